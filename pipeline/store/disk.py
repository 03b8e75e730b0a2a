"""The bytes on disk under a cache store: the integrity envelope, a pickle-free `diskcache.Disk`, and
plain read-only sqlite access, plus the errors a store reports.

Every value is sealed as ``ENVELOPE_MAGIC + sha256(key, NUL, payload) + payload``; `SafeDisk` stores only
str keys and enveloped bytes, and refuses (never decodes) anything in pickle mode. `ReadOnlyDB` reads a
store without writing a byte, for caches this process may not write. `pipeline.store.blobs.Store` is
built on these; `pipeline.store.cache` re-exports the public names.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import sqlite3
import stat
import threading
import urllib.parse
from pathlib import Path
from typing import Any

import diskcache
from diskcache.core import DBNAME, MODE_BINARY, MODE_PICKLE, MODE_RAW, UNKNOWN

logger = logging.getLogger("pipeline.store.cache")  # one logger for the whole cache

#: First bytes of every stored value; bump the digit if the envelope layout ever changes.
ENVELOPE_MAGIC = b"SDS2"  # 2: the digest covers the key too, so swapped rows are caught
_DIGEST_SIZE = 32  # sha256
_HEADER_SIZE = len(ENVELOPE_MAGIC) + _DIGEST_SIZE

#: How long a writer waits for another process's transaction before giving up. Transactions are
#: milliseconds long, so hitting this means something is badly wrong (or the database is read-only).
SQLITE_TIMEOUT_S = 120.0


# Settings passed to every diskcache.Cache we open. They are persisted in the store's Settings table
# and re-applied on every open, so a store created by an older version (or by plain diskcache with its
# 1 GB default limit and LRU-ish eviction) is switched to "never evict" as soon as we open it.
CACHE_SETTINGS: dict[str, Any] = {
    # Frames are expensive to render: losing them silently to a size limit would be a bug.
    "eviction_policy": "none",
    "size_limit": 2**62,
    # We never set expiry times, so culling has nothing to do; 0 skips its queries on every write.
    "cull_limit": 0,
    # Statistics turn every read into a write transaction (hit/miss counters): needless contention.
    "statistics": False,
}

KEY_RE = re.compile(r"[0-9a-f]{64}")
# diskcache.Disk.filename() names value files "ab/cd/<28 hex>.val". Anything else in the filename
# column was not written by diskcache and must never be opened or, worse, deleted.
_VALUE_FILE_RE = re.compile(r"[0-9a-f]{2}[/\\][0-9a-f]{2}[/\\][0-9a-f]{28}\.val")


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


def disk_full(where: Path | None) -> bool:
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


def open_failure(exc: BaseException, where: Path | None = None) -> str:
    """Classify an error raised while opening a store: 'full', 'damaged', 'readonly' or 'other'."""
    code = getattr(exc, "errno", None)
    text = str(exc).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or "disk is full" in text or "no space" in text:
        return "full"
    if "disk i/o error" in text and disk_full(where):
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
    if KEY_RE.fullmatch(key) is None:
        raise ValueError(f"cache keys must be 64 lowercase hex characters, got {key!r:.80}")
    return key


def _digest(key: str, payload: bytes) -> bytes:
    # The key is hashed in: a row moved or copied under another key fails the check like a flipped bit.
    return hashlib.sha256(key.encode("ascii") + b"\0" + payload).digest()


def _wrap(key: str, payload: bytes) -> bytes:
    return ENVELOPE_MAGIC + _digest(key, payload) + payload


def unwrap(blob: bytes, key: str, where: str) -> bytes:
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
        # opens it with `unwrap`), and diskcache's own readers never see an unchecked payload.
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


class ReadOnlyDB:
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
            if os.access(self.directory, os.W_OK) and not disk_full(self.directory):
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


def tree_size(root: Path) -> int:
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
