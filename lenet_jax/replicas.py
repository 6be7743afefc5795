"""Several seeds of one configuration, trained at once in one compiled program.

Each seed is an independent run (its own initial weights, data order, dropout and
distortion draws, and curvature refresh) computed by ``jax.vmap`` of the compiled chunk
over a leading model axis, and saved as a run folder of its own, ``WORKDIR/seed-S``,
which ``eval.py``, ``restore_run`` and ``--resume`` read like any run. On an accelerator
the seeds share each kernel launch, so several cost little more than one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.training.train_state import TrainState
from tqdm.auto import tqdm

from lenet_jax import checkpoint as ckpt
from lenet_jax import hessian
from lenet_jax.checkpoint import Position
from lenet_jax.config import Config
from lenet_jax.data import Dataset
from lenet_jax.distort import Distortion
from lenet_jax.errors import CheckpointError
from lenet_jax.factories import create_state, make_model, step_impl_for
from lenet_jax.fileio import atomic_write_text, exclusive
from lenet_jax.inputs import pad_images, preprocess
from lenet_jax.losses import Objective
from lenet_jax.model import init_params
from lenet_jax.parallel import data_mesh, is_primary
from lenet_jax.sdlm import set_hessian, uses_curvature
from lenet_jax.steps import curvature_model, curvature_sample, epoch_batches, step_keys, train_chunk
from lenet_jax.training import (
    CHECKPOINTS,
    CONFIG,
    Run,
    RunResult,
    append_metrics,
    describe_run,
    evaluate_epoch,
    save_position,
    start_or_resume,
    training_split,
    wait,
    write_metrics,
    zero_totals,
)

SEED_FOLDER = "seed-{}"


def seed_folders(workdir: Path) -> dict[int, Path]:
    """The per-seed run folders of a several-seed run, by seed (empty for a single run)."""
    out = {}
    for p in Path(workdir).glob("seed-*"):
        if p.is_dir() and p.name[5:].isdigit():
            out[int(p.name[5:])] = p
    return dict(sorted(out.items()))


@functools.partial(jax.jit, static_argnames=("objective", "augment"), donate_argnames=("state",))
def replicated_train_chunk(
    state: TrainState, images: jax.Array, labels: jax.Array, batches: jax.Array, keys: jax.Array, *,
    objective: Objective, augment: Distortion | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``steps.train_chunk`` for R models at once: ``state`` leaves, ``batches`` and
    ``keys`` carry a leading model axis; the data is shared."""
    return jax.vmap(lambda s, b, k: train_chunk(s, images, labels, b, k, objective=objective, augment=augment))(state, batches, keys)


@functools.partial(jax.jit, static_argnames=("estimator", "model", "objective", "probes"))
def replicated_hessian(params: Any, images: jax.Array, labels: jax.Array, picks: jax.Array, keys: jax.Array,
                       estimator: str, model: Any, objective: Objective, probes: int) -> Any:
    """Each model's curvature estimate over its own sample of patterns."""
    return jax.vmap(lambda p, pick, key: hessian.estimate(estimator, model, objective, p, preprocess(images[pick]), labels[pick], key,
                                                          probes=probes))(params, picks, keys)


def stack(states: list[TrainState]) -> TrainState:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack(state: TrainState, r: int) -> TrainState:
    return jax.tree.map(lambda x: x[r], state)


def fit_seeds(
    config: Config,
    seeds: list[int],
    dataset: Dataset,
    workdir: Path | str,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> list[RunResult]:
    """Train ``config`` once per seed, all seeds in one compiled program, each into
    ``workdir/seed-S``; returns each seed's result. A stop request saves every seed where
    it is; ``resume=True`` continues them (they always stand at the same position)."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds")
    configs = [config.replace(seed=s).validate() for s in seeds]
    if config.validation_size:
        raise ValueError("--seeds trains on the whole training set: --validation-size would hold out different images per seed")
    if step_impl_for(config) != "xla":
        raise ValueError("--seeds runs the xla step (the fused kernel trains one model at a time)")
    if config.devices > 1 or jax.process_count() > 1:
        raise ValueError("--seeds runs on one device (the seeds share it); drop --devices or run the seeds separately")
    workdir = Path(workdir)
    images, labels, _ = training_split(configs[0], dataset)
    steps = len(labels) // config.batch_size
    mesh = data_mesh(1)
    template = create_state(configs[0], steps)  # one optimiser and model for all: only the seed differs
    model = make_model(configs[0])
    fresh = [template.replace(params=(p := init_params(model, jax.random.fold_in(jax.random.key(c.seed), 0))),
                              opt_state=template.tx.init(p)) for c in configs]
    folders = [workdir / SEED_FOLDER.format(s) for s in seeds]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    say = log if is_primary() else (lambda m: None)
    with contextlib.ExitStack() as held:
        for f in folders:
            held.enter_context(exclusive(f))
        managers = [held.enter_context(contextlib.closing(ckpt.manager(f / CHECKPOINTS))) for f in folders]
        starts = [start_or_resume(c, t, steps, m, resume, f, say) for c, t, m, f in zip(configs, fresh, managers, folders)]
        positions = {s[2] for s in starts}
        if len(positions) != 1:
            where = ", ".join(f"seed {c.seed}: {s[2].describe()}" for c, s in zip(configs, starts))
            raise CheckpointError(f"{workdir}: the seeds stand at different positions ({where}); resume them one by one")
        shared = dict(images=jax.device_put(pad_images(images)), labels=jax.device_put(labels), validation=None,
                      test=(jax.device_put(dataset.test_images), jax.device_put(dataset.test_labels)),
                      mesh=mesh, steps=steps, chunk_len=math.ceil(steps / min(config.chunks, steps)), say=say,
                      progress=progress and is_primary(), stop=stop, infer_fn=make_model(configs[0], inference=True).apply, chunk=None)
        runs = [Run(config=c, workdir=f, mngr=m, **shared) for c, f, m in zip(configs, folders, managers)]
        for run, (_, history, _, _) in zip(runs, starts):
            atomic_write_text(run.workdir / CONFIG, json.dumps(run.config.to_dict(), indent=2) + "\n")
            write_metrics(run.workdir, history, say)
        return _train(runs, stack([s[0] for s in starts]), [s[1] for s in starts], starts[0][2], [s[3] for s in starts])


def _train(runs: list[Run], state: TrainState, histories: list[list[dict[str, Any]]], start: Position,
           totals: list[dict[str, float]]) -> list[RunResult]:
    head, config = runs[0], runs[0].config
    seeds = [r.config.seed for r in runs]
    head.say(describe_run(config, unstack(state, 0), head.steps * config.batch_size, head.mesh) + f"; seeds {','.join(map(str, seeds))}")
    position = start
    first = start.epoch + 1 if start.complete else start.epoch
    for epoch in range(first, config.epochs + 1):
        resumed = epoch == start.epoch
        state, totals, done = _train_epoch(runs, state, epoch, start.update if resumed else 0,
                                           totals if resumed else [zero_totals() for _ in runs])
        position = Position(epoch, done, head.steps)
        if not position.complete:
            for r, run in enumerate(runs):
                save_position(run, unstack(state, r), histories[r], position, {"totals": totals[r]})
            head.say(f"stopped in epoch {epoch} after {done:,} of {head.steps:,} updates; checkpoints in {head.workdir.parent}/seed-*")
            return [RunResult(unstack(state, r), histories[r], run.workdir, position, config.epochs) for r, run in enumerate(runs)]
        rows = [evaluate_epoch(run, unstack(state, r), epoch, totals[r]) for r, run in enumerate(runs)]
        for r, run in enumerate(runs):
            histories[r] = histories[r] + [rows[r]]
            save_position(run, unstack(state, r), histories[r], position, {"metrics": rows[r]})
            if is_primary():
                append_metrics(run.workdir, rows[r], run.say)
        errors = [row["test_error"] for row in rows]
        head.say(f"epoch {epoch:3d}  test " + "  ".join(f"{e:.2%}" for e in errors) + f"  (mean {statistics.mean(errors):.2%})  {rows[0]['seconds']:.1f}s")
        if epoch < config.epochs and head.stop():
            head.say(f"stopped after epoch {epoch}; checkpoints in {head.workdir.parent}/seed-*")
            break
    return [RunResult(unstack(state, r), histories[r], run.workdir, position, config.epochs) for r, run in enumerate(runs)]


def _refresh(runs: list[Run], state: TrainState, epoch: int) -> TrainState:
    config, n = runs[0].config, runs[0].labels.shape[0]
    samples = [curvature_sample(run.config, epoch, n) for run in runs]
    picks, keys = jnp.stack([p for p, _ in samples]), jnp.stack([k for _, k in samples])
    h = replicated_hessian(state.params, runs[0].images, runs[0].labels, picks, keys, config.hessian_estimator,
                           curvature_model(config), config.objective, config.hutchinson_probes)
    return state.replace(opt_state=set_hessian(state.opt_state, h))


def _train_epoch(runs: list[Run], state: TrainState, epoch: int, first: int,
                 totals: list[dict[str, float]]) -> tuple[TrainState, list[dict[str, float]], int]:
    head, config = runs[0], runs[0].config
    t0 = time.perf_counter()
    if first == 0 and uses_curvature(state.opt_state):
        state = _refresh(runs, state, epoch)
    n, bs = head.labels.shape[0], config.batch_size
    batches = jnp.stack([epoch_batches(run.config.seed, epoch, n, bs) for run in runs])
    keys = jnp.stack([step_keys(run.config.seed) for run in runs])
    bar = tqdm(total=head.steps * bs * len(runs), initial=first * bs * len(runs), desc=f"epoch {epoch}/{config.epochs}", unit="img",
               disable=not head.progress, leave=False)
    done = first
    try:
        for c in range(first, head.steps, head.chunk_len):
            chunk = batches[:, c : c + head.chunk_len]
            state, m = replicated_train_chunk(state, head.images, head.labels, chunk, keys, objective=config.objective, augment=config.distortion)
            m = wait(m)
            done = c + chunk.shape[1]
            bad = [run.config.seed for run, ok in zip(runs, m["finite"]) if not ok]
            if bad:
                raise FloatingPointError(f"the loss became NaN or infinite for seed(s) {','.join(map(str, bad))} in epoch {epoch}, "
                                         f"updates {c + 1}-{done} of {head.steps}; the last good checkpoints are in {head.workdir.parent}/seed-*")
            totals = [{"loss": t["loss"] + float(m["loss"][r]), "errors": t["errors"] + int(m["errors"][r]), "seconds": t["seconds"]}
                      for r, t in enumerate(totals)]
            bar.update(chunk.shape[1] * bs * len(runs))
            if done < head.steps and head.stop():
                break
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    return state, [dict(t, seconds=t["seconds"] + elapsed) for t in totals], done


def seeds_table(results: dict[int, float]) -> str:
    """Per-seed test errors, then their mean and sample standard deviation."""
    lines = ["seed  test error"] + [f"{s:>4d}  {e:.2%}" for s, e in results.items()]
    values = list(results.values())
    spread = f" ± {statistics.stdev(values):.2%}" if len(values) > 1 else ""
    lines.append(f"mean  {statistics.mean(values):.2%}{spread} over {len(values)} seed(s)")
    return "\n".join(lines)
