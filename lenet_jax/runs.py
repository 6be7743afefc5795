"""One run folder, and who writes it: ``open`` claims it, opens its checkpoint writer and
resumes it (a damaged checkpoint moved aside, never deleted), then writes its ``config.json``
and its metrics log; the returned ``Run`` saves (``save``, ``prune``) and logs (``log``).
Reading a saved run back, for ``eval.py``, the page and ``--resume``'s options, is
``restore_run`` and ``saved_config``: a read-only reader that never writes.

The layout itself (what a checkpoint holds, what is kept) is described in ``checkpoint``.

Several processes (several hosts): every process opens the folder, since orbax's saves
and deletions are collective (each process takes part, and they meet at barriers), but
only the primary process (process 0, the lock holder) changes the folder: orbax creates
it, removes killed saves' temporaries and deletes pruned checkpoints on its primary host only,
and this module moves damaged checkpoints aside and writes config.json and the metrics log on
the primary only.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
from flax.training.train_state import TrainState

from lenet_jax import checkpoint as ckpt
from lenet_jax.checkpoint import CHECKPOINTS, CONFIG, METRICS, SEED_FOLDER, Position
from lenet_jax.config import Config, load_config_file
from lenet_jax.errors import CheckpointError, ConfigError
from lenet_jax.fileio import RunFolder, atomic_write_text, claim
from lenet_jax.parallel import is_primary


class Start(NamedTuple):
    """Where one model starts: its state, history and position, the running sums of the
    epoch it is inside, and whether the epoch it ended still awaits its evaluation."""

    state: TrainState
    history: list[dict[str, Any]]
    position: Position
    totals: dict[str, float]
    pending: bool = False


def zero_totals() -> dict[str, float]:
    return {"loss": 0.0, "errors": 0, "seconds": 0.0}


@dataclass(frozen=True)
class Run:
    """One model's run folder, opened (``open``): its config (its seed), the folder this
    process holds, its checkpoint writer, the updates of its epochs and the name of its
    data (both go in every record)."""

    config: Config
    folder: RunFolder
    mngr: Any
    updates_per_epoch: int
    data: str
    say: Callable[[str], None]

    @property
    def path(self) -> Path:
        return self.folder.path

    def save(self, position: Position, state: TrainState, history: list[dict[str, Any]], **extra: Any) -> None:
        """Save ``state`` at ``position`` with its record: the config, the history and
        ``extra`` (the epoch's running ``totals`` mid-epoch, or its ``metrics``)."""
        record = {"epoch": position.epoch, "update": position.update, "updates_per_epoch": self.updates_per_epoch,
                  "config": self.config.to_dict(), "data": self.data, "history": history, **extra}
        ckpt.save(self.mngr, position.count, state, record)

    def prune(self) -> None:
        """Delete the checkpoints no longer kept (``checkpoint.prune``)."""
        ckpt.prune(self.mngr, self.config.keep)

    def log(self, row: dict[str, Any]) -> None:
        """Append a completed epoch's row to the metrics log (the primary process only)."""
        if is_primary():
            append_metrics(self.path, row, self.say)

    def newest_count(self) -> int | None:
        return max(self.mngr.all_steps(), default=None)

    def resume(self, template: TrainState, resume: bool, newest: int | None = None) -> Start:
        """Where this seed starts: ``template`` (a fresh state), or with ``resume`` the
        newest checkpoint (at most ``newest``) that loads and fits the config. A damaged
        checkpoint, and any checkpoint newer than the one resumed, is moved aside, never deleted."""
        config, updates, workdir, say = self.config, self.updates_per_epoch, self.path, self.say
        if self.mngr.latest_step() is None:
            if resume:
                say(f"{workdir} holds no checkpoint yet: starting the run")
            return Start(template, [], Position(1, 0, updates), zero_totals())
        if not resume:
            raise CheckpointError(f"{workdir} already holds checkpoints: pass --resume to continue it or choose another --workdir")

        def check(record: dict[str, Any]) -> None:
            if record.get("format") not in ckpt.RESUMABLE_FORMATS:
                raise CheckpointError(f"{workdir}: its checkpoints were written by an earlier lenet-jax (numbered by epoch); "
                                      "eval.py reads them, but a run can only be resumed by the version that wrote it")
            if "config" not in record:
                raise CheckpointError(f"{workdir}: a checkpoint record without its config")
            conflicts = config.resume_conflicts(Config.from_dict(record["config"], f"{workdir} checkpoint"))
            if conflicts:
                raise CheckpointError("cannot resume, the checkpoint was written with different " + ", ".join(conflicts))
            if ckpt.updates_of(record) != updates:
                raise CheckpointError(f"{workdir}: the run has {ckpt.updates_of(record)} updates per epoch, this data gives {updates}")

        count, state, record = ckpt.restore_newest_good(self.mngr, lambda record: template, newest=newest, check=check, log=say,
                                                       damaged=self._aside)
        for newer in [s for s in self.mngr.all_steps() if s > count]:
            say(f"checkpoint {newer} is newer than the one resumed; {self._aside(newer)}")
        position = Position.at_count(int(state.step), updates)
        if position.epoch > config.epochs:
            done = position.epoch if position.complete else position.epoch - 1
            raise ConfigError(f"--epochs {config.epochs}: the run in {workdir} has already completed {done} epochs"
                              + ("" if position.complete else f" and is inside epoch {position.epoch}"))
        pending = position.complete and "metrics" not in record and "totals" in record
        totals = {k: record["totals"][k] for k in zero_totals()} if (pending or not position.complete) else zero_totals()
        say(f"resuming {workdir} at {position.describe()}" + (" (its evaluation is still to do)" if pending else ""))
        return Start(state, list(record.get("history", [])), position, totals, pending)

    def _aside(self, count: int) -> str:
        """Move checkpoint ``count`` aside (the primary process; the others leave it to it)."""
        if not is_primary():
            return "moved aside by process 0"
        return f"moved to {ckpt.move_aside(self.mngr, count)}"

    def write_start(self, history: list[dict[str, Any]]) -> None:
        """config.json (the resolved config) and the metrics log rewritten from the
        resumed history (the primary process only)."""
        if not is_primary():
            return
        self.folder.write(CONFIG, json.dumps(self.config.to_dict(), indent=2) + "\n")
        if not (self.path / METRICS).exists():
            self.folder.record(self.path / METRICS)
        write_metrics(self.path, history, self.say)


@contextlib.contextmanager
def open(workdir: Path | str | RunFolder, configs: list[Config], templates: list[TrainState], updates_per_epoch: int, resume: bool,
         several: bool, data: str, say: Callable[[str], None], layout: list[int] | None = None) -> Iterator[tuple[list[Run], list[Start]]]:
    """Hold the run folder for the block (``workdir``, or with ``several`` one ``seed-S``
    folder per config inside it) and yield each model's ``Run`` and ``Start`` (fresh, from
    its template, or resumed). Refused before anything is written: a folder of the other
    kind of run, or a resume naming other seeds than the run's (``layout``: all of the
    run's seeds, when they are trained in groups). A ``RunFolder`` the caller already
    holds is used as it is; the folders this call claims are released when the block
    ends, what they created removed if it fails before a checkpoint is saved."""
    primary = is_primary()
    root = workdir.path if isinstance(workdir, RunFolder) else Path(workdir)
    seeds = [c.seed for c in configs]
    if primary:
        check_layout(root, layout or seeds, several, resume)
    with contextlib.ExitStack() as held:
        top = workdir if isinstance(workdir, RunFolder) else held.enter_context(claim(root, lock=primary, durable=ckpt.holds_checkpoints))
        folders = ([held.enter_context(claim(root / SEED_FOLDER.format(s), lock=primary, durable=ckpt.holds_checkpoints)) for s in seeds]
                   if several else [top])
        runs = []
        for config, folder in zip(configs, folders):
            if primary and not (folder.path / CHECKPOINTS).exists():
                folder.record(folder.path / CHECKPOINTS)
            mngr = held.enter_context(contextlib.closing(ckpt.writer(folder.path / CHECKPOINTS, primary=primary)))
            runs.append(Run(config, folder, mngr, updates_per_epoch, data, say))
        starts = [run.resume(template, resume) for run, template in zip(runs, templates)]
        if several:
            starts = _common_start(runs, templates, starts)
        if jax.process_count() > 1:  # the primary has moved damaged checkpoints aside: every process sees the same ones
            from jax.experimental.multihost_utils import sync_global_devices

            sync_global_devices("lenet-jax: run folder opened")
            for run in runs:
                ckpt.reload(run.mngr)
        for run, start in zip(runs, starts):
            run.write_start(start.history)
        yield runs, starts


def _common_start(runs: list[Run], templates: list[TrainState], starts: list[Start]) -> list[Start]:
    """The seeds of a run resume together, from the newest position all of them reached
    (a run stopped while it saved its seeds has some a save ahead: those checkpoints are moved
    aside, never deleted, and computed again)."""
    common = min(s.position.count for s in starts)
    return [s if s.position.count == common else run.resume(t, True, newest=common) for s, run, t in zip(starts, runs, templates)]


def check_layout(root: Path, seeds: list[int], several: bool, resume: bool) -> None:
    """Refuse, before anything is written, a folder that holds the other kind of run, or
    a resume that names other seeds than the run has."""
    existing = ckpt.seed_folders(root)
    if several and ckpt.is_single_run(root):
        raise ConfigError(f"--workdir {root} holds a run of one model; --seeds writes one folder per seed: choose another --workdir")
    if not several and existing:
        raise ConfigError(f"--workdir {root} holds the runs of several seeds ({', '.join(p.name for p in existing.values())}): "
                          f"resume it with --resume and no --seed, or give one seed's folder")
    if several and resume and existing and sorted(existing) != sorted(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: the run in {root} has seeds {','.join(map(str, existing))}; "
                          "--resume continues all of them (give no --seeds)")


# --------------------------------------------------------------------------- the metrics log


def metrics_line(row: dict[str, Any]) -> str:
    """One row as strict JSON: a value that is not a finite number is written as null,
    and named in ``non_finite``."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    clean = {k: (None if k in bad else v) for k, v in row.items()}
    if bad:
        clean["non_finite"] = bad
    return json.dumps(clean, allow_nan=False) + "\n"


def write_metrics(workdir: Path, history: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    """The metrics log rewritten from the checkpointed history: each epoch once, whatever
    earlier runs of the folder appended."""
    try:
        atomic_write_text(workdir / METRICS, "".join(metrics_line(row) for row in history))
    except OSError as e:
        say(f"warning: cannot write {workdir / METRICS} ({e.strerror or type(e).__name__}); the checkpoints hold the history")


def append_metrics(workdir: Path, row: dict[str, Any], say: Callable[[str], None]) -> None:
    try:
        with (workdir / METRICS).open("a") as f:
            f.write(metrics_line(row))
    except OSError as e:
        say(f"warning: cannot write {workdir / METRICS} ({e.strerror or type(e).__name__}); the checkpoint of epoch {row['epoch']} holds it")


# --------------------------------------------------------------------------- reading saved runs


def updates_per_epoch(config: Config, record: dict[str, Any]) -> int:
    """Optimiser updates per epoch of the run a record comes from (runs of the earliest
    layout did not record it: their count is derived from a 60,000-image training set)."""
    recorded = ckpt.updates_of(record)
    if recorded is not None:
        return recorded
    n = 60_000 - config.validation_size
    return max(1, (min(n, config.train_subset or n)) // config.batch_size)


READ_ATTEMPTS = 5
"""A reader of a folder that is training chooses again when the run pruned the checkpoint it
chose while it read it (a training saves and prunes several times a second on tiny data)."""


def restore_run(path: Path | str, which: str = "best", log: Callable[[str], None] = print) -> tuple[Any, Config, dict[str, Any]]:
    """The state (its optimiser on the run's own schedule), config and record of a saved
    completed epoch ("best", "latest" or an epoch number), read-only; if that one does not
    load, the newest older one that does (the skipped ones are named). The state's
    parameters are checked finite."""
    from lenet_jax.factories import create_state

    def target(record: dict[str, Any]) -> Any:
        config = Config.from_dict(record.get("config"), f"{path} checkpoint")
        return create_state(config, updates_per_epoch(config, record))

    mngr = ckpt.reader(ckpt.checkpoint_dir(path))
    try:
        for attempt in range(READ_ATTEMPTS):
            before = set(mngr.all_steps())
            try:
                count, state, record = ckpt.restore_newest_good(mngr, target, newest=ckpt.choose_checkpoint(mngr, which), log=log, accept=ckpt.is_complete)
                break
            except CheckpointError:
                ckpt.reload(mngr)
                if attempt == READ_ATTEMPTS - 1 or set(mngr.all_steps()) == before:
                    raise  # not a training that pruned what was chosen while it was read
    finally:
        mngr.close()
    if "epoch" not in record or "config" not in record:
        raise CheckpointError(f"{path}: checkpoint {count} has a record without its {'epoch' if 'epoch' not in record else 'config'}")
    if not ckpt.all_finite(state.params):
        raise CheckpointError(f"{path}: checkpoint {count} holds parameters that are NaN or infinite")
    return state, Config.from_dict(record["config"]), record


def saved_config(workdir: Path, log: Callable[[str], None] = print) -> Config | None:
    """The config of the run in ``workdir``: from its newest checkpoint that reads, else
    from its config.json; None for a folder with neither."""
    folder = workdir / CHECKPOINTS
    if folder.is_dir():
        mngr = ckpt.reader(folder)
        try:
            for count in sorted(mngr.all_steps(), reverse=True):
                try:
                    record = ckpt.read_record(mngr, count)
                except Exception as e:
                    if ckpt.unreadable(mngr, count, e):
                        continue  # damaged: the restore on resume names it
                    raise
                if isinstance(record.get("config"), dict):
                    return Config.from_dict(record["config"], f"{folder} checkpoint {count}")
        finally:
            mngr.close()
    saved = workdir / CONFIG
    if saved.is_file():
        return load_config_file(saved)
    return None
