"""Disk full while a frame is stored and while an output is written.

README: exit code 1 "failed while rendering (e.g. disk full; finished frames stay cached)"; "Every output is
written to a temporary file beside it and renamed into place, so a failed run never leaves a broken file".

The faults are simulated in-process (``pipeline.cli.main``) with monkeypatch, in the forms a full disk really
takes (each was first seen with a real, tiny tmpfs; the last tests here repeat that where the machine allows it):

- an ``OSError(ENOSPC)`` from a write: Pillow writing a GIF, or a frame store that raises it;
- ``sqlite3.OperationalError: database or disk is full``: how diskcache/sqlite report it for a frame, which is
  stored inline in the sqlite database;
- ffmpeg exiting with status 228 (-ENOSPC) after "Error writing trailer: No space left on device", leaving an
  empty or truncated MP4: simulated with an ``IMAGEIO_FFMPEG_EXE`` wrapper around the real ffmpeg.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.store.cache import CacheDir, Store
from tests.reliability._util import (
    ROOT,
    frame_logger,
    gif_frames,
    mp4_frames,
    partials,
    read_log,
    write_scene,
)

FRAMES = 24
FAIL_AFTER = 10  # frames stored before the disk is full
ENOSPC_TEXT = "No space left on device"


def cli(
    scene: Path,
    cache: Path,
    out: Path,
    capsys: pytest.CaptureFixture[str],
    *extra: str,
    log: Path | None = None,
) -> tuple[Any, str]:
    """Run the CLI in this process: (exit code, stderr). An exception escaping ``main`` is a traceback for a
    user; it is returned as the code ``'uncaught <type>: <message>'`` so assertions say what happened.
    With ``log``, every frame stored is logged there (``frame_logger``)."""
    capsys.readouterr()
    try:
        main(
            [
                str(scene),
                "--cache-dir",
                str(cache),
                "--out",
                str(out),
                "-q",
                "--report",
                str(out.parent / "report.json"),
                *extra,
            ],
            progress=frame_logger(log) if log is not None else None,
        )
        code: Any = 0
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:
        code = f"uncaught {type(exc).__name__}: {exc}"
    return code, capsys.readouterr().err


def report(out: Path) -> dict[str, Any]:
    return json.loads((out.parent / "report.json").read_text())


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a 24-frame scene rendered once (12 fps): ``scenes/``, ``cache/``, ``out/``."""
    base = tmp_path_factory.mktemp("disk-full")
    scene = write_scene(base / "scenes", FRAMES, fps=12)
    with pytest.raises(SystemExit) as exc:
        main([str(scene), "--cache-dir", str(base / "cache"), "--out", str(base / "out"), "-q"])
    assert exc.value.code in (0, None)
    return base


@pytest.fixture
def copy(rendered: Path, tmp_path: Path) -> Path:
    """This test's own copy of ``rendered``, with the scene switched to 6 fps: both outputs must be rewritten."""
    for name in ("scenes", "cache", "out"):
        shutil.copytree(rendered / name, tmp_path / name)
    write_scene(tmp_path / "scenes", FRAMES, fps=6)
    return tmp_path


def fill_frames_store_after(monkeypatch: pytest.MonkeyPatch, n: int, error: Exception) -> None:
    """The frame store raises ``error`` from the (n+1)-th frame on; other stores keep working."""
    real_put = Store.put
    stored = Counter[str]()

    def put(self: Store, key: str, payload: bytes) -> None:
        if self.directory.name == "frames":
            if stored["frames"] >= n:
                raise error
            stored["frames"] += 1
        real_put(self, key, payload)

    monkeypatch.setattr(Store, "put", put)


def check_stored_frames_readable(cache: Path, keys: list[str]) -> None:
    with CacheDir(cache) as store:
        for key in keys:
            blob = store.frames.get(key)
            assert blob is not None, f"frame {key[:12]} stored before the failure is gone"
            assert Image.open(io.BytesIO(blob)).size == (32, 32)


# --------------------------------------------------------------------------------------------------
# A frame cannot be stored


def _frame_store_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    scene = write_scene(tmp_path / "scenes", FRAMES)
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "render.log"
    with monkeypatch.context() as patch:
        fill_frames_store_after(patch, FAIL_AFTER, error)
        code, stderr = cli(scene, cache, out, capsys, "--batch-size", "4", log=log)
    assert code == 1, f"exit {code!r}; stderr:\n{stderr}"
    assert ENOSPC_TEXT in stderr or "disk is full" in stderr, stderr
    assert "frames finished so far are cached" in stderr
    assert "Traceback" not in stderr
    assert not out.exists() or not partials(out)
    stored = [key for key, _ in read_log(log)]
    assert len(stored) == FAIL_AFTER
    check_stored_frames_readable(cache, stored)

    # Without the fault, the next run renders only the missing frames.
    code, stderr = cli(scene, cache, out, capsys, "--batch-size", "4", log=log)
    assert code == 0, stderr
    assert (report(out)["rendered"], report(out)["cached"]) == (FRAMES - FAIL_AFTER, FAIL_AFTER)
    counts = Counter(key for key, _ in read_log(log))
    assert len(counts) == FRAMES and set(counts.values()) == {1}
    assert len(gif_frames(out / "out.gif")) == len(mp4_frames(out / "out.mp4")) == FRAMES


@pytest.mark.slow
def test_enospc_while_storing_a_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _frame_store_full(tmp_path, monkeypatch, capsys, OSError(errno.ENOSPC, ENOSPC_TEXT))


@pytest.mark.slow
def test_sqlite_disk_full_while_storing_a_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _frame_store_full(tmp_path, monkeypatch, capsys, sqlite3.OperationalError("database or disk is full"))


# --------------------------------------------------------------------------------------------------
# An output cannot be written


@pytest.mark.slow
def test_enospc_while_writing_the_gif_keeps_the_old_gif(
    copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scene, cache, out = copy / "scenes" / "scene.yaml", copy / "cache", copy / "out"
    old_gif = (out / "out.gif").read_bytes()
    import pipeline.outputs.gif as gif_writer

    real_quantize = gif_writer._quantize
    calls = Counter[str]()

    def quantize(frame: Any, *args: Any) -> Any:  # the disk fills up after a few GIF frames are written
        calls["frames"] += 1
        if calls["frames"] > 5:
            raise OSError(errno.ENOSPC, ENOSPC_TEXT)
        return real_quantize(frame, *args)

    with monkeypatch.context() as patch:
        patch.setattr(gif_writer, "_quantize", quantize)
        code, stderr = cli(scene, cache, out, capsys)
    assert code == 1, stderr
    assert ENOSPC_TEXT in stderr and "frames finished so far are cached" in stderr
    assert "Traceback" not in stderr
    assert (out / "out.gif").read_bytes() == old_gif
    assert not partials(out)

    code, stderr = cli(scene, cache, out, capsys)
    assert code == 0, stderr
    assert report(out)["rendered"] == 0
    assert report(out)["output_status"][str(out / "out.gif")] == "written"
    assert len(gif_frames(out / "out.gif")) == FRAMES
    assert Image.open(out / "out.gif").info["duration"] == 170  # 6 fps now


FFMPEG_FULL_DISK = """#!/bin/sh
# The real ffmpeg, then what it does when the disk fills up as it finishes an MP4: "Error writing trailer:
# No space left on device", exit status 228 (-ENOSPC), the file left {left} bytes long.
"{real}" "$@"
status=$?
for last; do :; done
case "$last" in
  *.mp4)
    if [ "$status" -eq 0 ] && [ -f "$last" ]; then
      truncate -s {left} "$last"
      echo "[out#0/mp4] Error writing trailer: No space left on device" >&2
      exit 228
    fi ;;
esac
exit "$status"
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "left",
    [
        0,
        2048,
    ],
)
def test_disk_full_while_ffmpeg_writes_the_mp4_keeps_the_old_mp4(
    copy: Path, tmp_path: Path, left: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import imageio_ffmpeg

    wrapper = tmp_path / "ffmpeg-full-disk"
    wrapper.write_text(FFMPEG_FULL_DISK.format(real=imageio_ffmpeg.get_ffmpeg_exe(), left=left))
    wrapper.chmod(0o755)
    scene, cache, out = copy / "scenes" / "scene.yaml", copy / "cache", copy / "out"
    old_mp4 = (out / "out.mp4").read_bytes()
    with monkeypatch.context() as patch:
        patch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))
        code, stderr = cli(scene, cache, out, capsys)
    assert (out / "out.mp4").read_bytes() == old_mp4, (
        "the MP4 at the final path changed although its write failed"
    )
    assert len(mp4_frames(out / "out.mp4")) == FRAMES
    assert not partials(out)
    assert code == 1, f"exit {code!r}; stderr:\n{stderr}"
    # The wrapper fakes the failure on a disk with room: the message says what ffmpeg did and asks about space.
    assert "is the disk full?" in stderr and "frames finished so far are cached" in stderr


# --------------------------------------------------------------------------------------------------
# A real full disk: a tiny tmpfs in a private mount namespace (unshare -rm: no root needed, but it needs
# unprivileged user namespaces; skipped where they are not allowed)


@cache
def _tmpfs_available(probe: Path) -> bool:
    probe.mkdir(parents=True, exist_ok=True)
    if not shutil.which("unshare"):
        return False
    try:
        done = subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{probe}'"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def in_tmpfs(tmp_path: Path, script: str, size: str = "256k") -> None:
    """Run ``script`` (sh) in a private mount namespace where ``$MNT`` is a tmpfs of ``size``."""
    if not _tmpfs_available(tmp_path / "probe"):
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {**os.environ, "MNT": str(mnt), "PY": sys.executable}
    full = f'set -u\nmount -t tmpfs -o size={size} tmpfs "$MNT"\ncd "{ROOT}"\n{script}'
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", full], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_real_full_disk_under_the_cache(tmp_path: Path) -> None:
    frames = 80  # enough that the disk fills up well before the render ends
    scene = write_scene(tmp_path / "scenes", frames)
    out, log, res = tmp_path / "out", tmp_path / "render.log", tmp_path / "res"
    res.mkdir()
    logged = f'"$PY" tests/reliability/_logged_render.py "{log}"'
    render = f'{logged} "{scene}" --cache-dir "$MNT/cache" --out "{out}" -q --batch-size 4'
    in_tmpfs(
        tmp_path,
        f"""
# The disk fills up once {FAIL_AFTER // 2} or more frames are stored.
{render} 2>"{res}/stderr" & pid=$!
n=0
while [ "$n" -lt {FAIL_AFTER // 2} ] && kill -0 "$pid" 2>/dev/null; do sleep 0.01; n=$(cat "{log}" 2>/dev/null | wc -l); done
head -c 100M /dev/zero >"$MNT/filler" 2>/dev/null
wait "$pid"; echo $? >"{res}/code"
cp "{log}" "{res}/log1"
rm "$MNT/filler"  # (sqlite cannot even open the cache to read while the disk is full)
"$PY" -c "
import json, os
from pipeline.store.cache import CacheDir
keys = [line.split()[0] for line in open('{log}')] if os.path.exists('{log}') else []
with CacheDir.open_readonly('$MNT/cache') as c:
    print(json.dumps([k for k in keys if c.frames.get(k) is not None]))
" >"{res}/readable" 2>"{res}/stderr2"
{render} --report "{res}/report.json" 2>"{res}/stderr3"; echo $? >"{res}/code3"
""",
        size="16m",
    )
    stderr = (res / "stderr").read_text()
    code = int((res / "code").read_text())
    stored = [key for key, _ in read_log(res / "log1")]  # by the run that hit the full disk
    assert len(stored) < frames, "the render finished before the disk was full"
    assert code == 1 and "Traceback" not in stderr, f"exit {code}:\n{stderr[-3000:]}"
    assert ENOSPC_TEXT in stderr or "disk is full" in stderr
    assert "frames finished so far are cached" in stderr
    assert json.loads((res / "readable").read_text()) == stored, (res / "stderr2").read_text()
    assert int((res / "code3").read_text()) == 0, (res / "stderr3").read_text()
    assert json.loads((res / "report.json").read_text())["rendered"] == frames - len(set(stored))


@pytest.mark.slow
@pytest.mark.parametrize(
    "free",
    [
        0,
        4096,
        # Room for the new MP4 (two 4 KiB pages), not for the GIF (two more) too: the GIF write fails
        # cleanly. (16384 was this before GIFs got a palette fitted to all frames and delta frames:
        # the GIF is about 4 KB now, not 40, and fits.)
        12288,
    ],
)
def test_real_full_disk_under_the_outputs(rendered: Path, tmp_path: Path, free: int) -> None:
    shutil.copytree(rendered / "cache", tmp_path / "cache")
    scene = write_scene(tmp_path / "scenes", FRAMES, fps=12)
    res = tmp_path / "res"
    res.mkdir()
    run = f'"$PY" render.py "{scene}" --cache-dir "{tmp_path / "cache"}" --out "$MNT/out" -q'
    in_tmpfs(
        tmp_path,
        f"""
{run} 2>"{res}/stderr1"; echo $? >"{res}/code1"
cp "$MNT/out/out.mp4" "$MNT/out/out.gif" "{res}/"
avail=$(df -B1 --output=avail "$MNT" | tail -n 1)
head -c $((avail - {free})) /dev/zero >"$MNT/filler" 2>/dev/null || true
sed -i 's/^fps: .*/fps: 6/' "{scene}"
{run} 2>"{res}/stderr2"; echo $? >"{res}/code2"
mkdir "{res}/after"; cp -a "$MNT/out/." "{res}/after/"
rm "$MNT/filler"
{run} 2>"{res}/stderr3"; echo $? >"{res}/code3"
mkdir "{res}/final"; cp -a "$MNT/out/." "{res}/final/"
""",
    )
    assert int((res / "code1").read_text()) == 0, (res / "stderr1").read_text()
    after, final = res / "after", res / "final"
    stderr = (res / "stderr2").read_text()
    # Whatever failed, no broken file at a final path and no temporary file.
    assert not partials(after), partials(after)
    assert len(mp4_frames(after / "out.mp4")) == FRAMES, "a broken MP4 stands at the final path"
    assert (after / "out.gif").read_bytes() == (res / "out.gif").read_bytes()
    code = int((res / "code2").read_text())
    assert code == 1 and "Traceback" not in stderr, f"exit {code}:\n{stderr[-3000:]}"
    assert ENOSPC_TEXT in stderr
    # With room again, the outputs are rewritten.
    assert int((res / "code3").read_text()) == 0, (res / "stderr3").read_text()
    assert not partials(final)
    assert len(gif_frames(final / "out.gif")) == len(mp4_frames(final / "out.mp4")) == FRAMES
    assert Image.open(final / "out.gif").info["duration"] == 170
