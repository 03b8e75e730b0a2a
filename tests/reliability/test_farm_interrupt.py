"""Ctrl-C (SIGINT) during a render on the Ray render farm (``render.py SCENE --workers 2``).

Issue 12: "Progress, Ctrl-C, --report and outputs behave as in a single-process render" (the single
process: ``test_interrupt.py``). The farm has up to ``capacity`` (one per worker: 2 here) batches of
BATCH frames on its workers and one batch being stored when the first Ctrl-C comes. It stores the
batch being stored, stops when the first batch on a worker comes back, drops that one and the others
(as one process drops the batch on its device) and exits 130: at most BATCH frames are stored after
the signal, of the (capacity + 1) x BATCH in flight. Its Ray cluster (started by the render) ends
with it: no Ray process of the run is left.
"""

from __future__ import annotations

import os
import shlex
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.reliability._util import (
    Render,
    count_lines,
    partials,
    read_log,
    render_sync,
    wait_until,
    write_scene,
)

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

FRAMES = 40
BATCH = 2
WORKERS = 2
FARM = ("--batch-size", str(BATCH), "--workers", str(WORKERS), "--threads", "1")


def session_processes(render: Render) -> list[str]:
    """The live processes of the render's session (it starts one of its own): the render, and the
    Ray cluster it started (GCS, raylet, workers...), as 'PID COMMAND'."""
    found = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(proc.pid) == render.pid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue  # gone meanwhile
    return found


def start(tmp_path: Path) -> tuple[Path, Path, Path, Path, Render]:
    """A 40-frame farm render (2 workers, 2-frame batches), returned once it has stored its first frames."""
    scene = write_scene(tmp_path / "scenes", FRAMES)
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "render.log"
    run = Render(scene, cache, out, log, *FARM)
    wait_until(lambda: count_lines(log) > 0 or run.proc.poll() is not None, 300)
    assert run.proc.poll() is None, f"the render ended before it could be interrupted:\n{run.stderr}"
    workers = [p for p in session_processes(run) if "ray::RenderWorker" in p]
    assert len(workers) == WORKERS, session_processes(run)
    return scene, cache, out, log, run


def assert_farm_shut_down(run: Render) -> None:
    """No process of the render's session outlives it (Ray stops its cluster as the render exits;
    a few seconds are allowed for the last of them to be reaped)."""
    left = wait_until(lambda: not session_processes(run), 10)
    assert left, f"Ray processes left after the render exited: {session_processes(run)}"


def resume_renders_exactly_the_missing_frames(scene: Path, cache: Path, out: Path, log: Path) -> None:
    stored = len({key for key, _ in read_log(log)})
    assert 0 < stored < FRAMES
    report = render_sync(scene, cache, out, log, *FARM, timeout=300)
    assert (report["rendered"], report["cached"], report["workers"]) == (FRAMES - stored, stored, WORKERS)
    counts = Counter(key for key, _ in read_log(log))
    assert len(counts) == FRAMES and set(counts.values()) == {1}, "a stored frame was rendered again"
    assert (out / "out.mp4").is_file() and (out / "out.gif").is_file() and not partials(out)


def test_ctrl_c_on_a_farm_stores_at_most_one_batch_stops_the_workers_and_exits_130(tmp_path: Path) -> None:
    scene, cache, out, log, run = start(tmp_path)
    # A Ctrl-C in the terminal: SIGINT to the whole foreground group, the Ray cluster's processes too.
    os.killpg(run.pid, signal.SIGINT)
    at_signal = count_lines(log)
    code = run.wait(120)
    stderr = run.stderr
    assert code == 130, stderr
    assert "stopping after the frames in flight" in stderr and "run the same command again" in stderr
    # The hint repeats the run's own options, --workers included.
    assert shlex.join([str(scene), "--cache-dir", str(cache), "--out", str(out), "-q", *FARM]) in stderr
    assert "Traceback" not in stderr and "render worker was lost" not in stderr, stderr
    after = count_lines(log)
    assert after - at_signal <= BATCH, f"{after - at_signal} frames stored after Ctrl-C, batches are {BATCH}"
    assert not out.exists() or not any(out.iterdir()), "an interrupted render wrote outputs"
    assert_farm_shut_down(run)
    resume_renders_exactly_the_missing_frames(scene, cache, out, log)


def test_three_quick_ctrl_c_on_a_farm_stop_at_once_and_the_next_run_resumes(tmp_path: Path) -> None:
    scene, cache, out, log, run = start(tmp_path)
    sent = time.monotonic()
    for _ in range(3):
        # kill -INT of the render process alone this time (the Ray cluster hears nothing of it).
        os.kill(run.pid, signal.SIGINT)
        time.sleep(0.05)
    code = run.wait(10)  # raises (and fails) if it takes longer
    assert time.monotonic() - sent < 10
    stderr = run.stderr
    # As test_interrupt.py: 130, or death by SIGINT should the third land during interpreter shutdown.
    assert code in (130, -signal.SIGINT), stderr
    assert "interrupted:" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr.split("interrupted:")[0], stderr
    assert_farm_shut_down(run)
    # Not blocked by the dead run's claims: renders exactly the missing frames.
    resume_renders_exactly_the_missing_frames(scene, cache, out, log)
