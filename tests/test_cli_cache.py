"""``render.py cache info`` and ``cache clear``, and the default cache location."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.cli import DEFAULT_CACHE, main
from pipeline.paths import PROJECT_ROOT
from pipeline.store.cache import CacheDir


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().out


def test_default_cache_is_the_project_cache_folder() -> None:
    assert DEFAULT_CACHE == PROJECT_ROOT / "cache"


def test_info_on_a_missing_cache_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["cache", "info", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0 and "no cache yet" in out
    assert not (tmp_path / "c").exists()


def test_info_counts_and_clear_empties(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CacheDir(tmp_path / "c") as cache:
        for i in range(3):
            cache.frames.put(hashlib.sha256(str(i).encode()).hexdigest(), b"x" * 50_000)
        cache.embeddings.put(hashlib.sha256(b"e").hexdigest(), b"y" * 10)
    (tmp_path / "c" / "README.md").write_text("keep me")
    code, out = run(["cache", "info", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0 and "3 frames, 1 embeddings, 0 records" in out
    code, out = run(["cache", "clear", "--yes", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 0 and "cleared" in out
    with CacheDir(tmp_path / "c") as cache:
        assert cache.counts() == {"frames": 0, "embeddings": 0, "records": 0}
    assert (tmp_path / "c" / "README.md").read_text() == "keep me"


def test_clear_without_yes_asks_and_keeps_on_no(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with CacheDir(tmp_path / "c") as cache:
        cache.frames.put(hashlib.sha256(b"f").hexdigest(), b"png")
    monkeypatch.setattr("typer.confirm", lambda *a, **k: False)
    code, out = run(["cache", "clear", "--cache-dir", str(tmp_path / "c")], capsys)
    assert (code, out) == (0, f"{tmp_path / 'c'}: nothing cleared\n")  # answering no is not a failure
    with CacheDir(tmp_path / "c") as cache:
        assert cache.counts()["frames"] == 1


def _files_mib(root: Path) -> str:
    return f"{sum(f.stat().st_size for f in root.rglob('*') if f.is_file()) / 2**20:.1f} MiB"


def test_info_counts_every_file_on_disk_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with CacheDir(tmp_path / "c") as cache:
        for i in range(40):
            cache.frames.put(hashlib.sha256(str(i).encode()).hexdigest(), bytes([i]) * 20_000)  # inline rows
        # While it is open the pages sit in the -wal file: diskcache's own estimate leaves them out.
        wal = tmp_path / "c" / "frames" / "cache.db-wal"
        assert wal.stat().st_size > 500_000
        code, out = run(["cache", "info", "--cache-dir", "c"], capsys)
        assert code == 0
        assert (
            out
            == f"{tmp_path / 'c'}: {_files_mib(tmp_path / 'c')} on disk; 40 frames, 0 embeddings, 0 records\n"
        )
        assert cache.frames._cache.volume() < wal.stat().st_size  # what was shown before


def _damage(store: Path) -> None:
    (store / "cache.db").write_bytes(b"not a database at all" * 400)
    for extra in ("cache.db-wal", "cache.db-shm"):
        (store / extra).unlink(missing_ok=True)


def _filled(root: Path) -> None:
    with CacheDir(root) as cache:
        cache.frames.put(hashlib.sha256(b"f").hexdigest(), b"png")
        cache.embeddings.put(hashlib.sha256(b"e").hexdigest(), b"emb")
        cache.records.put_json(hashlib.sha256(b"r").hexdigest(), {"r": 1})


def test_clear_one_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _filled(tmp_path / "c")
    code, out = run(
        ["cache", "clear", "--yes", "--store", "frames", "--cache-dir", str(tmp_path / "c")], capsys
    )
    assert code == 0 and out.endswith("(frames)\n"), out
    with CacheDir(tmp_path / "c") as cache:
        assert cache.counts() == {"frames": 0, "embeddings": 1, "records": 1}


def test_clear_an_unknown_store_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _filled(tmp_path / "c")
    with pytest.raises(SystemExit) as exc:
        main(["cache", "clear", "--yes", "--store", "frame", "--cache-dir", str(tmp_path / "c")])
    assert exc.value.code == 2
    assert "--store: 'frame' is not a store; stores: frames, embeddings, records" in capsys.readouterr().err


def test_a_damaged_store_is_named_and_only_it_is_cleared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "c"
    _filled(root)
    _damage(root / "frames")
    with pytest.raises(SystemExit) as exc:
        main(["cache", "info", "--cache-dir", str(root)])
    captured = capsys.readouterr()
    assert exc.value.code == 2
    assert "frames unreadable, 1 embeddings, 1 records" in captured.out
    assert f"cannot open the frames store of the cache in {root}: file is not a database" in captured.err
    assert f"cache clear --store frames --yes --cache-dir {root}" in captured.err
    assert "cache clear --yes" not in captured.err  # never the advice that empties the intact stores

    code, out = run(["cache", "clear", "--yes", "--cache-dir", str(root)], capsys)
    assert code == 0
    assert "the frames store was damaged (file is not a database); removed it" in out
    assert (
        "kept the intact embeddings, records; to empty them too: cache clear --store embeddings --store records"
        in out
    )
    with CacheDir(root) as cache:
        assert cache.counts() == {"frames": 0, "embeddings": 1, "records": 1}
