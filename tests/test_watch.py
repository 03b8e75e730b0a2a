"""Watch mode (``render.py SCENE --watch``) driven by real file saves in a subprocess.

The tiny model at 32x32 with 2 steps; every wait is bounded (a hung watcher fails, it does not hang).
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CPU = ("--device", "cpu", "--cache-dir")
WAIT_S = 120  # per step, generous for a busy machine; a passing run takes seconds

SCENE = """\
model: tiny
size: [32, 32]
steps: 2
keyframes:
  - {frame: 0, prompt: PROMPT}
  - {frame: 1, prompt: a cat}
outputs: [out.gif]
"""


class Lines:
    """The merged stdout/stderr of a process, line by line, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited before {text!r}; output:\n" + "\n".join(self.seen))
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no {text!r} within {WAIT_S}s; output:\n" + "\n".join(self.seen))

    def settle(self, quiet_s: float = 3.0) -> str:
        """Wait until the process has printed nothing for ``quiet_s``; returns the last line. (A save
        can reach the watcher as two batches of events on a loaded machine: the second re-plans, and a
        Ctrl-C sent during that no-op render would exit 130, as documented, instead of 0.)"""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=quiet_s)
            except queue.Empty:
                return self.seen[-1]
            if line is None:
                raise AssertionError("exited while settling; output:\n" + "\n".join(self.seen))
            self.seen.append(line)
        raise AssertionError(f"still printing after {WAIT_S}s; output:\n" + "\n".join(self.seen))


def _save(path: Path, text: str) -> None:
    # As many editors save: a new file renamed over the old one.
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text)
    os.replace(partial, path)


def test_watch_renders_on_save_survives_an_invalid_save_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    scene = tmp_path / "s.yaml"
    scene.write_text(SCENE.replace("PROMPT", "a dog"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            str(ROOT / "render.py"),
            str(scene),
            "--watch",
            "-q",
            *CPU,
            str(tmp_path / "cache"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell that starts jobs in the background ignores SIGINT in them: this test sends one.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = Lines(proc)
        assert (
            lines.wait_for("2 frames:")
            == f"2 frames: 2 rendered, 0 cached; outputs: {tmp_path}/renders/s/out.gif (written)"
        )
        lines.wait_for("watching 1 file(s) for saves")

        _save(scene, SCENE.replace("PROMPT", "a fox"))
        assert lines.wait_for("changed:") == "changed: s.yaml"
        # Frame 0's prompt changed; frame 1 is cached.
        assert lines.wait_for("2 frames:").startswith("2 frames: 1 rendered, 1 cached; outputs:")
        lines.wait_for("watching")

        _save(scene, SCENE.replace("PROMPT", "a fox").replace("steps: 2", "steps: 0"))
        lines.wait_for("changed: s.yaml")
        problem = lines.wait_for("s.yaml:3:")
        assert "steps" in problem
        lines.wait_for("1 problem(s): nothing rendered; waiting for the next save")

        _save(scene, SCENE.replace("PROMPT", "a dog"))
        lines.wait_for("changed: s.yaml")
        assert lines.wait_for("2 frames:").startswith("2 frames: 0 rendered, 2 cached; outputs:")
        lines.wait_for("watching")
        assert "watching" in lines.settle(), lines.seen  # waiting for a save, not rendering

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 0, lines.seen
        lines.wait_for("stopped watching")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Flat:
    """A stand-in renderer: a grey frame per job, no model (the loop is what is tested here)."""

    encoded = 0

    def render_batch(self, jobs: list[Any]) -> list[Any]:
        from PIL import Image

        return [Image.new("RGB", (32, 32), (128, 128, 128)) for _ in jobs]


def test_the_watch_loop_is_an_api_that_a_stop_event_ends(tmp_path: Path) -> None:
    from pipeline.watch import watch

    scene = tmp_path / "s.yaml"
    scene.write_text(SCENE.replace("PROMPT", "a dog"))
    said: queue.Queue[str] = queue.Queue()
    reports: list[Any] = []
    stop = threading.Event()

    def render(session: Any) -> None:
        reports.append(session.render(renderer=Flat()))
        said.put("rendered")

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                if text in said.get(timeout=1):
                    return
        raise AssertionError(f"no {text!r} within {WAIT_S}s")

    options = {"cache_dir": tmp_path / "cache", "device": "cpu"}
    thread = threading.Thread(
        target=watch, args=(scene, options), kwargs={"render": render, "echo": said.put, "stop": stop}
    )
    thread.start()
    try:
        wait_for("watching 1 file(s)")
        _save(scene, SCENE.replace("PROMPT", "a fox"))
        wait_for("changed: ")
        wait_for("rendered")
        wait_for("watching")
    finally:
        stop.set()
        thread.join(timeout=WAIT_S)
    assert not thread.is_alive()
    assert [(r.rendered, r.cached) for r in reports] == [(2, 0), (1, 1)]


def test_an_event_for_a_file_that_did_not_change_since_the_round_is_not_a_save(tmp_path: Path) -> None:
    """A late event of a save the last round already read (an editor's save can reach watchfiles as
    several batches of events) must not start another round; an event with a real change must."""
    from pipeline.watch import _stamps, _wait

    scene = tmp_path / "s.yaml"
    scene.write_text("a")
    files = {scene.resolve()}
    since = _stamps(files)

    class Events:
        def __init__(self, edit: bool) -> None:
            self.edit = edit

        def watch(self, *folders: Any, **options: Any) -> Any:
            if self.edit:
                _save(scene, "b")
            yield {(2, str(scene))}  # watchfiles' Change.modified
            yield set()  # then only timeouts, and the watcher ends

    assert _wait(files, since, None, Events(edit=False)) == []
    assert _wait(files, since, None, Events(edit=True)) == [scene.resolve()]
