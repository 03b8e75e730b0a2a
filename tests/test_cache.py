"""Tests for pipeline.store.cache: round trips, integrity envelope, no unpickling, no eviction, concurrency."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import diskcache
import pytest

import pipeline.store.blobs as blobs_mod
import pipeline.store.cache as cache_mod
from pipeline.plan.keys import canonical_json
from pipeline.store.cache import (
    ENVELOPE_MAGIC,
    CacheDir,
    CacheWarning,
    SafeDisk,
    Store,
    UnsafeEntry,
    check_key,
)
from pipeline.store.records import record_key

BIG = 100_000  # > diskcache's default min_file_size (32 KiB): stored in its own value file


def k(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def value_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "frames")
    yield s
    s.close()


class Boom:
    """Unpickling this creates the file at `path`: proof that something called pickle.load."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- round trips ------------------------------------------------------------------------------


def test_bytes_round_trip_inline_and_file(store: Store) -> None:
    small, big = b"\x89PNG small", os.urandom(BIG)
    store.put(k(1), small)
    store.put(k(2), big)
    assert store.get(k(1)) == small
    assert store.get(k(2)) == big
    assert store.get(k(3)) is None
    assert len(value_files(store.directory)) == 1  # only the big one has a file
    store.put(k(1), b"replaced")
    assert store.get(k(1)) == b"replaced"
    assert store.get(k(9)) is None


def test_empty_payload_round_trips(store: Store) -> None:
    store.put(k(1), b"")
    assert store.get(k(1)) == b""


def test_json_round_trip_is_canonical(store: Store) -> None:
    obj = {"b": [1, 2.5, None, True], "a": "héllo", "c": {"z": 1, "y": 2}}
    store.put_json(k(1), obj)
    assert store.get_json(k(1)) == obj
    assert store.get(k(1)) == '{"a":"héllo","b":[1,2.5,null,true],"c":{"y":2,"z":1}}'.encode()
    assert canonical_json({"y": 1, "x": 2}) == canonical_json({"x": 2, "y": 1})
    assert store.get_json(k(2)) is None
    with pytest.raises(ValueError):
        store.put_json(k(3), float("nan"))  # not JSON; would break canonical bytes


def test_get_json_on_non_json_is_a_miss(store: Store) -> None:
    store.put(k(1), b"\xff not json")
    with pytest.warns(CacheWarning, match="not a JSON record"):
        assert store.get_json(k(1)) is None
    assert k(1) not in store


def test_contains_delete_len_keys(store: Store) -> None:
    assert k(1) not in store
    store.put(k(1), b"a")
    store.put(k(2), os.urandom(BIG))
    assert k(1) in store and k(2) in store
    assert "not a key" not in store and 42 not in store
    assert len(store) == 2
    assert sorted(store.keys()) == sorted([k(1), k(2)])
    assert store.delete(k(2)) is True
    assert store.delete(k(2)) is False
    assert k(2) not in store and len(store) == 1
    assert value_files(store.directory) == []


def test_present_returns_exactly_the_stored_subset(store: Store) -> None:
    keys = [k(i) for i in range(10_000)]
    stored = set(keys[::3])
    with store._cache.transact():  # one transaction: keeps the test fast
        for key in stored:
            store.put(key, b"v")
    assert store.present(keys) == stored
    assert store.present(iter(keys)) == stored  # any iterable, consumed once
    assert store.present([]) == set()
    assert store.present(keys[:10] + keys[:10]) == stored & set(keys[:10])


def test_present_uses_both_strategies(store: Store, monkeypatch) -> None:
    keys = [k(i) for i in range(3_000)]
    stored = set(keys[::2])
    with store._cache.transact():
        for key in stored:
            store.put(key, b"v")
    # Few keys asked of a big store: chunked IN queries (chunk smaller than the question).
    monkeypatch.setattr(blobs_mod, "_PRESENT_CHUNK", 7)  # Store lives in store/blobs.py
    assert store.present(keys[:100]) == stored & set(keys[:100])
    # Many keys asked of a store of similar size: one index scan.
    assert store.present(keys) == stored


def test_present_is_fast(store: Store) -> None:
    keys = [k(i) for i in range(100_000)]
    with store._cache.transact():
        for key in keys[:1000]:
            store.put(key, b"v")
    start = time.perf_counter()
    assert len(store.present(keys)) == 1000
    # 0.1-0.3 s measured; a per-key loop takes 0.6-0.8 s. Generous bound for slow CI machines.
    assert time.perf_counter() - start < 5


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [bytearray(b"abc"), memoryview(b"x"), "text", 3, None, {"a": 1}, [b"x"]])
def test_non_bytes_values_rejected(store: Store, bad: object) -> None:
    with pytest.raises(TypeError):
        store.put(k(1), bad)  # type: ignore[arg-type]
    assert k(1) not in store


@pytest.mark.parametrize(
    "bad",
    ["", "abc", k(1).upper(), k(1)[:-1], k(1) + "0", "../" + k(1)[3:], k(1)[:-1] + "g", k(1)[:-1] + "\n"],
)
def test_invalid_keys_rejected(store: Store, bad: str) -> None:
    with pytest.raises(ValueError):
        store.put(bad, b"x")
    with pytest.raises(ValueError):
        store.get(bad)
    with pytest.raises(ValueError):
        store.present([k(1), bad])


@pytest.mark.parametrize("bad", [b"0" * 64, 12, ("a",), None])
def test_non_str_keys_rejected(store: Store, bad: object) -> None:
    with pytest.raises(TypeError):
        store.put(bad, b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        check_key(bad)


def test_safedisk_refuses_non_str_keys_and_non_bytes_values(tmp_path: Path) -> None:
    cache = diskcache.Cache(str(tmp_path), disk=SafeDisk)
    try:
        with pytest.raises(TypeError):
            cache.set(("tuple", "key"), b"x")
        with pytest.raises(TypeError):
            cache.set("key", {"would": "be pickled"})
        cache.set("key", b"fine")
        # diskcache's own readers get the sealed envelope, never an unchecked payload.
        sealed = cache.get("key")
        assert sealed.startswith(ENVELOPE_MAGIC) and sealed.endswith(b"fine")
    finally:
        cache.close()


def test_a_value_moved_under_another_key_is_caught(tmp_path: Path) -> None:
    """The digest covers the key: two swapped rows are two corrupt entries, not two wrong frames."""
    store = Store(tmp_path / "s")
    store.put(k(1), b"frame one")
    store.put(k(2), b"frame two")
    db = sqlite3.connect(tmp_path / "s" / "cache.db")
    one, two = (
        db.execute("SELECT value FROM Cache WHERE key = ?", (key,)).fetchone()[0] for key in (k(1), k(2))
    )
    db.execute("UPDATE Cache SET value = ? WHERE key = ?", (two, k(1)))
    db.execute("UPDATE Cache SET value = ? WHERE key = ?", (one, k(2)))
    db.commit()
    db.close()
    with pytest.warns(CacheWarning):
        assert store.get(k(1)) is None
    with pytest.warns(CacheWarning):
        assert store.get(k(2)) is None
    store.close()


def test_record_key() -> None:
    assert check_key(record_key("plan", "scenes/a.yaml")) == record_key("plan", "scenes/a.yaml")
    assert record_key("a", "bc") != record_key("ab", "c")


# -- never unpickle ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, BIG], ids=["inline", "value-file"])
def test_pickled_value_is_never_unpickled(tmp_path: Path, size: int) -> None:
    marker = tmp_path / "pwned"
    directory = tmp_path / "frames"
    Store(directory).close()  # created by us, then poisoned by "someone" with plain diskcache
    plain = diskcache.Cache(str(directory))
    plain.set(k(1), [Boom(str(marker)), b"x" * size])
    plain.close()
    assert not marker.exists()

    store = Store(directory)
    with pytest.warns(CacheWarning, match="pickle"):
        assert store.get(k(1)) is None
    assert not marker.exists()
    assert k(1) not in store  # the unsafe row was removed
    assert value_files(directory) == []
    store.close()


def test_safedisk_never_calls_pickle(tmp_path: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was called")

    monkeypatch.setattr(diskcache.core.pickle, "load", refuse)
    monkeypatch.setattr(diskcache.core.pickle, "loads", refuse)
    disk = SafeDisk(str(tmp_path))
    with pytest.raises(UnsafeEntry):
        disk.get(b"\x80\x04\x95pickled key", False)
    with pytest.raises(UnsafeEntry):
        disk.fetch(diskcache.core.MODE_PICKLE, None, b"\x80\x04N.", False)


def test_pickled_keys_are_invisible(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    directory = tmp_path / "records"
    Store(directory).close()
    plain = diskcache.Cache(str(directory))
    plain.set((Boom(str(marker)),), 1)  # a non-raw (pickled) key
    plain.close()
    store = Store(directory)
    assert list(store.keys()) == []
    assert store.present([k(1)]) == set()
    # Iterating with a SafeDisk cache refuses the key instead of unpickling it.
    with pytest.raises(UnsafeEntry):
        list(store._cache)
    assert not marker.exists()
    store.close()


# -- corruption -------------------------------------------------------------------------------


def corrupt_read(store: Store, key: str, match: str, caplog) -> None:
    """Reading `key` warns (CacheWarning + log), returns None, and removes the entry."""
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.store.cache"),
        pytest.warns(CacheWarning, match=match),
    ):
        assert store.get(key) is None
    assert any(r.name == "pipeline.store.cache" and r.levelno == logging.WARNING for r in caplog.records)
    assert key not in store
    # A second read is a plain miss: nothing left to warn about.
    assert store.get(key) is None


def test_flipped_byte_in_value_file(store: Store, caplog) -> None:
    store.put(k(1), os.urandom(BIG))
    store.put(k(2), b"neighbour")
    (path,) = value_files(store.directory)
    data = bytearray(path.read_bytes())
    assert data.startswith(ENVELOPE_MAGIC)
    data[BIG // 2] ^= 0x01
    path.write_bytes(bytes(data))
    corrupt_read(store, k(1), "checksum", caplog)
    assert not path.exists()
    assert store.get(k(2)) == b"neighbour"


def test_bad_magic_in_value_file(store: Store, caplog) -> None:
    store.put(k(1), os.urandom(BIG))
    (path,) = value_files(store.directory)
    data = bytearray(path.read_bytes())
    data[0:4] = b"XXXX"
    path.write_bytes(bytes(data))
    corrupt_read(store, k(1), "magic", caplog)


@pytest.mark.parametrize("keep", [BIG // 2, 10, 0])
def test_truncated_value_file(store: Store, caplog, keep: int) -> None:
    store.put(k(1), os.urandom(BIG))
    (path,) = value_files(store.directory)
    with open(path, "r+b") as handle:
        handle.truncate(keep)
    corrupt_read(store, k(1), "checksum|truncated", caplog)


def test_deleted_value_file(store: Store, caplog) -> None:
    store.put(k(1), os.urandom(BIG))
    (path,) = value_files(store.directory)
    path.unlink()
    corrupt_read(store, k(1), "missing", caplog)
    assert len(store) == 0


def _rewrite_row(store: Store, key: str, **columns: object) -> None:
    con = sqlite3.connect(store.directory / "cache.db")
    try:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        cursor = con.execute(f"UPDATE Cache SET {assignments} WHERE key = ?", (*columns.values(), key))
        assert cursor.rowcount == 1
        con.commit()
    finally:
        con.close()


def test_inline_value_corrupted_in_sqlite(store: Store, caplog) -> None:
    store.put(k(1), b"a small record")
    con = sqlite3.connect(store.directory / "cache.db")
    ((blob,),) = con.execute("SELECT value FROM Cache WHERE key = ?", (k(1),)).fetchall()
    con.close()
    flipped = bytearray(blob)
    flipped[-1] ^= 0x80
    _rewrite_row(store, k(1), value=bytes(flipped))
    corrupt_read(store, k(1), "checksum", caplog)


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"value": b"no envelope at all, long enough to hold a header......"}, "magic"),
        ({"value": b"SDS1"}, "truncated"),
        ({"value": "a text value"}, "type str"),
        ({"value": 12345}, "type int"),
        ({"mode": 3}, "mode"),  # MODE_TEXT: not ours
        ({"mode": 2, "filename": None}, "suspicious"),
        ({"mode": 2, "filename": "../../../etc/passwd"}, "suspicious"),
    ],
)
def test_rewritten_rows_are_misses(store: Store, caplog, columns: dict, match: str) -> None:
    store.put(k(1), b"a small record")
    _rewrite_row(store, k(1), **columns)
    corrupt_read(store, k(1), match, caplog)


def test_suspicious_filename_is_never_deleted(tmp_path: Path, caplog) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store = Store(tmp_path / "frames")
    store.put(k(1), os.urandom(BIG))
    store.put(k(2), os.urandom(BIG))
    _rewrite_row(store, k(1), filename="../victim.txt")
    with pytest.warns(CacheWarning):
        assert store.get(k(1)) is None
    _rewrite_row(store, k(2), filename="../victim.txt")
    store.clear()  # diskcache's clear removes each row's file: must refuse this one
    assert victim.read_text() == "keep me"
    store.close()


def test_corrupt_entry_in_readonly_store_is_reported_not_deleted(tmp_path: Path) -> None:
    with CacheDir(tmp_path / "cache") as cache:
        cache.frames.put(k(1), b"x")
    _rewrite_row(Store(tmp_path / "cache" / "frames"), k(1), value=b"garbage" * 10)
    ro = CacheDir.open_readonly(tmp_path / "cache")
    assert ro is not None
    with pytest.warns(CacheWarning):
        assert ro.frames.get(k(1)) is None
    assert k(1) in ro.frames  # left for a writer to clean up
    with pytest.raises(PermissionError):
        ro.frames.put(k(2), b"x")
    with pytest.raises(PermissionError):
        ro.clear()
    ro.close()


def test_concurrent_overwrite_or_delete_is_not_corruption(tmp_path: Path, monkeypatch) -> None:
    """Another process replacing a value removes the old value file right after its commit. A reader
    that selected the old row then finds the file gone: that is a race, not corruption, and must
    neither warn nor delete the fresh value."""
    store, other = Store(tmp_path / "frames"), Store(tmp_path / "frames")
    first, second = os.urandom(BIG), os.urandom(BIG)
    store.put(k(1), first)
    store.put(k(2), first)
    real_fetch = SafeDisk.fetch
    race = []

    def racing_fetch(self, mode, filename, value, read):
        if race:
            race.pop()()  # the "other process" acts between our SELECT and our open()
        return real_fetch(self, mode, filename, value, read)

    monkeypatch.setattr(SafeDisk, "fetch", racing_fetch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        race.append(lambda: other.put(k(1), second))
        assert store.get(k(1)) == second
        race.append(lambda: other.delete(k(2)))
        assert store.get(k(2)) is None
    assert store.get(k(1)) == second
    store.close()
    other.close()


# -- settings, directories --------------------------------------------------------------------


def test_no_eviction_settings(tmp_path: Path) -> None:
    with CacheDir(tmp_path / "cache") as cache:
        for store in cache.stores.values():
            settings = store.settings()
            assert settings["eviction_policy"] == "none"
            assert settings["size_limit"] >= 2**60
            assert settings["statistics"] == 0
            assert store._cache.timeout >= 30
            # Persisted too, so any process opening the store sees the same policy.
            con = sqlite3.connect(store.directory / "cache.db")
            persisted = dict(con.execute("SELECT key, value FROM Settings").fetchall())
            con.close()
            assert persisted["eviction_policy"] == "none"
            assert persisted["size_limit"] >= 2**60


def test_reopening_a_default_diskcache_switches_off_eviction(tmp_path: Path) -> None:
    plain = diskcache.Cache(str(tmp_path / "frames"), size_limit=1000)
    plain.close()
    store = Store(tmp_path / "frames")
    assert store.settings()["eviction_policy"] == "none"
    for i in range(20):
        store.put(k(i), os.urandom(BIG))  # far beyond the old 1000-byte limit
    assert len(store) == 20
    store.close()


def test_open_readonly_missing_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "cache"
    assert CacheDir.exists(missing) is False
    assert CacheDir.open_readonly(missing) is None
    assert not (tmp_path / "nope").exists()
    # An existing but empty directory (e.g. a fresh checkout's cache/ with .gitkeep) is not a cache.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".gitkeep").touch()
    assert CacheDir.open_readonly(empty) is None
    assert sorted(p.name for p in empty.iterdir()) == [".gitkeep"]


def test_open_readonly_existing(tmp_path: Path) -> None:
    with CacheDir(tmp_path / "cache") as cache:
        cache.frames.put(k(1), b"png")
    assert CacheDir.exists(tmp_path / "cache")
    ro = CacheDir.open_readonly(tmp_path / "cache")
    assert ro is not None and ro.readonly
    assert ro.frames.get(k(1)) == b"png"
    assert ro.frames.present([k(1), k(2)]) == {k(1)}
    ro.close()


def test_volume_counts_clear_keep_readme(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "README.md").write_text("cache lives here\n")
    (root / ".gitkeep").touch()
    with CacheDir(root) as cache:
        assert cache.counts() == {"frames": 0, "embeddings": 0, "records": 0}
        empty_volume = cache.volume()
        for i in range(5):
            cache.frames.put(k(i), os.urandom(BIG))
        cache.embeddings.put(k("e"), os.urandom(BIG))
        cache.records.put_json(k("r"), {"plan": [1, 2, 3]})
        assert cache.counts() == {"frames": 5, "embeddings": 1, "records": 1}
        assert cache.volume() >= empty_volume + 6 * BIG
        cache.clear()
        assert cache.counts() == {"frames": 0, "embeddings": 0, "records": 0}
        assert cache.volume() < empty_volume + BIG
        assert value_files(root) == []
        # Still usable after clear.
        cache.frames.put(k(1), b"again")
        assert cache.frames.get(k(1)) == b"again"
    assert (root / "README.md").read_text() == "cache lives here\n"
    assert (root / ".gitkeep").exists()
    assert sorted(p.name for p in root.iterdir()) == [".gitkeep", "README.md", *sorted(cache_mod.STORE_NAMES)]


def test_cachedir_creates_nested_directory(tmp_path: Path) -> None:
    with CacheDir(tmp_path / "a" / "b") as cache:
        cache.records.put_json(record_key("plan", "x"), {"ok": True})
    assert CacheDir.exists(tmp_path / "a" / "b")


def test_module_imports_no_heavy_dependencies() -> None:
    code = (
        "import sys, pipeline.store.cache\n"
        "heavy = {'torch', 'numpy', 'PIL', 'diffusers', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# -- several processes ------------------------------------------------------------------------


def _writer(root: str, tag: str, start, count: int) -> None:
    start.wait(60)
    with CacheDir(root) as cache:
        for i in range(count):
            # Mix inline values and value files, like records and frames.
            payload = f"{tag}-{i}".encode() * (1 if i % 4 else 8000)
            cache.frames.put(k(f"{tag}-{i}"), payload)
            if i % 50 == 0:
                cache.records.put_json(k(f"{tag}-rec-{i}"), {"tag": tag, "i": i})


def test_two_processes_write_concurrently(tmp_path: Path) -> None:
    root = str(tmp_path / "shared")  # does not exist yet: both processes race to create it too
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(root, tag, start, 200)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    time.sleep(0.2)
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with CacheDir(root) as cache:
        assert cache.counts()["frames"] == 400
        for tag in ("a", "b"):
            for i in range(200):
                expected = f"{tag}-{i}".encode() * (1 if i % 4 else 8000)
                assert cache.frames.get(k(f"{tag}-{i}")) == expected
        assert cache.records.get_json(k("b-rec-150")) == {"tag": "b", "i": 150}


def test_a_store_being_created_by_another_process_reads_as_no_cache_yet(tmp_path: Path) -> None:
    # diskcache creates the database file, then Settings, then Cache, one statement at a time: a
    # reader in between must see "no cache yet", not "no such table" (4 processes starting at once).
    with CacheDir(tmp_path / "cache") as cache:
        cache.frames.put(k(1), b"png")
    records = tmp_path / "cache" / "records" / "cache.db"
    for state in ("empty file", "settings only"):
        records.unlink()
        records.touch()
        if state == "settings only":
            with sqlite3.connect(records) as con:
                con.execute("CREATE TABLE Settings (key TEXT NOT NULL UNIQUE, value)")
        assert CacheDir.open_readonly(tmp_path / "cache") is None, state
        assert [s.entries for s in CacheDir.survey(tmp_path / "cache")] == [1, 0, 0], state


def test_readonly_stores_write_nothing(tmp_path: Path) -> None:
    with CacheDir(tmp_path / "cache") as cache:
        for i in range(3):
            cache.frames.put(k(i), os.urandom(BIG if i else 10))
        cache.records.put_json(k("r"), {"a": 1})
    files = {
        p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "cache").rglob("*") if p.is_file()
    }
    ro = CacheDir.open_readonly(tmp_path / "cache")
    assert ro is not None
    with ro:
        assert ro.counts() == {"frames": 3, "embeddings": 0, "records": 1}
        assert ro.frames.present([k(0), k(1), k(9)]) == {k(0), k(1)}
        assert ro.frames.get(k(1)) is not None and ro.records.get_json(k("r")) == {"a": 1}
        assert ro.frames.settings()["eviction_policy"] == "none"
        with pytest.raises(cache_mod.CacheReadOnly):
            ro.frames.put(k(5), b"x")
        with pytest.raises(PermissionError):
            ro.records.swap(k(5), None, b"x")
    # Not even diskcache's settings or a WAL index: opening used to rewrite the Settings table.
    after = {
        p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (tmp_path / "cache").rglob("*") if p.is_file()
    }
    assert {p: v for p, v in after.items() if not p.name.endswith(("-wal", "-shm"))} == {
        p: v for p, v in files.items() if not p.name.endswith(("-wal", "-shm"))
    }


def test_swap_is_compare_and_set(store: Store) -> None:
    assert store.swap(k(1), None, b"a", tag="claim") is True
    assert store.swap(k(1), None, b"b") is False
    assert store.swap(k(1), b"x", b"b") is False and store.get(k(1)) == b"a"
    assert store.swap(k(1), b"a", b"b", tag="claim") is True and store.get(k(1)) == b"b"
    store.put(k(2), b"untagged")
    assert store.tagged("claim") == {k(1): b"b"}
    assert store.swap(k(1), b"b", None) is True and k(1) not in store
    assert store.tagged("claim") == {}
