"""Checkpoints with orbax: one folder per run, one step per save, numbered by the
optimiser step (updates done), so where a run stands is ``state.step`` itself.

A step holds the training state (parameters, optimiser state, step count) and a JSON
record: the config, the per-pass history, ``epoch`` and ``update`` (for people and for
``eval.py``), and for a step saved mid-pass the running sums of that pass. Orbax writes
a step into a temporary folder and renames it when complete, so a killed save never
loads as valid; temporaries a killed process left are removed when the folder is opened.

What is kept: the last ``keep`` completed passes, the best one by validation error, and
the newest mid-pass step if it is newer than every completed pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp

from lenet_jax.errors import CheckpointError, NoGoodCheckpoint

FORMAT = 2
"""Records of this layout carry ``"format": 2``; earlier runs numbered steps by pass."""

BEST_METRIC = "val_error"


@dataclass(frozen=True)
class Position:
    """Where a run stands: ``update`` updates done in pass ``epoch`` (``update`` equals
    ``steps_per_epoch`` once the pass is complete)."""

    epoch: int
    update: int
    steps_per_epoch: int

    @classmethod
    def of_step(cls, step: int, steps_per_epoch: int) -> "Position":
        done, update = divmod(int(step), steps_per_epoch)
        if update == 0 and done > 0:
            return cls(done, steps_per_epoch, steps_per_epoch)
        return cls(done + 1, update, steps_per_epoch)

    @property
    def complete(self) -> bool:
        return self.update == self.steps_per_epoch

    @property
    def step(self) -> int:
        return (self.epoch - 1) * self.steps_per_epoch + self.update

    def describe(self) -> str:
        if self.update == 0:
            return f"the start of epoch {self.epoch}"
        if self.complete:
            return f"the end of epoch {self.epoch}"
        return f"epoch {self.epoch}, update {self.update:,} of {self.steps_per_epoch:,}"


def quiet_orbax() -> None:
    """Keep orbax's own logging of a failed restore (tracebacks of every retry) off the
    console: the project reports each skipped step in one line."""
    for name in ("absl", "orbax", "orbax.checkpoint", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def manager(directory: Path | str, create: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager for a run's checkpoint folder; it deletes nothing by itself
    (``prune`` does), and removes the temporary folders of saves a killed process left."""
    directory = Path(directory).absolute()
    if not create and not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint folder there")
    quiet_orbax()
    options = ocp.CheckpointManagerOptions(create=create, enable_async_checkpointing=False, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "record"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict[str, Any]) -> None:
    """Save ``state`` and its JSON-able ``record`` as ``step`` and wait until it is on disk."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record, format=FORMAT))))
    mngr.wait_until_finished()


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON record of ``step`` alone (no arrays loaded)."""
    record = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
    if not isinstance(record, dict):
        raise CheckpointError(f"step {step}: its record is not a JSON object")
    return record


def _records(mngr: ocp.CheckpointManager) -> dict[int, dict[str, Any]]:
    """The readable records, by step (an unreadable step is left to the restore to name)."""
    out = {}
    for step in mngr.all_steps():
        try:
            out[step] = read_record(mngr, step)
        except Exception:  # orbax raises many kinds; restoring that step reports why
            continue
    return out


def is_complete(record: dict[str, Any]) -> bool:
    """Whether the step of ``record`` ends a pass (earlier layouts saved only those)."""
    return record.get("format") != FORMAT or record.get("update") == record.get("steps_per_epoch")


def prune(mngr: ocp.CheckpointManager, keep: int) -> None:
    """Delete what is no longer needed: mid-pass steps older than the newest completed
    pass, and completed passes beyond the newest ``keep`` and the best."""
    records = _records(mngr)
    ends = sorted(s for s, r in records.items() if is_complete(r))
    if not ends:
        return
    best = best_step(mngr, records)
    kept = set(ends[-keep:]) | ({best} if best is not None else set())
    for step in mngr.all_steps():
        if step in records and (step not in kept) and (is_complete(records[step]) or step < ends[-1]):
            mngr.delete(step)


def best_step(mngr: ocp.CheckpointManager, records: dict[int, dict[str, Any]] | None = None) -> int | None:
    """The completed pass with the lowest validation error, or None if none has one."""
    records = _records(mngr) if records is None else records
    ranked = [(r.get("metrics", {}).get(BEST_METRIC), s) for s, r in records.items() if is_complete(r)]
    ranked = [(v, s) for v, s in ranked if v is not None]
    return min(ranked)[1] if ranked else None


def epoch_steps(mngr: ocp.CheckpointManager) -> dict[int, int]:
    """The step of each completed pass whose record reads, by pass number."""
    return {int(r["epoch"]): s for s, r in _records(mngr).items() if is_complete(r) and "epoch" in r}


def choose_step(mngr: ocp.CheckpointManager, which: str = "best") -> int:
    """The newest step to try for a completed pass: "latest" (the newest step; a
    mid-pass or unreadable one is passed over by ``restore_newest_good``), "best" (the
    latest when no pass has a validation error) or a pass number."""
    if which in ("latest", "best"):
        step = best_step(mngr) if which == "best" else None
        if step is None:
            step = mngr.latest_step()
    else:
        try:
            epoch = int(which)
        except ValueError:
            raise CheckpointError(f"no pass {which!r}: give best, latest or a pass number") from None
        by_epoch = epoch_steps(mngr)
        if epoch not in by_epoch:
            raise CheckpointError(f"{mngr.directory}: no checkpoint of epoch {epoch} (have {sorted(by_epoch) or 'none'})")
        step = by_epoch[epoch]
    if step is None:
        raise CheckpointError(f"{mngr.directory}: holds no checkpoint")
    return step


def restore_newest_good(
    mngr: ocp.CheckpointManager,
    target_for: Callable[[dict[str, Any]], Any],
    newest: int | None = None,
    check: Callable[[dict[str, Any]], None] = lambda record: None,
    log: Callable[[str], None] = print,
    accept: Callable[[dict[str, Any]], bool] = lambda record: True,
) -> tuple[int, Any, dict[str, Any]]:
    """Restore the newest step (at most ``newest``) that loads and that ``accept`` takes.
    A step that fails to load (a file truncated or deleted by a killed process, say) is
    named in one line and skipped, never used. ``target_for(record)`` builds the state to
    restore into; ``check(record)`` may refuse a loadable step by raising."""
    steps = sorted((s for s in mngr.all_steps() if newest is None or s <= newest), reverse=True)
    for step in steps:
        try:
            record = read_record(mngr, step)
        except Exception as e:  # orbax raises many kinds; any of them means unusable
            log(f"skipping checkpoint step {step}: its record does not load ({type(e).__name__}: {_first_line(e)})")
            continue
        if not accept(record):
            continue
        check(record)
        try:
            state, record = restore(mngr, step, target_for(record))
        except Exception as e:
            log(f"skipping checkpoint step {step}: its state does not load ({type(e).__name__}: {_first_line(e)})")
            continue
        return step, state, record
    raise NoGoodCheckpoint(f"{mngr.directory}: no checkpoint loads" + (f" (tried steps {steps})" if steps else ""))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else "no detail"


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """The state of ``step``, shaped like ``target`` (a state of the same config), and its record."""
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()))
    return restored["state"], restored["record"]
