"""Checkpoints with orbax: the last few epochs plus the best by validation error.

A checkpoint holds the training state (params, optimiser state, step) and a JSON record
(epoch, config, metrics). Orbax writes each step into a temporary folder and renames it
when complete, so a killed run never leaves a partial step that loads as valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

BEST_METRIC = "val_error"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not fit the requested run."""


class NoGoodCheckpoint(CheckpointError):
    """Every step of a checkpoint folder failed to load."""


def _best_key(metrics: dict[str, Any]) -> float:
    return -float(metrics[BEST_METRIC])


def manager(directory: Path | str, keep: int = 3, create: bool = True, track_best: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the ``keep`` latest steps, and with ``track_best`` also
    the best by val_error."""
    directory = Path(directory).absolute()
    if not create and not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint folder there")
    policy = [policies.LatestN(n=keep)]
    if track_best:
        policy.append(policies.BestN(get_metric_fn=_best_key, n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(policy),
        best_fn=_best_key if track_best else None,  # orbax then stores the metrics, so BestN survives a restart
        create=create,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "record"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, record: dict[str, Any]) -> None:
    """Save ``state`` as ``step`` (the epoch, for epoch checkpoints) and wait until it is on
    disk. ``record`` must be JSON-able; its "metrics" entry, if it has val_error, ranks the
    checkpoint for "best"."""
    metrics = record.get("metrics", {})
    ranked = {BEST_METRIC: metrics[BEST_METRIC]} if metrics.get(BEST_METRIC) is not None else None
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)),
        metrics=ranked,
    )
    mngr.wait_until_finished()


def clear(mngr: ocp.CheckpointManager) -> None:
    """Delete every step of ``mngr``."""
    for step in mngr.all_steps():
        mngr.delete(step)


def best_step(mngr: ocp.CheckpointManager) -> int | None:
    """The kept step with the lowest validation error, or None if none has one."""
    ranked = []
    for step in mngr.all_steps():
        try:
            value = read_record(mngr, step).get("metrics", {}).get(BEST_METRIC)
        except Exception:  # an unreadable step cannot be the best; restoring it reports why
            continue
        if value is not None:
            ranked.append((value, step))
    return min(ranked)[1] if ranked else None


def choose_step(mngr: ocp.CheckpointManager, which: str = "best") -> int:
    """"latest", "best" (falls back to latest when no step has a validation error) or a number."""
    if which == "latest" or which == "best":
        step = (best_step(mngr) if which == "best" else None) or mngr.latest_step()
    else:
        step = int(which)
        if step not in mngr.all_steps():
            raise CheckpointError(f"{mngr.directory}: no step {step} (have {list(mngr.all_steps())})")
    if step is None:
        raise CheckpointError(f"{mngr.directory}: holds no checkpoint")
    return step


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The JSON record of ``step`` alone (no arrays loaded)."""
    return mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]


def restore_newest_good(
    mngr: ocp.CheckpointManager,
    target_for: Callable[[dict[str, Any]], Any],
    newest: int | None = None,
    check: Callable[[dict[str, Any]], None] = lambda record: None,
    log: Callable[[str], None] = print,
) -> tuple[int, Any, dict[str, Any]]:
    """Restore the newest step (at most ``newest``) that loads. A step that fails to load
    (a file truncated or deleted by a killed process, say) is named and skipped, never
    used. ``target_for(record)`` builds the state to restore into; ``check(record)`` may
    refuse a loadable step by raising (its error propagates)."""
    steps = sorted((s for s in mngr.all_steps() if newest is None or s <= newest), reverse=True)
    for step in steps:
        try:
            record = read_record(mngr, step)
        except Exception as e:  # orbax raises many kinds; any of them means unusable
            log(f"skipping checkpoint step {step}: its record does not load ({type(e).__name__}: {_first_line(e)})")
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
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()),
    )
    return restored["state"], restored["record"]
