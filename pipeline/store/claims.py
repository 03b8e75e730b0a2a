"""Frame claims: several renders sharing one cache directory render each frame once, and none waits for ever.

Before a process renders a batch it claims the batch's frame keys in the cache's records store
(an atomic insert-if-absent); others skip claimed frames and wait for them to appear in the frame
store. A claim is a lease: it names its owner (host, pid, the process's start time) and the time it
was last renewed, and a heartbeat thread renews the claims a process holds every ``lease / 4``
seconds while it renders. A claim is taken over (atomically: one waiter wins) when

- its owner ran on this host and is gone (killed, crashed; a reused pid is told apart by its start
  time): at once;
- it was not renewed for its lease (60 s): the owner is on another host that crashed or lost the
  disk, or is stopped (Ctrl-Z), or its clock is far off. The lease is judged twice, and either is
  enough: by the wall-clock time written in the claim, and by how long this process has itself seen
  the claim unchanged, so a claimer whose clock runs ahead cannot hold frames for ever either.

A process whose claim was taken over may still finish and store the frame: a frame is then rendered
twice, never lost or wrong (both store the same key's pixels). Releasing and renewing only ever touch
a claim that is still the one this process wrote.
::

    claims = Claims(cache.records)
    mine = claims.claim(keys)          # the keys this process now owns (renewed in the background)
    ...render and store them...
    claims.release(mine)
    claims.close()                     # stops the heartbeat and releases anything still held

`live_claims` lists the claims in force (for ``--plan``); `Claims.wait_notice` says what a waiting
render waits for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psutil

from pipeline.store.cache import Store
from pipeline.store.records import claim_key

__all__ = ["LEASE_S", "WAIT_NOTICE_S", "Claim", "Claims", "frame_ranges", "live_claims"]

logger = logging.getLogger("pipeline.store.claims")

#: A claim that was not renewed for this long is free. Renewals come every quarter of it, so three
#: missed heartbeats in a row (a machine under heavy load) are still not a takeover.
LEASE_S = 60.0
#: A waiting render says what it waits for when it starts waiting, then at most this often.
WAIT_NOTICE_S = 15.0
#: Bounds on the lease a claim may ask for (the lease is written in the claim, by its owner).
_LEASE_RANGE = (1.0, 3600.0)
_TAG = "claim"  # rows of the records store that are claims (listed by `live_claims`)


def _started(pid: int) -> float | None:
    """The process's start time (seconds since the epoch, 1/100 s), or None if there is no such process."""
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.Error, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Claim:
    """A claim as stored: whose it is, since when, and when it was last renewed (owner's wall clock)."""

    frame: str
    host: str
    pid: int
    started: Any
    since: float
    renewed: float | None  # None: written by a version without leases
    lease: float
    token: str

    @classmethod
    def parse(cls, raw: bytes) -> Claim | None:
        try:
            data = json.loads(raw)
            lease = float(data.get("lease", 0.0))
            renewed = data.get("renewed")
            return cls(
                frame=str(data.get("frame", "")),
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=data.get("started"),
                since=float(data.get("since", renewed or 0.0)),
                renewed=None if renewed is None else float(renewed),
                lease=min(max(lease, _LEASE_RANGE[0]), _LEASE_RANGE[1]),
                token=str(data.get("token", "")),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self) -> str:
        return f"claimed by host {self.host} pid {self.pid} since {time.strftime('%H:%M:%S', time.localtime(self.since))}"


def _stale_by_owner(claim: Claim, host: str) -> str | None:
    """Why a claim made on this host is void because its process is gone (None: alive or elsewhere)."""
    if claim.host != host:
        return None
    started = _started(claim.pid)
    if started is None:
        return "its process is gone"
    if isinstance(claim.started, (int, float)) and abs(started - float(claim.started)) > 0.05:
        return "its process is gone (the pid was reused)"
    return None


def _stale_by_clock(claim: Claim, now: float, host: str) -> str | None:
    """Why a claim's lease ran out by the wall clock (None: still in force, as far as the clock says)."""
    if claim.renewed is None:
        # Written by a version without leases: its owner can only be checked on this host.
        return None if claim.host == host else "it has no lease"
    if now - claim.renewed > claim.lease:
        return f"not renewed for {now - claim.renewed:.0f} s"
    return None


def live_claims(records: Store | None, *, now: float | None = None) -> dict[str, Claim]:
    """The claims in force, by frame key: what ``--plan`` shows as "claimed by host X pid Y since ...".

    Read-only. Claims whose owner on this host is gone, or whose lease ran out, are left out: the
    next render takes those frames over.
    """
    if records is None:
        return {}
    now = time.time() if now is None else now
    host = socket.gethostname()
    found: dict[str, Claim] = {}
    for raw in records.tagged(_TAG).values():
        claim = Claim.parse(raw)
        if claim is None or not claim.frame:
            continue
        if _stale_by_owner(claim, host) or _stale_by_clock(claim, now, host):
            continue
        found[claim.frame] = claim
    return found


def frame_ranges(frames: Iterable[int], limit: int = 6) -> str:
    """``[12, 13, 14, 15, 20]`` -> ``"12-15, 20"``; long lists end with ``... (N frames)``."""
    ordered = sorted(set(frames))
    spans: list[list[int]] = []
    for f in ordered:
        if spans and f == spans[-1][1] + 1:
            spans[-1][1] = f
        else:
            spans.append([f, f])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans[:limit])
    if len(spans) > limit:
        text += f", ... ({len(ordered)} frames)"
    return text


class Claims:
    """This process's claims on frame keys, kept in a records store, renewed by a heartbeat thread."""

    def __init__(
        self,
        records: Store,
        *,
        lease: float = LEASE_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        heartbeat: bool = True,
    ) -> None:
        """``clock`` and ``monotonic`` are injectable so that tests can let leases run out at once;
        ``heartbeat=False`` leaves renewing to explicit `renew` calls."""
        self.records = records
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = _started(self.pid)
        self.lease = min(max(lease, _LEASE_RANGE[0]), _LEASE_RANGE[1])
        self.clock = clock
        self.monotonic = monotonic
        self.token = uuid.uuid4().hex  # tells this object's claims from earlier ones of this process
        self._held: dict[str, bytes] = {}  # frame key -> the claim bytes we wrote last
        self._seen: dict[str, tuple[bytes, float]] = {}  # others' claims: bytes, when first seen so
        self._lock = threading.Lock()
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_notice = 0.0
        self.taken_over: list[tuple[Claim, str]] = []  # (claim, why) for each takeover, for messages

    @staticmethod
    def _key(frame_key: str) -> str:
        return claim_key(frame_key)

    def _payload(self, frame_key: str, since: float, now: float) -> bytes:
        owner = {
            "frame": frame_key,
            "host": self.host,
            "pid": self.pid,
            "started": self.started,
            "since": round(since, 3),
            "renewed": round(now, 3),
            "lease": self.lease,
            "token": self.token,
        }
        return json.dumps(owner, sort_keys=True).encode()

    def _why_stale(self, raw: bytes, ck: str) -> str | None:
        """Why another's claim (its stored bytes) may be taken over, or None while it is in force."""
        claim = Claim.parse(raw)
        if claim is None:
            return "it is unreadable"
        if claim.host == self.host and claim.pid == self.pid and claim.token != self.token:
            # A live pid is unique on a host: this process wrote it, in an earlier attempt.
            return "it is left from an earlier attempt of this process"
        why = _stale_by_owner(claim, self.host) or _stale_by_clock(claim, self.clock(), self.host)
        if why:
            return why
        if claim.renewed is None:
            return None  # an old-style claim of a live process on this host: no heartbeat to watch
        # The claimer's clock may run ahead of ours: also time the lease by what we see ourselves.
        now = self.monotonic()
        seen = self._seen.get(ck)
        if seen is None or seen[0] != raw:
            self._seen[ck] = (raw, now)
            return None
        if now - seen[1] > claim.lease:
            return f"unchanged for {now - seen[1]:.0f} s (its owner stopped renewing it)"
        return None

    def claim(self, keys: Iterable[str]) -> list[str]:
        """Claim what is free (or held by a claim that is void); returns the keys now ours."""
        mine = []
        now = self.clock()
        for key in keys:
            ck = self._key(key)
            payload = self._payload(key, now, now)
            with self._lock:
                if self.records.swap(ck, None, payload, tag=_TAG):
                    self._held[key] = payload
                    mine.append(key)
                    continue
                raw = self.records.get(ck)
                if raw is None:
                    taken = self.records.swap(ck, None, payload, tag=_TAG)  # released meanwhile
                    why = None
                else:
                    why = self._why_stale(raw, ck)
                    taken = why is not None and self.records.swap(ck, raw, payload, tag=_TAG)
                if taken:
                    self._held[key] = payload
                    self._seen.pop(ck, None)
                    mine.append(key)
                    old = Claim.parse(raw) if raw is not None else None
                    if old is not None and why is not None:
                        self.taken_over.append((old, why))
        if mine and self._heartbeat:
            self._start_heartbeat()
        return mine

    def release(self, keys: Iterable[str]) -> None:
        """Give up claims; one that another process has taken over meanwhile is left alone."""
        for key in keys:
            with self._lock:
                payload = self._held.pop(key, None)
                if payload is not None:
                    self.records.swap(self._key(key), payload, None)

    def renew(self) -> list[str]:
        """Renew every claim held now; returns the keys lost to a takeover (no longer ours)."""
        lost = []
        with self._lock:
            now = self.clock()
            for key, old in list(self._held.items()):
                since = json.loads(old)["since"]
                new = self._payload(key, since, now)
                if self.records.swap(self._key(key), old, new, tag=_TAG):
                    self._held[key] = new
                else:
                    del self._held[key]
                    lost.append(key)
        for key in lost:
            logger.warning("claim on frame %s was taken over by another process", key[:12])
        return lost

    def owners(self, keys: Iterable[str]) -> dict[str, Claim]:
        """The current claims on `keys` (those that have one), by frame key."""
        found = {}
        for key in keys:
            raw = self.records.get(self._key(key))
            claim = Claim.parse(raw) if raw is not None else None
            if claim is not None:
                found[key] = claim
        return found

    def wait_notice(self, frames: Mapping[str, Iterable[int]]) -> list[str]:
        """Lines to print while waiting for `frames` (frame key -> frame numbers) claimed elsewhere:
        one per owner the first time, then again at most every `WAIT_NOTICE_S`; [] when not due."""
        now = self.monotonic()
        if not frames or now < self._next_notice:
            return []
        self._next_notice = now + WAIT_NOTICE_S
        by_owner: dict[tuple[str, int, float], tuple[Claim, list[int]]] = {}
        for key, claim in self.owners(frames).items():
            entry = by_owner.setdefault((claim.host, claim.pid, claim.since), (claim, []))
            entry[1].extend(frames[key])
        return [
            f"waiting for frames {frame_ranges(numbers)}, {claim.describe()}"
            for claim, numbers in sorted(by_owner.values(), key=lambda e: min(e[1]))
        ]

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.renew()
            except Exception as exc:  # a busy or full disk: the next beat tries again
                logger.warning("could not renew frame claims: %s", exc)

    def close(self) -> None:
        """Stop the heartbeat and release every claim still held."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.release(list(self._held))

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
