"""On-disk, content-addressed stores for frames, text embeddings and small JSON records.

A cache directory holds three independent `diskcache` stores::

    <cache dir>/frames/      PNG bytes of rendered frames, keyed by a 64-hex sha256 digest
    <cache dir>/embeddings/  safetensors bytes of text embeddings, keyed the same way
    <cache dir>/records/     small canonical-JSON records (last plan of a scene, outputs written)

Several render processes may share one directory: every write is a short sqlite transaction and
a writer that finds the database locked waits (up to `SQLITE_TIMEOUT_S`) instead of failing.

A cache this process may not write (a read-only mount, a folder without write permission) is still
served: `CacheDir.open` then opens it read-only, through plain read-only sqlite connections that write
nothing at all (not even diskcache's settings or the WAL index), so ``--plan`` and fully cached renders
work; storing a frame raises `CacheReadOnly`. Opening problems are one `CacheUnavailable` that says
which store failed and why (damaged, disk full, not writable).

The directory is treated as untrusted input. Anyone who can write to it must not be able to make
us run code, so nothing read from it is ever unpickled (`SafeDisk` refuses pickle-mode rows), and
every value carries a magic + sha256(key, payload) envelope so that corruption (a flipped bit, a
truncated or missing value file, a row rewritten by hand or moved under another key) turns into a logged `CacheWarning` and a cache miss,
never into wrong bytes or an exception for the caller. Nothing is ever evicted behind our back:
a frame that was rendered stays until someone clears the cache.

This package deliberately imports only the standard library and diskcache, because the torch-free
``--plan`` command uses it. Its modules: ``disk`` (the envelope, `SafeDisk`, read-only sqlite, the
errors), ``blobs`` (one `Store`), ``records`` (the names of records), and this one (`CacheDir`: the
three stores together, ``cache info`` and ``cache clear``); the public names of all are here.

Example::

    import hashlib
    from pipeline.store.cache import CacheDir
    from pipeline.store.records import plan_key

    with CacheDir("cache") as cache:
        key = hashlib.sha256(b"everything that determines frame 0").hexdigest()
        png = cache.frames.get(key)          # None: never rendered (or the entry was corrupt)
        if png is None:
            cache.frames.put(key, b"\x89PNG...")
        cache.records.put_json(plan_key("scenes/dog_cat.yaml"), {"frames": [key]})
        todo = {key} - cache.frames.present([key])   # set(): one query, even for 100k keys

    # The torch-free planner only looks, and never creates a cache that is not there:
    cache = CacheDir.open_readonly("cache")  # None if nothing was ever cached
    # A render opens it for writing, read-only where the disk refuses writes:
    cache = CacheDir.open("cache")            # cache.readonly tells which
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import diskcache
from diskcache.core import DBNAME

from pipeline.store.blobs import Store
from pipeline.store.disk import (
    ENVELOPE_MAGIC,
    SQLITE_TIMEOUT_S,
    CacheReadOnly,
    CacheUnavailable,
    CacheWarning,
    CorruptEntry,
    SafeDisk,
    UnsafeEntry,
    check_key,
    disk_full,
    open_failure,
    tree_size,
)

__all__ = [
    "ENVELOPE_MAGIC",
    "SQLITE_TIMEOUT_S",
    "STORE_NAMES",
    "CacheDir",
    "CacheReadOnly",
    "CacheUnavailable",
    "CacheWarning",
    "CorruptEntry",
    "SafeDisk",
    "Store",
    "StoreSurvey",
    "UnsafeEntry",
    "check_key",
]


#: Subdirectory names of the stores inside a cache directory, in a stable order.
STORE_NAMES = ("frames", "embeddings", "records")


def _unwritable(root: Path) -> str | None:
    """Why this process cannot write the existing cache at `root` (None: it looks writable).

    Checked before opening because opening for writing is itself a write (diskcache stores its
    settings): on a read-only cache it would fail, or partly succeed, instead of just reading.
    """
    for name in STORE_NAMES:
        for target in (root / name, root / name / DBNAME):
            if not os.access(target, os.W_OK):
                try:
                    read_only_fs = os.statvfs(target).f_flag & os.ST_RDONLY
                except OSError:
                    read_only_fs = False
                return (
                    f"{target} is on a read-only file system" if read_only_fs else f"{target} is not writable"
                )
    return None


@dataclass(frozen=True)
class StoreSurvey:
    """What `CacheDir.survey` found for one store: entries (None if unreadable), bytes on disk, problem."""

    name: str
    entries: int | None
    size: int
    problem: CacheUnavailable | None


class CacheDir:
    """A cache directory with three stores: `frames`, `embeddings` and `records`.

    The caller chooses the location (the CLI's default is ``./cache``). Files in the root other
    than the stores (README.md, .gitkeep) are left alone, including by `clear`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = SQLITE_TIMEOUT_S,
        _create: bool = True,
        _readonly: bool = False,
    ) -> None:
        """Open (creating what is missing) for reading and writing; see also `open` and `open_readonly`.

        Raises `CacheUnavailable` (naming the store) when a store cannot be opened.
        """
        self.path = Path(path)
        #: Why this cache is read-only when `open` had to fall back to reading (None otherwise).
        self.readonly_reason: str | None = None
        opened: list[Store] = []
        try:
            if _create:
                try:
                    self.path.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    kind = open_failure(exc, self.path)
                    raise CacheUnavailable(self.path, "denied" if kind == "readonly" else kind, exc) from exc
            for name in STORE_NAMES:
                try:
                    opened.append(
                        Store(self.path / name, create=_create, readonly=_readonly, timeout=timeout)
                    )
                except FileNotFoundError:
                    raise
                except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
                    kind = open_failure(exc, self.path / name)
                    if kind == "readonly" and not CacheDir.exists(self.path):
                        kind = "denied"
                    raise CacheUnavailable(self.path, kind, exc, store=name) from exc
        except BaseException:
            for store in opened:
                store.close()
            raise
        self.frames, self.embeddings, self.records = opened
        self.readonly = _readonly

    @staticmethod
    def exists(path: str | os.PathLike[str]) -> bool:
        """Whether `path` holds all three stores. Touches nothing on disk."""
        root = Path(path)
        return all((root / name / DBNAME).is_file() for name in STORE_NAMES)

    @staticmethod
    def unwritable(path: str | os.PathLike[str]) -> str | None:
        """Why this process cannot write the existing cache at `path`, or None if it looks writable."""
        root = Path(path)
        return _unwritable(root) or (f"the disk holding {root} is full" if disk_full(root) else None)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, timeout: float = SQLITE_TIMEOUT_S) -> CacheDir:
        """Open for reading and writing (created if missing), or read-only where writing is impossible.

        An existing cache that this process may not write (a read-only mount, no write permission on
        its folders or databases, a full disk) is opened read-only: frames and embeddings are served, `readonly`
        is True, `readonly_reason` says why, storing a frame or embedding raises `CacheReadOnly`, and
        bookkeeping records (last plan, file digests, output records) are simply not updated.
        Raises `CacheUnavailable` for anything else (a damaged store; a full disk where even
        reading fails).
        """
        root = Path(path)
        reason = _unwritable(root) if cls.exists(root) else None
        if reason is None:
            try:
                return cls(root, timeout=timeout)
            except CacheUnavailable as exc:
                if exc.kind not in ("readonly", "full") or not cls.exists(root):
                    raise
                reason = f"the disk is full: {exc.cause}" if exc.kind == "full" else str(exc.cause)
        cache = cls(root, timeout=timeout, _create=False, _readonly=True)
        cache.readonly_reason = reason
        # Records only speed up later runs (why a frame changed, file digests, up-to-date outputs):
        # a read-only cache goes without them. Frames and embeddings are refused loudly instead.
        cache.records._skip_puts = True
        return cache

    @classmethod
    def open_readonly(
        cls, path: str | os.PathLike[str], *, timeout: float = SQLITE_TIMEOUT_S
    ) -> CacheDir | None:
        """Open an existing cache for lookups only, or return None if there is none yet.

        Writes nothing at all, works on a read-only mount, and never creates the directory or a
        store. Raises `CacheUnavailable` when a store is damaged.
        """
        if not cls.exists(path):
            return None
        try:
            return cls(path, timeout=timeout, _create=False, _readonly=True)
        except FileNotFoundError:
            # Removed between the check and the open: same as never having existed.
            return None

    @staticmethod
    def survey(path: str | os.PathLike[str]) -> list[StoreSurvey]:
        """Each store's entry count and bytes on disk, read-only; a store that cannot be read says why.

        For ``cache info``: it works on a read-only or partly damaged cache, and writes nothing.
        """
        root = Path(path)
        found = []
        for name in STORE_NAMES:
            folder = root / name
            entries: int | None = None
            problem = None
            if (folder / DBNAME).is_file():
                try:
                    with Store(folder, create=False, readonly=True) as store:
                        entries = len(store)
                except FileNotFoundError:
                    entries = 0  # being created by another process
                except (sqlite3.Error, OSError) as exc:
                    problem = CacheUnavailable(root, open_failure(exc, folder), exc, store=name)
            found.append(StoreSurvey(name, entries, tree_size(folder) if folder.is_dir() else 0, problem))
        return found

    @staticmethod
    def clear_store(path: str | os.PathLike[str], name: str) -> tuple[int, str | None]:
        """Empty one store and give its space back; a damaged store (not a database) is removed whole.

        Returns (bytes freed, why the store was removed instead of emptied, or None). Raises
        `CacheUnavailable` (kind ``"readonly"``) when the store may not be written: nothing is cleared.
        """
        if name not in STORE_NAMES:
            raise ValueError(f"no store named {name!r}; stores: {', '.join(STORE_NAMES)}")
        root = Path(path)
        folder = root / name
        if not (folder / DBNAME).is_file():
            return 0, None
        before = tree_size(folder)
        for target in (folder, folder / DBNAME):
            if not os.access(target, os.W_OK):
                raise CacheUnavailable(root, "readonly", PermissionError(f"{target} is not writable"), name)
        try:
            store = Store(folder, create=False)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            kind = open_failure(exc, folder)
            if kind != "damaged":
                raise CacheUnavailable(root, kind, exc, store=name) from exc
            # Nothing in it can be read: remove the folder. Only our own store folder, by its fixed name.
            shutil.rmtree(folder)
            return before, str(exc)
        with store:
            store.clear()
            store.compact()
        return max(0, before - tree_size(folder)), None

    @property
    def stores(self) -> dict[str, Store]:
        return {"frames": self.frames, "embeddings": self.embeddings, "records": self.records}

    def volume(self) -> int:
        """Bytes of every file of every store (databases, their -wal and -shm files, value files)."""
        return sum(store.volume() for store in self.stores.values())

    def counts(self) -> dict[str, int]:
        """Number of entries per store, e.g. ``{"frames": 120, "embeddings": 3, "records": 2}``."""
        return {name: len(store) for name, store in self.stores.items()}

    def clear(self) -> None:
        """Empty every store and give the space back; anything else in the directory (README.md) stays."""
        for store in self.stores.values():
            store.clear()
            store.compact()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()

    def __enter__(self) -> CacheDir:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CacheDir({str(self.path)!r})"
