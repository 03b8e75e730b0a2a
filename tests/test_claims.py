"""Frame claims are leases: honoured while renewed, taken over when their owner is gone or silent.

Clocks are injected (no sleeping): ``Clock`` is both the wall clock and the monotonic clock of one
process, moved by hand.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.plan.history import frame_status
from pipeline.store.cache import CacheDir, Store
from pipeline.store.claims import LEASE_S, Claims, frame_ranges, live_claims

KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4)]


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def records(tmp_path: Path) -> Store:
    cache = CacheDir(tmp_path / "cache")
    yield cache.records
    cache.close()


def plant(records: Store, key: str, **owner: object) -> None:
    """A claim written by someone else (another host, an old version, a dead process)."""
    other = Claims(records, heartbeat=False)
    raw = {
        "frame": key,
        "host": "render-2",
        "pid": 4242,
        "started": 1.0,
        "since": time.time(),
        "renewed": time.time(),
        "lease": LEASE_S,
        "token": "t",
        **owner,
    }
    records.put(
        other._key(key), json.dumps({k: v for k, v in raw.items() if v is not None}).encode(), tag="claim"
    )


def test_a_free_frame_is_claimed_once(records: Store) -> None:
    a, b = Claims(records, heartbeat=False), Claims(records, heartbeat=False)
    a.host = "render-1"  # two objects of one process would take over each other's claims (see below)
    assert a.claim(KEYS[:2]) == KEYS[:2]
    assert b.claim(KEYS[:3]) == [KEYS[2]]


def test_another_hosts_claim_is_honoured_while_renewed_and_taken_over_after_its_lease(records: Store) -> None:
    clock = Clock(time.time())
    plant(records, KEYS[0], renewed=clock.now, since=clock.now)
    me = Claims(records, clock=clock, monotonic=clock, heartbeat=False)
    assert me.claim([KEYS[0]]) == []
    clock.now += LEASE_S - 1
    assert me.claim([KEYS[0]]) == []
    clock.now += 2  # 61 s without a renewal, by both clocks
    assert me.claim([KEYS[0]]) == [KEYS[0]]
    ((old, why),) = me.taken_over
    assert (old.host, old.pid) == ("render-2", 4242) and why == "not renewed for 61 s"


def test_a_claim_from_another_host_left_long_ago_is_taken_over_at_once(records: Store) -> None:
    plant(records, KEYS[0], renewed=time.time() - 3600, since=time.time() - 3600)
    assert Claims(records, heartbeat=False).claim([KEYS[0]]) == [KEYS[0]]


def test_an_old_style_claim_from_another_host_is_not_trusted_for_ever(records: Store) -> None:
    # What the version without leases wrote: owner only. Its owner on another host cannot be checked.
    plant(records, KEYS[0], renewed=None, since=None, lease=None, token=None, frame=None, started="123")
    assert Claims(records, heartbeat=False).claim([KEYS[0]]) == [KEYS[0]]


def test_a_claimer_whose_clock_runs_ahead_still_loses_its_claim_when_it_stops_renewing(
    records: Store,
) -> None:
    clock = Clock(time.time())
    plant(records, KEYS[0], renewed=clock.now + 86400, since=clock.now + 86400)  # a day ahead
    me = Claims(records, clock=clock, monotonic=clock, heartbeat=False)
    assert me.claim([KEYS[0]]) == []
    clock.now += LEASE_S / 2
    assert me.claim([KEYS[0]]) == []
    clock.now += LEASE_S  # unchanged for 90 s as this process saw it
    assert me.claim([KEYS[0]]) == [KEYS[0]]


def test_renewing_keeps_a_claim_and_release_never_touches_a_claim_taken_over(records: Store) -> None:
    owner_clock, waiter_clock = Clock(time.time()), Clock(time.time())
    owner = Claims(records, clock=owner_clock, monotonic=owner_clock, heartbeat=False)
    waiter = Claims(records, clock=waiter_clock, monotonic=waiter_clock, heartbeat=False)
    # A dead pid is taken over at once; pretend the owner is another host so only leases count.
    owner.host = "render-1"
    assert owner.claim([KEYS[0]]) == [KEYS[0]]
    for _ in range(5):  # 5 x 40 s: far past one lease, but renewed every 40 s
        owner_clock.now += 40
        waiter_clock.now += 40
        assert owner.renew() == []
        assert waiter.claim([KEYS[0]]) == []
    owner_clock.now += 100  # the owner stops (Ctrl-Z): its lease runs out
    waiter_clock.now += 100
    assert waiter.claim([KEYS[0]]) == [KEYS[0]]
    assert owner.renew() == [KEYS[0]]  # it learns that the claim is gone
    owner.release([KEYS[0]])
    assert live_claims(records, now=waiter_clock.now)[KEYS[0]].token == waiter.token


def test_a_claim_left_by_an_earlier_attempt_of_this_process_is_taken_over(records: Store) -> None:
    assert Claims(records, heartbeat=False).claim([KEYS[0]]) == [KEYS[0]]
    assert Claims(records, heartbeat=False).claim([KEYS[0]]) == [KEYS[0]]


def test_a_claim_whose_process_on_this_host_is_gone_is_taken_over_at_once(records: Store) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    plant(records, KEYS[0], host=socket.gethostname(), pid=int(done.stdout))
    assert Claims(records, heartbeat=False).claim([KEYS[0]]) == [KEYS[0]]


def test_a_live_process_on_this_host_keeps_its_claim(records: Store) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        try:
            import psutil

            started = round(psutil.Process(proc.pid).create_time(), 2)
            plant(records, KEYS[0], host=socket.gethostname(), pid=proc.pid, started=started)
            assert Claims(records, heartbeat=False).claim([KEYS[0]]) == []
            # The same pid with another start time is another (reused) process: the claim is void.
            plant(records, KEYS[1], host=socket.gethostname(), pid=proc.pid, started=started - 100)
            assert Claims(records, heartbeat=False).claim([KEYS[1]]) == [KEYS[1]]
        finally:
            proc.kill()


def test_the_heartbeat_renews_and_close_releases(records: Store) -> None:
    me = Claims(records, lease=1.0)  # renewed every 0.25 s
    assert me.claim([KEYS[0]]) == [KEYS[0]]
    first = records.get(me._key(KEYS[0]))
    deadline = time.monotonic() + 30
    while records.get(me._key(KEYS[0])) == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert records.get(me._key(KEYS[0])) != first, "the heartbeat never renewed the claim"
    me.close()
    assert records.get(me._key(KEYS[0])) is None


def test_wait_notice_names_frames_owner_and_time_then_stays_quiet(records: Store) -> None:
    clock = Clock(time.time())
    since = time.mktime((2026, 12, 1, 14, 3, 11, 0, 0, -1))
    for key in KEYS:
        plant(records, key, since=since, renewed=clock.now)
    me = Claims(records, clock=clock, monotonic=clock, heartbeat=False)
    frames = {KEYS[0]: [12], KEYS[1]: [13, 14], KEYS[2]: [15], KEYS[3]: [20]}
    assert me.wait_notice(frames) == [
        "waiting for frames 12-15, 20, claimed by host render-2 pid 4242 since 14:03:11"
    ]
    clock.now += 5
    assert me.wait_notice(frames) == []
    clock.now += 15
    assert len(me.wait_notice(frames)) == 1


def test_frame_ranges() -> None:
    assert frame_ranges([3, 1, 2, 7]) == "1-3, 7"
    assert frame_ranges(range(0, 40, 2), limit=2) == "0, 2, ... (20 frames)"


def test_plan_status_shows_live_claims_only(records: Store, plan_text) -> None:
    p = plan_text(
        "model: tiny\nframes: 3\nkeyframes:\n  - {frame: 0, prompt: a dog}\n  - {frame: 2, prompt: a cat}\n"
    )
    keys = [j.key for j in p]
    since = time.mktime((2026, 12, 1, 9, 5, 0, 0, 0, -1))
    plant(records, keys[1], since=since, renewed=time.time())
    plant(records, keys[2], since=since, renewed=time.time() - 3600)  # lease long over: will be taken over
    status = frame_status(p, None, {keys[0]}, live_claims(records))
    assert status == ["cached", "claimed by host render-2 pid 4242 since 09:05:00", "not rendered yet"]
