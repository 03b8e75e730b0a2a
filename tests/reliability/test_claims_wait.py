"""Frame claims left by another host: a void one is taken over at once, a live one is waited for aloud.

The claims are written into the cache the way another machine sharing the cache directory would
(``pipeline.store.claims`` format), then a real ``render.py`` process runs against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store.cache import CacheDir
from pipeline.store.records import claim_key
from tests.reliability._util import ROOT, plan_keys, plan_rows, wait_until, write_scene

FRAMES = 4


def plant(cache: Path, keys: list[str], *, since: float, renewed: float, lease: float) -> None:
    """Claims on `keys` by 'render-2' pid 4242, a host this test is not on."""
    with CacheDir(cache) as c:
        for key in keys:
            claim = {
                "frame": key,
                "host": "render-2",
                "pid": 4242,
                "started": 1.0,
                "since": since,
                "renewed": renewed,
                "lease": lease,
                "token": "other",
            }
            c.records.put(claim_key(key), json.dumps(claim).encode(), tag="claim")


def start(scene: Path, cache: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    report, stderr = tmp_path / "report.json", tmp_path / "stderr"
    args = [
        sys.executable,
        "render.py",
        str(scene),
        "--cache-dir",
        str(cache),
        "--out",
        str(tmp_path / "out"),
    ]
    args += ["--report", str(report), "-q", "--batch-size", "2"]
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL
        )
    return proc, report, stderr


def hhmmss(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


@pytest.mark.slow
def test_a_claim_another_host_left_long_ago_is_taken_over_at_once(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scenes", FRAMES, outputs=("out.gif",))
    cache = tmp_path / "cache"
    keys = plan_keys(scene, cache)
    since = time.time() - 3600
    plant(cache, keys, since=since, renewed=since, lease=60)
    proc, report, stderr = start(scene, cache, tmp_path)
    try:
        code = proc.wait(240)  # before leases: waited for ever
    finally:
        proc.kill()
    text = stderr.read_text()
    assert code == 0, text
    assert json.loads(report.read_text())["rendered"] == FRAMES
    assert (
        f"taking over 2 frames claimed by host render-2 pid 4242 since {hhmmss(since)}: not renewed for 36"
        in text
    )


@pytest.mark.slow
def test_frames_claimed_by_a_live_render_elsewhere_are_waited_for_with_a_message(tmp_path: Path) -> None:
    from tests.conftest import run_render

    scene = write_scene(tmp_path / "scenes", FRAMES, outputs=("out.gif",))
    elsewhere = tmp_path / "elsewhere-cache"  # what the other host renders
    run_render(scene, elsewhere, "--out", str(tmp_path / "elsewhere-out"))
    cache = tmp_path / "cache"
    keys = plan_keys(scene, cache)
    since = time.time()
    plant(cache, keys[2:], since=since, renewed=since, lease=3600)

    proc, report, stderr = start(scene, cache, tmp_path)
    try:
        expected = f"waiting for frames 2-3, claimed by host render-2 pid 4242 since {hhmmss(since)}"
        assert wait_until(lambda: expected in stderr.read_text(), 240, poll=0.2), stderr.read_text()
        assert proc.poll() is None  # a live claim is honoured: still waiting
        # The other host finishes: stores its frames and releases its claims.
        with CacheDir(elsewhere) as theirs, CacheDir(cache) as ours:
            for key in keys[2:]:
                blob = theirs.frames.get(key)
                assert blob is not None, key
                ours.frames.put(key, blob)
                ours.records.delete(claim_key(key))
        code = proc.wait(240)
    finally:
        proc.kill()
    text = stderr.read_text()
    assert code == 0, text
    assert text.count("waiting for frames") >= 1 and "taking over" not in text
    result = json.loads(report.read_text())
    assert (result["rendered"], result["cached"]) == (2, 2)


def test_plan_shows_frames_claimed_by_a_live_render(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "scenes", FRAMES, outputs=("out.gif",))
    cache = tmp_path / "cache"
    keys = plan_keys(scene, cache)
    since = time.time()
    plant(cache, keys[1:3], since=since, renewed=since, lease=3600)
    plant(cache, keys[3:], since=since - 7200, renewed=since - 7200, lease=60)  # lease over: not shown
    claimed = f"claimed by host render-2 pid 4242 since {hhmmss(since)}"
    rows = plan_rows(scene, cache)
    assert [r["status"] for r in rows] == ["not rendered yet", claimed, claimed, "not rendered yet"]
