"""The training loop: ``fit`` a Config on a Dataset into a run folder, resume it from
wherever it stopped, and ``restore_run`` a saved pass.

The loop is thin: it chooses chunks of the epoch's index batches, runs the compiled chunk
of updates (``steps.chunk_function``: the XLA scan or the fused kernel) on each,
refreshes SDLM's curvature before each pass, evaluates after it, and saves. Where a run stands is its optimiser step
(``checkpoint.Position``); everything random is derived from the seed and that position,
so a run stopped anywhere resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax.training.train_state import TrainState
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lenet_jax import checkpoint as ckpt
from lenet_jax.checkpoint import Position
from lenet_jax.config import Config, load_config_file
from lenet_jax.data import Dataset, split_validation
from lenet_jax.errors import CheckpointError
from lenet_jax.factories import conv_impl_for, create_state, make_model, step_impl_for
from lenet_jax.fileio import atomic_write_text, exclusive
from lenet_jax.inputs import pad_images
from lenet_jax.model import count_parameters
from lenet_jax.parallel import choose_devices, data_mesh, is_primary, put_replicated
from lenet_jax.sdlm import uses_curvature
from lenet_jax.steps import Chunk, chunk_function, epoch_batches, evaluate, refresh_curvature, step_keys

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
CONFIG = "config.json"


@dataclass
class RunResult:
    """The state a run ended with, its per-pass history, where it stands and how many
    passes it was asked for (``finished`` unless a stop request ended it early)."""

    state: TrainState
    history: list[dict[str, Any]]
    workdir: Path
    position: Position
    epochs: int

    @property
    def finished(self) -> bool:
        return self.position.complete and self.position.epoch >= self.epochs


def training_split(config: Config, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The images and labels ``config`` trains on, and its validation set (None without one)."""
    train, validation = split_validation(dataset, config.validation_size, config.seed)
    images, labels = train.train_images, train.train_labels
    if config.train_subset is not None:
        if config.train_subset > len(labels):
            raise ValueError(f"--train-subset {config.train_subset} is larger than the {len(labels):,} training images")
        images, labels = images[: config.train_subset], labels[: config.train_subset]
    if config.batch_size > len(labels):
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(labels)} training images")
    return images, labels, validation


@dataclass(frozen=True)
class Run:
    """What every pass of one run shares: its config and folder, the data on the device,
    the mesh, the chunking, and how it reports and is stopped (``replicas`` builds one per
    seed, sharing the arrays)."""

    config: Config
    workdir: Path
    images: jax.Array
    labels: jax.Array
    validation: tuple[jax.Array, jax.Array] | None
    test: tuple[jax.Array, jax.Array]
    mesh: Mesh
    steps: int
    chunk_len: int
    mngr: Any
    say: Callable[[str], None]
    progress: bool
    stop: Callable[[], bool]
    infer_fn: Callable = field(repr=False)
    chunk: Chunk = field(repr=False)


def zero_totals() -> dict[str, float]:
    return {"loss": 0.0, "errors": 0, "seconds": 0.0}


def fit(
    config: Config,
    dataset: Dataset,
    workdir: Path | str,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> RunResult:
    """Train ``config`` on ``dataset``: checkpoints, the metrics log and the config go to
    ``workdir`` (written by process 0 when there are several). Only one process may
    train in a folder at a time.

    ``stop`` is asked after every compiled chunk; when it says yes the run saves where it
    is (mid-pass included) and returns, and ``resume=True`` later continues it with
    bit-identical results."""
    config.validate()
    workdir = Path(workdir)
    primary = is_primary()
    say = log if primary else (lambda message: None)
    images, labels, validation = training_split(config, dataset)
    steps = len(labels) // config.batch_size
    mesh = data_mesh(choose_devices(config.batch_size, config.devices))
    template = create_state(config, steps)
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    with exclusive(workdir) if primary else contextlib.nullcontext():
        mngr = ckpt.manager(workdir / CHECKPOINTS)
        try:
            state, history, start, totals = start_or_resume(config, template, steps, mngr, resume, workdir, say)
            if primary:
                atomic_write_text(workdir / CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
                write_metrics(workdir, history, say)
            run = Run(
                config=config, workdir=workdir,
                images=put_replicated(pad_images(images), mesh), labels=put_replicated(labels, mesh),
                validation=None if validation is None else (jax.device_put(validation[0]), jax.device_put(validation[1])),
                test=(jax.device_put(dataset.test_images), jax.device_put(dataset.test_labels)),
                mesh=mesh, steps=steps, chunk_len=math.ceil(steps / min(config.chunks, steps)), mngr=mngr, say=say,
                progress=progress and primary, stop=stop, infer_fn=make_model(config, inference=True).apply,
                chunk=chunk_function(config, steps, mesh),
            )
            return _train(run, put_replicated(state, mesh), history, start, totals)
        finally:
            mngr.close()


def start_or_resume(
    config: Config, template: TrainState, steps: int, mngr: Any, resume: bool, workdir: Path, say: Callable[[str], None]
) -> tuple[TrainState, list[dict[str, Any]], Position, dict[str, float]]:
    """The state, history, position and running sums a run starts from: a fresh state,
    or with ``resume`` the newest checkpoint that loads and fits ``config``."""
    if mngr.latest_step() is None:
        if resume:
            say(f"{workdir} holds no checkpoint yet: starting the run")
        return template, [], Position(1, 0, steps), zero_totals()
    if not resume:
        raise CheckpointError(f"{workdir} already holds checkpoints: pass --resume to continue it or choose another --workdir")

    def check(record: dict[str, Any]) -> None:
        if record.get("format") != ckpt.FORMAT:
            raise CheckpointError(f"{workdir}: its checkpoints were written by an earlier lenet-jax (numbered by pass); "
                                  "eval.py reads them, but a run can only be resumed by the version that wrote it")
        if "config" not in record:
            raise CheckpointError(f"{workdir}: a checkpoint record without its config")
        conflicts = config.resume_conflicts(Config.from_dict(record["config"], f"{workdir} checkpoint"))
        if conflicts:
            raise CheckpointError("cannot resume, the checkpoint was written with different " + ", ".join(conflicts))

    step, state, record = ckpt.restore_newest_good(mngr, lambda record: template, check=check, log=say)
    for broken in [s for s in mngr.all_steps() if s > step]:
        mngr.delete(broken)
    position = Position.of_step(int(state.step), steps)
    if position.epoch > config.epochs:
        done = position.epoch if position.complete else position.epoch - 1
        raise ValueError(f"--epochs {config.epochs}: the run in {workdir} has already completed {done} epochs"
                         + ("" if position.complete else f" and is inside epoch {position.epoch}"))
    totals = zero_totals() if position.complete else {k: record["totals"][k] for k in zero_totals()}
    say(f"resuming {workdir} at {position.describe()}")
    return state, list(record.get("history", [])), position, totals


def _train(run: Run, state: TrainState, history: list[dict[str, Any]], start: Position, totals: dict[str, float]) -> RunResult:
    """The passes from ``start`` to the last, each saved when it completes; a stop
    request saves mid-pass and returns."""
    config = run.config
    run.say(describe_run(config, state, run.steps * config.batch_size, run.mesh))
    position = start
    first = start.epoch + 1 if start.complete else start.epoch
    for epoch in range(first, config.epochs + 1):
        resumed = epoch == start.epoch
        state, totals, done = _train_epoch(run, state, epoch, start.update if resumed else 0, totals if resumed else zero_totals())
        position = Position(epoch, done, run.steps)
        if not position.complete:
            save_position(run, state, history, position, {"totals": totals})
            run.say(f"stopped in epoch {epoch} after {done:,} of {run.steps:,} updates; checkpoint in {run.workdir / CHECKPOINTS}")
            return RunResult(state, history, run.workdir, position, config.epochs)
        row = evaluate_epoch(run, state, epoch, totals)
        history = history + [row]
        save_position(run, state, history, position, {"metrics": row})
        if is_primary():
            append_metrics(run.workdir, row, run.say)
        val = f"  val {row['val_error']:.2%}" if "val_error" in row else ""
        run.say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train {row['train_error']:.2%}{val}"
                f"  test {row['test_error']:.2%}  {row['seconds']:.1f}s")
        if epoch < config.epochs and run.stop():
            run.say(f"stopped after epoch {epoch}; checkpoint in {run.workdir / CHECKPOINTS}")
            return RunResult(state, history, run.workdir, position, config.epochs)
    return RunResult(state, history, run.workdir, position, config.epochs)


def describe_run(config: Config, state: TrainState, images: int, mesh: Mesh) -> str:
    """The run's first line: the model, the optimiser, the data and how it executes."""
    parameters = count_parameters(state.params, make_model(config).c3_table)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (
        f"training LeNet-5 ({config.head} head, {config.loss} loss, {parameters:,} parameters) "
        f"with {config.optimizer} on {images:,} {config.dataset} images, batch {config.batch_size}, {config.epochs} epochs, "
        f"on {mesh.size} {jax.devices()[0].platform} device(s){processes}; "
        f"precision {config.precision}, convolutions {conv_impl_for(config)}, steps {step_impl_for(config)}"
    )


def wait(tree: Any) -> Any:
    """``tree`` on the host once computed; the wait sleeps in Python, so a signal handler
    runs (and a second signal can end the process) while a compiled chunk is running."""
    while not all(leaf.is_ready() for leaf in jax.tree.leaves(tree)):
        time.sleep(0.002)
    return jax.device_get(tree)


def _train_epoch(run: Run, state: TrainState, epoch: int, first: int, totals: dict[str, float]) -> tuple[TrainState, dict[str, float], int]:
    """Updates ``first``.. of pass ``epoch``, chunk by chunk (the curvature refreshed
    first when the pass starts); returns the state, the pass's running sums and how many
    updates of it are done (fewer than all when a stop request came)."""
    config = run.config
    t0 = time.perf_counter()
    if first == 0 and uses_curvature(state.opt_state):
        state = refresh_curvature(state, run.images, run.labels, config, epoch)
    batches = epoch_batches(config.seed, epoch, run.labels.shape[0], config.batch_size)
    keys = step_keys(config.seed)
    bs = config.batch_size
    bar = tqdm(total=run.steps * bs, initial=first * bs, desc=f"epoch {epoch}/{config.epochs}", unit="img", disable=not run.progress, leave=False)
    done = first
    try:
        for c in range(first, run.steps, run.chunk_len):
            chunk = batches[c : c + run.chunk_len]
            state, m = run.chunk(state, run.images, run.labels, chunk, keys)
            m = wait(m)
            done = c + chunk.shape[0]
            if not bool(m["finite"]):
                last = max(run.mngr.all_steps(), default=None)
                where = f"{Position.of_step(last, run.steps).describe()} in {run.workdir / CHECKPOINTS}" if last is not None else "none"
                raise FloatingPointError(f"the loss became NaN or infinite in epoch {epoch}, updates {c + 1}-{done} of {run.steps}; "
                                         f"the last good checkpoint is {where}")
            totals = {"loss": totals["loss"] + float(m["loss"]), "errors": totals["errors"] + int(m["errors"]), "seconds": totals["seconds"]}
            bar.update(chunk.shape[0] * bs)
            if done < run.steps and run.stop():
                break
    finally:
        bar.close()
    totals["seconds"] += time.perf_counter() - t0
    return state, totals, done


def evaluate_epoch(run: Run, state: TrainState, epoch: int, totals: dict[str, float]) -> dict[str, Any]:
    """The history row of a completed pass: its running training loss and error, its
    seconds, and the test (and validation) loss and error after it."""
    seen = run.steps * run.config.batch_size
    row: dict[str, Any] = {"epoch": epoch, "train_loss": totals["loss"] / seen, "train_error": totals["errors"] / seen, "seconds": totals["seconds"]}
    params = jax.device_get(state.params)
    objective, batch = run.config.objective, run.config.eval_batch_size
    if run.validation is not None:
        v = evaluate(params, run.infer_fn, *run.validation, objective, batch)
        row.update(val_loss=v["loss"], val_error=v["error"])
    t = evaluate(params, run.infer_fn, *run.test, objective, batch)
    row.update(test_loss=t["loss"], test_error=t["error"])
    return row


def save_position(run: Run, state: TrainState, history: list[dict[str, Any]], position: Position, extra: dict[str, Any]) -> None:
    record = {"epoch": position.epoch, "update": position.update, "steps_per_epoch": run.steps,
              "config": run.config.to_dict(), "history": history, **extra}
    ckpt.save(run.mngr, position.step, state, record)
    ckpt.prune(run.mngr, run.config.keep)


def write_metrics(workdir: Path, history: list[dict[str, Any]], say: Callable[[str], None]) -> None:
    """The metrics log rewritten from the checkpointed history: each pass once, whatever
    earlier runs of the folder appended."""
    try:
        atomic_write_text(workdir / METRICS, "".join(json.dumps(row) + "\n" for row in history))
    except OSError as e:
        say(f"warning: cannot write {workdir / METRICS} ({e.strerror or type(e).__name__}); the checkpoints hold the history")


def append_metrics(workdir: Path, row: dict[str, Any], say: Callable[[str], None]) -> None:
    try:
        with open(workdir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        say(f"warning: cannot write {workdir / METRICS} ({e.strerror or type(e).__name__}); the checkpoint of epoch {row['epoch']} holds it")


# --------------------------------------------------------------------------- saved runs


def checkpoint_dir(path: Path | str) -> Path:
    """Accept a run's workdir or its checkpoints folder."""
    path = Path(path)
    return path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path


def _steps_per_epoch(config: Config, record: dict[str, Any]) -> int:
    """Optimiser updates per pass of the run a record comes from (runs of an earlier
    layout did not record it: their count is derived from a 60,000-image training set)."""
    if "steps_per_epoch" in record:
        return int(record["steps_per_epoch"])
    n = 60_000 - config.validation_size
    return max(1, (min(n, config.train_subset or n)) // config.batch_size)


def restore_run(path: Path | str, which: str = "best", log: Callable[[str], None] = print) -> tuple[TrainState, Config, dict[str, Any]]:
    """The state (its optimiser on the run's own schedule), config and record of a saved
    pass ("best", "latest" or a pass number); if that one does not load, the newest older
    one that does (the skipped ones are named)."""
    mngr = ckpt.manager(checkpoint_dir(path), create=False)
    try:
        newest = ckpt.choose_step(mngr, which)

        def target(record: dict[str, Any]) -> TrainState:
            config = Config.from_dict(record.get("config"), f"{path} checkpoint")
            return create_state(config, _steps_per_epoch(config, record))

        _, state, record = ckpt.restore_newest_good(mngr, target, newest=newest, log=log, accept=ckpt.is_complete)
    finally:
        mngr.close()
    return state, Config.from_dict(record["config"]), record


def saved_config(workdir: Path, log: Callable[[str], None] = print) -> Config | None:
    """The config of the run in ``workdir``: from its newest checkpoint that reads, else
    from its config.json; None for a folder with neither."""
    folder = workdir / CHECKPOINTS
    if folder.is_dir():
        mngr = ckpt.manager(folder, create=False)
        try:
            for step in sorted(mngr.all_steps(), reverse=True):
                try:
                    record = ckpt.read_record(mngr, step)
                except Exception:  # the restore on resume names it
                    continue
                if "config" in record:
                    return Config.from_dict(record["config"], f"{folder} step {step}")
        finally:
            mngr.close()
    saved = workdir / CONFIG
    if saved.is_file():
        return load_config_file(saved)
    return None
