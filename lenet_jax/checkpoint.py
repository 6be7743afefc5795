"""Saved runs: what a run folder holds, how its checkpoints are written and read.

A run folder holds ``config.json``, ``metrics.jsonl`` and ``checkpoints/``, one orbax checkpoint
per save, numbered by the **update count** (optimiser updates done), so where a run stands is
``state.step`` itself (``Position``: the epoch and the update within it). A several-seed
run (``train.py --seeds``) is a folder of run folders, ``seed-S``.

A checkpoint holds the training state (parameters, optimiser state, update count) and a JSON
record: the config, the per-epoch history, ``epoch``, ``update`` and
``updates_per_epoch``, and for a checkpoint saved mid-epoch the running sums of that epoch.
Orbax writes a checkpoint into a temporary folder and renames it when complete, so a killed
save never loads as valid.

Writers and readers: a training opens a ``writer`` (``runs.open``, holding the run
folder's lock, ``fileio.claim``); with several processes every process of the training
opens one, since orbax's saves and deletions are collective, but only the primary's
(process 0's, the lock holder's) changes the folder: orbax creates it, removes the
temporary folders of killed saves and deletes pruned checkpoints on its primary host only, and
the project's own changes (a failed save's partial folder removed, a damaged checkpoint moved
aside) are made by the primary only. Everyone else (``eval.py``, an export) opens a
``reader``: read-only, it never deletes, and a checkpoint that a writer prunes while it reads
is passed over quietly.

What is kept: the last ``keep`` completed epochs, the best one by validation error, and
the newest mid-epoch checkpoint if it is newer than every completed epoch. Nothing is ever
deleted because it failed to load: a damaged checkpoint is moved aside, kept for the user.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import logging
import math
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from lenet_jax import finite
from lenet_jax.errors import (
    CheckpointError,
    CheckpointReadError,
    Damaged,
    Diverged,
    NoGoodCheckpoint,
    UserError,
    first_line,
    is_damage,
    os_error_code,
    os_failure,
    path_error,
    tensorstore_status,
    unwrapped,
)

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
SEED_FOLDER = "seed-{}"
UNLOADABLE = "unloadable-{}"
"""Where a checkpoint that does not load is moved, inside the checkpoints folder."""

FORMAT = 3
"""Records of this layout carry ``"format": 3``. Format 2 named ``updates_per_epoch``
``steps_per_epoch`` and is read (and resumed) too; earlier runs numbered checkpoints by epoch,
and are read but not resumed."""
RESUMABLE_FORMATS = (2, 3)


class DamagedRecord(CheckpointError, Damaged):
    """A checkpoint's record is not what this project writes (malformed or tampered)."""


class DamagedCheckpoint(CheckpointError, Damaged):
    """A file of a checkpoint fails the project's own check before orbax reads it (empty, or
    JSON that does not parse or is not what orbax writes)."""

BEST_METRIC = "val_error"


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``update`` updates done in epoch ``epoch`` (``update`` equals
    ``updates_per_epoch`` once the epoch is complete)."""

    epoch: int
    update: int
    updates_per_epoch: int

    @classmethod
    def at_count(cls, count: int, updates_per_epoch: int) -> "Position":
        done, update = divmod(int(count), updates_per_epoch)
        if update == 0 and done > 0:
            return cls(done, updates_per_epoch, updates_per_epoch)
        return cls(done + 1, update, updates_per_epoch)

    @property
    def complete(self) -> bool:
        return self.update == self.updates_per_epoch

    @property
    def count(self) -> int:
        """The update count at this position: the checkpoint's number."""
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
    """The per-seed run folders in the folder of several seeds' runs, by seed (empty for a run folder)."""
    out = {}
    for p in Path(workdir).glob("seed-*"):
        if p.is_dir() and p.name[5:].isdigit():
            out[int(p.name[5:])] = p
    return dict(sorted(out.items()))


def several_seeds(workdir: Path | str) -> dict[int, Path]:
    """The per-seed run folders, by seed, when ``workdir`` is the folder of several seeds' runs
    (it has seed folders and no checkpoints of its own); empty otherwise."""
    workdir = Path(workdir)
    return {} if (workdir / CHECKPOINTS).is_dir() else seed_folders(workdir)


def is_single_run(workdir: Path | str) -> bool:
    """Whether ``workdir`` holds (the start of) a run of one model."""
    workdir = Path(workdir)
    return (workdir / CHECKPOINTS).exists() or (workdir / CONFIG).exists()


def holds_checkpoints(folder: Path | str) -> bool:
    """Whether ``folder`` (a run folder, or the folder of several seeds' runs) holds a completed checkpoint."""
    folder = Path(folder)
    runs = [folder, *seed_folders(folder).values()] if folder.is_dir() else []
    return any(p.is_dir() and p.name.isdigit() for run in runs if (run / CHECKPOINTS).is_dir() for p in (run / CHECKPOINTS).iterdir())


# --------------------------------------------------------------------------- managers


class quiet:
    """Keep orbax's noise about one save or restore off the console (the project reports
    a failure in one line), and leave none of it behind.

    While the operation runs: its logging (a traceback for every retry, on the
    ``absl``, ``orbax`` and ``asyncio`` loggers), its unraisable exceptions and its
    'coroutine ... was never awaited' warnings. After a failure (set ``failed``): what
    it abandoned. When orbax's read of one array fails, it closes its event loop with
    the reads of the other arrays still in flight; left alone, each of those prints
    later (when TensorStore finishes it or the garbage collector gets to it, up to a
    second later, in the middle of whatever runs then) ``Exception ignored in:
    <coroutine object _read_array_index_and_device_put ...>`` and the whole TensorStore
    spec (orbax raises a new Exception from its ``except BaseException`` when such a
    coroutine is closed), 'Event loop is closed' (TensorStore's callback into the loop
    that is gone), asyncio's 'Task exception was never retrieved', or 'coroutine ...
    was never awaited'. So on leaving after a failure, until TensorStore has finished
    what it was reading for the closed loops (at most ``SETTLE_S``), the tasks of closed
    loops (and of no other) are finished off here: a pending task's coroutine is closed
    (and with it those it awaits) and the task kept from reporting itself destroyed, a
    finished one's exception is marked retrieved, and a coroutine of orbax's that was
    made and never started is closed. Then the hook, the loggers' levels and the
    warning filters are put back as they were. Every other unraisable exception reaches
    the previous hook."""

    LOGGERS = ("absl", "orbax", "orbax.checkpoint", "jax._src.distributed", "asyncio")
    NOISY = ("/orbax/", "/tensorstore/", "/asyncio/")
    SETTLE_S = 2.0

    def __init__(self) -> None:
        self.failed = False
        self.dropped: list[str] = []

    def __enter__(self) -> "quiet":
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
        self._hook = sys.unraisablehook
        self._levels = [(logger, logger.level) for logger in map(logging.getLogger, self.LOGGERS)]
        for logger, _ in self._levels:
            logger.setLevel(logging.CRITICAL)
        sys.unraisablehook = self._drop_noise
        return self

    def _drop_noise(self, unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None) or getattr(unraisable.object, "gi_code", None)
        e = unraisable.exc_value
        if (code is not None and self._noisy(code)) or (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            self.dropped.append(f"{type(e).__name__} in {unraisable.object!r}")
            return
        self._hook(unraisable)

    @classmethod
    def _noisy(cls, code: Any, parts: tuple[str, ...] | None = None) -> bool:
        return any(part in code.co_filename.replace("\\", "/") for part in parts or cls.NOISY)

    def _close(self, coroutine: Any) -> None:
        try:
            coroutine.close()  # what the collector would do later, printing what it raises
        except BaseException as e:  # noqa: BLE001 - orbax raises a bare Exception from GeneratorExit
            self.dropped.append(f"{type(e).__name__} closing {coroutine!r}")

    def _settle(self) -> bool:
        """Finish off what failed operations left on closed event loops; whether some of
        it still waits for TensorStore (a future TensorStore has yet to resolve)."""
        waiting = False
        objects = gc.get_objects()  # before collecting: the collector would finalise a never-awaited coroutine, warning
        running = {id(o.get_coro()) for o in objects if isinstance(o, asyncio.Task) and not o.get_loop().is_closed()}
        for o in objects:
            if inspect.iscoroutine(o) and inspect.getcoroutinestate(o) == inspect.CORO_CREATED and self._noisy(o.cr_code, self.NOISY[:2]) and (
                    id(o) not in running):
                self._close(o)  # one orbax made and never awaited: gone, it would warn 'coroutine ... was never awaited'
            if not isinstance(o, asyncio.Future) or not o.get_loop().is_closed():
                continue  # a future of a loop that runs is none of this
            if o.done():
                if not o.cancelled():
                    o.exception()  # marks it retrieved: nothing is logged when it goes
            elif isinstance(o, asyncio.Task):
                self._close(o.get_coro())  # and with it the coroutines it awaits
                o._log_destroy_pending = False  # its loop is closed: it can neither finish nor be cancelled
            elif type(o) is asyncio.Future:
                waiting = True  # a read of TensorStore's still in flight: its callback will find the loop closed
        del objects
        gc.collect()
        return waiting

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.failed:
                deadline = time.monotonic() + self.SETTLE_S
                while self._settle() and time.monotonic() < deadline:
                    time.sleep(0.02)
        finally:
            sys.unraisablehook = self._hook
            for logger, level in self._levels:
                logger.setLevel(level)
            self._warnings.__exit__(None, None, None)


def writer(directory: Path | str, primary: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of a training: the primary process's (the lock holder's)
    creates the folder and removes the temporary folders of saves a killed process left;
    another process's (several hosts) takes part in the saves and deletions, which orbax
    makes on the primary host only. It deletes nothing else by itself (``prune`` does)."""
    directory = Path(directory).absolute()
    try:
        with quiet():
            options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, cleanup_tmp_directories=primary)
            return ocp.CheckpointManager(directory, options=options, item_names=("state", "record"))
    except OSError as e:
        raise path_error(directory, e) from None


def reader(directory: Path | str) -> ocp.CheckpointManager:
    """A read-only CheckpointManager: it never creates, cleans up or deletes anything, so
    it can read a folder that another process is training in."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint folder there")
    with quiet():  # orbax warns that a read-only manager saves nothing
        options = ocp.CheckpointManagerOptions(create=False, read_only=True, enable_async_checkpointing=False, cleanup_tmp_directories=False)
        return _while_pruned(lambda: ocp.CheckpointManager(directory, options=options, item_names=("state", "record")))


def _while_pruned(read: Callable[[], Any], attempts: int = 20) -> Any:
    """``read()`` again when it failed because a checkpoint vanished under it: orbax lists the
    checkpoints, then reads each one's metadata, and a training that holds the folder may prune
    one in between."""
    for attempt in range(attempts):
        try:
            return read()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def reload(mngr: ocp.CheckpointManager) -> None:
    """The manager's list of checkpoints read again (a reader's view of a folder that trains)."""
    _while_pruned(mngr.reload)


def all_finite(tree: Any) -> bool:
    """Whether every number in ``tree`` is finite (``finite.all_finite`` of its host copy)."""
    return bool(finite.all_finite(jax.device_get(tree)))


def save(mngr: ocp.CheckpointManager, count: int, state: Any, record: dict[str, Any]) -> None:
    """Save ``state`` and its JSON-able ``record`` as checkpoint ``count`` and wait until it is on
    disk. A state with a NaN or infinity is never saved (Diverged); a write that the
    system refuses (a full disk, a file size limit, a permission: ``errors.os_failure``)
    is one CheckpointError naming the folder, and leaves no checkpoint behind. Any other
    failure is a bug: it propagates with its traceback (the partial checkpoint removed too)."""
    if not all_finite(state):
        raise Diverged(f"refusing to save checkpoint {count}: its parameters or optimiser state hold NaN or infinity")
    reason = None
    with quiet() as attempt:
        try:
            mngr.save(count, args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record, format=FORMAT))))
            mngr.wait_until_finished()
        except Exception as e:
            attempt.failed = True
            if jax.process_index() == 0:
                _remove_partial(Path(mngr.directory), count)
            reason = os_failure(e)
            if reason is None:
                raise
    if reason is not None:
        raise CheckpointError(f"{mngr.directory}: cannot save checkpoint {count} ({reason})")


def _remove_partial(directory: Path, count: int) -> None:
    """The temporary folder a failed save of ``count`` left (this process wrote it)."""
    import shutil

    for p in directory.glob(f"{count}.orbax-checkpoint-tmp*"):
        shutil.rmtree(p, ignore_errors=True)


def read_record(mngr: ocp.CheckpointManager, count: int) -> dict[str, Any]:
    """The JSON record of checkpoint ``count`` alone (no arrays loaded), its types checked."""
    check_checkpoint(Path(mngr.directory) / str(count), ("record",))
    record = mngr.restore(count, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    return check_record(record, f"checkpoint {count}")


def check_checkpoint(folder: Path, parts: tuple[str, ...] = ("record", "state")) -> None:
    """The project's own check of a checkpoint's small files, before orbax reads them, so that
    damage to them is named and told from a bug: the record and orbax's tree metadata
    (``state/_METADATA``, without which orbax reports a tree that does not match, as it
    does for a bug) and per-array metadata must be JSON, the OCDBT manifest not empty.
    DamagedCheckpoint names the file; a missing one raises FileNotFoundError (also damage)."""
    names = []
    if "record" in parts:
        names.append("record/metadata")
    if "state" in parts:
        names.append("state/_METADATA")
        names += [f"state/array_metadatas/{p.name}" for p in sorted((folder / "state" / "array_metadatas").glob("*"))]
        manifest = folder / "state" / "manifest.ocdbt"
        if manifest.exists() and manifest.stat().st_size == 0:
            raise DamagedCheckpoint("state/manifest.ocdbt is empty (a truncated file)")
    for name in names:
        try:
            value = json.loads((folder / name).read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DamagedCheckpoint(f"{name} is not valid JSON (a truncated or damaged file: {first_line(e, limit=200)})") from None
        if name == "state/_METADATA" and not (isinstance(value, dict) and isinstance(value.get("tree_metadata"), dict)):
            raise DamagedCheckpoint(f"{name} is JSON but not orbax's tree metadata (a damaged or edited file)")


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
    """The readable records, by update count (a damaged or pruned checkpoint is left out, and left to
    the restore to name; a failure of the reading itself stops, CheckpointReadError)."""
    out = {}
    for count in mngr.all_steps():
        try:
            out[count] = read_record(mngr, count)
        except Exception as e:
            if unreadable(mngr, count, e):
                continue
            raise
    return out


PRUNE_S = 0.5
"""How long a failure that is neither damage nor a read failure waits to see whether the
checkpoint is vanishing (a writer deleting it while it was read raises whatever orbax meets)."""


def unreadable(mngr: ocp.CheckpointManager, count: int, e: BaseException) -> bool:
    """Whether reading checkpoint ``count`` failed because it is damaged or was pruned under the
    reader (to be passed over); CheckpointReadError for a failure of the reading itself;
    False for anything else (a bug, to propagate)."""
    folder = Path(mngr.directory) / str(count)
    if not folder.is_dir():
        return True
    if is_read_failure(e):
        inner = unwrapped(e)
        raise CheckpointReadError(f"{mngr.directory}: reading checkpoint {count} failed ({type(inner).__name__}: {first_line(inner, limit=200)}); "
                                  "nothing was skipped or moved, try again") from None
    if is_damage(e):
        return True
    deadline = time.monotonic() + PRUNE_S
    while folder.is_dir() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not folder.is_dir()


def updates_of(record: dict[str, Any]) -> int | None:
    """Updates per epoch of the run a record comes from (None for the earliest layout)."""
    value = record.get("updates_per_epoch", record.get("steps_per_epoch"))
    return None if value is None else int(value)


def is_complete(record: dict[str, Any]) -> bool:
    """Whether the checkpoint of ``record`` ends an epoch (earlier layouts saved only those)."""
    return record.get("format") not in RESUMABLE_FORMATS or record.get("update") == updates_of(record)


def prune(mngr: ocp.CheckpointManager, keep: int) -> None:
    """Delete what is no longer needed: mid-epoch checkpoints older than the newest completed
    epoch, and completed epochs beyond the newest ``keep`` and the best."""
    found = records(mngr)
    ends = sorted(s for s, r in found.items() if is_complete(r))
    if not ends:
        return
    best = best_checkpoint(mngr, found)
    kept = set(ends[-keep:]) | ({best} if best is not None else set())
    for count in mngr.all_steps():
        if count in found and (count not in kept) and (is_complete(found[count]) or count < ends[-1]):
            mngr.delete(count)


def best_checkpoint(mngr: ocp.CheckpointManager, found: dict[int, dict[str, Any]] | None = None) -> int | None:
    """The completed epoch with the lowest validation error, or None if none has one."""
    found = records(mngr) if found is None else found
    ranked = [(r.get("metrics", {}).get(BEST_METRIC), s) for s, r in found.items() if is_complete(r)]
    ranked = [(v, s) for v, s in ranked if isinstance(v, (int, float)) and math.isfinite(v)]
    return min(ranked)[1] if ranked else None


def epoch_checkpoints(mngr: ocp.CheckpointManager) -> dict[int, int]:
    """The checkpoint of each completed epoch whose record reads, by epoch."""
    return {int(r["epoch"]): s for s, r in records(mngr).items() if is_complete(r) and "epoch" in r}


def choose_checkpoint(mngr: ocp.CheckpointManager, which: str = "best") -> int:
    """The newest checkpoint to try for a completed epoch: "latest" (the newest; a
    mid-epoch or unreadable one is passed over by ``restore_newest_good``), "best" (the
    latest when no epoch has a validation error) or an epoch number."""
    if which in ("latest", "best"):
        count = best_checkpoint(mngr) if which == "best" else None
        if count is None:
            count = mngr.latest_step()
    else:
        try:
            epoch = int(which)
        except ValueError:
            raise CheckpointError(f"no epoch {which!r}: give best, latest or an epoch number") from None
        by_epoch = epoch_checkpoints(mngr)
        if epoch not in by_epoch:
            raise CheckpointError(f"{mngr.directory}: no checkpoint of epoch {epoch} (completed epochs saved: {sorted(by_epoch) or 'none'})")
        count = by_epoch[epoch]
    if count is None:
        raise CheckpointError(f"{mngr.directory}: holds no checkpoint")
    return count


def is_read_failure(e: BaseException) -> bool:
    """Whether a failed restore says the reading failed (a read error, a permission,
    memory: an OSError, or a TensorStore error carrying one, other than a missing file)
    rather than that the checkpoint itself is damaged (a missing or malformed file)."""
    e = unwrapped(e)
    if isinstance(e, MemoryError) or tensorstore_status(e) in ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"):
        return True
    return not isinstance(e, FileNotFoundError) and os_error_code(e) not in (None, 2)


def move_aside(mngr: ocp.CheckpointManager, count: int) -> Path:
    """Move checkpoint ``count`` out of the manager's view, to ``checkpoints/unloadable-<count>``
    (``-2``, ``-3``... if taken), and return where it went."""
    directory = Path(mngr.directory)
    target = directory / UNLOADABLE.format(count)
    n = 1
    while target.exists():
        n += 1
        target = directory / (UNLOADABLE.format(count) + f"-{n}")
    (directory / str(count)).rename(target)
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
    """Restore the newest checkpoint (at most ``newest``) that loads and that ``accept`` takes.

    A checkpoint that fails to load because it is damaged (``errors.is_damage``: a file
    truncated or deleted by a killed process, a malformed record) is named in one line,
    in words, and skipped, never used; ``damaged(count)``, when given (a writer), moves it
    aside and says where. A failure of the reading itself (an OSError other than a
    missing file, MemoryError) stops with CheckpointReadError and touches nothing. A checkpoint
    that disappears while it is read (a writer pruned it) is passed over quietly. Any
    other failure (a bug: a TypeError, a state that does not match the saved tree) is
    raised as it is, and nothing is moved. ``target_for(record)`` builds the state to
    restore into; ``check(record)`` may refuse a loadable checkpoint by raising. Orbax's own
    noise about a failed attempt never reaches the console (``quiet``)."""
    tried: list[int] = []
    not_accepted: list[dict[str, Any]] = []
    while True:
        counts = sorted((s for s in mngr.all_steps() if (newest is None or s <= newest) and s not in tried), reverse=True)
        if not counts:
            break
        count = counts[0]
        tried.append(count)
        part, record = "record", None
        with quiet() as attempt:
            try:
                record = read_record(mngr, count)
                if not accept(record):
                    not_accepted.append(record)
                    continue
                check(record)
                part = "state"
                state, record = restore(mngr, count, target_for(record))
                return count, state, record
            except Exception as e:
                attempt.failed = True
                if isinstance(e, UserError) and not isinstance(e, Damaged):
                    raise  # check()'s refusal, or a config in the record that is not one
                if not unreadable(mngr, count, e):
                    raise  # a bug, not damage: nothing is moved
                if (Path(mngr.directory) / str(count)).is_dir():
                    _skip(count, part, e, log, damaged, where=_position(count, record))
                else:
                    reload(mngr)  # pruned by the writer while we read it
    if not_accepted and len(not_accepted) == len(tried):
        newest_record = not_accepted[0]
        where = Position(int(newest_record.get("epoch", 1)), int(newest_record.get("update", 0)), updates_of(newest_record) or 1).describe()
        raise NoGoodCheckpoint(f"{mngr.directory}: no epoch is complete yet (the newest checkpoint is at {where}); "
                               "resume the run to finish it")
    raise NoGoodCheckpoint(f"{mngr.directory}: no checkpoint loads" + (f" (tried checkpoints {sorted(tried, reverse=True)})" if tried else ""))


def _position(count: int, record: dict[str, Any] | None) -> str | None:
    """Where the run stood at ``count``, in words, when its record was read."""
    if record is None:
        return None
    updates = updates_of(record)
    if updates:
        return Position.at_count(count, updates).describe()
    return f"epoch {record['epoch']}" if isinstance(record.get("epoch"), int) else None


def _skip(count: int, part: str, e: BaseException, log: Callable[[str], None], damaged: Callable[[int], str] | None,
          where: str | None = None) -> None:
    moved = f"; {damaged(count)}" if damaged is not None else ""
    at = f"{where}: " if where else ""
    log(f"skipping checkpoint {count}: its {part} does not load ({at}{describe_damage(e)}){moved}")


def describe_damage(e: BaseException) -> str:
    """What could not be read and why, in words: the array or file, and whether it is
    truncated, missing or malformed (never orbax's wrapper, whose message embeds a bound
    method's repr and the whole TensorStore spec)."""
    e = unwrapped(e)
    if isinstance(e, DamagedRecord):
        return f"{type(e).__name__}: {first_line(e, limit=200)}"
    if isinstance(e, Damaged):
        return first_line(e, limit=200)
    text = str(e)
    if isinstance(e, FileNotFoundError):
        found = re.search(r"(/\S+?)\.?(?:\s|$)", text)  # orbax: 'File /.../record/metadata not found.'
        name = e.filename or (found.group(1) if found else None)
        return f"{_in_checkpoint(name) if name else 'a file of it'} is missing"
    status = tensorstore_status(e)
    if status is not None:
        array = re.search(r'Error reading "([^"/]+)', text)  # orbax names an array's folder by its tree path, joined by dots
        files = [_in_checkpoint(f) for f in re.findall(r'local file "([^"]+)"', text) if not f.endswith("/")]
        what = (f"array {array.group(1).replace('.', '/')}" if array else "an array") + (f" in {', '.join(files)}" if files else "")
        kind = {"OUT_OF_RANGE": "a truncated file", "NOT_FOUND": "a missing file"}.get(status, "a truncated or damaged file")
        return f"{what} could not be read ({kind})"
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"a JSON file of it is not valid JSON (a truncated or damaged file: {first_line(e, limit=200)})"
    return f"{type(e).__name__}: {first_line(e, limit=200)}"


def _in_checkpoint(path: str) -> str:
    """``path`` relative to its checkpoint folder (``state/d/...``), for a message."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.isdigit() and i + 1 < len(parts) and parts[i + 1] in ("state", "record"):
            return "/".join(parts[i + 1:])
    return path


def restore(mngr: ocp.CheckpointManager, count: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """The state of checkpoint ``count``, shaped like ``target`` (a state of the same config), and its record."""
    check_checkpoint(Path(mngr.directory) / str(count))
    restored = mngr.restore(count, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
    return restored["state"], check_record(restored["record"], f"checkpoint {count}")
