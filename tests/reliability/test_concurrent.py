"""Several processes rendering the same scene into ONE cache directory at the same time.

Frames are claimed before they render (``pipeline.store.claims``), so the processes split the work: every
frame is rendered and stored once in all, every process exits 0 with the same outputs, and sqlite's
locking never surfaces as "database is locked".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability._util import (
    Render,
    assert_same_frames,
    frame_logger,
    gif_frames,
    mp4_frames,
    plan_keys,
    read_log,
    write_scene,
)

FRAMES = 40
FRAMES_ELSEWHERE = 12


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_sharing_a_cache_render_each_frame_once(tmp_path: Path, processes: int) -> None:
    scene = write_scene(tmp_path / "scenes", FRAMES)
    cache = tmp_path / "cache"
    log = tmp_path / "render.log"
    outs = [tmp_path / f"out{i}" for i in range(processes)]
    # One torch thread each: with the default (all cores each) the processes' OpenMP threads oversubscribe the
    # CPU and spin; measured here, two processes took 24 s instead of 6 s. The claims are what is tested.
    runs = [
        Render(scene, cache, out, log, "--batch-size", "4", tag=f"p{i}", env={"OMP_NUM_THREADS": "1"})
        for i, out in enumerate(outs)
    ]
    try:
        codes = [run.wait(300) for run in runs]
    finally:
        for run in runs:
            run.kill_group()

    for run, code in zip(runs, codes, strict=True):
        assert code == 0, f"process {run.pid} exited {code}:\n{run.stderr[-3000:]}"
        assert "database is locked" not in run.stderr
        assert "Traceback" not in run.stderr
        assert f"{FRAMES} frames:" in run.stdout

    # Each frame key stored exactly once across all processes (claims split the work).
    rows = read_log(log)
    stored = Counter(key for key, _ in rows)
    twice = {key[:12]: n for key, n in stored.items() if n > 1}
    assert not twice, f"frames stored more than once: {twice}"
    assert set(stored) == set(plan_keys(scene, cache))
    per_process = Counter(pid for _, pid in rows)
    print(f"\n{processes} processes: frames stored per process {dict(per_process)}")

    # Every process wrote the same outputs.
    first_mp4, first_gif = mp4_frames(outs[0] / "out.mp4"), gif_frames(outs[0] / "out.gif")
    assert len(first_mp4) == len(first_gif) == FRAMES
    for out in outs[1:]:
        assert (out / "out.gif").read_bytes() == (outs[0] / "out.gif").read_bytes()
        assert_same_frames(mp4_frames(out / "out.mp4"), first_mp4, f"{out.name}/out.mp4")


def render_with_a_batch_finished_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], list[str], set[str]]:
    """Render a 12-frame scene in this process while "another process" finishes its first batch in the race
    window the claims must close: after this process looked at the cache (frames missing) and before it claims
    them, the other stores them and releases its claims. Returns (report, frames stored elsewhere, frames
    stored here)."""
    from pipeline.store.cache import CacheDir
    from pipeline.store.claims import Claims
    from tests.conftest import run_render

    scene = write_scene(tmp_path / "scenes", FRAMES_ELSEWHERE, outputs=("out.gif",))
    run_render(scene, tmp_path / "other-cache", "--batch-size", "4")  # the frames "another process" renders

    injected: list[str] = []
    real_claim = Claims.claim

    def claim(self: Claims, keys: Iterable[str]) -> list[str]:
        keys = list(keys)
        if not injected:  # the first batch: finished and released elsewhere, just now
            with CacheDir(tmp_path / "other-cache") as other, CacheDir(tmp_path / "cache") as mine:
                for key in keys:
                    blob = other.frames.get(key)
                    assert blob is not None
                    mine.frames.put(key, blob)
                    injected.append(key)
        return real_claim(self, keys)

    log = tmp_path / "render.log"
    monkeypatch.setattr(Claims, "claim", claim)
    report = run_render(scene, tmp_path / "cache", "--batch-size", "4", progress=frame_logger(log))
    assert len(injected) == 4
    return report, injected, {key for key, _ in read_log(log)}


@pytest.mark.slow
def test_a_frame_finished_elsewhere_just_before_the_claim_is_not_rendered_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report, injected, rendered_here = render_with_a_batch_finished_elsewhere(tmp_path, monkeypatch)
    assert not rendered_here & set(injected), "frames stored by another process were rendered again"
    assert len(rendered_here) == FRAMES_ELSEWHERE - len(injected)
    assert report["frames"] == FRAMES_ELSEWHERE and report["renders"] == len(rendered_here)


@pytest.mark.slow
def test_the_report_counts_only_the_frames_this_run_rendered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report, _, rendered_here = render_with_a_batch_finished_elsewhere(tmp_path, monkeypatch)
    assert report["rendered"] == len(rendered_here), report
    assert report["rendered"] + report["cached"] <= FRAMES_ELSEWHERE
