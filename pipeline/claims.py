"""Frame claims: several renders sharing one cache directory render each frame once.

Before a process renders a batch it claims the batch's frame keys in the cache's records store
(an atomic insert-if-absent); others skip claimed frames and wait for them to appear in the frame
store. A claim names its owner (host, pid and the process's start time, so a reused pid is not
mistaken for the owner); a claim whose owner is gone (killed, crashed) is taken over::

    claims = Claims(cache.records)
    mine = claims.claim(keys)          # the keys this process now owns
    ...render and store them...
    claims.release(mine)
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable

from pipeline.cache import Store, record_key


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or '' where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22; the command name (field 2) may hold spaces, so split after its closing ')'.
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return not started or _start_time(pid) == started


class Claims:
    """Claims on frame keys, kept in a records store."""

    def __init__(self, records: Store):
        self.records = records
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = {"host": self.host, "pid": self.pid, "started": _start_time(self.pid)}

    @staticmethod
    def _key(frame_key: str) -> str:
        return record_key("claim", frame_key)

    def _owner_gone(self, claim_key: str) -> bool:
        raw = self.records.get(claim_key)
        if raw is None:
            return True  # released (or unreadable) in the meantime
        try:
            owner = json.loads(raw)
        except ValueError:
            return True
        if owner.get("host") != self.host:
            return False  # another machine on a shared disk: trust it
        if owner.get("pid") == self.pid and owner.get("started") == self.owner["started"]:
            return True  # our own claim from an earlier attempt in this process
        return not _alive(int(owner.get("pid", 0)), str(owner.get("started", "")))

    def claim(self, keys: Iterable[str]) -> list[str]:
        """Claim what is free (or held by a dead process); returns the keys now ours."""
        payload = json.dumps(self.owner).encode()
        mine = []
        for key in keys:
            ck = self._key(key)
            if self.records.add(ck, payload):
                mine.append(key)
            elif self._owner_gone(ck):
                if ck in self.records:
                    self.records.delete(ck)
                if self.records.add(ck, payload):
                    mine.append(key)
        return mine

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            ck = self._key(key)
            if ck in self.records:
                self.records.delete(ck)
