"""``render.py cache info`` and ``cache clear``, and the default cache location."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.cache import CacheDir
from pipeline.cli import DEFAULT_CACHE, PROJECT_ROOT, main


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
    assert code == 0 and "3 frames, 1 embeddings" in out
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
    code, _ = run(["cache", "clear", "--cache-dir", str(tmp_path / "c")], capsys)
    assert code == 1
    with CacheDir(tmp_path / "c") as cache:
        assert cache.counts()["frames"] == 1
