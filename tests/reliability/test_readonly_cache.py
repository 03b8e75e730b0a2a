"""A complete cache that this process may not write: ``--plan`` and fully cached renders still work.

Two ways to make a cache read-only, both real (as root, ``chmod`` alone is ignored):

- ``mount``: a read-only bind mount in a private mount namespace (``unshare -rm``): every write
  fails with EROFS, even for root;
- ``permissions``: ``chmod -R a-w`` and a process that honours it: this user if it is not root,
  else a process in a new user namespace with no uid mapping (``unshare --user``: it runs as
  nobody, with no power over root's files).

Also: a disk that is full when the cache is opened (a tiny tmpfs) serves reads the same way, and a
render that needs to store frames says why it cannot (exit 1), never "clear the cache".
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from tests.reliability._util import ROOT, write_scene

FRAMES = 4


def _works(args: list[str]) -> bool:
    try:
        return subprocess.run(args, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@cache
def _can(mode: str) -> bool:
    if not shutil.which("unshare"):
        return mode == "permissions" and os.geteuid() != 0
    if mode == "mount":
        return _works(
            ["unshare", "-rm", "sh", "-c", "mount --bind / /mnt 2>/dev/null || mount -t tmpfs t /mnt"]
        )
    if mode == "tmpfs":
        return _works(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"])
    return os.geteuid() != 0 or _works(["unshare", "--user", "true"])


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `root`: size, mtime and sha256 (to prove nothing was written)."""
    return {
        str(f.relative_to(root)): (
            f.stat().st_size,
            f.stat().st_mtime_ns,
            hashlib.sha256(f.read_bytes()).hexdigest(),
        )
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(scene, complete cache, its GIF): a 4-frame scene rendered once."""
    from tests.conftest import run_render

    base = tmp_path_factory.mktemp("readonly")
    os.chmod(base, 0o755)  # readable for the unprivileged process of the 'permissions' mode
    scene = write_scene(base / "scenes", FRAMES, outputs=("out.gif",))
    run_render(scene, base / "cache", "--out", str(base / "first"))
    return scene, base / "cache", base / "first" / "out.gif"


def run_readonly(mode: str, cache_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python render.py ARGS`` with `cache_dir` read-only the `mode` way; the cache is intact after."""
    if not _can(mode):
        pytest.skip(f"cannot make a cache read-only by {mode} here")
    py = [sys.executable, "render.py", *args]
    if mode == "mount":
        script = f'mount --bind "{cache_dir}" "{cache_dir}" && mount -o remount,bind,ro "{cache_dir}" "{cache_dir}" && exec "$@"'
        cmd = ["unshare", "-rm", "sh", "-c", script, "sh", *py]
    else:
        subprocess.run(["chmod", "-R", "a-w", str(cache_dir)], check=True)
        cmd = ["unshare", "--user", *py] if os.geteuid() == 0 else py
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        if mode == "permissions":
            subprocess.run(["chmod", "-R", "u+w", str(cache_dir)], check=True)


MODES = ["mount", "permissions"]


@pytest.mark.parametrize("mode", MODES)
def test_plan_and_a_fully_cached_render_work_and_write_nothing(
    built: tuple[Path, Path, Path], tmp_path: Path, mode: str
) -> None:
    scene, cache_dir, first_gif = built
    before = snapshot(cache_dir)
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(tmp_path, 0o755)

    plan = run_readonly(mode, cache_dir, str(scene), "--plan", "--cache-dir", str(cache_dir))
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.rstrip().endswith(f"{FRAMES} cached, 0 to render")

    render = run_readonly(mode, cache_dir, str(scene), "--cache-dir", str(cache_dir), "--out", str(out), "-q")
    assert render.returncode == 0, render.stderr
    assert f"{FRAMES} frames: 0 rendered, {FRAMES} cached" in render.stdout
    assert (out / "out.gif").read_bytes() == first_gif.read_bytes()
    assert "Traceback" not in plan.stderr + render.stderr

    info = run_readonly(mode, cache_dir, "cache", "info", "--cache-dir", str(cache_dir))
    assert info.returncode == 0, info.stderr
    assert f"{FRAMES} frames, " in info.stdout and "; read-only (" in info.stdout
    assert snapshot(cache_dir) == before  # not a byte, not even a -wal or -shm file


@pytest.mark.parametrize("mode", MODES)
def test_frames_to_render_and_clearing_fail_clearly_and_keep_the_cache(
    built: tuple[Path, Path, Path], tmp_path: Path, mode: str
) -> None:
    scene, cache_dir, _ = built
    before = snapshot(cache_dir)
    os.chmod(tmp_path, 0o777)
    changed = tmp_path / "changed.yaml"
    changed.write_text(scene.read_text().replace("seed: 7", "seed: 8"))

    render = run_readonly(mode, cache_dir, str(changed), "--cache-dir", str(cache_dir), "-q")
    assert render.returncode == 1, render.stderr
    assert "read-only" in render.stderr and f"{FRAMES} frames are not cached" in render.stderr
    assert "render into a cache you can write" in render.stderr  # said before the model loads
    cleared = run_readonly(mode, cache_dir, "cache", "clear", "--yes", "--cache-dir", str(cache_dir))
    assert cleared.returncode == 1
    assert "nothing was cleared" in cleared.stderr
    for result in (render, cleared):
        assert "Traceback" not in result.stderr
        assert "cache clear" not in result.stderr  # an intact cache is never to be cleared
    assert snapshot(cache_dir) == before


def test_a_full_disk_under_the_cache_still_serves_plans_and_cached_renders(
    built: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    if not _can("tmpfs"):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    scene, cache_dir, first_gif = built
    mnt, res = tmp_path / "mnt", tmp_path / "res"
    mnt.mkdir()
    res.mkdir()
    changed = tmp_path / "changed.yaml"
    changed.write_text(scene.read_text().replace("seed: 7", "seed: 8"))
    script = f"""
set -u
mount -t tmpfs -o size=1m tmpfs "{mnt}"
cp -r "{cache_dir}" "{mnt}/cache"
head -c 10M /dev/zero >"{mnt}/filler" 2>/dev/null
cd "{ROOT}"
"{sys.executable}" render.py "{scene}" --plan --cache-dir "{mnt}/cache" >"{res}/plan" 2>&1; echo $? >>"{res}/plan"
"{sys.executable}" render.py "{scene}" --cache-dir "{mnt}/cache" --out "{res}/out" -q >"{res}/render" 2>&1; echo $? >>"{res}/render"
"{sys.executable}" render.py "{changed}" --cache-dir "{mnt}/cache" --out "{res}/out2" -q >"{res}/more" 2>&1; echo $? >>"{res}/more"
"""
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    plan, render, more = ((res / name).read_text() for name in ("plan", "render", "more"))
    assert plan.endswith(f"{FRAMES} cached, 0 to render\n0\n"), plan
    assert f"{FRAMES} frames: 0 rendered, {FRAMES} cached" in render and render.endswith("\n0\n"), render
    assert (res / "out" / "out.gif").read_bytes() == first_gif.read_bytes()
    # Frames that must be stored: exit 1 as for a disk that fills up while rendering, saying why.
    assert more.endswith("\n1\n"), more
    assert "the disk is full" in more and "Traceback" not in more and "cache clear" not in more
