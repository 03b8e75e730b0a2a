"""Render-loop overhead: ``pipeline.run.run`` with the model and the pixels stubbed out, for growing N.

Everything that ``run`` does around the pipeline calls is timed (planning excluded): picking ready
frames, batching, claims, putting each frame into the frame cache, progress accounting. The model
load is replaced by ``None`` (``load_pipeline`` and ``configure`` patched) and
``FrameRenderer.render_batch`` returns a fixed 100-byte payload per frame, so what is left is pure
driver cost. With a loop that is linear in the number of frames, seconds/frame stays flat as N grows;
a loop that re-scans every remaining frame after each batch shows seconds/frame growing with N.

Scene: 3 keyframes, ``noise: travel``, N frames, fresh temporary cache per N, batch size 4 (the CPU
default), no outputs. One run per N (the stub makes runs deterministic apart from machine noise).

    /work/venv/bin/python bench/driver_overhead.py [--quick]     # N = 250 ... 4000 (--quick: up to 1000)
"""

from __future__ import annotations

import _common as c

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
frames: {frames}
noise: travel
keyframes:
  - {{frame: 0, prompt: "a dog", seed: 1}}
  - {{frame: {mid}, prompt: "a fox", seed: 2}}
  - {{frame: {last}, prompt: "a cat", seed: 3}}
"""


def main() -> None:
    sizes = (250, 500, 1000) if c.quick() else (250, 500, 1000, 2000, 4000)
    c.header("driver_overhead: pipeline.run.run with stubbed model and pixels, batch 4")
    import pipeline.models
    import pipeline.renderer
    from pipeline.cache import CacheDir
    from pipeline.environment import resolve_env
    from pipeline.models import resolve_model
    from pipeline.planner import plan
    from pipeline.run import run
    from pipeline.scene import load_scene

    pipeline.models.load_pipeline = lambda *a, **k: None
    pipeline.renderer.configure = lambda pipe, scene: pipe
    calls = []

    def render_batch(self, batch):
        calls.append(len(batch))
        return [b"\x89PNG-stub" + b"\0" * 91 for _ in batch]

    pipeline.renderer.FrameRenderer.render_batch = render_batch
    rows = []
    with c.workdir() as d:
        for n in sizes:
            scene = load_scene(c.write_scene(d / str(n), SCENE.format(frames=n, mid=n // 2, last=n - 1)))
            env = resolve_env(scene, device="cpu")
            ref = resolve_model(scene.model, scene.base_dir)
            p = plan(scene, env)
            calls.clear()
            with CacheDir(d / f"cache-{n}") as cache:
                t, result = c.timed(
                    lambda: run(scene, env, ref, p, cache, set(), [], batch_size=4, quiet=True)
                )
            assert result["rendered"] == n, result
            rows.append((n, len(calls), t, 1000 * t / n))
    c.table(["frames", "batches", "run() s", "ms per frame"], rows)


if __name__ == "__main__":
    main()
