"""Animated GIFs with every frame kept: one palette fitted to all the frames (ffmpeg's
``palettegen``), frame 0 whole and each later frame as the rectangle that changed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import GifImagePlugin, Image

from pipeline.outputs import sequences
from pipeline.outputs.files import OutputError, atomic_output
from pipeline.outputs.sequences import as_rgb, check_fps, check_size, require_frames

__all__ = ["write_gif"]

log = logging.getLogger(__name__)

# GIF stores delays in centiseconds, and browsers replace delays under 2 cs with 10 cs (so a
# "faster" GIF plays 5x slower); 20 ms (50 fps) is therefore the fastest a GIF can really play.
_GIF_MIN_DELAY_MS = 20

# A GIF's one palette has 255 colours; index 255 marks a pixel that did not change (delta frames).
_GIF_COLOURS = 255
_GIF_TRANSPARENT = 255


def _gif_delay_ms(fps: float) -> int:
    # Round to the nearest centisecond (GIF's unit) instead of letting Pillow truncate: at 15 fps
    # that is 70 ms (14.3 fps) instead of 60 ms (16.7 fps).
    delay = round(100.0 / fps) * 10
    if delay < _GIF_MIN_DELAY_MS:
        log.warning("GIF cannot play at %.3g fps; using %d ms per frame (50 fps)", fps, _GIF_MIN_DELAY_MS)
        delay = _GIF_MIN_DELAY_MS
    return delay


def _gif_palette(frames: Sequence[Image.Image]) -> Image.Image:
    """One palette for the whole GIF, fitted to its frames by ffmpeg's ``palettegen``.

    Every pixel of every frame counts (``stats_mode=full``), the frames streamed into ffmpeg one at
    a time. 255 colours at most: index 255 is kept for "unchanged" in delta frames (see
    ``write_gif``). Returns a "P" image whose palette has exactly those colours (with fewer colours
    in the frames than that, each of them exactly), to map frames onto with :func:`_quantize`.
    """
    import subprocess

    import imageio_ffmpeg

    width, height = frames[0].size
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        *("-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-i", "-"),
        *("-vf", f"palettegen=max_colors={_GIF_COLOURS}:reserve_transparent=0:stats_mode=full"),
        *("-f", "image2", "-c:v", "png", "-"),
    ]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as ffmpeg:
        assert ffmpeg.stdin is not None and ffmpeg.stdout is not None and ffmpeg.stderr is not None
        # Read ffmpeg's output while feeding it, so neither side can block on a full pipe.
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(ffmpeg.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        try:
            for index in range(len(frames)):
                frame = frames[index]
                check_size(frame, index, (width, height))
                ffmpeg.stdin.write(as_rgb(frame).tobytes())
                del frame  # one decoded frame at a time
            ffmpeg.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg stopped early: its status and message say why
        except BaseException:
            # A frame that cannot be read (FrameMissing) or Ctrl-C: stop ffmpeg, or it would wait for
            # the rest of its input for ever and the reader with it.
            ffmpeg.kill()
            raise
        finally:
            with contextlib.suppress(OSError):
                ffmpeg.stdin.close()
            reader.join()
        errors = ffmpeg.stderr.read().decode(errors="replace").strip()
    if ffmpeg.returncode != 0 or not out or not out[0]:
        raise OutputError(f"ffmpeg could not choose a GIF palette: {errors or ffmpeg.returncode}")
    with Image.open(io.BytesIO(out[0])) as sheet:
        # palettegen writes a 16x16 sheet, padded past the colours it found: keep each colour once.
        colours = list(dict.fromkeys(sheet.convert("RGB").get_flattened_data()))[:_GIF_COLOURS]
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in colours for c in rgb])
    return palette


def _quantize(frame: Image.Image, palette: Image.Image) -> Image.Image:
    # Each pixel to its nearest palette colour, without dithering: dither noise differs from frame
    # to frame, so in an animation it crawls and shimmers, and it defeats the delta frames (a pixel
    # that keeps its colour costs nothing). Slight banding in gradients is the lesser evil.
    return as_rgb(frame).quantize(palette=palette, dither=Image.Dither.NONE)


def _delta(index: Any, previous: Any) -> tuple[tuple[int, int], Image.Image]:
    """Frame ``index`` (palette indices) as drawn over ``previous``: the rectangle that changed, with
    the pixels that did not as the transparent index, at its offset; a 1x1 transparent pixel when
    nothing changed (the frame is still there, with its delay)."""
    import numpy as np

    changed = index != previous
    if not changed.any():
        return (0, 0), Image.fromarray(np.full((1, 1), _GIF_TRANSPARENT, np.uint8), "P")
    rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    window = np.where(changed, index, _GIF_TRANSPARENT)[top:bottom, left:right].astype(np.uint8)
    return (int(left), int(top)), Image.fromarray(np.ascontiguousarray(window), "P")


def write_gif(
    path: Path,
    frames: Sequence[Image.Image],
    fps: float,
    *,
    loop: int | None = 0,
    rubber_band: bool = False,
) -> None:
    """Write an animated GIF with exactly one GIF frame per input frame, each with the same delay.

    ``loop`` follows Pillow: 0 loops forever, k > 0 is the NETSCAPE repeat count, None writes
    no loop block (plays once). ``rubber_band`` appends the way back (see ``sequences.rubber_band``).
    One palette fitted to all the frames (``_gif_palette``: ffmpeg's palettegen) is the global
    colour table; frame 0 is stored whole, every later frame as the rectangle that changed, with
    unchanged pixels transparent (disposal "leave in place"), so what is shown is exactly each
    frame mapped onto the palette. Frames are streamed twice (palette, then pixels), one held at a
    time, whatever the length.
    """
    import numpy as np

    base = frames
    if rubber_band:
        frames = sequences.rubber_band(frames)
    require_frames(frames, "write_gif")
    delay = _gif_delay_ms(check_fps(fps))
    # The palette from each distinct frame once: the way back of a rubber band repeats frames.
    palette = _gif_palette(base if rubber_band else frames)
    table = list(palette.getpalette() or [])
    table += [0] * (3 * 256 - len(table))  # a full 256-entry table; index 255 is "unchanged"

    # Why not `Image.save(save_all=True, append_images=...)`: Pillow's multi-frame writer
    # (GifImagePlugin._write_multiple_frames) drops any frame that is pixel-identical to the
    # previous one and adds its duration to the previous frame, with no option to turn that off.
    # The animation looks the same, but the frame count no longer matches the scene (held
    # frames, a paused section), which breaks frame-exact tooling and tests. Instead we write the
    # GIF stream ourselves with the module-level helpers Pillow keeps public for this ("legacy GIF
    # utilities"): `getheader` (header, global colour table, NETSCAPE loop block) and `getdata` (one
    # image block with its graphic control extension: delay, transparency, disposal), so every
    # frame is kept with its own delay. Should a Pillow release change them, the frame-count,
    # pixel and ffmpeg-decode tests in tests/test_assemble.py fail loudly. (ffmpeg could write the
    # whole GIF, but its muxer rounds each delay from timestamps: 7, 7, 6 cs at 15 fps.)
    with atomic_output(path) as tmp, open(tmp, "wb") as fp:
        size: tuple[int, int] | None = None
        previous: Any = None
        for index in range(len(frames)):
            frame = frames[index]
            size = check_size(frame, index, size)
            image = _quantize(frame, palette)
            del frame  # only the quantised copy is needed from here on: one decoded frame at a time
            pixels = np.asarray(image)
            params: dict[str, Any] = {"duration": delay, "disposal": 1}  # 1: leave it in place
            if previous is None:
                image.putpalette(table)
                info: dict[str, Any] = {"duration": delay}
                if loop is not None:
                    info["loop"] = int(loop)
                header, _ = GifImagePlugin.getheader(image, info=info)
                fp.writelines(header)
                fp.writelines(GifImagePlugin.getdata(image, (0, 0), **params))
            else:
                offset, window = _delta(pixels, previous)
                fp.writelines(GifImagePlugin.getdata(window, offset, transparency=_GIF_TRANSPARENT, **params))
            previous = pixels
        fp.write(b";")  # GIF trailer
