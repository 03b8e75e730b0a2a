"""A cache directory is untrusted input: tampering with a stored frame is a warning and a re-render,
never a crash, a wrong frame, or code run from the cache.

One clean render per storage form (32x32 frames are small PNGs stored inline in sqlite; 128x128 frames
are over diskcache's 32 KiB ``min_file_size`` and live in ``.val`` files), then, in a copy of its cache,
each kind of tampering on one frame, followed by a render whose outputs need a rewrite (fps changed) or
are up to date. The final frames and outputs are decoded and compared with the clean render's.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import warnings
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import diskcache
import numpy as np
import pytest

from pipeline.store.cache import CacheWarning
from tests.reliability._helpers_inputs import (
    Payload,
    cached_frames,
    cli,
    folder_frames,
    gif_frames,
    max_diff,
    plan_of,
    render_ok,
    row,
    scene_in,
    update_row,
)

pytestmark = pytest.mark.slow

SCENE = """\
model: tiny
size: [{size}, {size}]
steps: 2
seed: 5
fps: {fps}
keyframes:
  - {{frame: 0, prompt: a red barn}}
  - {{frame: 7, prompt: a blue lake}}
outputs: [out.gif, frames/]
"""
DAMAGED = 3  # the frame whose stored value is tampered with

MODE_RAW, MODE_BINARY, MODE_PICKLE = (
    diskcache.core.MODE_RAW,
    diskcache.core.MODE_BINARY,
    diskcache.core.MODE_PICKLE,
)


@dataclass
class Baseline:
    size: int
    folder: Path
    keys: list[str]
    frames: list[np.ndarray]  # decoded from the clean cache, in frame order
    gif: list[np.ndarray]

    @property
    def cache(self) -> Path:
        return self.folder / "cache"


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Baseline]:
    out = {}
    for size in (32, 128):
        folder = tmp_path_factory.mktemp(f"clean{size}")
        scene = scene_in(folder, SCENE.format(size=size, fps=12))
        # One frame per batch, as the damaged frame will be rendered again: batched CPU kernels may move
        # a pixel by a level (see test_modes' batch tests), and this test compares exactly.
        report = render_ok(scene, folder / "cache", "--batch-size", "1")
        assert report["rendered"] == 8
        keys = [job.key for job in plan_of(scene)]
        assert len(set(keys)) == 8
        frames = cached_frames(folder / "cache", keys)
        # The outputs of the clean render hold exactly the cached frames.
        assert max_diff(folder_frames(folder / "renders" / "scene" / "frames"), frames) == 0
        out[size] = Baseline(size, folder, keys, frames, gif_frames(folder / "renders" / "scene" / "out.gif"))
    # The premise of the two storage forms: inline rows at 32x32, value files at 128x128.
    assert {row(out[32].cache, k)[0] for k in out[32].keys} == {MODE_RAW}
    assert all(row(out[32].cache, k)[1] is None for k in out[32].keys)
    assert {row(out[128].cache, k)[0] for k in out[128].keys} == {MODE_BINARY}
    return out


# -- the kinds of tampering ------------------------------------------------------------------


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x5A
    return bytes(b)


def flip_inline(cache: Path, key: str, payload: Path) -> None:
    mode, filename, value = row(cache, key)
    assert mode == MODE_RAW and filename is None and value
    update_row(cache, key, value=sqlite3.Binary(_flip(value)))


def _value_file(cache: Path, key: str) -> Path:
    mode, filename, _ = row(cache, key)
    assert mode == MODE_BINARY and filename
    path = cache / "frames" / filename
    assert path.is_file() and path.stat().st_size > 32 * 1024
    return path


def flip_file(cache: Path, key: str, payload: Path) -> None:
    path = _value_file(cache, key)
    path.write_bytes(_flip(path.read_bytes()))


def truncate_file(cache: Path, key: str, payload: Path) -> None:
    path = _value_file(cache, key)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def delete_file(cache: Path, key: str, payload: Path) -> None:
    _value_file(cache, key).unlink()


def pickle_inline(cache: Path, key: str, payload: Path) -> None:
    update_row(
        cache, key, mode=MODE_PICKLE, filename=None, value=sqlite3.Binary(pickle.dumps(Payload(payload)))
    )


def pickle_file(cache: Path, key: str, payload: Path) -> None:
    path = _value_file(cache, key)
    path.write_bytes(pickle.dumps(Payload(payload)))
    update_row(cache, key, mode=MODE_PICKLE)


def _other_envelope(cache: Path, key: str) -> bytes:
    """The stored bytes (a valid envelope) of another frame: right checksum, wrong picture."""
    with closing(sqlite3.connect(cache / "frames" / "cache.db")) as db:
        mode, filename, value = db.execute(
            "SELECT mode, filename, value FROM Cache WHERE key != ? AND raw = 1 LIMIT 1", (key,)
        ).fetchone()
    return bytes(value) if mode == MODE_RAW else (cache / "frames" / filename).read_bytes()


def escape_relative(cache: Path, key: str, payload: Path) -> None:
    """The row's file name climbs out of the store to a file holding a valid envelope of another frame."""
    outside = payload.parent / "outside_rel.val"
    outside.write_bytes(_other_envelope(cache, key))
    _value_file(cache, key)
    update_row(cache, key, filename=os.path.relpath(outside, cache / "frames"))


def escape_absolute(cache: Path, key: str, payload: Path) -> None:
    """An inline row turned into a value-file row with an absolute file name outside the store."""
    outside = payload.parent / "outside_abs.val"
    outside.write_bytes(_other_envelope(cache, key))
    update_row(cache, key, mode=MODE_BINARY, filename=str(outside), value=None)


KINDS: dict[str, tuple[int, Callable[[Path, str, Path], None]]] = {
    "flip_inline": (32, flip_inline),
    "pickle_inline": (32, pickle_inline),
    "escape_absolute": (32, escape_absolute),
    "flip_file": (128, flip_file),
    "truncate_file": (128, truncate_file),
    "delete_file": (128, delete_file),
    "pickle_file": (128, pickle_file),
    "escape_relative": (128, escape_relative),
}


def _setup(base: Baseline, tmp_path: Path, fps: int) -> tuple[Path, Path]:
    folder = tmp_path / "work"
    scene = scene_in(folder, SCENE.format(size=base.size, fps=fps))
    cache = folder / "cache"
    shutil.copytree(base.cache, cache)
    return scene, cache


def _check_final_state(base: Baseline, scene: Path, cache: Path) -> None:
    """Every frame in the cache and in both outputs equals the clean render's, pixel for pixel."""
    assert max_diff(cached_frames(cache, base.keys), base.frames) == 0
    renders = scene.parent / "renders" / "scene"
    assert max_diff(folder_frames(renders / "frames"), base.frames) == 0
    assert max_diff(gif_frames(renders / "out.gif"), base.gif) == 0
    assert row(cache, base.keys[DAMAGED])[0] in (MODE_RAW, MODE_BINARY)


def _outside_files(folder: Path) -> dict[Path, bytes]:
    """Files outside the store that a tampered row names: they must be neither deleted nor changed."""
    return {path: path.read_bytes() for path in folder.glob("outside_*.val")}


def _cache_warnings(caught: list[warnings.WarningMessage], key: str) -> list[str]:
    return [
        str(w.message) for w in caught if issubclass(w.category, CacheWarning) and key[:16] in str(w.message)
    ]


# -- the tests -------------------------------------------------------------------------------


def test_pickle_payload_would_run_under_plain_diskcache(
    baselines: dict[int, Baseline], tmp_path: Path
) -> None:
    """Control: the pickle rows used below are live ammunition; a plain diskcache read runs them."""
    for size, tamper in ((32, pickle_inline), (128, pickle_file)):
        base = baselines[size]
        cache = tmp_path / f"c{size}"
        shutil.copytree(base.cache, cache)
        payload = tmp_path / f"pwned{size}"
        tamper(cache, base.keys[DAMAGED], payload)
        with diskcache.Cache(str(cache / "frames")) as plain:
            plain.get(base.keys[DAMAGED])
        assert payload.exists()


@pytest.mark.parametrize("kind", list(KINDS))
def test_tampered_frame_is_rerendered_when_outputs_are_rewritten(
    kind: str, baselines: dict[int, Baseline], tmp_path: Path
) -> None:
    size, tamper = KINDS[kind]
    base = baselines[size]
    scene, cache = _setup(base, tmp_path, fps=10)  # fps changed: every output must be written again
    payload = tmp_path / "pwned"
    key = base.keys[DAMAGED]
    tamper(cache, key, payload)
    outside = _outside_files(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = render_ok(scene, cache)
    assert _cache_warnings(caught, key), [str(w.message) for w in caught]
    assert (report["rendered"], report["cached"]) == (1, 7)
    assert set(report["output_status"].values()) == {"written"}
    assert not payload.exists()
    _check_final_state(base, scene, cache)
    assert _outside_files(tmp_path) == outside


@pytest.mark.parametrize("kind", list(KINDS))
def test_tampered_frame_with_outputs_up_to_date_is_detected(
    kind: str, baselines: dict[int, Baseline], tmp_path: Path
) -> None:
    size, tamper = KINDS[kind]
    base = baselines[size]
    scene, cache = _setup(base, tmp_path, fps=12)
    render_ok(scene, cache)
    key = base.keys[DAMAGED]
    tamper(cache, key, tmp_path / "pwned")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = render_ok(scene, cache)
    # Even with every output up to date, the damaged frame is found, warned about and rendered again.
    assert _cache_warnings(caught, key)
    assert (report["rendered"], report["cached"]) == (1, 7)
    assert not (tmp_path / "pwned").exists()
    _check_final_state(base, scene, cache)


def test_cli_prints_cache_warnings_and_rerenders(baselines: dict[int, Baseline], tmp_path: Path) -> None:
    """Through ``python render.py``: a flipped inline frame and a pickle-mode row are warned about on
    stderr, both frames are rendered again, and no payload runs."""
    base = baselines[32]
    scene, cache = _setup(base, tmp_path, fps=10)
    payload = tmp_path / "pwned"
    flip_inline(cache, base.keys[2], payload)
    pickle_inline(cache, base.keys[5], payload)
    report = tmp_path / "report.json"
    result = cli(str(scene), "--cache-dir", str(cache), "--report", str(report), "-q", "--batch-size", "1")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for key in (base.keys[2], base.keys[5]):
        lines = [line for line in result.stderr.splitlines() if key[:16] in line]
        assert any("CacheWarning" in line and "treated as a miss" in line for line in lines), result.stderr
    assert "8 frames: 2 rendered, 6 cached" in result.stdout
    assert not payload.exists()
    _check_final_state(base, scene, cache)


# -- a damaged store, not just an entry --------------------------------------------------------------


def test_corrupt_store_database_is_reported_and_clearable(
    baselines: dict[int, Baseline], tmp_path: Path
) -> None:
    base = baselines[32]
    scene, cache = _setup(base, tmp_path, fps=12)
    db = cache / "frames" / "cache.db"
    db.write_bytes(os.urandom(8192))
    for extra in (["--plan"], ["-q"]):
        result = cli(str(scene), "--cache-dir", str(cache), *extra)
        assert "Traceback" not in result.stdout + result.stderr
        assert result.returncode in (1, 2)
        assert str(db) in result.stderr or str(cache) in result.stderr
    cleared = cli("cache", "clear", "--yes", "--cache-dir", str(cache))
    assert cleared.returncode == 0 and "Traceback" not in cleared.stderr
    again = cli(str(scene), "--cache-dir", str(cache), "-q")
    assert again.returncode == 0, again.stderr


def test_cache_dir_that_is_a_file_is_bad_input(tmp_path: Path) -> None:
    scene = scene_in(tmp_path / "scene", SCENE.format(size=32, fps=12))
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("I am a file\n")
    result = cli(str(scene), "--cache-dir", str(not_a_dir), "-q")
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2
    assert "--cache-dir" in result.stderr or str(not_a_dir) in result.stderr
    assert not_a_dir.read_text() == "I am a file\n"
