"""The soundtrack into the MP4, with the ffmpeg of imageio-ffmpeg (no librosa needed)::

    probe(Path("song.wav"))                          # 183.4 (seconds), or what is wrong with the file
    mux(Path("video.mp4"), Path("song.wav"), start=12.5, seconds=4.0)   # adds the audio in place

The audio is cut at ``start`` seconds and to the video's length, aligned to its first frame, encoded
as AAC; the video stream and the metadata (the comment) are copied as they are.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

__all__ = ["MuxError", "audio_seconds", "mux", "probe"]

_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_AUDIO_STREAM = re.compile(r"Stream #\d+:(\d+)[^:]*: Audio: ")


class MuxError(OSError):
    """ffmpeg could not add the audio (the video being written is dropped; the old one is kept)."""


def _ffmpeg() -> str:
    import imageio_ffmpeg  # a dependency of the project; lazy like the other ffmpeg users

    return imageio_ffmpeg.get_ffmpeg_exe()


def _info(path: Path) -> str:
    """What ``ffmpeg -i`` says of a file (ffprobe is not shipped by imageio-ffmpeg)."""
    run = subprocess.run(
        [_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )
    return run.stderr


def audio_seconds(info: str) -> float | None:
    """The length of the first audio stream that ``ffmpeg -i`` describes, or None without one."""
    if not _AUDIO_STREAM.search(info):
        return None
    m = _DURATION.search(info)
    if m is None:
        return None
    h, mi, s = m.groups()
    return int(h) * 3600 + int(mi) * 60 + float(s)


def probe(path: Path) -> float | str:
    """The audio file's length in seconds, or why ffmpeg cannot play it."""
    info = _info(path)
    seconds = audio_seconds(info)
    if seconds is not None:
        return seconds
    last = [line.strip() for line in info.splitlines() if line.strip()]
    why = last[-1] if last and "Audio:" not in info else "it has no audio stream"
    if "Invalid data" in info:
        why = "ffmpeg finds no audio in it (invalid data)"
    return f"not a readable audio file: {why}"


def mux(video: Path, audio: Path, *, start: float, seconds: float) -> None:
    """Add ``audio`` from ``start`` seconds, cut to ``seconds``, to ``video`` (replaced in place)."""
    muxed = video.with_name(video.stem + ".audio" + video.suffix)
    try:
        run = subprocess.run(
            [
                _ffmpeg(),
                "-hide_banner",
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-i",
                str(video),
                "-ss",
                f"{start:.6f}",
                "-t",
                f"{seconds:.6f}",
                "-i",
                str(audio),
                "-map",
                "0:v:0",
                "-map",
                "1:a:0",
                "-c:v",
                "copy",
                "-c:a",
                "aac",
                "-b:a",
                "192k",
                "-map_metadata",
                "0",
                "-fflags",
                "+bitexact",
                "-movflags",
                "+faststart",
                str(muxed),
            ],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
        if run.returncode != 0:
            raise MuxError(f"ffmpeg could not add the audio {audio.name}: {run.stderr.strip()[-500:]}")
        os.replace(muxed, video)
    finally:
        muxed.unlink(missing_ok=True)
