"""Training and evaluation: pure, compiled functions over data that lives on the device.

An epoch is a few calls of one jitted ``lax.scan`` over shuffled index batches (the
chunks only exist to drive a progress bar); nothing runs in Python per step, so batch
size 1 (the paper's pure stochastic updates) is as cheap as the arithmetic allows.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training.train_state import TrainState
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lenet_jax import checkpoint as ckpt
from lenet_jax import hessian
from lenet_jax.config import Config
from lenet_jax.data import Dataset, pad_images, preprocess, split_validation
from lenet_jax.distort import Distortion, distort_batch
from lenet_jax.losses import Objective
from lenet_jax.model import LeNet5, count_parameters, init_params
from lenet_jax.parallel import choose_devices, data_mesh, is_primary, put_replicated, split_batch
from lenet_jax.sdlm import paper_schedule, sdlm, set_hessian, uses_curvature

Metrics = dict[str, jax.Array]


# --------------------------------------------------------------------------- set-up


def make_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    lr = config.learning_rate
    if config.schedule == "paper":
        return paper_schedule(steps_per_epoch, lr)
    if config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, config.epochs * steps_per_epoch)
    return optax.constant_schedule(lr)


def make_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SDLM (the paper), plain SGD, SGD with momentum or Adam, on the configured schedule."""
    schedule = make_schedule(config, steps_per_epoch)
    if config.optimizer == "sdlm":
        tx = sdlm(schedule, mu=config.mu)
    elif config.optimizer == "sgd":
        tx = optax.sgd(schedule)
    elif config.optimizer == "momentum":
        tx = optax.sgd(schedule, momentum=config.momentum)
    else:
        tx = optax.adam(schedule)
    if config.weight_decay:
        weights_only = lambda params: jax.tree.map_with_path(lambda path, _: path[-1].key != "bias", params)  # noqa: E731
        tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=weights_only), tx)
    return tx


def make_model(config: Config, inference: bool = False, forward_mode: bool = False) -> LeNet5:
    """The LeNet5 module ``config`` describes. "auto" convolutions resolve by backend and
    use: "custom_vjp" for training on the CPU (its hand-written gradient runs far faster
    inside the compiled epoch), "xla" elsewhere and for inference (``inference=True``),
    where ``lax.conv`` is the faster forward pass on the CPU too (README, Speed).
    ``forward_mode=True`` (a model ``jax.jvp`` will differentiate) turns "custom_vjp" into
    "patches". Every implementation computes the same function on the same parameters."""
    impl = config.conv_impl
    if impl == "auto":
        impl = "custom_vjp" if jax.default_backend() == "cpu" and not inference else "xla"
    if forward_mode and impl == "custom_vjp":
        impl = "patches"
    return LeNet5(
        head=config.head, init_exponent=config.init_exponent, init_scale=config.init_scale, conv_impl=impl,
        activation=config.activation, subsampling=config.subsampling, c3=config.c3, conv=config.conv, dropout=config.dropout,
    )


def create_state(config: Config, steps_per_epoch: int) -> TrainState:
    """A fresh TrainState for ``config``, parameters drawn from its seed."""
    model = make_model(config)
    params = init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0))
    return TrainState.create(apply_fn=model.apply, params=params, tx=make_optimizer(config, steps_per_epoch))


def epoch_key(seed: int, epoch: int, purpose: int) -> jax.Array:
    """Stateless per-epoch randomness: a run is reproducible and resumable from its seed."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), purpose)


# --------------------------------------------------------------------------- pure steps


def loss_fn(
    params: Any, apply_fn: Callable, objective: Objective, x: jax.Array, y: jax.Array, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean loss of a batch, and its number of errors (the on-the-fly training error).
    With a ``key`` the model runs in training mode (dropout on, when it has any)."""
    if key is None:
        scores = apply_fn({"params": params}, x)
    else:
        scores = apply_fn({"params": params}, x, train=True, rngs={"dropout": key})
    errors = jnp.sum(objective.predict(scores) != y)
    return jnp.mean(objective.per_sample(scores, y)), errors


def train_step(
    state: TrainState, x: jax.Array, y: jax.Array, objective: Objective, key: jax.Array | None = None
) -> tuple[TrainState, Metrics]:
    """One update on a preprocessed batch; ``key`` drives dropout."""
    (loss, errors), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.apply_fn, objective, x, y, key)
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss * y.shape[0], "errors": errors, "finite": jnp.isfinite(loss)}


@functools.partial(jax.jit, static_argnames=("objective", "mesh", "augment"), donate_argnames=("state",))
def train_chunk(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    batches: jax.Array,
    objective: Objective,
    mesh: Mesh | None = None,
    key: jax.Array | None = None,
    augment: Distortion | None = None,
) -> tuple[TrainState, Metrics]:
    """Scan ``train_step`` over rows of ``batches`` (indices into the uint8 ``images``:
    28x28, or faster padded once by ``pad_images``), each batch split over ``mesh`` when
    one is given (data parallelism).

    With a ``key``, each update's randomness (dropout, and the distortion ``augment`` of
    its batch) is drawn from ``key`` folded with the optimiser step, so a resumed run
    draws exactly what an uninterrupted one would."""

    def body(carry, idx):
        state, totals = carry
        x = preprocess(images[idx])
        step_key = None if key is None else jax.random.fold_in(key, state.step)
        if augment is not None:
            if step_key is None:
                raise ValueError("distorting the training batches needs a key")
            step_key, distort_key = jax.random.split(step_key)
            x = distort_batch(distort_key, x, augment)
        x, y = split_batch(x, mesh), split_batch(labels[idx], mesh)
        state, m = train_step(state, x, y, objective, step_key)
        totals = {
            "loss": totals["loss"] + m["loss"],
            "errors": totals["errors"] + m["errors"],
            "finite": totals["finite"] & m["finite"],
        }
        return (state, totals), None

    zero = {"loss": jnp.zeros((), jnp.float32), "errors": jnp.zeros((), jnp.int32), "finite": jnp.ones((), bool)}
    (state, totals), _ = jax.lax.scan(body, (state, zero), batches)
    return state, totals


@functools.partial(jax.jit, static_argnames=("apply_fn", "objective", "batch_size"))
def evaluate_arrays(
    params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array, objective: Objective, batch_size: int = 1000
) -> dict[str, jax.Array]:
    """Summed loss, error count and predictions over uint8 ``images``, in batches."""
    n = images.shape[0]
    nb = -(-n // batch_size)
    pad = nb * batch_size - n
    imgs = jnp.pad(images, ((0, pad), (0, 0), (0, 0))).reshape(nb, batch_size, 28, 28)
    labs = jnp.pad(labels, (0, pad)).reshape(nb, batch_size)

    def one(args):
        x, y = args
        scores = apply_fn({"params": params}, preprocess(x))
        return objective.per_sample(scores, y), objective.predict(scores)

    losses, preds = jax.lax.map(one, (imgs, labs))
    losses, preds = losses.reshape(-1)[:n], preds.reshape(-1)[:n]
    return {"loss": jnp.sum(losses), "errors": jnp.sum(preds != labels), "predictions": preds}


def evaluate(params: Any, apply_fn: Callable, images: Any, labels: Any, objective: Objective, batch_size: int = 1000) -> dict[str, Any]:
    """Mean loss, error rate, error count, predictions and confusion matrix (rows: true)."""
    out = evaluate_arrays(params, apply_fn, jnp.asarray(images), jnp.asarray(labels), objective, min(batch_size, len(labels)))
    preds = np.asarray(out["predictions"])
    labels = np.asarray(labels)
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (labels, preds), 1)
    n = len(labels)
    return {
        "loss": float(out["loss"]) / n,
        "error": int(out["errors"]) / n,
        "errors": int(out["errors"]),
        "n": n,
        "predictions": preds,
        "confusion": confusion,
    }


@functools.partial(jax.jit, static_argnames=("estimator", "model", "objective", "probes"))
def estimate_hessian(
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    pick: jax.Array,
    key: jax.Array,
    estimator: str,
    model: LeNet5,
    objective: Objective,
    probes: int = 8,
) -> Any:
    """A compiled Hessian-diagonal estimate over the uint8 ``images[pick]`` (see
    ``lenet_jax.hessian``)."""
    return hessian.estimate(estimator, model, objective, params, preprocess(images[pick]), labels[pick], key, probes=probes)


def refresh_curvature(state: TrainState, images: jax.Array, labels: jax.Array, config: Config, epoch: int) -> TrainState:
    """Before a pass: average the estimate over ``config.hessian_samples`` random training
    patterns and hold it fixed in the optimiser state for the pass (appendix C). The
    patterns are the same on every device: the average is over the global sample."""
    n = labels.shape[0]
    key = epoch_key(config.seed, epoch, 1)
    pick = jax.random.choice(key, n, (min(config.hessian_samples, n),), replace=False)
    h = estimate_hessian(
        state.params, images, labels, pick, jax.random.fold_in(key, 1),
        config.hessian_estimator, make_model(config, forward_mode=config.hessian_estimator in hessian.FORWARD_MODE_ESTIMATORS),
        config.objective, config.hutchinson_probes,
    )
    return state.replace(opt_state=set_hessian(state.opt_state, h))


# --------------------------------------------------------------------------- the loop

PARTIAL = "interrupted"
"""Folder (in a run's workdir) of the checkpoint written when a signal stops a run
mid-epoch; it is deleted once that epoch completes."""


@dataclass
class RunResult:
    """The state a run ended with, its per-epoch history, and, when a signal stopped it
    early, where: ``stopped`` = {"epoch", "update", "steps"}."""

    state: TrainState
    history: list[dict[str, Any]]
    workdir: Path
    stopped: dict[str, int] | None = None


@dataclass
class Position:
    """Where a run (re)starts: after ``update`` updates of ``epoch``, with that epoch's
    running sums so far."""

    epoch: int = 1
    update: int = 0
    loss: float = 0.0
    errors: int = 0
    seconds: float = 0.0


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int) -> jax.Array:
    """The epoch's shuffled index batches, (n // batch_size, batch_size); a remainder
    smaller than a batch is left out of that epoch (a different one each epoch)."""
    perm = jax.random.permutation(epoch_key(seed, epoch, 0), n)
    steps = n // batch_size
    return perm[: steps * batch_size].reshape(steps, batch_size)


def training_split(config: Config, dataset: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The images and labels ``config`` trains on, and its validation set (None without one)."""
    train, validation = split_validation(dataset, config.validation_size, config.seed)
    images, labels = train.train_images, train.train_labels
    if config.train_subset is not None:
        images, labels = images[: config.train_subset], labels[: config.train_subset]
    if config.batch_size > len(labels):
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(labels)} training images")
    return images, labels, validation


def _wait(tree: Any) -> Any:
    """``tree`` on the host once computed; the wait sleeps in Python, so a signal handler
    runs (and a second signal can end the process) while a compiled chunk is running."""
    while not all(leaf.is_ready() for leaf in jax.tree.leaves(tree)):
        time.sleep(0.002)
    return jax.device_get(tree)


def _resume(
    config: Config, template: TrainState, epochs: Any, partial: Any, log: Callable[[str], None]
) -> tuple[TrainState, list[dict[str, Any]], Position]:
    """The state, history and position of the newest good checkpoint of a run: an
    interrupted epoch if one is newer than the last complete epoch, else that epoch."""

    def check(record: dict[str, Any]) -> None:
        conflicts = config.resume_conflicts(Config.from_dict(record["config"]))
        if conflicts:
            raise ckpt.CheckpointError("cannot resume, the checkpoint was written with different " + ", ".join(conflicts))

    state, history, position = template, [], Position()
    if epochs.latest_step() is not None:
        step, state, record = ckpt.restore_newest_good(epochs, lambda record: template, check=check, log=log)
        for broken in [s for s in epochs.all_steps() if s > step]:
            epochs.delete(broken)
        history, position = record.get("history", []), Position(epoch=step + 1)
    if partial.latest_step() is not None:
        try:
            record = ckpt.read_record(partial, partial.latest_step())
        except Exception:  # restore_newest_good below names the failure
            record = {"epoch": position.epoch}
        if record.get("epoch", 0) < position.epoch:
            log(f"discarding the interrupted-epoch checkpoint: epoch {position.epoch - 1} completed after it")
            ckpt.clear(partial)
            return state, history, position
        try:
            _, state_p, record = ckpt.restore_newest_good(partial, lambda record: template, check=check, log=log)
        except ckpt.NoGoodCheckpoint:
            ckpt.clear(partial)
            return state, history, position
        p = record["partial"]
        state, history = state_p, record["history"]
        position = Position(record["epoch"], p["update"], p["loss"], p["errors"], p["seconds"])
    return state, history, position


def fit(
    config: Config,
    dataset: Dataset,
    workdir: Path | str,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> RunResult:
    """Train ``config`` on ``dataset``: checkpoints, a metrics log (metrics.jsonl) and the
    config go to ``workdir`` (from process 0 when there are several).

    ``stop`` is asked after every compiled chunk; when it says yes the run writes a
    checkpoint where it is (mid-epoch included) and returns, and ``resume=True`` later
    continues it with bit-identical results. Returns the state and per-epoch history."""
    config.validate()
    workdir = Path(workdir)
    primary = is_primary()
    say = log if primary else (lambda message: None)
    images, labels, validation = training_split(config, dataset)
    n = len(labels)
    steps = n // config.batch_size
    mesh = data_mesh(choose_devices(config.batch_size, config.devices))
    template = create_state(config, steps)

    epochs_mngr = ckpt.manager(workdir / "checkpoints", keep=config.keep, track_best=validation is not None)
    partial_mngr = ckpt.manager(workdir / PARTIAL, keep=1)
    try:
        existing = epochs_mngr.latest_step() is not None or partial_mngr.latest_step() is not None
        if existing and not resume:
            raise ckpt.CheckpointError(
                f"{workdir} already holds checkpoints: pass --resume to continue it or choose another --workdir"
            )
        if existing:
            state, history, start = _resume(config, template, epochs_mngr, partial_mngr, say)
            where = f"epoch {start.epoch}, update {start.update:,} of {steps:,}" if start.update else f"the start of epoch {start.epoch}"
            say(f"resuming {workdir} at {where}")
        else:
            if resume:
                say(f"{workdir} holds no checkpoint yet: starting the run")
            state, history, start = template, [], Position()
        if primary:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        return _train(config, dataset, workdir, state, history, start, (images, labels, validation), mesh,
                      (epochs_mngr, partial_mngr), say, progress and primary, stop)
    finally:
        epochs_mngr.close()
        partial_mngr.close()


def _train(
    config: Config,
    dataset: Dataset,
    workdir: Path,
    state: TrainState,
    history: list[dict[str, Any]],
    start: Position,
    data: tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None],
    mesh: Mesh,
    managers: tuple[Any, Any],
    say: Callable[[str], None],
    progress: bool,
    stop: Callable[[], bool],
) -> RunResult:
    """The epoch loop of ``fit``, from ``start``."""
    images, labels, validation = data
    epochs_mngr, partial_mngr = managers
    n, bs = len(labels), config.batch_size
    steps = n // bs
    parameters = count_parameters(state.params, make_model(config).c3_table)
    state = put_replicated(state, mesh)
    d_images, d_labels = put_replicated(pad_images(images), mesh), put_replicated(labels, mesh)
    objective = config.objective
    say(
        f"training LeNet-5 ({config.head} head, {config.loss} loss, {parameters:,} parameters) "
        f"with {config.optimizer} on {n:,} {config.dataset} images, batch {bs}, {config.epochs} epochs, "
        f"on {mesh.size} {jax.devices()[0].platform} device(s)" + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else "")
    )
    chunk_len = math.ceil(steps / min(config.chunks, steps))
    step_keys = jax.random.fold_in(jax.random.key(config.seed), 2)
    infer_fn = make_model(config, inference=True).apply
    for epoch in range(start.epoch, config.epochs + 1):
        so_far = start if epoch == start.epoch else Position(epoch)
        t0 = time.perf_counter()
        if so_far.update == 0 and uses_curvature(state.opt_state):
            state = refresh_curvature(state, d_images, d_labels, config, epoch)
        batches = epoch_batches(config.seed, epoch, n, bs)
        totals = {"loss": so_far.loss, "errors": so_far.errors}
        bar = tqdm(total=steps * bs, initial=so_far.update * bs, desc=f"epoch {epoch}/{config.epochs}", unit="img", disable=not progress, leave=False)
        for c in range(so_far.update, steps, chunk_len):
            chunk = batches[c : c + chunk_len]
            state, m = train_chunk(state, d_images, d_labels, chunk, objective, mesh, step_keys, config.distortion)
            m = _wait(m)
            done = c + chunk.shape[0]
            if not bool(m["finite"]):
                raise FloatingPointError(
                    f"the loss became NaN or infinite in epoch {epoch}, updates {c + 1}-{done} of {steps}; "
                    f"the last good checkpoint is epoch {epochs_mngr.latest_step()} in {workdir / 'checkpoints'}"
                )
            totals = {"loss": totals["loss"] + float(m["loss"]), "errors": totals["errors"] + int(m["errors"])}
            bar.update(chunk.shape[0] * bs)
            if done < steps and stop():
                bar.close()
                seconds = so_far.seconds + time.perf_counter() - t0
                record = {
                    "epoch": epoch,
                    "config": config.to_dict(),
                    "history": history,
                    "partial": {"update": done, "steps": steps, "loss": totals["loss"], "errors": totals["errors"], "seconds": seconds},
                }
                ckpt.save(partial_mngr, (epoch - 1) * steps + done, state, record)
                say(f"stopped in epoch {epoch} after {done:,} of {steps:,} updates; checkpoint in {workdir / PARTIAL}")
                return RunResult(state=state, history=history, workdir=workdir, stopped={"epoch": epoch, "update": done, "steps": steps})
        bar.close()
        train_seconds = so_far.seconds + time.perf_counter() - t0
        seen = steps * bs
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": totals["loss"] / seen,
            "train_error": totals["errors"] / seen,
            "seconds": train_seconds,
        }
        params = jax.device_get(state.params)
        if validation is not None:
            v = evaluate(params, infer_fn, *validation, objective, config.eval_batch_size)
            row.update(val_loss=v["loss"], val_error=v["error"])
        t = evaluate(params, infer_fn, dataset.test_images, dataset.test_labels, objective, config.eval_batch_size)
        row.update(test_loss=t["loss"], test_error=t["error"])
        history = history + [row]
        if is_primary():
            with open(workdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        ckpt.save(epochs_mngr, epoch, state, {"epoch": epoch, "config": config.to_dict(), "metrics": row, "history": history})
        ckpt.clear(partial_mngr)
        val = f"  val {row['val_error']:.2%}" if validation is not None else ""
        say(
            f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train {row['train_error']:.2%}{val}"
            f"  test {row['test_error']:.2%}  {train_seconds:.1f}s"
        )
        if epoch < config.epochs and stop():
            say(f"stopped after epoch {epoch}; checkpoint in {workdir / 'checkpoints'}")
            return RunResult(state=state, history=history, workdir=workdir, stopped={"epoch": epoch, "update": steps, "steps": steps})
    return RunResult(state=state, history=history, workdir=workdir)


def checkpoint_dir(path: Path | str) -> Path:
    """Accept a run's workdir or its checkpoints folder."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def restore_run(path: Path | str, which: str = "best", log: Callable[[str], None] = print) -> tuple[TrainState, Config, dict[str, Any]]:
    """The state, config and record of a saved epoch ("best", "latest" or a number); if
    that one does not load, the newest older one that does (the skipped ones are named)."""
    mngr = ckpt.manager(checkpoint_dir(path), create=False)
    newest = ckpt.choose_step(mngr, which)
    _, state, record = ckpt.restore_newest_good(
        mngr, lambda record: create_state(Config.from_dict(record["config"]), 1), newest=newest, log=log
    )
    mngr.close()
    return state, Config.from_dict(record["config"]), record
