"""Assembling rendered frames into output files (MP4, GIF, PNG frames, contact sheet), atomically.

Every writer takes ``frames`` as a ``Sequence`` of RGB ``PIL.Image.Image`` and only indexes it,
in order, once: the renderer may hand over a lazy sequence that decodes each frame from the cache
on access, so a 1,000-frame MP4 or GIF streams through with a couple of frames in memory.

Every file is written to a hidden temporary name in the same directory and renamed onto the
final path only when it is complete (``atomic_output``), so an interrupted or failed run never
leaves a truncated file behind and the previous output stays intact::

    from pathlib import Path
    from pipeline.outputs.assemble import kind_for_path, write_output

    out = Path("renders/dog_cat.gif")
    write_output(kind_for_path(str(out)), out, frames, fps=12, rubber_band=True)

This module never imports torch, and imports imageio (slow) only when an MP4 is written.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import re
import secrets
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

from PIL import GifImagePlugin, Image

from pipeline.audio.mux import mux

__all__ = [
    "OUTPUT_KINDS",
    "atomic_output",
    "clean_partials",
    "is_frame_file",
    "kind_for_path",
    "name_length_problem",
    "rubber_band",
    "write_gif",
    "write_grid",
    "write_mp4",
    "write_output",
    "write_png_frames",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

OUTPUT_KINDS: tuple[str, ...] = ("mp4", "gif", "frames", "grid")

_SUFFIX_KINDS = {".mp4": "mp4", ".gif": "gif", ".png": "grid", ".jpg": "grid", ".jpeg": "grid"}

# `.{name}.partial-{pid}-{token}{suffix}`: the greedy `.+` backtracks to the last ".partial-", so
# names that themselves contain ".partial-" still parse; the pid is what clean_partials checks.
_PARTIAL_RE = re.compile(r"\..+\.partial-(?P<pid>\d+)-[0-9a-f]+(?:\.[^.]+)?")
_FRAME_RE = re.compile(r"frame_(?P<index>\d+)\.png")

# GIF stores delays in centiseconds, and browsers replace delays under 2 cs with 10 cs (so a
# "faster" GIF plays 5x slower); 20 ms (50 fps) is therefore the fastest a GIF can really play.
_GIF_MIN_DELAY_MS = 20

# A GIF's one palette has 255 colours; index 255 marks a pixel that did not change (delta frames).
_GIF_COLOURS = 255
_GIF_TRANSPARENT = 255


# --------------------------------------------------------------------------------------------
# Atomic files


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary file is ``.{name}.partial-{pid}-{random}{suffix}`` in the same directory: the
    same directory so that ``os.replace`` is an atomic rename on one filesystem, the real suffix
    so that writers choosing a format by extension (Pillow, ffmpeg) still do. The body must
    create the file. On success it is fsynced, renamed, and the directory fsynced, so after a
    crash either the old or the new file is there, complete. On any exception, including
    KeyboardInterrupt, the temporary file is deleted and the exception re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_partial_name(path.name, str(os.getpid()), secrets.token_hex(_TOKEN_BYTES)))
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        # BaseException on purpose: Ctrl-C mid-render must not leave a partial file around.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


_TOKEN_BYTES = 4
# The longest pid a temporary name can carry: pids are 32-bit numbers (Linux caps them at 2**22, but
# the check must not depend on which pid a later run gets).
_PID_DIGITS = len(str(2**32))


def _partial_name(name: str, pid: str, token: str) -> str:
    return f".{name}.partial-{pid}-{token}{Path(name).suffix}"


def name_length_problem(
    path: Path, kind: str, frames: int = 1, *, limits: dict[str, tuple[str, int, int]] | None = None
) -> str | None:
    """Why ``path`` cannot be written as a ``kind`` output for its length alone, or None if it can.

    Checked before rendering, since the file system refuses a long name only when the output is
    written, after every frame has rendered. Each folder still to be made and the file's own name,
    once ``atomic_output`` has added its temporary prefix and suffix (with the longest possible
    pid), must fit NAME_MAX, and the whole temporary path PATH_MAX; both are asked of the nearest
    folder that exists (a folder made inside it is on the same file system), 255 and 4096 where it
    cannot say. A frames folder's files are ``frame_NNNNN.png`` inside it, for ``frames`` frames.
    ``limits`` memoises the folder look-ups over many paths (one dict per check of a scene).
    """
    path_text = os.fspath(path)
    file = os.path.join(path_text, f"frame_{max(frames - 1, 0):05d}.png") if kind == "frames" else path_text
    parent, name = os.path.split(file)
    existing, name_max, path_max = _limits(parent, {} if limits is None else limits)
    for component in [*parent[len(existing) :].split(os.sep), name]:
        if component and _name_units(component) > name_max:
            return f"'{_shorten(component)}' is {_name_units(component)} bytes long; this file system allows {name_max} per name"
    partial = _partial_name(name, "9" * _PID_DIGITS, "f" * 2 * _TOKEN_BYTES)
    if _name_units(partial) > name_max:
        extra = _name_units(partial) - _name_units(name)
        return (
            f"'{_shorten(name)}' is {_name_units(name)} bytes long, and {extra} more while it is written "
            f"(a temporary name beside it); this file system allows {name_max} per name, so at most "
            f"{name_max - extra} for this name"
        )
    full = _name_units(os.path.join(parent, partial))
    if full >= path_max:  # PATH_MAX counts the terminating NUL
        return (
            f"its full path is {full} bytes long while it is written; this file system allows {path_max - 1}"
        )
    return None


def _name_units(name: str) -> int:
    # What the limits count: bytes on POSIX, UTF-16 code units on Windows.
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        return len(name.encode("utf-16-le", "surrogatepass")) // 2
    return len(os.fsencode(name))


def _shorten(name: str, keep: int = 30) -> str:
    return name if len(name) <= 2 * keep + 3 else f"{name[:keep]}...{name[-keep:]}"


def _limits(folder: str, memo: dict[str, tuple[str, int, int]]) -> tuple[str, int, int]:
    """(nearest existing folder of ``folder``, its NAME_MAX, its PATH_MAX); 255 and 4096 where unknown."""
    if folder in memo:
        return memo[folder]
    found: tuple[str, int, int]
    try:
        found = (folder, _pathconf(folder, "PC_NAME_MAX", 255), _pathconf(folder, "PC_PATH_MAX", 4096))
    except (FileNotFoundError, NotADirectoryError):
        up = os.path.dirname(folder)
        found = (folder, 255, 4096) if up == folder else _limits(up, memo)
    except OSError as exc:
        # A name too long to look up has its parent looked up instead; anything else (no permission
        # to search the folder, say) is left to the write itself, under the usual limits.
        long = exc.errno == errno.ENAMETOOLONG
        found = _limits(os.path.dirname(folder), memo) if long else (folder, 255, 4096)
    memo[folder] = found
    return found


def _pathconf(folder: str, name: str, default: int) -> int:
    """``os.pathconf``, or ``default`` where the system cannot say; raises OSError if ``folder`` is not there."""
    try:
        value = os.pathconf(folder, name)
    except (ValueError, AttributeError):  # a name the system does not know; no pathconf (Windows)
        return default
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return default
        raise
    return value if value and value > 0 else default


def _fsync_path(path: Path) -> None:
    # Writers (ffmpeg, Pillow) write by name and close the file themselves, so flush what the OS
    # holds by reopening it; without this a power cut after the rename can leave an empty file.
    # O_RDWR rather than O_RDONLY because fsync on a read-only handle fails on Windows.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Directories cannot be opened on Windows; there the
    # rename is as durable as the filesystem makes it, which is the best we can do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def clean_partials(directory: Path) -> list[Path]:
    """Remove leftover ``.*.partial-{pid}-*`` files in ``directory`` whose process is gone.

    A killed run (SIGKILL, power cut) cannot clean up after itself; its temporary files are
    removed here. Files whose pid is a live process are kept, because they may belong to a
    renderer writing into the same directory right now. (A recycled pid only makes this keep a
    stale file a little longer; pids from another machine on a shared filesystem are not told
    apart.) Returns the removed paths; a missing directory yields ``[]``.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _PARTIAL_RE.fullmatch(entry.name)
        if match is None or entry.is_dir() or _pid_alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            # Another process cleaning the same directory got there first.
            continue
        removed.append(entry)
    return removed


def is_frame_file(name: str) -> bool:
    """Whether ``name`` is one of the ``frame_NNNNN.png`` files a frames output consists of."""
    return _FRAME_RE.fullmatch(name) is not None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; when unsure, say yes (keeping a file is safe)."""
    if pid <= 0:
        # We never write such pids, and os.kill(0, ...) would signal our own process group.
        return False
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:
        # PermissionError: it exists but belongs to another user.
        return True
    return True


def _pid_alive_windows(pid: int) -> bool:  # pragma: no cover - exercised on Windows only
    # os.kill(pid, 0) on Windows sends CTRL_C_EVENT instead of probing, so ask the kernel.
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    process_query_limited_information = 0x1000
    still_active = 259
    error_access_denied = 5
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return kernel32.GetLastError() == error_access_denied
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


# --------------------------------------------------------------------------------------------
# Frame sequences


class _IndexedView(Sequence[T]):
    """``base[indices[i]]`` on access: a reordered sequence that decodes nothing up front."""

    def __init__(self, base: Sequence[T], indices: Sequence[int]) -> None:
        self._base = base
        self._indices = list(indices)

    def __len__(self) -> int:
        return len(self._indices)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> _IndexedView[T]: ...

    def __getitem__(self, index: int | slice) -> T | _IndexedView[T]:
        if isinstance(index, slice):
            return _IndexedView(self._base, self._indices[index])
        return self._base[self._indices[index]]

    def __repr__(self) -> str:
        return f"_IndexedView(len={len(self)}, indices={self._indices[:8]}{'...' if len(self) > 8 else ''})"


def rubber_band(frames: Sequence[T]) -> Sequence[T]:
    """Play the frames forward, then back: ``frames + frames[2:-1][::-1]``.

    This is exactly the formula of the seed document (the Keras latent-walk example), kept
    as-is so outputs match it: n frames become ``n + max(n - 3, 0)``. Note what it does at the
    ends: the last frame is not repeated at the turn (good), but the way back stops at frame 2,
    skipping frame 1, so when the GIF loops the seam goes from frame 2 straight to frame 0.
    For n = 6: 0 1 2 3 4 5 4 3 2 | 0 1 ...

    A list or tuple gives a list (it holds references, not copies). Any other sequence, e.g. a
    lazy one that decodes on access, gives an index-mapped view, so nothing is decoded here and
    each frame is decoded again when the way back reaches it.
    """
    if isinstance(frames, (list, tuple)):
        items = list(frames)
        return items + items[2:-1][::-1]
    n = len(frames)
    indices = list(range(n))
    return _IndexedView(frames, indices + indices[2:-1][::-1])


# `write_gif` has a keyword argument named `rubber_band`, which shadows the function inside it.
_rubber_band = rubber_band


def _iter_frames(frames: Sequence[Image.Image]) -> Iterator[Image.Image]:
    # Index rather than iterate: a lazy sequence need only define __len__ and __getitem__, and
    # yielding `frames[i]` directly (no local variable) keeps no reference to the frame here.
    for i in range(len(frames)):
        yield frames[i]


def _require_frames(frames: Sequence[Image.Image], what: str) -> int:
    n = len(frames)
    if n == 0:
        raise ValueError(f"{what}: no frames to write")
    return n


def _check_fps(fps: float) -> float:
    fps = float(fps)
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return fps


def _as_rgb(frame: Image.Image) -> Image.Image:
    return frame if frame.mode == "RGB" else frame.convert("RGB")


def _check_size(frame: Image.Image, index: int, expected: tuple[int, int] | None) -> tuple[int, int]:
    # Encoders would either fail obscurely or (imageio) rescale; every frame must match frame 0.
    if expected is not None and frame.size != expected:
        raise ValueError(
            f"frame {index} is {frame.size[0]}x{frame.size[1]}, "
            f"but frame 0 is {expected[0]}x{expected[1]}; all frames must have the same size"
        )
    return frame.size


# --------------------------------------------------------------------------------------------
# Writers


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
    _require_frames(frames, "write_mp4")
    fps = _check_fps(fps)
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
            for index, frame in enumerate(_iter_frames(frames)):
                if size is None and (frame.width % 2 or frame.height % 2):
                    raise ValueError(
                        f"MP4 (H.264, yuv420p) needs an even width and height, got "
                        f"{frame.width}x{frame.height}; Stable Diffusion sizes are multiples of 8"
                    )
                size = _check_size(frame, index, size)
                writer.append_data(np.asarray(_as_rgb(frame)))
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


class OutputError(OSError):
    """An output file could not be written completely (the old one, if any, is kept)."""


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
                _check_size(frame, index, (width, height))
                ffmpeg.stdin.write(_as_rgb(frame).tobytes())
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
    return _as_rgb(frame).quantize(palette=palette, dither=Image.Dither.NONE)


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
    no loop block (plays once). ``rubber_band`` appends the way back (see ``rubber_band()``).
    One palette fitted to all the frames (``_gif_palette``: ffmpeg's palettegen) is the global
    colour table; frame 0 is stored whole, every later frame as the rectangle that changed, with
    unchanged pixels transparent (disposal "leave in place"), so what is shown is exactly each
    frame mapped onto the palette. Frames are streamed twice (palette, then pixels), one held at a
    time, whatever the length.
    """
    import numpy as np

    base = frames
    if rubber_band:
        frames = _rubber_band(frames)
    _require_frames(frames, "write_gif")
    delay = _gif_delay_ms(_check_fps(fps))
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
            size = _check_size(frame, index, size)
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
    n = _require_frames(frames, "write_png_frames")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if texts is not None and len(texts) != n:
        raise ValueError(f"write_png_frames: {len(texts)} texts for {n} frames")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for offset, frame in enumerate(_iter_frames(frames)):
        target = directory / f"frame_{start + offset:05d}.png"
        options: dict[str, Any] = {}
        if texts is not None:
            options["pnginfo"] = _png_info(texts[offset])
        with atomic_output(target) as tmp:
            frame.save(tmp, format="PNG", **options)
        written.append(target)
    end = start + n
    for entry in directory.iterdir():
        match = _FRAME_RE.fullmatch(entry.name)
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
    n = _require_frames(frames, "write_grid")
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
    for index, frame in enumerate(_iter_frames(frames)):
        size = _check_size(frame, index, size)
        w, h = size
        if sheet is None:
            sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), background)
        row, col = divmod(index, cols)
        sheet.paste(_as_rgb(frame), (col * (w + gap), row * (h + gap)))
    assert sheet is not None  # n >= 1
    options: dict[str, Any] = {}
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):
        options["quality"] = 95  # Pillow's default of 75 visibly smears fine SD detail
    with atomic_output(path) as tmp:
        sheet.save(tmp, **options)


# --------------------------------------------------------------------------------------------
# Dispatch


def kind_for_path(path: str | os.PathLike[str]) -> str:
    """The output kind a path asks for: .mp4, .gif, .png/.jpg (grid), or a directory (frames).

    A directory is a path ending with "/" or one without a suffix. Pass a string when the
    trailing slash matters: ``Path`` drops it.
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or (os.altsep and text.endswith(os.altsep)):
        return "frames"
    suffix = Path(text).suffix.lower()
    if not suffix:
        return "frames"
    try:
        return _SUFFIX_KINDS[suffix]
    except KeyError:
        raise ValueError(
            f"cannot tell the output kind of {text!r} from its suffix {suffix!r}: use .mp4 (mp4), "
            f".gif (gif), .png or .jpg (grid), or a directory ending with '/' (frames); "
            f"allowed kinds: {', '.join(OUTPUT_KINDS)}"
        ) from None


def write_output(kind: str, path: Path, frames: Sequence[Image.Image], **settings: Any) -> None:
    """Write ``frames`` as ``kind`` (one of ``OUTPUT_KINDS``) to ``path``.

    ``settings`` are the keyword arguments of the matching writer (``fps``, ``quality`` and
    ``comment`` for mp4; ``fps`` and ``loop`` for gif; ``start`` and ``texts`` for frames; ``cols``, ``rows``, ``gap``,
    ``background`` for grid). Two are accepted for every kind, so a caller can pass one set of
    scene settings: ``rubber_band`` (bool, applied to the frames before writing) and ``fps``
    (ignored by frames and grid). Unknown settings raise TypeError. Partial files left in the
    target directory by dead runs are cleaned first.
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

    clean_partials(path if kind == "frames" else path.parent)
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
