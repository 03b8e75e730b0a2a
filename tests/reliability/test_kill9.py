"""kill -9 at random moments during a 200-frame render, 20+ times in a row, resuming each time.

What must hold (README: "each frame is stored in the cache the moment its batch finishes", "a failed run
never leaves a broken file"):

- the final outputs equal those of an uninterrupted render of the same scene in another cache;
- no finished frame is ever rendered again: in the render log (one line per stored frame) every frame
  key appears at most once over all the runs; the only work a kill loses is the batch in flight;
- no broken file ever stands at an output's final path: a watcher thread polls both paths every few
  milliseconds and decodes every version of each file it sees (a version: inode, size, mtime);
- no ``.partial-`` file is left once a run has completed.

The kill moments are drawn from a seeded ``random.Random``. A delay drawn between 0.3 s and the whole
expected run time would let most runs finish (and 20 kills need the 200 frames spread over them), so each
kill first picks a phase at random, then a random moment inside it, measured on the run itself where the
machine's speed would otherwise decide (it is shared, and loads vary):

- start-up: 0.3 s to 90% of the reference render's start-up (model loading), or the first stored frame;
- mid-render: once a random number of this run's frames are stored (about 200 / kills on average), a random
  moment inside the next batch;
- outputs: the last kills, and any run with nothing left to render: just after out.mp4's temporary file
  appears, or once out.gif's temporary file has grown to a random fraction of the finished GIF's size.

Where each kill really landed is read back from the log and the output folder. The log cannot show work
that was lost (a batch rendered but not stored when the kill came): at most one batch per kill that came
after the model was loaded, reported as an upper bound. ``pytest -s`` prints the figures.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.outputs.writers import write_gif, write_mp4
from tests.reliability._util import (
    Render,
    assert_same_frames,
    count_lines,
    gif_frames,
    mp4_frames,
    partials,
    plan_keys,
    plan_rows,
    read_log,
    render_sync,
    solid_frames,
    wait_until,
    write_scene,
)

FRAMES = 200
BATCH = 4
KILLS = 20
ASSEMBLY_KILLS = 6  # the last kills all land while outputs are written
SEED = 20240607
OLD_FRAMES = 3  # the valid "previous" outputs the watcher sees until the first rewrite


class OutputWatcher(threading.Thread):
    """Polls output paths every few ms; decodes every new version of a file found at a final path."""

    def __init__(self, paths: list[Path], valid_counts: set[int], scratch: Path):
        super().__init__(daemon=True)
        self.paths = paths
        self.valid_counts = valid_counts
        self.scratch = scratch
        self.stop = threading.Event()
        self.versions: dict[tuple[str, int, int, int], str] = {}
        self.failures: list[str] = []
        self.polls = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.paths:
                try:
                    self.check(path)
                except Exception as exc:  # a bug in the watcher must fail the test, not vanish
                    self.failures.append(f"watcher error on {path.name}: {exc!r}")
            self.polls += 1
            time.sleep(0.003)

    def check(self, path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no output yet: allowed
        try:
            st = os.fstat(fd)
            version = (path.name, st.st_ino, st.st_size, st.st_mtime_ns)
            if version in self.versions:
                return
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
        finally:
            os.close(fd)
        try:
            if path.suffix == ".gif":
                n = len(gif_frames(data))
            else:
                copy = self.scratch / f"seen-{len(self.versions)}.mp4"
                copy.write_bytes(data)
                n = len(mp4_frames(copy))
                copy.unlink()
            if n not in self.valid_counts:
                raise ValueError(f"{n} frames")
        except Exception as exc:
            self.failures.append(f"{path.name} ({len(data)} bytes): {type(exc).__name__}: {exc}")
            self.versions[version] = "BROKEN"
        else:
            self.versions[version] = f"{n} frames"


@dataclass
class Timing:
    """From the reference render; start-up and per-frame are lowered when a later run is quicker."""

    startup: float
    per_frame: float
    writing_mp4: float
    gif_size: int


class KillLoop:
    """Starts a render, kills it with SIGKILL at a moment chosen by ``rng``, and notes where it landed."""

    def __init__(self, scene: Path, cache: Path, out: Path, log: Path, timing: Timing, rng: random.Random):
        self.scene, self.cache, self.out, self.log = scene, cache, out, log
        self.timing = timing
        self.rng = rng
        self.runs: list[Render] = []
        self.kills: list[dict[str, object]] = []

    def stored(self, pid: int | None = None) -> int:
        rows = read_log(self.log)
        return len({key for key, p in rows}) if pid is None else sum(1 for _, p in rows if p == pid)

    def writing(self, pid: int) -> list[Path]:
        return [p for p in partials(self.out) if f".partial-{pid}-" in p.name]

    def gif_grown(self, pid: int, size: float) -> bool:
        try:
            return any(".gif." in p.name and p.stat().st_size >= size for p in self.writing(pid))
        except FileNotFoundError:  # renamed into place between the listing and the stat
            return False

    def kill_once(self) -> None:
        k = len(self.kills)
        remaining = FRAMES - self.stored()
        if remaining == 0 or k >= KILLS - ASSEMBLY_KILLS:
            target = "assembly"
        else:
            target = self.rng.choice(("startup", "render", "render"))
        run = Render(self.scene, self.cache, self.out, self.log, "--batch-size", str(BATCH), tag=f"kill{k}")
        self.runs.append(run)
        pid, t = run.pid, self.timing

        def exited() -> bool:
            return run.proc.poll() is not None

        if target == "startup":
            # A random moment of the start-up; a run quicker than the reference is killed at its first frame.
            moment = self.rng.uniform(0.3, max(0.35, 0.9 * t.startup))
            wait_until(lambda: exited() or self.stored(pid) > 0, moment)
        elif target == "render":
            # After a random number of this run's frames are stored, a random moment inside the next batch.
            share = remaining / (KILLS - ASSEMBLY_KILLS - k)
            n = self.rng.randint(1, max(1, min(round(2 * share) - 1, remaining - 1)))
            moment = self.rng.uniform(0.0, min(BATCH * t.per_frame, 0.2))
            wait_until(lambda: exited() or self.stored(pid) >= 1, 300)
            t.startup = min(t.startup, time.monotonic() - run.started)
            first = time.monotonic()
            wait_until(lambda: exited() or self.stored(pid) >= n, 300)
            if n > BATCH:
                t.per_frame = min(t.per_frame, (time.monotonic() - first) / (n - 1))
            wait_until(exited, moment)
        else:
            # While an output is written: out.mp4 just after its temporary file appears, or out.gif once
            # its temporary file has grown to a random fraction of the finished GIF's size.
            fraction = self.rng.uniform(0.05, 0.9)
            mp4_now = self.rng.random() < 0.5
            wait_until(lambda: exited() or self.writing(pid), 300)
            now = self.writing(pid)
            if mp4_now and now and ".mp4." in now[0].name:
                moment = self.rng.uniform(0.0, 0.5 * t.writing_mp4)
                wait_until(exited, moment)
            else:
                moment = fraction
                wait_until(lambda: exited() or self.gif_grown(pid, fraction * t.gif_size), 300, poll=0.001)
        writing = [p.name.split(".partial-")[0].lstrip(".") for p in self.writing(pid)]
        run.kill()
        assert run.proc.returncode == -9, (
            f"run {k} ended on its own (exit {run.proc.returncode}):\n{run.stderr[-2000:]}"
        )
        stored = self.stored(pid)
        if writing:
            landed = f"assembly ({writing[0]})"
        elif remaining == 0:
            landed = "start-up before assembly"
        elif stored == 0:
            landed = "start-up (model loading or first batch)"
        else:
            landed = "mid-render"
        self.kills.append(
            {
                "target": target,
                "moment": round(moment, 2),  # seconds, except for out.gif: the fraction of its size
                "landed": landed,
                "remaining": remaining,
                "stored": stored,
                "seconds": round(time.monotonic() - run.started, 1),
            }
        )
        print(f"  kill {k:2d}: {self.kills[-1]}")


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scenes", FRAMES)
    keys = plan_keys(scene, tmp_path / "ref-cache")
    assert len(set(keys)) == FRAMES

    # 1. The uninterrupted reference, in its own cache; it also times start-up, frames and outputs.
    ref_log, ref_out = tmp_path / "ref.log", tmp_path / "ref-out"
    ref = Render(scene, tmp_path / "ref-cache", ref_out, ref_log, "--batch-size", str(BATCH), tag="ref")

    def ref_exited() -> bool:
        return ref.proc.poll() is not None

    wait_until(lambda: ref_exited() or count_lines(ref_log) > 0, 300)
    startup = time.monotonic() - ref.started
    wait_until(lambda: ref_exited() or count_lines(ref_log) >= FRAMES, 300)
    per_frame = (time.monotonic() - ref.started - startup) / (FRAMES - 1)
    # Outputs are written in order, each through its own temporary file: out.mp4, then out.gif.
    wait_until(lambda: ref_exited() or partials(ref_out), 300)
    mp4_from = time.monotonic()
    wait_until(lambda: ref_exited() or any(".gif." in p.name for p in partials(ref_out)), 300)
    gif_from = time.monotonic()
    wait_until(lambda: ref_exited() or not partials(ref_out), 300)
    writing_gif = time.monotonic() - gif_from
    assert ref.wait() == 0, ref.stderr[-3000:]
    timing = Timing(startup, per_frame, gif_from - mp4_from, (ref_out / "out.gif").stat().st_size)
    print(
        f"\nreference render: start-up {startup:.1f}s, {per_frame * 1000:.0f} ms/frame, writing out.mp4 "
        f"{timing.writing_mp4:.2f}s and out.gif {writing_gif:.2f}s, total {time.monotonic() - ref.started:.1f}s"
    )

    # 2. Valid but different outputs at the final paths, so the watcher always has something to read
    #    and every rewrite during the kill loop replaces a file that someone could be reading.
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "render.log"
    out.mkdir()
    write_mp4(out / "out.mp4", solid_frames(OLD_FRAMES), fps=12)
    write_gif(out / "out.gif", solid_frames(OLD_FRAMES), fps=12)
    watcher = OutputWatcher([out / "out.mp4", out / "out.gif"], {OLD_FRAMES, FRAMES}, tmp_path)
    watcher.start()

    loop = KillLoop(scene, cache, out, log, timing, random.Random(SEED))
    try:
        while len(loop.kills) < KILLS:
            loop.kill_once()
        # 3. One last run, to completion.
        logged = loop.stored()
        cached = sum(1 for row in plan_rows(scene, cache) if row["cached"])
        final = render_sync(scene, cache, out, log, "--batch-size", str(BATCH))
    finally:
        watcher.stop.set()
        watcher.join(30)
        for run in loop.runs:
            run.kill_group()  # ffmpeg children orphaned by the kills, if any are still running
    kills = loop.kills

    # -- Outputs equal the uninterrupted render's.
    gif_identical = (out / "out.gif").read_bytes() == (ref_out / "out.gif").read_bytes()
    if not gif_identical:
        assert_same_frames(gif_frames(out / "out.gif"), gif_frames(ref_out / "out.gif"), "out.gif")
    mp4_identical = (out / "out.mp4").read_bytes() == (ref_out / "out.mp4").read_bytes()
    assert_same_frames(mp4_frames(out / "out.mp4"), mp4_frames(ref_out / "out.mp4"), "out.mp4")
    assert len(gif_frames(out / "out.gif")) == FRAMES

    # -- No frame rendered twice; every frame in the cache; the last run rendered only what was missing.
    rows = read_log(log)
    stored = Counter(key for key, _ in rows)
    twice = {key[:12]: n for key, n in stored.items() if n > 1}
    assert not twice, f"finished frames rendered again: {twice}"
    assert set(stored) <= set(keys)
    # A frame stored, then killed before its log line was written, is in the cache and never rendered
    # again: it is the one frame a kill can leave unlogged (at most one per kill).
    unlogged = cached - logged
    assert 0 <= unlogged <= KILLS
    assert len(stored) == FRAMES - unlogged
    assert (final["frames"], final["rendered"], final["cached"]) == (FRAMES, FRAMES - cached, cached)

    # -- Never a broken file at a final path; no temporary file left behind.
    assert not watcher.failures, f"broken outputs seen at the final path: {watcher.failures}"
    assert not partials(out), partials(out)
    assert len(watcher.versions) >= 4  # the two old files and the two final ones at least

    landed = Counter(str(kill["landed"]) for kill in kills)
    in_flight = sum(1 for kill in kills if str(kill["landed"]).startswith(("start-up (", "mid-render")))
    assert landed["mid-render"] >= 1 and any(phase.startswith("assembly") for phase in landed)
    figures = {
        "kills": len(kills),
        "runs": len(loop.runs) + 1,
        "kills_by_phase": dict(landed),
        "frames_rendered_twice": sum(n - 1 for n in stored.values()),
        "frames_stored": len(rows),
        "stored_but_killed_before_logging": unlogged,
        "kills_that_could_lose_a_batch_in_flight": in_flight,
        "frames_lost_in_flight_at_most": in_flight * BATCH,
        "frames_rendered_by_the_final_run": final["rendered"],
        "output_versions_checked": len(watcher.versions),
        "watcher_polls": watcher.polls,
        "corrupt_outputs_seen": len(watcher.failures),
        "mp4_byte_identical": mp4_identical,
        "gif_byte_identical": gif_identical,
    }
    print("kill -9 figures:")
    for name, value in figures.items():
        print(f"  {name}: {value}")
