"""How a batch-1 run uses the CPU's cores.

At batch 1 (the paper's pure stochastic updates) every operation is tiny, and XLA's CPU
thread pool, one thread per core the process may use, costs more in hand-offs between
its threads than it gives: the same program runs fastest with a pool of one thread, at
the rate of the process alone on one core (docs/speed.md). XLA sizes that pool from the
cores the process may use at the moment its CPU client starts, and offers no setting for
it; ``start_jax`` therefore
starts JAX's backends with the process held to one core for that moment, then gives
every thread back the cores it had, so the pool's one thread (and evaluation, and the
rest of the process) may run on any of them. The pool's size also decides how XLA splits
a sum between threads: a batch-1 run on the CPU started so computes the same numbers
whatever the number of cores it may use (the tests check one core against two).

``pinned`` serves a process whose pool already has several threads (a notebook or a
script that started JAX itself): it moves every thread onto one core while a chunk of
batch-1 updates runs, which gives part of the gain and changes nothing computed.

Everything here is for the CPU backend on Linux (``os.sched_setaffinity`` on each
thread); other backends, platforms and a process the user already holds to one core
(``taskset``) are left as they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import signal
from pathlib import Path
from typing import Iterator

import jax

TASKS = Path("/proc/self/task")
DEVICE_COUNT_SETTINGS = ("xla_force_host_platform_device_count",)
"""XLA flags that give the CPU several devices, each sizing the pool for itself."""
ONE_THREAD_FLAGS = ("--xla_cpu_copy_insertion_use_region_analysis=true",)
"""XLA flags added for a one-thread start unless the user's ``XLA_FLAGS`` names them:
region analysis lets the compiled batch-1 loop update the C5 and F6 kernels in place
instead of copying them every update (docs/speed.md: 3-6% at batch 1, the same numbers)."""


def linux_threads() -> bool:
    """Whether each of the process's threads can be listed and moved (Linux)."""
    return hasattr(os, "sched_setaffinity") and TASKS.is_dir()


def only_cpu() -> bool:
    """Whether JAX can only run on the CPU here, known without starting a backend:
    ``JAX_PLATFORMS`` (or ``jax_platforms``) names the CPU alone, or no accelerator's
    package is installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.strip() == "cpu"
    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS") or importlib.metadata.entry_points(group="jax_plugins"):
        return False
    if importlib.util.find_spec("libtpu") is not None:
        return False
    try:
        import jax_plugins  # type: ignore[import-not-found]
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


def backends_started() -> bool:
    """Whether JAX's backends (and so XLA's CPU pool) exist already."""
    from jax._src import xla_bridge  # no public way to ask without starting them

    return xla_bridge.backends_are_initialized()


def one_thread_applies() -> bool:
    """Whether ``start_jax(one_thread=True)`` would give XLA's CPU pool one thread where it
    would otherwise have several: JAX not started, only the CPU, one CPU device (no
    device count set by the user), one process, Linux, and more than one core allowed."""
    flags = os.environ.get("XLA_FLAGS", "")
    return (
        linux_threads()
        and not backends_started()
        and only_cpu()
        and jax.config.jax_num_cpu_devices in (-1, 1)
        and not any(setting in flags for setting in DEVICE_COUNT_SETTINGS)
        and not jax.distributed.is_initialized()
        and len(os.sched_getaffinity(0)) > 1
    )


def start_jax(one_thread: bool) -> bool:
    """Start JAX's backends, with XLA's CPU pool of one thread if ``one_thread`` and
    ``one_thread_applies()``; whether it got one thread so. Call it before anything else
    uses JAX (a started backend is left as it is)."""
    if not (one_thread and one_thread_applies()):
        jax.devices()
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    mine = [f for f in ONE_THREAD_FLAGS if f.split("=")[0] not in flags]
    if mine:  # read when the CPU client starts; the user's own setting is left as it is
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [flags, *mine]))
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # the threads the client starts inherit it
    try:
        jax.devices()
    finally:
        move_threads(allowed)
    return True


def batch1_core(backend: str, batch_size: int, n_seeds: int) -> int | None:
    """The core a chunk of updates is pinned to, or None to leave the threads where they are."""
    if backend != "cpu" or batch_size != 1 or n_seeds != 1 or not linux_threads():
        return None
    allowed = os.sched_getaffinity(0)
    return min(allowed) if len(allowed) > 1 else None


def thread_ids() -> list[int]:
    """The ids of the process's threads now (Linux)."""
    return [int(name) for name in os.listdir(TASKS) if name.isdigit()]


def move_threads(allowed: set[int]) -> dict[int, set[int]]:
    """Every thread of the process onto the cores ``allowed``; each moved thread's set of
    cores before. A thread that ends meanwhile is passed over."""
    before = {}
    for tid in thread_ids():
        with contextlib.suppress(OSError):  # a thread that ended between the listing and here
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, allowed)
    return before


@contextlib.contextmanager
def pinned(core: int | None) -> Iterator[None]:
    """Every thread of the process on ``core`` for the block (nothing when None); each
    thread's own set of cores restored after it. One started inside the block keeps the
    core it inherited until it is next pinned."""
    if core is None:
        yield
        return
    before = move_threads({core})
    try:
        yield
    finally:
        for tid, cores in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cores)


def threads_cores() -> list[int]:
    """Every core some thread of this process may run on."""
    allowed: set[int] = set()
    for tid in thread_ids():
        with contextlib.suppress(OSError):
            allowed |= os.sched_getaffinity(tid)
    return sorted(allowed)


PR_SET_PDEATHSIG = 1


def end_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when the parent ends (Linux's parent-death signal), for
    a worker process; False when the parent has ended already."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent
