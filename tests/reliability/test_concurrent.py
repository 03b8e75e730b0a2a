"""Several processes rendering the same scene into ONE cache directory at the same time.

Frames are claimed before they render (``pipeline.claims``), so the processes split the work: every
frame is rendered and stored once in all, every process exits 0 with the same outputs, and sqlite's
locking never surfaces as "database is locked".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.reliability._util import (
    Render,
    assert_same_frames,
    gif_frames,
    mp4_frames,
    plan_keys,
    read_log,
    write_scene,
)

FRAMES = 40


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_sharing_a_cache_render_each_frame_once(tmp_path: Path, processes: int) -> None:
    scene = write_scene(tmp_path / "scenes", FRAMES)
    cache = tmp_path / "cache"
    log = tmp_path / "render.log"
    outs = [tmp_path / f"out{i}" for i in range(processes)]
    runs = [Render(scene, cache, out, log, "--batch-size", "4", tag=f"p{i}") for i, out in enumerate(outs)]
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
