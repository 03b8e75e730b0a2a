"""GIF size against the MP4 of the same frames, and how far the GIF's pixels are from the frames.

``scenes/dog_cat.yaml`` (64 frames, 64x64, the random-weight ``tiny`` model, 8 steps) is rendered
once into a cache (``--cache-dir``, default a temporary one; pass the same folder again to skip the
render). Then, from those cached frames, with the writers of ``pipeline.outputs.writers``:

- the MP4 (as the scene writes it), a plain GIF of the 64 frames, and the scene's rubber-band GIF
  (64 + 61 frames), each written 3 times (median seconds);
- the GIF's frames decoded again (Pillow) and compared with the frames: mean and largest absolute
  difference per channel (0-255), and whether every frame and its delay survived.

    .venv/bin/python bench/gif_size.py [--cache-dir DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import _common as c
import numpy as np
from PIL import Image

import pipeline
from pipeline.outputs.writers import write_gif, write_mp4


def _arg(name: str) -> str | None:
    args = sys.argv[1:]
    return args[args.index(name) + 1] if name in args else None


def _timed(fn: object, n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return c.median(times)


def main() -> None:
    c.threads()
    c.header("gif_size: scenes/dog_cat.yaml (64 frames, 64x64, tiny, 8 steps), GIF vs MP4")
    with c.workdir() as d:
        cache = Path(_arg("--cache-dir") or d / "cache")
        session = pipeline.open(c.ROOT / "scenes" / "dog_cat.yaml", cache_dir=cache, out_dir=d / "out")
        report = session.render()
        print(f"render: {report.rendered} rendered, {report.cached} cached")
        frames = session.frames()
        mp4, gif, band = d / "a.mp4", d / "a.gif", d / "band.gif"
        rows = []
        t_mp4 = _timed(lambda: write_mp4(mp4, frames, 12))
        t_gif = _timed(lambda: write_gif(gif, frames, 12))
        t_band = _timed(lambda: write_gif(band, frames, 12, rubber_band=True))
        size_mp4 = mp4.stat().st_size
        for name, path, t in (("MP4", mp4, t_mp4), ("GIF", gif, t_gif), ("GIF, rubber band", band, t_band)):
            size = path.stat().st_size
            rows.append((name, f"{size:,}", f"{size / size_mp4:.1f}x", f"{t:.3f}"))
        c.table(["output", "bytes", "vs MP4", "seconds (median of 3)"], rows)

        with Image.open(gif) as image:
            count, delays, errors = image.n_frames, set(), []
            for i in range(count):
                image.seek(i)
                delays.add(image.info.get("duration"))
                decoded = np.asarray(image.convert("RGB"), dtype=np.int16)
                errors.append(np.abs(decoded - np.asarray(frames[i], dtype=np.int16)))
        err = np.stack(errors)
        print(
            f"GIF: {count} frames (of {len(frames)}), delays {sorted(delays)} ms, "
            f"mean |difference| {err.mean():.2f}, largest {err.max()} (0-255)"
        )


if __name__ == "__main__":
    main()
