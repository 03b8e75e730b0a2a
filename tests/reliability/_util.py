"""Helpers for the reliability tests: scenes, render subprocesses, the render log, output decoding.

The tests start ``render.py`` as real subprocesses (kill -9, Ctrl-C and concurrency can only be
tested that way) through ``_logged_render.py``, which hands the API a progress callback
(:func:`frame_logger`), so every stored frame leaves one line ``<frame key> <pid>`` behind: that log
is how the tests count renders.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# render.py plus a log of every frame stored: ``[*LOGGED_RENDER, LOG, SCENE, ...]``.
LOGGED_RENDER = [sys.executable, str(Path(__file__).with_name("_logged_render.py"))]


def frame_logger(log: Path) -> Callable[[Any], None]:
    """A progress callback (``pipeline.app.Progress``) that appends ``<key> <pid>`` per stored frame."""
    pid = os.getpid()

    def progress(event: Any) -> None:
        if event.keys:
            with open(log, "a") as f:
                f.write("".join(f"{key} {pid}\n" for key in event.keys))

    return progress


SCENE = """\
model: tiny
size: [32, 32]
steps: 2
seed: 7
fps: {fps}
frames: {frames}
keyframes:
  - frame: 0
    prompt: "a dog in a field"
  - frame: {last}
    prompt: "a cat in a field"
outputs:
{outputs}
"""


def write_scene(
    folder: Path,
    frames: int,
    *,
    fps: int = 12,
    outputs: Sequence[str] = ("out.mp4", "out.gif"),
    name: str = "scene",
) -> Path:
    """A dog-to-cat morph of ``frames`` frames with the tiny model at 32x32, 2 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    text = SCENE.format(
        fps=fps, frames=frames, last=frames - 1, outputs="\n".join(f"  - {o}" for o in outputs)
    )
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


class Render:
    """One ``python render.py`` subprocess; stdout and stderr go to files (no pipe can fill up)."""

    def __init__(
        self,
        scene: Path,
        cache: Path,
        out: Path,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        tag: str = "",
    ):
        self.scene = scene
        workdir = log.parent
        stamp = f"{tag or 'run'}-{time.monotonic_ns()}"
        self.stdout_path = workdir / f"{stamp}.stdout"
        self.stderr_path = workdir / f"{stamp}.stderr"
        self.args = [
            *LOGGED_RENDER,
            str(log),
            str(scene),
            "--cache-dir",
            str(cache),
            "--out",
            str(out),
            "-q",
            *extra,
        ]
        with open(self.stdout_path, "wb") as so, open(self.stderr_path, "wb") as se:
            self.proc = subprocess.Popen(
                self.args,
                cwd=ROOT,
                stdout=so,
                stderr=se,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                # Its own process group: ffmpeg children orphaned by a kill -9 can be cleaned up at the end.
                start_new_session=True,
            )
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise

    def kill(self) -> None:
        """kill -9 of the render process alone (its ffmpeg child, if any, is orphaned as in real life)."""
        with suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill_group(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with suppress(Exception):
            self.proc.wait(10)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def render_sync(
    scene: Path, cache: Path, out: Path, log: Path, *extra: str, timeout: float = 300
) -> dict[str, Any]:
    """Render to completion; returns the ``--report`` JSON (asserts exit 0)."""
    report = log.parent / f"report-{time.monotonic_ns()}.json"
    run = Render(scene, cache, out, log, "--report", str(report), *extra)
    code = run.wait(timeout)
    assert code == 0, f"render exited {code}:\n{run.stderr[-3000:]}"
    return json.loads(report.read_text())


def plan_rows(scene: Path, cache: Path) -> list[dict[str, Any]]:
    """``--plan --json``: one object per frame (key, cached, ...); no torch, writes nothing."""
    out = subprocess.run(
        [sys.executable, "render.py", str(scene), "--plan", "--json", "--cache-dir", str(cache)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return list(json.loads(out.stdout))


def plan_keys(scene: Path, cache: Path) -> list[str]:
    """The frame keys of the scene, in frame order."""
    return [row["key"] for row in plan_rows(scene, cache)]


def read_log(log: Path) -> list[tuple[str, int]]:
    """The render log's lines as (frame key, pid); every complete line must be well formed (a last line
    without its newline is being written right now and is left out)."""
    try:
        text = log.read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.split("\n")[:-1]:
        key, pid = line.split()
        assert len(key) == 64, line
        rows.append((key, int(pid)))
    return rows


def count_lines(log: Path) -> int:
    try:
        return log.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def partials(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if ".partial-" in p.name)
    except FileNotFoundError:
        return []


def wait_until(condition: Callable[[], Any], timeout: float, poll: float = 0.005) -> Any:
    """Poll until ``condition()`` is truthy (returned) or the timeout passes (returns the last value)."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(poll)


# --------------------------------------------------------------------------------------------------
# Decoding outputs


def gif_frames(data: bytes | Path) -> list[np.ndarray]:
    """Every frame of a GIF as RGB arrays; raises if the file is truncated or not a GIF."""
    from PIL import Image

    raw = data.read_bytes() if isinstance(data, Path) else data
    if not raw.endswith(b";"):
        raise ValueError("GIF has no trailer (truncated)")
    frames = []
    with Image.open(io.BytesIO(raw)) as im:
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return frames


def mp4_frames(path: Path) -> list[np.ndarray]:
    """Every frame of an MP4 decoded by imageio's ffmpeg; raises if it cannot be read."""
    import imageio.v2 as iio

    reader = iio.get_reader(path, format="FFMPEG")
    try:
        return [np.asarray(frame) for frame in reader]
    finally:
        reader.close()


def assert_same_frames(a: list[np.ndarray], b: list[np.ndarray], what: str) -> None:
    assert len(a) == len(b), f"{what}: {len(a)} frames against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.shape == y.shape and np.array_equal(x, y), f"{what}: frame {i} differs"


def solid_frames(n: int, size: int = 32) -> list[Any]:
    """``n`` plain-coloured PIL frames, to make a valid 'previous' output that differs from any render."""
    from PIL import Image

    return [Image.new("RGB", (size, size), (40 * i % 256, 200, 90)) for i in range(n)]
