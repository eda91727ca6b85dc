"""How bchat's serving processes share a small machine's CPU with each other and with PostgreSQL
(gunicorn's workers, ``bchat serve`` and the model runners call these at start)."""

from __future__ import annotations

import gc
import os


def own_scheduling_group(nice: int = 0) -> None:
    """Make this process its own session, so that where Linux groups processes for the CPU by
    session (autogroup, kernel.sched_autogroup_enabled: on in Debian's and Ubuntu's kernels
    unless a cgroup CPU controller is in use) it gets a group's share of its own, with
    ``nice`` set on that group.

    Every PostgreSQL backend starts its own session, so each one was a group the size of all
    of gunicorn's workers together, which shared one (the model's runner in it too). Under
    bench/class_load.py's class on PostgreSQL, runs alternated in the same hour, p99 was
    403-585 ms with one group and 134-161 ms with a group per worker and the runner in a niced
    group of its own (in a quieter hour: 193-347 and 110-275 ms). Signals
    still reach a worker (gunicorn's master signals each by pid, and a worker exits when the
    master is gone) and a runner (its supervisor stops it; it dies with its parent)."""
    try:
        os.setsid()
    except OSError:  # already a session's leader
        return
    if nice:
        try:  # the group's weight: a process's own nice counts only within its group
            with open("/proc/self/autogroup", "w") as group:
                group.write(str(nice))
        except OSError:  # no autogroup here (another kernel, or a cgroup controller instead)
            pass


def freeze_loaded_objects() -> None:
    """Put what a serving process has loaded (the app, its modules, SQLAlchemy's mappers,
    ~120,000 objects) out of the garbage collector's sight: they live as long as the process.
    Each full collection walked them all, 37 ms on a quiet core and 55-107 ms under
    bench/class_load.py's class, about once per worker every half minute, and every request
    in that worker waited for it. Collections now walk only what requests allocate."""
    gc.collect()
    gc.freeze()
