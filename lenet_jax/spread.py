"""Several seeds on several CPU cores: ``train.py --seeds`` at batch 1 gives each core a
process of its own and a share of the seeds.

At batch 1 a seed trains fastest on one thread (``lenet_jax.cores``), so a CPU with N
cores trains N seeds in about the time of one. One process cannot do this with several
CPU devices: XLA's CPU client gives them one shared pool of as many threads as devices.
So each core gets a worker process (``python -m lenet_jax.spread``) held to that core
before JAX starts, so that its pool has one thread, as a single run's has, and it trains
its seeds one after the other, each exactly as ``train.py --seed S --workdir
WORKDIR/seed-S`` does: the same compiled program on a pool of the same size, so the same
parameters bit for bit (a pool of another size splits the work, and the sums,
otherwise). The cores share the epochs evenly (``plan``): where the seeds do not divide
among the cores, a seed's first epochs train on one core and the rest on another, which
resumes it from its checkpoint once the first has paused, so three seeds on two cores
take the time of one and a half, not two. A resumed run is the same bit for bit, so the
seed is still exactly its own run. Two seeds in one program on a core took as long as
one after the other (measured), and would no longer each be its own run.

The command (the parent) holds ``WORKDIR``'s lock and passes a stop request on: on
SIGTERM/SIGINT every worker saves where it is and starts no further seed; a second
signal ends everything at once, as it ends a single run. A worker whose parent dies is
sent SIGTERM by the kernel (Linux's parent-death signal), so it saves and ends too.
A worker that fails makes the others stop cleanly, and the command fails with its kind
of error (exit 1 for a diverged seed, as a single run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lenet_jax import cores, training
from lenet_jax.checkpoint import METRICS, SEED_FOLDER, holds_checkpoints
from lenet_jax.config import Config
from lenet_jax.errors import Diverged, UserError, command
from lenet_jax.fileio import RunFolder, atomic_write_text
from lenet_jax.runs import check_layout

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.05
STOPPED_BEFORE_TRAINING = (130, -signal.SIGTERM)
"""How a worker asked to stop before its training started ends: as an interrupted command
(``errors.command``), or by the signal itself while Python was still starting."""


class WorkerFailed(UserError, RuntimeError):
    """A worker process ended with an error (its own error line is printed above)."""


@dataclass(frozen=True)
class Part:
    """A stretch of one seed's training that a worker runs: from where the seed stands to
    the end of epoch ``until`` (None: its last epoch), once the stretch before it has
    paused after epoch ``after`` (None: the seed starts here)."""

    seed: int
    until: int | None = None
    after: int | None = None

    def __str__(self) -> str:
        if self.until is not None:
            return f"{self.seed} (to epoch {self.until})"
        return str(self.seed) if self.after is None else f"{self.seed} (from epoch {self.after + 1})"


@dataclass(frozen=True)
class SeedOutcome:
    """What a seed's run ended with: its per-epoch history, whether it completed every
    epoch, and where its process ran."""

    seed: int
    history: list[dict[str, Any]]
    finished: bool
    cores: list[int]
    """The cores its process's threads could run on when it ended."""


def plan(seeds: Sequence[int], config: Config, backend: str, processes: int, allowed: set[int],
         local_devices: int = 1, done: dict[int, int] | None = None) -> list[list[Part]] | None:
    """What each allowed core trains, in core order (``share``), or None to train the
    seeds in one program: only on the CPU, in one process with one device (several CPU
    devices are a user's own XLA flag, left alone), at batch 1, for several seeds, with
    more than one core ``allowed`` (a user's own ``taskset`` to one core is left alone
    too). ``done``: the epochs each seed has completed already (a resumed run)."""
    if backend != "cpu" or processes != 1 or local_devices != 1 or config.devices > 1 or config.batch_size != 1 or len(seeds) < 2:
        return None
    if len(allowed) < 2:
        return None
    return share(seeds, config.epochs, min(len(allowed), len(seeds)), done or {})


def share(seeds: Sequence[int], epochs: int, cores: int, done: dict[int, int]) -> list[list[Part]]:
    """The seeds' remaining epochs dealt to ``cores`` cores as evenly as whole epochs
    allow (McNaughton's wrap-around, with the order of a seed's epochs kept): the seeds
    fill the cores in turn, each core up to the same length L, at least the longest
    seed's; a seed that overflows a core trains its first epochs at the start of the
    next core and the rest at the end of this one, which cannot come sooner than L less
    the rest, by which time the first part, no longer than that, has paused."""
    left = {s: max(0, epochs - done.get(s, 0)) for s in seeds}
    length = max(-(-sum(left.values()) // cores), *left.values())
    parts: list[list[Part]] = [[] for _ in range(cores)]
    core, room = 0, length
    for seed in seeds:
        need = left[seed]
        if need > room and room > 0 and core + 1 < cores:
            head = done.get(seed, 0) + need - room
            parts[core].append(Part(seed, after=head))
            core += 1
            parts[core].append(Part(seed, until=head))
            room = length - (need - room)
            continue
        if need > room and core + 1 < cores:
            core, room = core + 1, length
        parts[core].append(Part(seed))
        room -= need
    return [p for p in parts if p]


def processes_that_fit(config: Config, n_train: int, wanted: int, available: int | None) -> int:
    """How many of ``wanted`` workers fit in ``training.MEMORY_SHARE`` of the ``available``
    bytes (unknown: all), each holding the data and one seed (``training.seed_memory``).
    ConfigError when not even one fits in all of it."""
    if available is None:
        return wanted
    each, shared = training.seed_memory(config, n_train)
    if each + shared > available:
        raise training.one_seed_too_large(each + shared, available)
    return max(1, min(wanted, int(training.MEMORY_SHARE * available // (each + shared))))


def places(config: Config, seeds: Sequence[int], n_train: int, done: dict[int, int] | None = None) -> list[list[Part]] | None:
    """``plan`` for this process, its backend and the cores it may use, on as many cores
    as fit in memory (``processes_that_fit``); None to train the seeds in one program.
    ``done``: the epochs each seed has completed (``completed_epochs``, for a resumed run)."""
    import jax

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") and cores.TASKS.is_dir() else set()  # Linux
    where = (jax.default_backend(), jax.process_count())
    planned = plan(seeds, config, *where, allowed, jax.local_device_count(), done)
    if planned is None:
        return None
    fit = processes_that_fit(config, n_train, len(planned), training.available_memory())
    return plan(seeds, config, *where, set(sorted(allowed)[:fit]), done=done)


def completed_epochs(root: Path, seeds: Sequence[int]) -> dict[int, int]:
    """The epochs each seed's folder under ``root`` records as completed (its metrics
    log's rows; none for a folder without one): what is left to share out on a resume."""
    done = {}
    for seed in seeds:
        try:
            rows = (root / SEED_FOLDER.format(seed) / METRICS).read_text().splitlines()
        except (OSError, UnicodeDecodeError):  # none, or unreadable: the checkpoints say where the seed stands
            rows = []
        done[seed] = sum(1 for row in rows if _is_row(row))
    return done


def _is_row(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def worker_command(core: int, parts: list[Part], config: Config, workdir: Path, resume: bool, report: Path) -> list[str]:
    """The command line of the worker that trains ``parts`` on ``core``; how each first
    part of a seed ended goes to a file next to ``report`` (``ended_mark``)."""
    return [sys.executable, "-m", "lenet_jax.spread", "--core", str(core), "--parts", json.dumps([dataclasses.astuple(p) for p in parts]),
            "--workdir", str(workdir), "--config", json.dumps(config.to_dict()), "--report", str(report),
            "--parent", str(os.getpid()), *(["--resume"] if resume else [])]


PAUSED, STOPPED = "paused", "stopped"


def ended_mark(report: Path, seed: int) -> Path:
    """The file that says how ``seed``'s first part ended (``PAUSED``: the rest may
    start; ``STOPPED``: it will not pause, the seed's training stops here), in the
    folder of the workers' reports."""
    return report.parent / f"first-part-{seed}"


def _first_part_ended(report: Path, seed: int, stop: Callable[[], bool]) -> bool:
    """Wait until ``seed``'s first part has ended; whether it paused (not stopped, and
    no stop request here meanwhile)."""
    mark = ended_mark(report, seed)
    while not (stop() or mark.exists()):
        time.sleep(POLL_SECONDS)
    return not stop() and mark.read_text() == PAUSED


def fit_spread(config: Config, places: list[list[Part]], workdir: Path | RunFolder, resume: bool = False,
               say: Callable[[str], None] = print, stop: Callable[[], bool] = lambda: False) -> list[SeedOutcome]:
    """Train each core's parts of the seeds (``plan``) in a worker process of its own on
    that core, into ``workdir/seed-S`` (``workdir`` held by the caller); the outcome of
    every seed that started, in the order the seeds were planned from (the cores' parts
    read in turn). ``stop`` is asked while they run; when it says yes every worker is
    asked to stop (SIGTERM) and saves where it is; a seed not yet started gets an empty
    folder, which ``--resume`` trains. Raises ``Diverged`` or ``WorkerFailed`` when a
    worker fails, after the others have stopped cleanly."""
    root = workdir.path if isinstance(workdir, RunFolder) else Path(workdir)
    order = list(dict.fromkeys(part.seed for parts in places for part in parts))
    check_layout(root, order, several=True, resume=resume)
    on = sorted(os.sched_getaffinity(0))[: len(places)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    say("seeds " + "; ".join(f"{','.join(map(str, parts))} on core {c}" for c, parts in zip(on, places))
        + ": a process per core, its seeds one after the other")
    with tempfile.TemporaryDirectory(prefix="lenet-jax-spread-") as reports:
        paths = [Path(reports) / f"core-{core}.json" for core in on]
        workers = [subprocess.Popen(worker_command(core, seeds, config, root, resume, path), env=env, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
                   for core, seeds, path in zip(on, places, paths)]
        try:
            codes = _supervise(workers, stop)
        finally:
            for worker in workers:  # an error in the command itself: no worker outlives it
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)
                    worker.wait()
        outcomes: dict[int, SeedOutcome] = {}
        for o in (SeedOutcome(**o) for path in paths if path.is_file() for o in json.loads(path.read_text())):
            if o.seed not in outcomes or len(o.history) > len(outcomes[o.seed].history) or o.finished:
                outcomes[o.seed] = o  # a seed in two parts: the later one, which read the first one's history
    if len(outcomes) < len(order) and holds_checkpoints(root):
        for seed in order:  # an empty folder each: --resume trains them
            with contextlib.suppress(OSError):
                (root / SEED_FOLDER.format(seed)).mkdir(exist_ok=True)
    failed = [(parts, code) for parts, code in zip(places, codes) if code != 0]
    if failed:
        named = "; ".join(f"seed(s) {','.join(str(p.seed) for p in parts)}: exit code {code}" for parts, code in failed)
        error = Diverged if any(code == 1 for _, code in failed) else WorkerFailed
        raise error(f"{named} (its error is above); every other seed still training stopped with a checkpoint")
    return [outcomes[s] for s in order if s in outcomes]


def _supervise(workers: list[subprocess.Popen], stop: Callable[[], bool]) -> list[int]:
    """Wait for every worker, passing a stop request on once, and asking the others to
    stop when one fails; each worker's exit code, 0 for one asked to stop before its
    training started (``STOPPED_BEFORE_TRAINING``)."""
    asked: set[int] = set()
    while any([w.poll() is None for w in workers]):  # every worker polled, each time
        failed = any(w.returncode not in (None, 0) for w in workers)
        if not asked and (stop() or failed):
            for i, w in enumerate(workers):
                if w.poll() is None:
                    w.send_signal(signal.SIGTERM)
                    asked.add(i)
        time.sleep(POLL_SECONDS)
    return [0 if i in asked and w.returncode in STOPPED_BEFORE_TRAINING else w.returncode for i, w in enumerate(workers)]


# --------------------------------------------------------------------------- the worker


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the parent ends (Linux), and end now if it already has."""
    if not cores.end_with_parent(parent):
        raise WorkerFailed("the command that started this worker has ended")


def settle_on(core: int) -> None:
    """Hold every thread of the process (those the imports started included) to ``core``
    for good, then start JAX: XLA's CPU pool gets one thread, as a single run's does
    (``cores.start_jax``), and its threads inherit the core."""
    cores.move_threads({core})
    cores.start_jax(one_thread=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lenet_jax.spread", description="One core's worker of train.py --seeds (internal).")
    parser.add_argument("--core", type=int, required=True)
    parser.add_argument("--parts", required=True, help="the worker's parts of the seeds, as JSON [[seed, until, after], ...]")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--config", required=True, help="the run's config as JSON")
    parser.add_argument("--report", type=Path, required=True, help="where the outcome of each seed goes, as JSON")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    return parser


@command
def work(args: argparse.Namespace) -> int:
    """Train the worker's parts of the seeds one after the other on its core, a part
    that continues a seed once the part before it has paused; each part's outcome is
    written to ``--report`` as it ends. A stop request saves the seed in training and
    starts no other. Every first part of a seed is marked as paused or stopped when the
    worker ends, however it ends, so that no other worker waits for it for ever."""
    from lenet_jax.data import load_dataset
    from lenet_jax.preemption import StopRequest
    from lenet_jax.training import fit

    parts = [Part(*p) for p in json.loads(args.parts)]
    with StopRequest(say=_prefixed(f"seeds {','.join(str(p.seed) for p in parts)}: ", sys.stderr)) as stop:
        die_with_parent(args.parent)
        settle_on(args.core)
        config = Config.from_dict(json.loads(args.config)).validate()
        dataset = load_dataset(config.dataset, config.data_source, config.data_dir, config.cache_dir, log=lambda message: None)
        outcomes: list[dict[str, Any]] = []
        paused: set[int] = set()
        try:
            with stop.asking():
                for part in parts:
                    if part.after is not None and not _first_part_ended(args.report, part.seed, stop) or stop():
                        break
                    say = _prefixed(f"seed {part.seed}: ")
                    result = fit(config.replace(seed=part.seed), dataset, args.workdir / SEED_FOLDER.format(part.seed),
                                 resume=args.resume or part.after is not None, log=say, progress=False, stop=stop, pause_after=part.until)
                    outcomes.append({"seed": part.seed, "history": result.history, "finished": result.finished,
                                     "cores": cores.threads_cores()})
                    args.report.write_text(json.dumps(outcomes))
                    if part.until is not None and not stop():  # paused (or, resumed past its end, finished)
                        paused.add(part.seed)
                        atomic_write_text(ended_mark(args.report, part.seed), PAUSED)  # read whole or not at all
        finally:
            for part in parts:
                if part.until is not None and part.seed not in paused:
                    atomic_write_text(ended_mark(args.report, part.seed), STOPPED)
    return 0


def _prefixed(prefix: str, stream: Any = None) -> Callable[[str], None]:
    def say(message: str) -> None:
        print("\n".join(prefix + line for line in message.splitlines()), file=stream or sys.stdout, flush=True)

    return say


def main(argv: list[str] | None = None) -> int:
    return work(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
