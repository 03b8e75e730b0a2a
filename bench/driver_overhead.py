"""Render-loop overhead: ``Session.render`` with the model and the pixels stubbed out, for growing N.

Everything that the render does around the pipeline calls is timed (planning excluded): picking ready
frames, batching, claims, putting each frame into the frame cache, progress accounting. No model is
loaded: a stub renderer is injected through the API (``session.render(renderer=Stub())``) whose
``render_batch`` returns a fixed 100-byte payload per frame (PNG bytes pass through the writer thread
unencoded), so what is left is pure driver cost. With a loop that is linear in the number of frames, seconds/frame stays flat as N grows;
a loop that re-scans every remaining frame after each batch shows seconds/frame growing with N.

Scene: 3 keyframes, ``noise: travel``, N frames, fresh temporary cache per N, batch size 4 (the CPU
default), no outputs. One run per N (the stub makes runs deterministic apart from machine noise).

    python bench/driver_overhead.py [--quick]     # N = 250 ... 4000 (--quick: up to 1000)
"""

from __future__ import annotations

import _common as c

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
frames: {frames}
noise: travel
outputs: []
keyframes:
  - {{frame: 0, prompt: "a dog", seed: 1}}
  - {{frame: {mid}, prompt: "a fox", seed: 2}}
  - {{frame: {last}, prompt: "a cat", seed: 3}}
"""


class Stub:
    """A renderer with no model and no pixels: the driver's own cost is all that is timed."""

    encoded = 0

    def __init__(self) -> None:
        self.calls: list[int] = []

    def render_batch(self, batch: list) -> list[bytes]:
        self.calls.append(len(batch))
        return [b"\x89PNG-stub" + b"\0" * 91 for _ in batch]


def main() -> None:
    sizes = (250, 500, 1000) if c.quick() else (250, 500, 1000, 2000, 4000)
    c.header("driver_overhead: Session.render with an injected stub renderer, batch 4")
    import pipeline

    rows = []
    with c.workdir() as d:
        for n in sizes:
            path = c.write_scene(d / str(n), SCENE.format(frames=n, mid=n // 2, last=n - 1))
            session = pipeline.open(path, device="cpu", batch_size=4, cache_dir=d / f"cache-{n}")
            session.plan()  # planned before the timing, as before
            stub = Stub()
            t, report = c.timed(lambda: session.render(renderer=stub))
            assert report.rendered == n, report
            rows.append((n, len(stub.calls), t, 1000 * t / n))
    c.table(["frames", "batches", "render() s", "ms per frame"], rows)


if __name__ == "__main__":
    main()
