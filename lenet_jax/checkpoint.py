"""Saved runs: what a run folder holds, how its checkpoints are written and read.

A run folder holds ``config.json``, ``metrics.jsonl`` and ``checkpoints/``, one orbax step
per save, numbered by the **update** (optimiser updates done), so where a run stands is
``state.step`` itself (``Position``: the epoch and the update within it). A several-seed
run (``train.py --seeds``) is a folder of run folders, ``seed-S``.

A step holds the training state (parameters, optimiser state, update count) and a JSON
record: the config, the per-epoch history, ``epoch``, ``update`` and
``updates_per_epoch``, and for a step saved mid-epoch the running sums of that epoch.
Orbax writes a step into a temporary folder and renames it when complete, so a killed
save never loads as valid.

Writers and readers: only the process holding the run folder's lock (``fileio.claim``)
opens a ``writer``, which removes the temporary folders of killed saves and prunes.
Everyone else (``eval.py``, an export) opens a ``reader``: read-only, it never deletes,
and a step that a writer prunes while it reads is passed over quietly.

What is kept: the last ``keep`` completed epochs, the best one by validation error, and
the newest mid-epoch step if it is newer than every completed epoch. Nothing is ever
deleted because it failed to load: a damaged step is moved aside, kept for the user.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from lenet_jax.config import Config, load_config_file
from lenet_jax.errors import CheckpointError, CheckpointReadError, Diverged, NoGoodCheckpoint, UserError, path_error

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SEED_FOLDER = "seed-{}"
UNLOADABLE = "unloadable-{}"
"""Where a step that does not load is moved, inside the checkpoints folder."""

FORMAT = 3
"""Records of this layout carry ``"format": 3``. Format 2 named ``updates_per_epoch``
``steps_per_epoch`` and is read (and resumed) too; earlier runs numbered steps by epoch,
and are read but not resumed."""
RESUMABLE_FORMATS = (2, 3)


class DamagedRecord(CheckpointError):
    """A step's record is not what this project writes (malformed or tampered)."""

BEST_METRIC = "val_error"


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``update`` updates done in epoch ``epoch`` (``update`` equals
    ``updates_per_epoch`` once the epoch is complete)."""

    epoch: int
    update: int
    updates_per_epoch: int

    @classmethod
    def of_step(cls, step: int, updates_per_epoch: int) -> "Position":
        done, update = divmod(int(step), updates_per_epoch)
        if update == 0 and done > 0:
            return cls(done, updates_per_epoch, updates_per_epoch)
        return cls(done + 1, update, updates_per_epoch)

    @property
    def complete(self) -> bool:
        return self.update == self.updates_per_epoch

    @property
    def step(self) -> int:
        """The update count at this position: the checkpoint's step number."""
        return (self.epoch - 1) * self.updates_per_epoch + self.update

    def describe(self) -> str:
        if self.update == 0:
            return f"the start of epoch {self.epoch}"
        if self.complete:
            return f"the end of epoch {self.epoch}"
        return f"epoch {self.epoch}, update {self.update:,} of {self.updates_per_epoch:,}"


# --------------------------------------------------------------------------- the folder layout


def checkpoint_dir(path: Path | str) -> Path:
    """Accept a run's folder or its checkpoints folder."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def seed_folders(workdir: Path | str) -> dict[int, Path]:
    """The per-seed run folders of a several-seed run, by seed (empty for a single run)."""
    out = {}
    for p in Path(workdir).glob("seed-*"):
        if p.is_dir() and p.name[5:].isdigit():
            out[int(p.name[5:])] = p
    return dict(sorted(out.items()))


def is_single_run(workdir: Path | str) -> bool:
    """Whether ``workdir`` holds (the start of) a run of one model."""
    workdir = Path(workdir)
    return (workdir / CHECKPOINTS).exists() or (workdir / CONFIG).exists()


def holds_checkpoints(folder: Path | str) -> bool:
    """Whether ``folder`` (a run folder, or a several-seed run's) holds a completed step."""
    folder = Path(folder)
    runs = [folder, *seed_folders(folder).values()] if folder.is_dir() else []
    return any(p.is_dir() and p.name.isdigit() for run in runs if (run / CHECKPOINTS).is_dir() for p in (run / CHECKPOINTS).iterdir())


# --------------------------------------------------------------------------- managers


def quiet_orbax() -> None:
    """Keep orbax's own logging of a failed save or restore (tracebacks of every retry),
    and the 'Event loop is closed' errors its tensorstore callbacks raise once a failed
    operation's event loop is gone, off the console: the project reports each failure in
    one line. Every other unraisable exception still reaches the previous hook."""
    for name in ("absl", "orbax", "orbax.checkpoint", "jax._src.distributed", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "drops_closed_loop_noise", False):
        sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


def _without_closed_loop_noise(previous: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def hook(unraisable: Any) -> None:
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_noise = True  # type: ignore[attr-defined]
    return hook


def writer(directory: Path | str) -> ocp.CheckpointManager:
    """The CheckpointManager of the process that holds the run folder's lock: it creates
    the folder and removes the temporary folders of saves a killed process left. It
    deletes nothing else by itself (``prune`` does)."""
    directory = Path(directory).absolute()
    quiet_orbax()
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True)
    try:
        return ocp.CheckpointManager(directory, options=options, item_names=("state", "record"))
    except OSError as e:
        raise path_error(directory, e) from None


def reader(directory: Path | str) -> ocp.CheckpointManager:
    """A read-only CheckpointManager: it never creates, cleans up or deletes anything, so
    it can read a folder that another process is training in."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint folder there")
    quiet_orbax()
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, enable_async_checkpointing=False, cleanup_tmp_directories=False)
    return _while_pruned(lambda: ocp.CheckpointManager(directory, options=options, item_names=("state", "record")))


def _while_pruned(read: Callable[[], Any], attempts: int = 20) -> Any:
    """``read()`` again when it failed because a step vanished under it: orbax lists the
    steps, then reads each one's metadata, and a training that holds the folder may prune
    one in between."""
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def reload(mngr: ocp.CheckpointManager) -> None:
    """The manager's list of steps read again (a reader's view of a folder that trains)."""
    _while_pruned(mngr.reload)


def all_finite(tree: Any) -> bool:
    """Whether every number in ``tree`` is finite."""
    return all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(jax.device_get(tree)) if np.issubdtype(np.asarray(x).dtype, np.inexact))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict[str, Any]) -> None:
    """Save ``state`` and its JSON-able ``record`` as ``step`` and wait until it is on
    disk. A state with a NaN or infinity is never saved (Diverged); a failed write (a
    full disk) is one CheckpointError naming the folder, and leaves no step behind."""
    if not all_finite(state):
        raise Diverged(f"refusing to save checkpoint step {step}: its parameters or optimiser state hold NaN or infinity")
    try:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record, format=FORMAT))))
        mngr.wait_until_finished()
    except Exception as e:  # orbax and tensorstore raise many kinds for a failed write
        _remove_partial(Path(mngr.directory), step)
        reason = getattr(e, "strerror", None) or _os_reason(e) or _first_line(e)
        raise CheckpointError(f"{mngr.directory}: cannot save checkpoint step {step} ({reason})") from None


def _os_reason(e: BaseException) -> str | None:
    """The operating system's words in a tensorstore error ('...: No space left on device
    [os_error_code='28']'), if it carries some."""
    import re

    found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)'?\]", str(e))
    return f"{found.group(1)} (errno {found.group(2)})" if found else None


def _remove_partial(directory: Path, step: int) -> None:
    """The temporary folder a failed save of ``step`` left (this process wrote it)."""
    import shutil

    for p in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(p, ignore_errors=True)


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON record of ``step`` alone (no arrays loaded), its types checked."""
    record = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    return check_record(record, f"step {step}")


RECORD_TYPES: dict[str, tuple[type, ...]] = {"epoch": (int,), "update": (int,), "updates_per_epoch": (int,), "steps_per_epoch": (int,),
                                             "history": (list,), "config": (dict,), "metrics": (dict,), "totals": (dict,), "format": (int,)}


def check_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a JSON object whose known keys have their types; CheckpointError
    naming ``where`` otherwise (a damaged or tampered record)."""
    if not isinstance(record, dict):
        raise DamagedRecord(f"{where}: its record is not a JSON object")
    for key, kinds in RECORD_TYPES.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise DamagedRecord(f"{where}: its record's {key!r} is {type(value).__name__}, not {kinds[0].__name__}")
    if any(not isinstance(row, dict) for row in record.get("history", [])):
        raise DamagedRecord(f"{where}: its record's history holds something other than JSON objects")
    return record


def records(mngr: ocp.CheckpointManager) -> dict[int, dict[str, Any]]:
    """The readable records, by step (an unreadable step is left to the restore to name)."""
    out = {}
    for step in mngr.all_steps():
        try:
            out[step] = read_record(mngr, step)
        except Exception:  # orbax raises many kinds; restoring that step reports why
            continue
    return out


def updates_of(record: dict[str, Any]) -> int | None:
    """Updates per epoch of the run a record comes from (None for the earliest layout)."""
    value = record.get("updates_per_epoch", record.get("steps_per_epoch"))
    return None if value is None else int(value)


def is_complete(record: dict[str, Any]) -> bool:
    """Whether the step of ``record`` ends an epoch (earlier layouts saved only those)."""
    return record.get("format") not in RESUMABLE_FORMATS or record.get("update") == updates_of(record)


def prune(mngr: ocp.CheckpointManager, keep: int) -> None:
    """Delete what is no longer needed: mid-epoch steps older than the newest completed
    epoch, and completed epochs beyond the newest ``keep`` and the best."""
    found = records(mngr)
    ends = sorted(s for s, r in found.items() if is_complete(r))
    if not ends:
        return
    best = best_step(mngr, found)
    kept = set(ends[-keep:]) | ({best} if best is not None else set())
    for step in mngr.all_steps():
        if step in found and (step not in kept) and (is_complete(found[step]) or step < ends[-1]):
            mngr.delete(step)


def best_step(mngr: ocp.CheckpointManager, found: dict[int, dict[str, Any]] | None = None) -> int | None:
    """The completed epoch with the lowest validation error, or None if none has one."""
    found = records(mngr) if found is None else found
    ranked = [(r.get("metrics", {}).get(BEST_METRIC), s) for s, r in found.items() if is_complete(r)]
    ranked = [(v, s) for v, s in ranked if isinstance(v, (int, float)) and math.isfinite(v)]
    return min(ranked)[1] if ranked else None


def epoch_steps(mngr: ocp.CheckpointManager) -> dict[int, int]:
    """The step of each completed epoch whose record reads, by epoch."""
    return {int(r["epoch"]): s for s, r in records(mngr).items() if is_complete(r) and "epoch" in r}


def choose_step(mngr: ocp.CheckpointManager, which: str = "best") -> int:
    """The newest step to try for a completed epoch: "latest" (the newest step; a
    mid-epoch or unreadable one is passed over by ``restore_newest_good``), "best" (the
    latest when no epoch has a validation error) or an epoch number."""
    if which in ("latest", "best"):
        step = best_step(mngr) if which == "best" else None
        if step is None:
            step = mngr.latest_step()
    else:
        try:
            epoch = int(which)
        except ValueError:
            raise CheckpointError(f"no epoch {which!r}: give best, latest or an epoch number") from None
        by_epoch = epoch_steps(mngr)
        if epoch not in by_epoch:
            raise CheckpointError(f"{mngr.directory}: no checkpoint of epoch {epoch} (completed epochs saved: {sorted(by_epoch) or 'none'})")
        step = by_epoch[epoch]
    if step is None:
        raise CheckpointError(f"{mngr.directory}: holds no checkpoint")
    return step


def is_read_failure(e: BaseException) -> bool:
    """Whether a failed restore says the reading failed (a read error, a permission,
    memory) rather than that the step itself is damaged (a missing or malformed file)."""
    return isinstance(e, MemoryError) or (isinstance(e, OSError) and not isinstance(e, FileNotFoundError))


def move_aside(mngr: ocp.CheckpointManager, step: int) -> Path:
    """Move step ``step`` out of the manager's view, to ``checkpoints/unloadable-<step>``
    (``-2``, ``-3``... if taken), and return where it went."""
    directory = Path(mngr.directory)
    target = directory / UNLOADABLE.format(step)
    n = 1
    while target.exists():
        n += 1
        target = directory / (UNLOADABLE.format(step) + f"-{n}")
    (directory / str(step)).rename(target)
    mngr.reload()
    return target


def restore_newest_good(
    mngr: ocp.CheckpointManager,
    target_for: Callable[[dict[str, Any]], Any],
    newest: int | None = None,
    check: Callable[[dict[str, Any]], None] = lambda record: None,
    log: Callable[[str], None] = print,
    accept: Callable[[dict[str, Any]], bool] = lambda record: True,
    damaged: Callable[[int], str] | None = None,
) -> tuple[int, Any, dict[str, Any]]:
    """Restore the newest step (at most ``newest``) that loads and that ``accept`` takes.

    A step that fails to load because it is damaged (a file truncated or deleted by a
    killed process, a malformed record) is named in one line and skipped, never used;
    ``damaged(step)``, when given (a writer), moves it aside and says where. A failure
    of the reading itself (an OSError other than a missing file, MemoryError) stops with
    CheckpointReadError and touches nothing. A step that disappears while it is read (a
    writer pruned it) is passed over quietly. ``target_for(record)`` builds the state to
    restore into; ``check(record)`` may refuse a loadable step by raising."""
    tried: list[int] = []
    not_accepted: list[dict[str, Any]] = []
    while True:
        steps = sorted((s for s in mngr.all_steps() if (newest is None or s <= newest) and s not in tried), reverse=True)
        if not steps:
            break
        step = steps[0]
        tried.append(step)
        part = "record"
        try:
            record = read_record(mngr, step)
            if not accept(record):
                not_accepted.append(record)
                continue
            check(record)
            part = "state"
            state, record = restore(mngr, step, target_for(record))
            return step, state, record
        except DamagedRecord as e:
            _skip(step, "record", e, log, damaged)
        except UserError:  # check()'s refusal, or a config in the record that is not one
            raise
        except Exception as e:  # orbax raises many kinds; sort them into damage and read failures
            if not (Path(mngr.directory) / str(step)).is_dir():
                reload(mngr)  # pruned by the writer while we read it
                continue
            if is_read_failure(e):
                raise CheckpointReadError(f"{mngr.directory}: reading step {step} failed ({type(e).__name__}: {_first_line(e)}); "
                                          "nothing was skipped or moved, try again") from None
            _skip(step, part, e, log, damaged)
    if not_accepted and len(not_accepted) == len(tried):
        newest_record = not_accepted[0]
        where = Position(int(newest_record.get("epoch", 1)), int(newest_record.get("update", 0)), updates_of(newest_record) or 1).describe()
        raise NoGoodCheckpoint(f"{mngr.directory}: no epoch is complete yet (the newest checkpoint is at {where}); "
                               "resume the run to finish it")
    raise NoGoodCheckpoint(f"{mngr.directory}: no checkpoint loads" + (f" (tried steps {sorted(tried, reverse=True)})" if tried else ""))


def _skip(step: int, part: str, e: BaseException, log: Callable[[str], None], damaged: Callable[[int], str] | None) -> None:
    where = f"; {damaged(step)}" if damaged is not None else ""
    log(f"skipping checkpoint step {step}: its {part} does not load ({type(e).__name__}: {_first_line(e)}){where}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """The state of ``step``, shaped like ``target`` (a state of the same config), and its record."""
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
    return restored["state"], check_record(restored["record"], f"step {step}")


# --------------------------------------------------------------------------- reading saved runs


def updates_per_epoch(config: Config, record: dict[str, Any]) -> int:
    """Optimiser updates per epoch of the run a record comes from (runs of the earliest
    layout did not record it: their count is derived from a 60,000-image training set)."""
    recorded = updates_of(record)
    if recorded is not None:
        return recorded
    n = 60_000 - config.validation_size
    return max(1, (min(n, config.train_subset or n)) // config.batch_size)


READ_ATTEMPTS = 5
"""A reader of a folder that is training chooses again when the run pruned the step it
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

    mngr = reader(checkpoint_dir(path))
    try:
        for attempt in range(READ_ATTEMPTS):
            before = set(mngr.all_steps())
            try:
                step, state, record = restore_newest_good(mngr, target, newest=choose_step(mngr, which), log=log, accept=is_complete)
                break
            except CheckpointError:
                reload(mngr)
                if attempt == READ_ATTEMPTS - 1 or set(mngr.all_steps()) == before:
                    raise  # not a training that pruned what was chosen while it was read
    finally:
        mngr.close()
    if "epoch" not in record or "config" not in record:
        raise CheckpointError(f"{path}: checkpoint step {step} has a record without its {'epoch' if 'epoch' not in record else 'config'}")
    if not all_finite(state.params):
        raise CheckpointError(f"{path}: checkpoint step {step} holds parameters that are NaN or infinite")
    return state, Config.from_dict(record["config"]), record


def saved_config(workdir: Path, log: Callable[[str], None] = print) -> Config | None:
    """The config of the run in ``workdir``: from its newest checkpoint that reads, else
    from its config.json; None for a folder with neither."""
    folder = workdir / CHECKPOINTS
    if folder.is_dir():
        mngr = reader(folder)
        try:
            for step in sorted(mngr.all_steps(), reverse=True):
                try:
                    record = read_record(mngr, step)
                except Exception:  # the restore on resume names it
                    continue
                if isinstance(record.get("config"), dict):
                    return Config.from_dict(record["config"], f"{folder} step {step}")
        finally:
            mngr.close()
    saved = workdir / CONFIG
    if saved.is_file():
        return load_config_file(saved)
    return None
