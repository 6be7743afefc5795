"""Which CPU cores a compiled chunk of updates runs on.

At batch 1 (the paper's pure stochastic updates) every operation is tiny, and XLA's CPU
threads spread over several cores cost more in synchronisation than they give: the same
program runs faster with all of the process's threads on one core (measured by
``python -m bench.throughput`` against ``taskset -c 0``, and docs/speed.md). ``pinned``
moves every thread of the process onto one core for the duration of a block and puts
each back where it was afterwards, so evaluation and the curvature refresh before each
epoch keep every core. The thread pools are unchanged (the same number of threads), so
the program computes exactly what it computes unpinned.

Only where it helps and nothing else is changed: the CPU backend, one seed at batch 1,
a process that may use more than one core (a user's own ``taskset`` is left alone), and
Linux (``os.sched_setaffinity`` on each thread).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

TASKS = Path("/proc/self/task")


def batch1_core(backend: str, batch_size: int, n_seeds: int) -> int | None:
    """The core a chunk of updates is pinned to, or None to leave the threads where they are."""
    if backend != "cpu" or batch_size != 1 or n_seeds != 1 or not hasattr(os, "sched_setaffinity") or not TASKS.is_dir():
        return None
    allowed = os.sched_getaffinity(0)
    return min(allowed) if len(allowed) > 1 else None


def thread_ids() -> list[int]:
    """The ids of the process's threads now (Linux)."""
    return [int(name) for name in os.listdir(TASKS) if name.isdigit()]


def move_threads(core: int) -> dict[int, set[int]]:
    """Every thread of the process onto ``core``; each moved thread's set of cores before.
    A thread that ends meanwhile is passed over."""
    before = {}
    for tid in thread_ids():
        with contextlib.suppress(OSError):  # a thread that ended between the listing and here
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {core})
    return before


@contextlib.contextmanager
def pinned(core: int | None) -> Iterator[None]:
    """Every thread of the process on ``core`` for the block (nothing when None); each
    thread's own set of cores restored after it. One started inside the block keeps the
    core it inherited until it is next pinned."""
    if core is None:
        yield
        return
    before = move_threads(core)
    try:
        yield
    finally:
        for tid, cores in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cores)
