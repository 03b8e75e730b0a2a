"""Writing rendered frames as output files (MP4, GIF, PNG frames, contact sheet), atomically.

Every writer takes ``frames`` as a ``Sequence`` of RGB ``PIL.Image.Image`` and only indexes it, in
order, once (``pipeline.outputs.sequences``): a 1,000-frame MP4 or GIF streams through with a couple
of frames in memory. Every file is written under a temporary name and renamed into place when
complete (``pipeline.outputs.files.atomic_output``), so a failed run leaves the previous output intact::

    from pathlib import Path
    from pipeline.outputs.kinds import kind_for_path
    from pipeline.outputs.writers import write_output

    out = Path("renders/dog_cat.gif")
    write_output(kind_for_path(str(out)), out, frames, fps=12, rubber_band=True)

This module never imports torch, and imports imageio (slow) only when an MP4 is written.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.audio.mux import mux
from pipeline.outputs.files import FRAME_RE, OutputError, atomic_output, clean_partials
from pipeline.outputs.gif import write_gif
from pipeline.outputs.kinds import OUTPUT_KINDS
from pipeline.outputs.sequences import (
    as_rgb,
    check_fps,
    check_size,
    iter_frames,
    require_frames,
    rubber_band,
)

__all__ = ["write_gif", "write_grid", "write_mp4", "write_output", "write_png_frames"]


def write_mp4(
    path: Path,
    frames: Sequence[Image.Image],
    fps: float,
    *,
    quality: int = 8,
    comment: str | None = None,
    audio: Mapping[str, Any] | None = None,
    audio_file: Path | None = None,
) -> None:
    """Write an H.264 (libx264, yuv420p) MP4, streaming one frame at a time into ffmpeg.

    ``comment`` goes into the file's metadata (``ffprobe`` shows it as ``comment``; players list it).
    ``audio_file``: a soundtrack from ``audio["start"]`` seconds, cut to the video (``pipeline.audio.mux``).

    ``quality`` is imageio's 1-10 scale (10 best; 8 is CRF 10, visually lossless for typical
    renders). Width and height must be even (yuv420p halves the chroma planes); frames are never
    resized. Raises ValueError for no frames, bad fps/quality, or odd or mismatched sizes.
    """
    require_frames(frames, "write_mp4")
    fps = check_fps(fps)
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not 1 <= quality <= 10:
        # imageio-ffmpeg checks this with an assert, which vanishes under `python -O`.
        raise ValueError(f"quality must be between 1 and 10, got {quality!r}")

    # Lazy: imageio pulls in its plugin machinery, which costs every CLI call that writes no MP4.
    import imageio.v2 as iio
    import numpy as np

    with atomic_output(path) as tmp:
        size: tuple[int, int] | None = None
        writer = iio.get_writer(
            tmp,
            format="FFMPEG",
            fps=fps,
            codec="libx264",
            quality=quality,
            pixelformat="yuv420p",
            # 1 disables imageio's "round up to the macro block" rescale: a size that the codec
            # cannot take is an error we raise below, never a silently stretched video.
            macro_block_size=1,
            ffmpeg_log_level="error",
            # Moves the index to the front so browsers can start playing before the download ends.
            output_params=["-movflags", "+faststart", *_metadata(comment)],
        )
        try:
            for index, frame in enumerate(iter_frames(frames)):
                if size is None and (frame.width % 2 or frame.height % 2):
                    raise ValueError(
                        f"MP4 (H.264, yuv420p) needs an even width and height, got "
                        f"{frame.width}x{frame.height}; Stable Diffusion sizes are multiples of 8"
                    )
                size = check_size(frame, index, size)
                writer.append_data(np.asarray(as_rgb(frame)))
        except BaseException:
            # Not `with writer:` - imageio's __exit__ skips close() when an exception is in
            # flight, leaving ffmpeg to finish (and write the temp file) at garbage collection,
            # after atomic_output has already deleted it. Stop ffmpeg now; an error while closing
            # must not hide the original one.
            with contextlib.suppress(Exception):
                writer.close()
            raise
        writer.close()
        if audio_file is not None:
            mux(
                tmp, Path(audio_file), start=float((audio or {}).get("start", 0.0)), seconds=len(frames) / fps
            )
        # imageio-ffmpeg does not check ffmpeg's exit status (a full disk truncates the file and only
        # prints a message): read the file back and count its frames before it may replace the old one.
        _check_mp4(tmp, path, len(frames))


def _metadata(comment: str | None) -> list[str]:
    # One argument, never parsed by a shell; ffmpeg's own "-metadata key=value" takes the text after
    # the first "=" as it is. Line breaks are kept out: some players show only the first line.
    if not comment:
        return []
    return ["-metadata", "comment=" + " ".join(comment.split())]


def _check_mp4(tmp: Path, path: Path, expected: int) -> None:
    import imageio_ffmpeg

    free = shutil.disk_usage(tmp.parent).free
    why = (
        f"No space left on device: {free} bytes free"
        if free < 1 << 20
        else "is the disk full? see ffmpeg's messages above"
    )
    if not tmp.exists() or tmp.stat().st_size == 0:
        raise OutputError(f"ffmpeg produced no output for {path.name} ({why})")
    try:
        frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(tmp))
    except Exception:  # ffmpeg cannot read it back: truncated or damaged
        raise OutputError(f"ffmpeg wrote a broken {path.name} ({why})") from None
    if frames != expected:
        raise OutputError(f"ffmpeg wrote {frames} of {expected} frames of {path.name} ({why})")


def write_png_frames(
    directory: Path,
    frames: Sequence[Image.Image],
    *,
    start: int = 0,
    texts: Sequence[dict[str, str]] | None = None,
) -> list[Path]:
    """Write ``frame_{start:05d}.png``, ``frame_{start+1:05d}.png``, ... into ``directory``.

    ``texts[i]``, when given, are frame i's PNG text chunks (``tEXt``, or ``iTXt`` for text that
    Latin-1 cannot hold), as image viewers and ComfyUI-style tools read them.

    Each file is written atomically. Afterwards, ``frame_*.png`` files numbered at or beyond
    ``start + len(frames)`` are removed, so a scene that got shorter leaves no stale frames
    (files below ``start`` are left alone: a caller writing from ``start`` owns only the rest).
    Returns the written paths in order.
    """
    n = require_frames(frames, "write_png_frames")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if texts is not None and len(texts) != n:
        raise ValueError(f"write_png_frames: {len(texts)} texts for {n} frames")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for offset, frame in enumerate(iter_frames(frames)):
        target = directory / f"frame_{start + offset:05d}.png"
        options: dict[str, Any] = {}
        if texts is not None:
            options["pnginfo"] = _png_info(texts[offset])
        with atomic_output(target) as tmp:
            frame.save(tmp, format="PNG", **options)
        written.append(target)
    end = start + n
    for entry in directory.iterdir():
        match = FRAME_RE.fullmatch(entry.name)
        if match is not None and int(match["index"]) >= end and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    return written


def _png_info(texts: dict[str, str]) -> Any:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in texts.items():
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            info.add_itxt(key, value)  # UTF-8: prompts in any script
        else:
            info.add_text(key, value)
    return info


def write_grid(
    path: Path,
    frames: Sequence[Image.Image],
    cols: int,
    rows: int | None = None,
    *,
    gap: int = 0,
    background: tuple[int, int, int] = (0, 0, 0),
) -> None:
    """Write a contact sheet: frame i at row ``i // cols``, column ``i % cols``.

    ``rows`` defaults to ``ceil(n / cols)``; too few rows for the frames is an error rather
    than silently dropping frames. ``gap`` pixels of ``background`` separate the cells (and
    fill unused cells). The format follows the suffix (.png, or .jpg at quality 95).
    """
    n = require_frames(frames, "write_grid")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    if rows is None:
        rows = math.ceil(n / cols)
    if rows < 1 or rows * cols < n:
        raise ValueError(f"a {cols}x{rows} grid has room for {cols * rows} frames, but there are {n}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")

    sheet: Image.Image | None = None
    size: tuple[int, int] | None = None
    for index, frame in enumerate(iter_frames(frames)):
        size = check_size(frame, index, size)
        w, h = size
        if sheet is None:
            sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), background)
        row, col = divmod(index, cols)
        sheet.paste(as_rgb(frame), (col * (w + gap), row * (h + gap)))
    assert sheet is not None  # n >= 1
    options: dict[str, Any] = {}
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        options["quality"] = 95  # Pillow's default of 75 visibly smears fine SD detail
    with atomic_output(path) as tmp:
        sheet.save(tmp, **options)


def write_output(
    kind: str, path: Path, frames: Sequence[Image.Image], *, clean_first: bool = True, **settings: Any
) -> None:
    """Write ``frames`` as ``kind`` (one of ``OUTPUT_KINDS``) to ``path``.

    ``settings`` are the keyword arguments of the matching writer (``fps``, ``quality`` and
    ``comment`` for mp4; ``fps`` and ``loop`` for gif; ``start`` and ``texts`` for frames; ``cols``, ``rows``, ``gap``,
    ``background`` for grid). Two are accepted for every kind, so a caller can pass one set of
    scene settings: ``rubber_band`` (bool, applied to the frames before writing) and ``fps``
    (ignored by frames and grid). Unknown settings raise TypeError. Partial files left in the
    target directory by dead runs are cleaned first, unless ``clean_first`` is False (the caller
    cleaned the folder already: ``pipeline.outputs.assemble`` cleans each folder once per run).
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; allowed kinds: {', '.join(OUTPUT_KINDS)}")
    path = Path(path)
    settings = dict(settings)
    if settings.pop("rubber_band", False):
        frames = rubber_band(frames)
    fps = settings.pop("fps", None)
    if kind in ("mp4", "gif") and fps is None:
        raise TypeError(f"write_output: {kind} needs an fps setting")

    if clean_first:
        clean_partials(partials_folder(kind, path))
    if kind == "mp4":
        write_mp4(path, frames, fps, **settings)
    elif kind == "gif":
        write_gif(path, frames, fps, **settings)
    elif kind == "frames":
        write_png_frames(path, frames, **settings)
    else:
        if "cols" not in settings:
            raise TypeError("write_output: grid needs a cols setting")
        write_grid(path, frames, **settings)


def partials_folder(kind: str, path: Path) -> Path:
    """The folder where writing a ``kind`` output to ``path`` puts its temporary files."""
    return path if kind == "frames" else path.parent
