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

This module deliberately imports only the standard library and diskcache, because the torch-free
``--plan`` command uses it.

Example::

    import hashlib
    from pipeline.store.cache import CacheDir, record_key

    with CacheDir("cache") as cache:
        key = hashlib.sha256(b"everything that determines frame 0").hexdigest()
        png = cache.frames.get(key)          # None: never rendered (or the entry was corrupt)
        if png is None:
            cache.frames.put(key, b"\x89PNG...")
        cache.records.put_json(record_key("plan", "scenes/dog_cat.yaml"), {"frames": [key]})
        todo = {key} - cache.frames.present([key])   # set(): one query, even for 100k keys

    # The torch-free planner only looks, and never creates a cache that is not there:
    cache = CacheDir.open_readonly("cache")  # None if nothing was ever cached
    # A render opens it for writing, read-only where the disk refuses writes:
    cache = CacheDir.open("cache")            # cache.readonly tells which
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import DBNAME, MODE_BINARY, MODE_PICKLE, MODE_RAW, UNKNOWN

from pipeline.plan.keys import canonical_json, key_of

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
    "record_key",
]

logger = logging.getLogger("pipeline.store.cache")

#: First bytes of every stored value; bump the digit if the envelope layout ever changes.
ENVELOPE_MAGIC = b"SDS2"  # 2: the digest covers the key too, so swapped rows are caught
_DIGEST_SIZE = 32  # sha256
_HEADER_SIZE = len(ENVELOPE_MAGIC) + _DIGEST_SIZE

#: How long a writer waits for another process's transaction before giving up. Transactions are
#: milliseconds long, so hitting this means something is badly wrong (or the database is read-only).
SQLITE_TIMEOUT_S = 120.0

#: Subdirectory names of the stores inside a cache directory, in a stable order.
STORE_NAMES = ("frames", "embeddings", "records")

# Settings passed to every diskcache.Cache we open. They are persisted in the store's Settings table
# and re-applied on every open, so a store created by an older version (or by plain diskcache with its
# 1 GB default limit and LRU-ish eviction) is switched to "never evict" as soon as we open it.
_CACHE_SETTINGS: dict[str, Any] = {
    # Frames are expensive to render: losing them silently to a size limit would be a bug.
    "eviction_policy": "none",
    "size_limit": 2**62,
    # We never set expiry times, so culling has nothing to do; 0 skips its queries on every write.
    "cull_limit": 0,
    # Statistics turn every read into a write transaction (hit/miss counters): needless contention.
    "statistics": False,
}

_KEY_RE = re.compile(r"[0-9a-f]{64}")
# diskcache.Disk.filename() names value files "ab/cd/<28 hex>.val". Anything else in the filename
# column was not written by diskcache and must never be opened or, worse, deleted.
_VALUE_FILE_RE = re.compile(r"[0-9a-f]{2}[/\\][0-9a-f]{2}[/\\][0-9a-f]{28}\.val")

# SQLite >= 3.32 allows 32766 bound parameters per statement; older builds allow 999. A chunk just
# under the old limit is portable, and was also the fastest measured (250: 1.2x, 32000: 1.1x slower).
_PRESENT_CHUNK = 900
# present() scans the whole key index instead when the store has at most this many rows per key asked.
_SCAN_FACTOR = 3


class CacheWarning(UserWarning):
    """A cache entry was unreadable (corrupt, truncated, missing or unsafe) and was treated as a miss."""


class CorruptEntry(Exception):
    """A stored row or value file does not hold a valid envelope.

    Deliberately not an `OSError`: diskcache's `Cache.get` swallows `OSError` from `Disk.fetch`
    as "deleted concurrently", which would hide corruption from us.
    """


class UnsafeEntry(CorruptEntry):
    """A stored key or value is in pickle mode; reading it would mean unpickling untrusted data."""


class CacheReadOnly(PermissionError):
    """A write to a cache that was opened read-only (see `CacheDir.open`)."""


class CacheUnavailable(OSError):
    """The cache directory cannot be opened. ``kind`` says why, ``store`` which store failed:

    - ``"damaged"``: a store's database is not a readable sqlite database (only that store is bad);
    - ``"full"``: the disk is full (sqlite could not even open the store);
    - ``"denied"``: the cache does not exist yet and cannot be created here (read-only, no permission);
    - ``"other"``: anything else (``cause`` holds the original error).

    An `OSError`, so code that treats any I/O failure as fatal keeps doing so.
    """

    def __init__(self, path: Path, kind: str, cause: BaseException, store: str | None = None) -> None:
        where = f"the {store} store of the cache in {path}" if store else f"the cache in {path}"
        super().__init__(f"cannot open {where}: {cause or type(cause).__name__}")
        self.path = path
        self.kind = kind
        self.cause = cause
        self.store = store

    def hint(self, command: str = "python render.py") -> str:
        """What the user should do, one line; never advice that would destroy an intact store."""
        if self.kind == "full":
            return "free some space on that disk, or choose another --cache-dir"
        if self.kind == "damaged":
            return (
                f"that store is damaged; remove just it with: {command} cache clear --store {self.store} "
                f"--yes --cache-dir {self.path} (the other stores are kept)"
            )
        if self.kind == "denied":
            return "choose a folder you can write with --cache-dir"
        return f"check that {self.path} is a readable folder, or choose another --cache-dir"


#: Below this much free space, a store that fails to open is taken to have failed for lack of space.
_NEARLY_FULL = 256 * 1024


def _disk_full(where: Path | None) -> bool:
    """Whether the file system holding `where` (or its nearest existing parent) is (nearly) full."""
    if where is None:
        return False
    for folder in (where, *where.parents):
        try:
            st = os.statvfs(folder)
        except (OSError, AttributeError):
            continue
        return st.f_bavail * st.f_frsize < _NEARLY_FULL
    return False


def _open_failure(exc: BaseException, where: Path | None = None) -> str:
    """Classify an error raised while opening a store: 'full', 'damaged', 'readonly' or 'other'."""
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or "no space" in text:
        return "full"
    if "disk i/o error" in text and _disk_full(where):
        # What sqlite says when it cannot size the WAL index (-shm file) on a full disk.
        return "full"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM) or "readonly" in text or "read-only" in text:
        return "readonly"
    if "unable to open database file" in text:
        # What sqlite says when it cannot create the WAL index beside a database it may not write.
        return "readonly"
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return "damaged"  # "file is not a database", "database disk image is malformed"
    if "malformed" in text or "not a database" in text:
        return "damaged"
    return "other"


def check_key(key: object) -> str:
    """Return `key` if it is a 64-character lowercase hex digest, else raise.

    Keys end up in SQL parameters and log lines; restricting them to hex digests means no key can
    ever be mistaken for a path, a pattern or anything else.
    """
    if not isinstance(key, str):
        raise TypeError(f"cache keys must be str, not {type(key).__name__}")
    if _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"cache keys must be 64 lowercase hex characters, got {key!r:.80}")
    return key


def record_key(*parts: str) -> str:
    """Digest any strings (e.g. ``record_key("plan", "scenes/dog_cat.yaml")``) into a valid key.

    The parts are JSON-encoded as a list before hashing so that ``("a", "bc")`` and ``("ab", "c")``
    cannot collide.
    """
    return key_of(list(parts))


def _digest(key: str, payload: bytes) -> bytes:
    # The key is hashed in: a row moved or copied under another key fails the check like a flipped bit.
    return hashlib.sha256(key.encode("ascii") + b"\0" + payload).digest()


def _wrap(key: str, payload: bytes) -> bytes:
    return ENVELOPE_MAGIC + _digest(key, payload) + payload


def _unwrap(blob: bytes, key: str, where: str) -> bytes:
    if len(blob) < _HEADER_SIZE:
        raise CorruptEntry(f"{where}: truncated ({len(blob)} bytes, header needs {_HEADER_SIZE})")
    if blob[: len(ENVELOPE_MAGIC)] != ENVELOPE_MAGIC:
        raise CorruptEntry(f"{where}: bad magic {blob[: len(ENVELOPE_MAGIC)]!r}")
    payload = blob[_HEADER_SIZE:]
    if _digest(key, payload) != blob[len(ENVELOPE_MAGIC) : _HEADER_SIZE]:
        raise CorruptEntry(f"{where}: checksum mismatch ({len(payload)} payload bytes)")
    return payload


class SafeDisk(diskcache.Disk):
    """A `diskcache.Disk` that stores only str keys and bytes values and never unpickles.

    Values are sealed in an envelope (magic, sha256 of key and payload, payload) that `Store.get`
    opens and checks on every read. Anything that is not a raw str key or an enveloped bytes value raises `UnsafeEntry`
    (pickle mode) or `CorruptEntry` (anything else) instead of being decoded.
    """

    def put(self, key: Any) -> tuple[Any, bool]:
        # The base class pickles every key that is not bytes/str/int/float; refuse instead.
        if not isinstance(key, str):
            raise TypeError(f"SafeDisk keys must be str, not {type(key).__name__}")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        # A non-raw key is a pickle: the base class would pickle.load() it while iterating.
        if not raw:
            raise UnsafeEntry("key stored in pickle mode; refusing to unpickle it")
        return bytes(key) if isinstance(key, memoryview) else key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        if read or not isinstance(value, bytes):
            # The base class would pickle anything else; file handles (read=True) would bypass the
            # envelope. Only whole bytes objects are accepted.
            raise TypeError(f"SafeDisk values must be bytes, not {type(value).__name__}")
        if not isinstance(key, str):
            raise TypeError("SafeDisk needs the key to seal a value (use Cache.set or Cache.add)")
        # The base class stores bytes shorter than min_file_size inline (MODE_RAW) and longer ones in
        # their own file (MODE_BINARY); both paths keep the envelope byte for byte.
        return super().store(_wrap(key, bytes(value)), False, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == MODE_PICKLE:
            raise UnsafeEntry("value stored in pickle mode; refusing to unpickle it")
        # Returns the sealed envelope: only the caller knows the key it was read under (Store.get
        # opens it with `_unwrap`), and diskcache's own readers never see an unchecked payload.
        if mode == MODE_RAW:
            if not isinstance(value, bytes):
                raise CorruptEntry(f"inline value has type {type(value).__name__}, expected bytes")
            blob = value
        elif mode == MODE_BINARY:
            blob = self._read_value_file(filename)
        else:
            # MODE_TEXT / MODE_NONE / anything else was not written by SafeDisk.
            raise CorruptEntry(f"unexpected storage mode {mode!r}")
        return io.BytesIO(blob) if read else blob

    def remove(self, file_path: str) -> None:
        # Cache.clear()/delete() and our own discards call this with the row's filename column. A
        # row rewritten by someone else could point at "../../something"; never delete outside
        # diskcache's own naming scheme.
        if not isinstance(file_path, str) or _VALUE_FILE_RE.fullmatch(file_path) is None:
            logger.warning("not removing suspicious value file name %r", file_path)
            return
        super().remove(file_path)

    def _read_value_file(self, filename: str | None) -> bytes:
        if not isinstance(filename, str) or _VALUE_FILE_RE.fullmatch(filename) is None:
            raise CorruptEntry(f"suspicious value file name {filename!r}")
        try:
            with open(os.path.join(self._directory, filename), "rb") as reader:
                return reader.read()
        except FileNotFoundError:
            # Might also be a concurrent delete/overwrite; Store.get tells the two apart.
            raise CorruptEntry(f"value file {filename} is missing") from None
        except OSError as exc:
            raise CorruptEntry(f"value file {filename} unreadable: {exc}") from None


class _ReadOnlyDB:
    """The part of `diskcache.Cache` a read-only `Store` uses, over read-only sqlite connections.

    Opening a `diskcache.Cache` writes (its settings, its schema, the WAL index), which fails on a
    read-only mount and needlessly touches a cache that ``--plan`` only looks at. This opens the
    database with ``mode=ro``; where even that fails because the folder cannot hold the WAL index
    (a read-only mount of a cache whose last writer exited cleanly, or a full disk), with
    ``immutable=1``, which reads the database file alone. Rows seen that way may lag a writer's newest ones (a miss, never wrong
    bytes: every value is checked against its key's digest).
    """

    def __init__(self, directory: Path, timeout: float) -> None:
        self.directory = directory
        self.timeout = timeout
        self.disk = SafeDisk(str(directory))
        self._local = threading.local()
        # A damaged file fails here, not later. A store that another process is creating right now
        # may not have its tables yet: that is no store (yet), like a missing one.
        tables = self._sql("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        if not {"Settings", "Cache"} <= {name for (name,) in tables}:
            self.close()
            raise FileNotFoundError(f"the cache store at {directory} is still being created")

    def _connect(self) -> sqlite3.Connection:
        uri = "file:" + urllib.parse.quote(str((self.directory / DBNAME).resolve())) + "?mode=ro"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=self.timeout, isolation_level=None)
            try:
                con.execute(
                    "SELECT 1 FROM sqlite_master LIMIT 1"
                ).fetchall()  # connecting is lazy; this opens
            except sqlite3.Error:
                con.close()
                raise
            return con
        except sqlite3.OperationalError:
            if os.access(self.directory, os.W_OK) and not _disk_full(self.directory):
                raise  # not the WAL index: a real problem, reported by the caller
        return sqlite3.connect(uri + "&immutable=1", uri=True, timeout=self.timeout, isolation_level=None)

    @property
    def _sql(self) -> Any:
        # One connection per thread and per process, as diskcache does (sqlite objects must not
        # cross threads, and a forked child must not share its parent's file locks).
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.con = None
            self._local.pid = os.getpid()
        if self._local.con is None:
            self._local.con = self._connect()
        return self._local.con.execute

    def _setting(self, name: str) -> Any:
        rows = self._sql("SELECT value FROM Settings WHERE key = ?", (name,)).fetchall()
        return rows[0][0] if rows else None

    def settings(self) -> dict[str, Any]:
        return {name: self._setting(name) for name in diskcache.DEFAULT_SETTINGS}

    def __len__(self) -> int:
        return int(self._setting("count") or 0)

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None and getattr(self._local, "pid", None) == os.getpid():
            con.close()
        self._local.con = None


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
            self._cache = _ReadOnlyDB(self._directory, timeout)
        else:
            self._cache = diskcache.Cache(
                str(self._directory), timeout=timeout, disk=SafeDisk, **_CACHE_SETTINGS
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
                return _unwrap(blob, key, f"value file {filename}" if filename else "inline value")
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
            if isinstance(key, str) and _KEY_RE.fullmatch(key):
                payload = self.get(key)
                if payload is not None:
                    found[key] = payload
        return found

    def __contains__(self, key: object) -> bool:
        """Whether a row exists for `key`; whether it is readable is only known after `get`.

        Unlike the other methods this does not raise for an invalid key: no such key can be stored.
        """
        if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
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
        return iter([key for (key,) in rows if isinstance(key, str) and _KEY_RE.fullmatch(key)])

    def __len__(self) -> int:
        return len(self._cache)

    def volume(self) -> int:
        """Bytes of every file in the store's folder: the database, its -wal and -shm files, value files."""
        return _tree_size(self._directory)

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


def _tree_size(root: Path) -> int:
    """Sizes of all regular files under `root` (symlinks not followed); files vanishing meanwhile count 0."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


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
                    kind = _open_failure(exc, self.path)
                    raise CacheUnavailable(self.path, "denied" if kind == "readonly" else kind, exc) from exc
            for name in STORE_NAMES:
                try:
                    opened.append(
                        Store(self.path / name, create=_create, readonly=_readonly, timeout=timeout)
                    )
                except FileNotFoundError:
                    raise
                except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
                    kind = _open_failure(exc, self.path / name)
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
        return _unwritable(root) or (f"the disk holding {root} is full" if _disk_full(root) else None)

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
                    problem = CacheUnavailable(root, _open_failure(exc, folder), exc, store=name)
            found.append(StoreSurvey(name, entries, _tree_size(folder) if folder.is_dir() else 0, problem))
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
        before = _tree_size(folder)
        for target in (folder, folder / DBNAME):
            if not os.access(target, os.W_OK):
                raise CacheUnavailable(root, "readonly", PermissionError(f"{target} is not writable"), name)
        try:
            store = Store(folder, create=False)
        except (sqlite3.Error, OSError, diskcache.Timeout) as exc:
            kind = _open_failure(exc, folder)
            if kind != "damaged":
                raise CacheUnavailable(root, kind, exc, store=name) from exc
            # Nothing in it can be read: remove the folder. Only our own store folder, by its fixed name.
            shutil.rmtree(folder)
            return before, str(exc)
        with store:
            store.clear()
            store.compact()
        return max(0, before - _tree_size(folder)), None

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
