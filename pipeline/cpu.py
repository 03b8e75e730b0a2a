"""How many CPU threads torch uses when frames render on the CPU.

torch's default is one OpenMP thread per core. On a machine whose cores are busy with other work that
is the worst choice: every parallel region waits for its slowest thread, and a descheduled thread
stalls them all (``bench/threads.py``; ``bench/RESULTS.md`` section 10). So the default takes only the
cores that are free when the render starts::

    choose_threads(None)    # 'auto': physical cores minus the load of other work, at least 1,
                            # unless OMP_NUM_THREADS is set: then torch already follows it
    choose_threads(1)       # exactly 1
    choose_threads(0)       # torch's own default (one per core)
"""

from __future__ import annotations

import math
import os


def free_cores() -> int:
    """Physical cores not busy with other work, from the 1-minute load average (at least 1)."""
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform (Windows): assume the machine is ours
        load = 0.0
    return max(1, min(cores, cores - math.floor(load)))


def choose_threads(requested: int | None) -> int | None:
    """The thread count to set (``None``: leave torch's default). ``requested``: None auto, 0 torch's."""
    if requested is None:
        # The usual way to pin threads for every OpenMP program: a user (or a test suite) who set it
        # has chosen, and torch read it at import.
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        return free_cores()
    if requested == 0:
        return None
    return requested
