"""Render throughput: our batched renderer against the naive loop of peer tools, same model, same run.

Scene: a 2-keyframe prompt morph (linear slerp, ``noise: fixed`` seed 42, guidance 7, empty negative
prompt), tiny model, 8 steps, N frames (32; 16 with ``--quick``), at 64x64 and 256x256, float32 on CPU.

- naive: ONE frame per pipeline call, prompts RE-ENCODED for every frame: ``pipe.encode_prompt`` of
  both keyframe prompts and of the negative prompt, ``slerp``, then ``pipe(prompt_embeds=...,
  negative_prompt_embeds=..., latents=..., num_inference_steps=8, guidance_scale=7, height, width)``,
  and the frame encoded to PNG (peer tools save every frame too).
- ours: ``plan`` + ``pipeline.render.loop.run(scene, env, ref, plan, cache, cached=set(), targets=[],
  batch_size=B)``: the project's own driver (``FrameRenderer`` batches, each frame put into the frame
  cache as it finishes), from an EMPTY temporary cache dir (so the two prompt embeddings and the
  negative one are encoded once and stored), batch sizes 1, 4 and 8. No outputs are written.
- ours, warm: the same against that now full cache (``cached = cache.frames.present(keys)``):
  0 frames rendered.

The pipeline is loaded ONCE per size, outside every timing (model load is excluded from both naive
and ours; its time is printed apart: ``pipeline.render.models.load_pipeline`` is patched to return that
pipeline), and one untimed warm-up call is made first. Each round runs
naive, ours b=1, b=4, b=8 (and warm) back to back; the table shows the median over the rounds
(3; 1 with ``--quick``) of frames per second, and ours/naive as the ratio of those medians. The last
column is the max absolute pixel difference between ours and naive on the last frame (a check that
both render the same thing).

Torch runs with ONE intra-op thread (``--threads N`` to change; see ``_common.threads``): on the
shared 2-core machine the default two OpenMP threads made single calls swing from 0.06 s to 18 s.

    /work/venv/bin/python bench/render_throughput.py [--quick] [--threads N]
"""

from __future__ import annotations

import io

import _common as c
import numpy as np

SCENE = """\
model: tiny
size: [{size}, {size}]
steps: {steps}
guidance: 7.0
seed: 42
noise: fixed
interpolation: slerp
outputs: []
keyframes:
  - frame: 0
    prompt: "{a}"
  - frame: {last}
    prompt: "{b}"
"""
A = "A cute dog in a beautiful field of lavender flowers, perfect lighting, film grain"
B = "A cute cat in a beautiful field of lavender flowers, perfect lighting, film grain"
STEPS = 8
BATCHES = (1, 4, 8)


def naive(pipe, torch, slerp, encode_png, n: int, size: int) -> list[bytes]:
    """The peer-tool loop: everything recomputed for every frame, one frame per call."""
    pngs = []
    for i in range(n):
        t = i / (n - 1)
        with torch.no_grad():
            ea, _ = pipe.encode_prompt(A, "cpu", 1, False)
            eb, _ = pipe.encode_prompt(B, "cpu", 1, False)
            en, _ = pipe.encode_prompt("", "cpu", 1, False)
        gen = torch.Generator("cpu").manual_seed(42)
        latents = torch.randn((1, 4, size // 8, size // 8), generator=gen, dtype=torch.float32)
        image = pipe(
            prompt_embeds=slerp(ea, eb, t),
            negative_prompt_embeds=en,
            latents=latents,
            num_inference_steps=STEPS,
            guidance_scale=7.0,
            height=size,
            width=size,
        ).images[0]
        pngs.append(encode_png(image))
    return pngs


def ours(path, pipe, cache_dir, batch: int, cold: bool) -> tuple[int, list[bytes]]:
    """The project's own driver through the public API (no outputs): cold from an empty cache, or warm
    against a full one.

    The pipeline loaded once up front is injected as the renderer (``render(renderer=...)``), so the
    model load is outside the timing; everything else is ``Session.render``, whatever it does.
    Returns (frames rendered, the PNG of every frame).
    """
    import pipeline
    from pipeline.render.renderer import FrameRenderer
    from pipeline.store.cache import CacheDir

    session = pipeline.open(path, device="cpu", batch_size=batch, cache_dir=cache_dir)
    report = session.render(
        renderer=lambda setup: FrameRenderer(
            pipe, setup.scene, setup.plan, setup.cache, device="cpu", dtype="float32"
        )
    )
    if cold:
        assert report.embeddings_encoded == 3, report  # two prompts and the negative, once each
    with CacheDir(cache_dir) as cache:
        return report.rendered, [cache.frames.get(j.key) for j in session.plan()]


def pixels(png: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def main() -> None:
    n = 16 if c.quick() else 32
    rounds = 1 if c.quick() else 3
    c.threads()  # before torch is imported: OMP_NUM_THREADS; again after: set_num_threads
    c.header(f"render_throughput: {n} frames, {STEPS} steps, tiny model, CPU float32, {rounds} round(s)")
    import torch

    c.threads()
    from pipeline.render.batches import encode_png
    from pipeline.render.interpolate import slerp
    from pipeline.render.models import load_pipeline, resolve_model
    from pipeline.render.renderer import configure
    from pipeline.scene.load import load_scene

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with c.workdir() as d:
        for size in (64, 256):
            path = c.write_scene(d / f"s{size}", SCENE.format(size=size, steps=STEPS, last=n - 1, a=A, b=B))
            scene = load_scene(path)
            ref = resolve_model(scene.model, scene.base_dir)
            t_load, pipe = c.timed(
                lambda: configure(load_pipeline(ref, device="cpu", dtype="float32"), scene)
            )
            print(f"# {size}x{size}: model load {t_load:.2f} s (excluded from every timing below)")
            naive(pipe, torch, slerp, encode_png, 2, size)  # untimed warm-up
            fps: dict[str, list[float]] = {}
            diff: dict[str, int] = {}
            for r in range(rounds):
                t, ref_pngs = c.timed(lambda: naive(pipe, torch, slerp, encode_png, n, size))
                fps.setdefault("naive (1 frame/call, re-encode)", []).append(n / t)
                for b in BATCHES:
                    cache_dir = d / f"cache-{size}-{b}-{r}"
                    t, (rendered, pngs) = c.timed(lambda: ours(path, pipe, cache_dir, b, cold=True))
                    assert rendered == n, rendered
                    name = f"ours, cold, batch {b}"
                    fps.setdefault(name, []).append(n / t)
                    diff[name] = int(np.abs(pixels(pngs[-1]) - pixels(ref_pngs[-1])).max())
                    if b == BATCHES[-1]:
                        t, (rendered, _) = c.timed(lambda: ours(path, pipe, cache_dir, b, cold=False))
                        assert rendered == 0, rendered
                        fps.setdefault("ours, warm re-run (0 rendered)", []).append(n / t)
            base = c.median(fps["naive (1 frame/call, re-encode)"])
            for name, xs in fps.items():
                med = c.median(xs)
                rows.append((f"{size}x{size}", name, med, n / med, med / base, diff.get(name, "-")))
    c.table(["size", "renderer", "frames/s (median)", f"s per {n} frames", "ours/naive", "max px diff"], rows)


if __name__ == "__main__":
    main()
