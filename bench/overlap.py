"""Does the driver keep the device busy? A stand-in device that takes a fixed time per frame.

No model and no GPU: a renderer injected through the API (``session.render(renderer=Device())``)
sleeps ``--ms`` milliseconds per frame of each batch (``time.sleep`` releases the GIL, as a GPU
kernel wait does) and returns real 512x512 RGB frames (the scene's init image with a little
per-frame grain, so PNG encoding costs what a rendered frame costs). Everything else is the real
run: batching, claims, PNG encoding, cache writes, progress. The device's busy fraction is the time
it spent sleeping over the time from the start of its first call to the end of its last (and,
second figure, to the moment the last frame was stored: that adds the one batch the writer stores
after the device is done).

The driver of a commit whose renderers return PNG bytes (before the writer thread) is measured too:
there the stand-in encodes each frame after its sleep, as that commit's renderer did in the
pipeline call's thread. Run it from that commit's checkout with this file copied in.

    python bench/overlap.py [--frames 96] [--batch 4] [--ms 50] [--quick]
"""

from __future__ import annotations

import sys
import time

import _common as c
import numpy as np
from PIL import Image

SCENE = """\
model: tiny
size: [512, 512]
steps: 2
frames: {frames}
noise: travel
outputs: []
keyframes:
  - {{frame: 0, prompt: "a dog", seed: 1}}
  - {{frame: {last}, prompt: "a cat", seed: 2}}
"""


def arg(name: str, default: float) -> float:
    args = sys.argv[1:]
    return float(args[args.index(name) + 1]) if name in args else default


def frames_like_renders(n: int = 8) -> list[np.ndarray]:
    """``n`` 512x512 frames: a landscape with per-frame grain; about 500 KiB as PNG, like a render."""
    base = np.asarray(
        Image.open(c.ROOT / "scenes" / "inputs" / "landscape.png").convert("RGB").resize((512, 512)),
        dtype=np.int16,
    )
    rng = np.random.default_rng(0)
    return [np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


class Device:
    """The stand-in device: ``ms`` per frame, without the GIL; frames as images (or PNG bytes for
    a driver from before the writer thread)."""

    encoded = 0

    def __init__(self, ms: float, frames: list[np.ndarray], pngs: bool) -> None:
        self.ms = ms
        self.frames = frames
        self.pngs = pngs
        self.busy = 0.0
        self.first: float | None = None
        self.last = 0.0
        self.calls = 0

    def render_batch(self, jobs: list) -> list:
        start = time.perf_counter()
        self.first = self.first if self.first is not None else start
        time.sleep(self.ms / 1000 * len(jobs))
        end = time.perf_counter()
        self.busy += end - start
        self.last = end
        self.calls += 1
        images = [Image.fromarray(self.frames[j.frame % len(self.frames)]) for j in jobs]
        if not self.pngs:
            return images
        import io

        out = []
        for image in images:  # what the renderer of that commit did after the pipeline call
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=1)
            out.append(buf.getvalue())
        self.last = time.perf_counter()
        return out


def main() -> None:
    frames = int(arg("--frames", 24 if c.quick() else 96))
    batch = int(arg("--batch", 4))
    ms = arg("--ms", 50.0)
    import pipeline
    import pipeline.render.loop

    # A driver that wants PNG bytes from the renderer has no encode_png (in render/batches.py since issue 9).
    driver = sys.modules.get("pipeline.render.batches", pipeline.render.loop)
    pngs = not hasattr(driver, "encode_png")
    c.header(
        f"overlap: stand-in device at {ms:g} ms/frame, {frames} frames of 512x512, batch {batch}, "
        f"renderer returns {'PNG bytes' if pngs else 'images'}"
    )
    images = frames_like_renders()
    rows = []
    with c.workdir() as d:
        for run in range(2 if c.quick() else 3):
            path = c.write_scene(d / f"r{run}", SCENE.format(frames=frames, last=frames - 1))
            session = pipeline.open(path, device="cpu", batch_size=batch, cache_dir=d / f"cache-{run}")
            session.plan()
            device = Device(ms, images, pngs)
            stored: list[float] = []

            def progress(event: object, stored: list[float] = stored) -> None:
                if getattr(event, "keys", ()):
                    stored.append(time.perf_counter())

            report = session.render(renderer=device, progress=progress)
            assert report.rendered == frames == len(stored), report
            span = device.last - device.first
            whole = stored[-1] - device.first
            rows.append(
                (
                    run + 1,
                    device.calls,
                    f"{device.busy:.2f}",
                    f"{span:.2f}",
                    f"{whole:.2f}",
                    f"{100 * device.busy / span:.1f}%",
                    f"{100 * device.busy / whole:.1f}%",
                    f"{frames / whole:.2f}",
                )
            )
    c.table(
        [
            "run",
            "calls",
            "device busy s",
            "first call to last return s",
            "first call to last frame stored s",
            "busy (to last return)",
            "busy (to last stored)",
            "frames/s (to last stored)",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
