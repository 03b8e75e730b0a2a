"""One checksummed key/value store (`Store`): 64-hex keys to bytes or canonical JSON, on diskcache.

Reads never raise for bad data (a corrupt or unsafe entry is a logged `CacheWarning` and a miss),
writes are short sqlite transactions shared safely by several processes, and nothing is ever
evicted. A cache directory (`pipeline.store.cache.CacheDir`) holds three of these::

    store = Store("cache/records")
    store.put_json(key, {"ok": True}); store.get_json(key)      # {'ok': True}
    store.present(keys)                                          # the keys it holds, in one query
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import DBNAME

from pipeline.plan.keys import canonical_json
from pipeline.store.disk import (
    CACHE_SETTINGS,
    KEY_RE,
    SQLITE_TIMEOUT_S,
    CacheReadOnly,
    CacheWarning,
    CorruptEntry,
    ReadOnlyDB,
    SafeDisk,
    check_key,
    tree_size,
    unwrap,
)

logger = logging.getLogger("pipeline.store.cache")  # one logger for the whole cache


# SQLite >= 3.32 allows 32766 bound parameters per statement; older builds allow 999. A chunk just
# under the old limit is portable, and was also the fastest measured (250: 1.2x, 32000: 1.1x slower).
_PRESENT_CHUNK = 900
# present() scans the whole key index instead when the store has at most this many rows per key asked.
_SCAN_FACTOR = 3


class Store:
    """One diskcache-backed key/value store: 64-hex keys to bytes (or canonical JSON).

    Reads never raise for bad data: a corrupt or unsafe entry is reported as a `CacheWarning`
    (also logged on ``pipeline.store.cache``), deleted, and returned as a miss (None).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        create: bool = True,
        readonly: bool = False,
        timeout: float = SQLITE_TIMEOUT_S,
        skip_puts: bool = False,
    ) -> None:
        """Open (and with ``create=True`` create) the store in `directory`.

        With ``create=False`` a missing store raises `FileNotFoundError` instead of being created.
        With ``readonly=True`` nothing is ever written (the database is opened read-only), writes
        raise `CacheReadOnly` and corrupt entries are reported but left in place. ``skip_puts`` (with
        ``readonly``) makes `put` a no-op instead: for bookkeeping records that only speed up later
        runs, on a cache that cannot be written (see `CacheDir.open`).
        """
        self._directory = Path(directory)
        if not create and not (self._directory / DBNAME).is_file():
            raise FileNotFoundError(f"no cache store at {self._directory}")
        self._readonly = readonly
        self._skip_puts = readonly and skip_puts
        self._cache: Any
        if readonly:
            self._cache = ReadOnlyDB(self._directory, timeout)
        else:
            self._cache = diskcache.Cache(
                str(self._directory), timeout=timeout, disk=SafeDisk, **CACHE_SETTINGS
            )

    # -- introspection ------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def readonly(self) -> bool:
        return self._readonly

    def settings(self) -> dict[str, Any]:
        """The diskcache settings in effect (eviction_policy, size_limit, ...), for diagnostics."""
        if self._readonly:
            return dict(self._cache.settings())
        return {name: getattr(self._cache, name) for name in diskcache.DEFAULT_SETTINGS}

    def __repr__(self) -> str:
        return f"Store({str(self._directory)!r})"

    # -- bytes API ----------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The payload stored under `key`, or None if absent or unreadable (never raises for bad data)."""
        check_key(key)
        # A missing value file can also mean a concurrent overwrite/delete removed it between our
        # SELECT and open(); in that case the row has changed and reading again gives the truth.
        for _attempt in range(3):
            row = self._select_row(key)
            if row is None:
                return None
            rowid, store_time, mode, filename, value = row
            try:
                blob = self._cache.disk.fetch(mode, filename, value, False)
                return unwrap(blob, key, f"value file {filename}" if filename else "inline value")
            except CorruptEntry as exc:
                if self._discard(key, rowid, store_time, filename, exc):
                    return None
        return None

    def put(self, key: str, payload: bytes, *, tag: str | None = None) -> None:
        """Store `payload` under `key`, replacing any previous value. `tag` labels the row (see `tagged`)."""
        check_key(key)
        if not isinstance(payload, bytes):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if self._skip_puts:
            logger.debug("read-only cache: not recording %s in %s", key[:16], self._directory)
            return
        self._check_writable()
        try:
            # retry=False on purpose: diskcache's retry loop spins forever on *any* OperationalError
            # at BEGIN (e.g. a read-only database). The sqlite busy timeout already makes us wait.
            self._cache.set(key, payload, tag=tag, retry=False)
        except diskcache.Timeout as exc:
            raise TimeoutError(
                f"could not lock {self._directory / DBNAME} for writing within {self._cache.timeout}s "
                "(another process holding it, or the database is not writable)"
            ) from exc

    def add(self, key: str, payload: bytes, *, tag: str | None = None) -> bool:
        """Store `payload` under `key` only if no row exists; atomic across processes. True if stored."""
        return self.swap(key, None, payload, tag=tag)

    def swap(self, key: str, expected: bytes | None, new: bytes | None, *, tag: str | None = None) -> bool:
        """Atomically (across processes): if `key` holds `expected` (None: no readable value), store
        `new` (None: delete the row) and return True; else change nothing and return False.

        Frame claims use it so that taking over, renewing and releasing a claim never touches a
        claim another process made in the meantime.
        """
        check_key(key)
        for value in (expected, new):
            if value is not None and not isinstance(value, bytes):
                raise TypeError(f"payload must be bytes, not {type(value).__name__}")
        self._check_writable()
        try:
            with self._cache.transact(retry=False):
                # Inside the write transaction: nobody can change the row between this read and the write.
                if self.get(key) != expected:
                    return False
                if new is None:
                    self._cache.delete(key, retry=False)
                else:
                    self._cache.set(key, new, tag=tag, retry=False)
                return True
        except diskcache.Timeout as exc:
            raise TimeoutError(
                f"could not lock {self._directory / DBNAME} for writing within {self._cache.timeout}s"
            ) from exc

    def tagged(self, tag: str) -> dict[str, bytes]:
        """Every readable entry whose row carries `tag` (one scan; meant for small stores like records)."""
        rows = self._sql()("SELECT key FROM Cache WHERE tag = ? AND raw = 1", (tag,)).fetchall()
        found = {}
        for (key,) in rows:
            if isinstance(key, str) and KEY_RE.fullmatch(key):
                payload = self.get(key)
                if payload is not None:
                    found[key] = payload
        return found

    def __contains__(self, key: object) -> bool:
        """Whether a row exists for `key`; whether it is readable is only known after `get`.

        Unlike the other methods this does not raise for an invalid key: no such key can be stored.
        """
        if not isinstance(key, str) or KEY_RE.fullmatch(key) is None:
            return False
        rows = self._sql()("SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchall()
        return bool(rows)

    def delete(self, key: str) -> bool:
        """Remove `key`; True if it was present."""
        check_key(key)
        self._check_writable()
        return bool(self._cache.delete(key, retry=False))

    def present(self, keys: Iterable[str]) -> set[str]:
        """The subset of `keys` that have a row in this store (readable or not: see `get`).

        Never one query per key: either one ``IN (...)`` query per chunk of sorted keys, or, when
        the store is not much bigger than the question, one scan of the (covering) key index.
        100,000 keys: 0.08 s (index scan) to 0.27 s (chunked IN, 1M-row store) measured, against
        0.6-0.8 s for 100,000 single lookups.
        """
        wanted = {check_key(key) for key in keys}
        if not wanted:
            return set()
        sql = self._sql()
        # raw = 1 everywhere: str keys are stored raw, so this is exactly diskcache's own lookup.
        if len(self._cache) <= _SCAN_FACTOR * len(wanted):
            # Measured: scanning the index costs ~0.5 us per stored row, IN lookups ~2 us per asked key.
            rows = sql("SELECT key FROM Cache WHERE raw = 1")
            return {key for (key,) in rows if key in wanted}
        found: set[str] = set()
        ordered = sorted(wanted)  # sorted probes walk the index in order: ~1.5x faster than random
        for start in range(0, len(ordered), _PRESENT_CHUNK):
            chunk = ordered[start : start + _PRESENT_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = sql(f"SELECT key FROM Cache WHERE key IN ({marks}) AND raw = 1", chunk)
            found.update(key for (key,) in rows)
        return found

    def keys(self) -> Iterator[str]:
        """All valid keys in the store (in no particular order); pickled or odd keys are skipped."""
        rows = self._sql()("SELECT key FROM Cache WHERE raw = 1").fetchall()
        return iter([key for (key,) in rows if isinstance(key, str) and KEY_RE.fullmatch(key)])

    def __len__(self) -> int:
        return len(self._cache)

    def volume(self) -> int:
        """Bytes of every file in the store's folder: the database, its -wal and -shm files, value files."""
        return tree_size(self._directory)

    def clear(self) -> int:
        """Delete every entry; returns how many were removed."""
        self._check_writable()
        return int(self._cache.clear(retry=False))

    def compact(self) -> None:
        """Give the space of deleted rows back to the file system (best effort: skipped while busy)."""
        self._check_writable()
        try:
            sql = self._sql()
            sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            sql("VACUUM").fetchall()
            sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.OperationalError as exc:
            logger.info("could not compact %s: %s", self._directory, exc)

    def close(self) -> None:
        # diskcache reopens the connection lazily on next use, so a closed store still works.
        self._cache.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- JSON convenience ---------------------------------------------------------------------

    def get_json(self, key: str) -> Any | None:
        """The JSON value stored under `key`, or None if absent or unreadable."""
        payload = self.get(key)
        if payload is None:
            return None
        try:
            return json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            # The envelope was intact, so this was written as non-JSON by someone else; same policy
            # as any other unreadable entry.
            self._report(key, f"not a JSON record: {exc}", stacklevel=3)
            if not self._readonly:
                self.delete(key)
            return None

    def put_json(self, key: str, obj: Any) -> None:
        """Store `obj` as canonical JSON (sorted keys, compact, UTF-8), so equal objects give equal bytes."""
        self.put(key, canonical_json(obj).encode("utf-8"))

    # -- internals ----------------------------------------------------------------------------

    def _sql(self) -> Any:
        # diskcache keeps one sqlite connection per thread (and reopens after fork); it has no
        # public way to run our own SELECTs, so we borrow its connection rather than open another.
        return self._cache._sql

    def _select_row(self, key: str) -> tuple[int, float, int, str | None, Any] | None:
        # Unlike diskcache we ignore expire_time: we never set one, and get/contains/present must
        # agree on what "present" means even if a foreign writer did.
        rows = self._sql()(
            "SELECT rowid, store_time, mode, filename, value FROM Cache WHERE key = ? AND raw = 1",
            (key,),
        ).fetchall()
        return rows[0] if rows else None

    def _discard(self, key: str, rowid: int, store_time: float, filename: str | None, exc: Exception) -> bool:
        """Delete the exact row version that failed to read. False if it changed meanwhile (retry)."""
        if self._readonly:
            # Still a miss for the caller, but a read-only user must not modify the cache; only
            # complain if the row did not simply change under us.
            row = self._select_row(key)
            if row is None:
                return True
            if row[0] == rowid and row[1] == store_time:
                self._report(key, str(exc))
                return True
            return False
        try:
            with self._cache.transact(retry=False):
                # Matching on rowid *and* store_time means we only ever delete the version we read:
                # a concurrent writer that replaced it with a good value keeps its value.
                cursor = self._sql()(
                    "DELETE FROM Cache WHERE rowid = ? AND store_time = ? AND key = ?",
                    (rowid, store_time, key),
                )
                deleted = cursor.rowcount > 0
        except (diskcache.Timeout, sqlite3.OperationalError) as db_exc:
            # Could not get the write lock (or the database is read-only): still a miss, and the
            # next reader will try to clean up again. Reads must not raise for bad data.
            self._report(key, f"{exc} (could not delete it: {db_exc or 'database busy'})")
            return True
        if not deleted:
            # The row changed or vanished: a concurrent overwrite or delete, not corruption.
            return self._select_row(key) is None
        if filename is not None:
            self._cache.disk.remove(filename)  # SafeDisk.remove refuses names outside the store
        self._report(key, str(exc))
        return True

    def _report(self, key: str, reason: str, stacklevel: int = 4) -> None:
        # Both channels: the log for render runs (goes to their log file), the warning so that
        # tests and interactive users see it and can turn it into an error with -W.
        message = f"{self._directory.name} cache entry {key[:16]}... unreadable, treated as a miss: {reason}"
        logger.warning("%s (store %s)", message, self._directory)
        # Default stacklevel: warn <- _report <- _discard <- get <- the caller we want to point at.
        warnings.warn(message, CacheWarning, stacklevel=stacklevel)

    def _check_writable(self) -> None:
        if self._readonly:
            raise CacheReadOnly(errno.EROFS, "the cache store was opened read-only", str(self._directory))
