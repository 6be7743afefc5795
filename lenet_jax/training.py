"""The training loop: train one or more seeds of one configuration, each into a run folder
of its own, and resume them from wherever they stopped.

``fit`` trains one seed; ``fit_seeds`` trains several, all in one compiled program, each into ``WORKDIR/seed-S``. Both are the same ``_fit``: build what
the config describes (``build``), open the run folders (``runs.open``), loop.
The ``Experiment`` holds what the seeds share (the config, the data on the device, the
mesh, the ``updates.Strategy`` that computes their chunks of updates and curvature
refreshes), each ``SeedRun`` what is one seed's own (its ``runs.Run``, training
positions and validation set), ``Controls`` how the loop reports and is stopped.

The loop is thin: it runs the compiled chunk on each slice of the epoch's batches,
refreshes SDLM's curvature when an epoch starts (as ``--hessian-refresh`` says), evaluates
after the epoch (or has a helper process evaluate it while the next one trains:
``lenet_jax.alongside``), and saves. Where a seed stands is its update count
(``checkpoint.Position``); everything random is derived from the seed and that count, so
a run stopped anywhere resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lenet_jax import checkpoint as ckpt
from lenet_jax import cores, runs
from lenet_jax.alongside import Helper, HelperFailed, scores
from lenet_jax.checkpoint import CHECKPOINTS, SEED_FOLDER, Position
from lenet_jax.config import Config
from lenet_jax.data import Dataset, validation_split
from lenet_jax.errors import ConfigError, Diverged
from lenet_jax.factories import create_states, make_inference, make_model, resolve
from lenet_jax.fileio import RunFolder
from lenet_jax.inputs import pad_images
from lenet_jax.model import LeNet5, count_parameters
from lenet_jax.parallel import choose_devices, data_mesh, is_primary, put_replicated
from lenet_jax.runs import Run, Start, zero_totals
from lenet_jax.sdlm import uses_curvature
from lenet_jax.updates import Strategy, epoch_batches, update_key

CHANCE_ERROR = 0.85
"""A test error at or above this after an epoch of at least ``CHANCE_UPDATES`` updates
means the network answers at chance (90% for ten classes)."""
CHANCE_UPDATES = 1000
COLLAPSED = 0.5
"""A network that gives one answer to this share of the test digits or more has
collapsed (saturated units answer the same whatever the input); a learning one gives
each class about a tenth."""


@dataclass
class RunResult:
    """The state a seed ended with, its per-epoch history, its folder, where it stands
    and how many epochs it was asked for (``finished`` unless a stop request ended it)."""

    state: TrainState
    history: list[dict[str, Any]]
    workdir: Path
    position: Position
    epochs: int

    @property
    def finished(self) -> bool:
        return self.position.complete and self.position.epoch >= self.epochs


@dataclass(frozen=True)
class Experiment:
    """What the seeds trained together share: the config (the first seed's), its
    model, the training and test data on the device, the mesh, the strategy and the
    chunking of an epoch."""

    config: Config
    model: LeNet5
    images: jax.Array
    labels: jax.Array
    test: tuple[jax.Array, jax.Array]
    mesh: Mesh
    strategy: Strategy
    updates_per_epoch: int
    chunk_len: int
    infer_fn: Callable = field(repr=False)


@dataclass(frozen=True)
class Controls:
    """How the loop reports (``say``, a progress bar) and is stopped (``stop`` is asked
    after every compiled chunk)."""

    say: Callable[[str], None]
    progress: bool
    stop: Callable[[], bool]
    pause_after: int | None = None
    """Save and return once this epoch is complete (another process trains the rest)."""


@dataclass(frozen=True)
class SeedRun:
    """What is one seed's own in an experiment: its config (its seed), its run folder
    (``runs.Run``), the positions of its training images in the training set (None: all
    of them, in order) and its validation set."""

    config: Config
    run: Run
    train_index: jax.Array | None
    validation: tuple[jax.Array, jax.Array] | None

    @property
    def workdir(self) -> Path:
        return self.run.path


def training_positions(config: Config, n: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """How many images ``config`` trains on, in a training set of ``n``; their positions
    (None when they are simply the first ones, no validation split taking any out); and
    the positions of its validation images (None without a validation split)."""
    kept, held = (None, None) if not config.validation_size else validation_split(n, config.validation_size, config.seed)
    available = n if kept is None else len(kept)
    size = available if config.train_subset is None else config.train_subset
    if size > available:
        raise ConfigError(f"--train-subset {config.train_subset} is larger than the {available:,} training images")
    if config.batch_size > size:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {size} training images")
    return size, None if kept is None else kept[:size], held


def fit(
    config: Config,
    dataset: Dataset,
    workdir: Path | str | RunFolder,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
    alongside: bool = False,
    pause_after: int | None = None,
) -> RunResult:
    """Train ``config`` on ``dataset``: checkpoints, the metrics log and the config go to
    ``workdir`` (written by process 0 when there are several; a ``RunFolder`` the caller
    already holds is used as it is). Only one process may train in a folder at a time.

    ``stop`` is asked after every compiled chunk; when it says yes the run saves where it
    is (mid-epoch included) and returns, and ``resume=True`` later continues it with
    bit-identical results. ``alongside``: evaluate each epoch in a helper process while
    the next one trains (``lenet_jax.alongside``; for a process whose XLA pool has one
    thread, as ``train.py`` starts it at batch 1 on the CPU: the helper's is the same).
    ``pause_after``: return, unfinished, once an epoch at or past that one is complete
    and saved (at once when the run already stands at the end of one), for another
    process to resume the rest (``lenet_jax.spread``)."""
    return _fit(config, [config.seed], dataset, workdir, resume, log, progress, stop, several=False, alongside=alongside,
                pause_after=pause_after)[0]


# --------------------------------------------------------------------------- the memory of several seeds

PATTERN_WORK = 9
"""Working memory per pattern, in units of the bytes of one pattern's activations (its
input and every stage's output: 36 KB for the paper's network): what a training batch
keeps for its gradient, and what the paper's curvature estimate keeps for each of its
patterns (it takes them all at once). Measured with ``memory_analysis()`` of the
compiled programs on the CPU: 260 KB a pattern with custom_vjp convolutions, 285-290 KB
with patches, 86-98 KB with xla; 9 x 36 KB = 328 KB covers them."""
JACOBIAN_WORK, PROBE_WORK, ESTIMATE_BATCH = 2.5, 6.0, 16
"""The gauss_newton and hutchinson estimates take ``ESTIMATE_BATCH`` patterns at a time,
each keeping one parameter-sized vector per row of its output curvature (measured: 1 to
1.8 of them a row) or about 4.4 per probe (measured), and one per pattern of the sample."""
MEMORY_SHARE = 0.8
"""The share of the available memory a training of several seeds plans to fill."""


def available_memory(device: Any = None) -> int | None:
    """Bytes free on ``device`` (the first local one): its allocator's limit less what it
    holds, where the backend says (GPUs, TPUs); else, for the CPU, the host's available
    memory (MemAvailable of /proc/meminfo, or the physical memory). None when unknown."""
    import os

    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # a backend without the query
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def seed_memory(config: Config, n_train: int) -> tuple[int, int]:
    """An estimate, from shapes alone (nothing compiled), of the bytes a run of several
    seeds of ``config`` (on a training set of ``n_train``) needs for each seed, and for
    what the seeds share. Each seed: its state (parameters and optimiser state) three times
    (its own, the stacked copy, the update's), then the larger of its training batch's
    working memory with its gradient and update, and its curvature estimate's (SDLM; it
    grows with --hessian-samples). Shared: the data on the device and one evaluation batch."""
    import jax.numpy as jnp

    from lenet_jax.factories import make_optimizer
    from lenet_jax.model import init_params

    def nbytes(tree: Any) -> int:
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    model = make_model(config)
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    state = nbytes(params) + nbytes(jax.eval_shape(make_optimizer(config, 1).init, params))
    x = jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32)
    outputs, activations = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="trace"), params, x)
    pattern = PATTERN_WORK * (nbytes(x) + nbytes(activations) + nbytes(outputs))
    work = 2 * nbytes(params) + config.batch_size * pattern
    if config.optimizer == "sdlm":
        samples = min(config.hessian_samples, training_positions(config, n_train)[0])
        if config.hessian_estimator == "paper":
            work = max(work, samples * pattern)
        else:
            one = jax.ShapeDtypeStruct(outputs.shape[1:], outputs.dtype)
            rows = jax.eval_shape(config.objective.curvature_factor, one, jax.ShapeDtypeStruct((), jnp.int32)).shape[0]
            per = rows * JACOBIAN_WORK if config.hessian_estimator == "gauss_newton" else config.hutchinson_probes * PROBE_WORK
            work = max(work, (samples + min(ESTIMATE_BATCH, samples) * per) * nbytes(params))
    shared = n_train * (32 * 32 + 4) + 10_000 * (28 * 28 + 4) + config.eval_batch_size * pattern
    return 3 * state + int(work), shared


def one_seed_too_large(needed: int, available: int) -> ConfigError:
    """The error of a run of seeds of which not even one fits in memory."""
    return ConfigError(f"--seeds: one seed needs about {needed / 1e9:.3g} GB, more than the {available / 1e9:.3g} GB "
                       "available (fewer --hessian-samples, or a smaller --batch-size, need less)")


def seed_groups(config: Config, seeds: list[int], n_train: int, available: int | None = None) -> list[list[int]]:
    """``seeds`` in consecutive groups of about equal size, each small enough for its
    estimated memory (``seed_memory``) to fit in ``MEMORY_SHARE`` of the ``available``
    bytes (default ``available_memory()``): one group when all fit, or when the memory
    is unknown. ConfigError when not even one seed fits in all of it."""
    available = available_memory() if available is None else available
    if available is None or len(seeds) < 2:
        return [list(seeds)]
    each, shared = seed_memory(config, n_train)
    fit = int((MEMORY_SHARE * available - shared) // each)
    if fit >= len(seeds):
        return [list(seeds)]
    if each + shared > available:
        raise one_seed_too_large(each + shared, available)
    count = math.ceil(len(seeds) / max(fit, 1))
    size = math.ceil(len(seeds) / count)
    return [list(seeds[i : i + size]) for i in range(0, len(seeds), size)]


def fit_seeds(
    config: Config,
    seeds: list[int],
    dataset: Dataset,
    workdir: Path | str | RunFolder,
    resume: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    stop: Callable[[], bool] = lambda: False,
) -> list[RunResult]:
    """Train ``config`` once per seed, all seeds in one compiled program, each into
    ``workdir/seed-S``; returns each seed's result. A stop request saves every seed where
    it is; ``resume=True`` continues all of the run's seeds (``seeds`` must be exactly
    the run's).

    Seeds whose estimated memory (``seed_groups``) exceeds the device's are trained in
    groups, one after the other, each group one compiled program computing what it would
    alone. A stop request (or a failure) leaves the seeds of the groups not yet trained
    out of the results, with an empty folder each, which ``resume=True`` trains."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {','.join(map(str, seeds))}: give distinct seeds")
    if config.devices > 1 or jax.process_count() > 1:
        raise ConfigError("--seeds runs on one device (the seeds share it); drop --devices or run the seeds separately")
    available = available_memory()
    groups = seed_groups(config.validate(), seeds, len(dataset.train_labels), available)
    if len(groups) == 1:
        return _fit(config, seeds, dataset, workdir, resume, log, progress, stop, several=True)
    each, _ = seed_memory(config, len(dataset.train_labels))
    log(f"{len(seeds):,} seeds need about {len(seeds) * each / 1e9:.3g} GB ({each / 1e6:.3g} MB each), more than the "
        f"{available / 1e9:.3g} GB available: training them in {len(groups)} groups of up to {len(groups[0]):,}, one after the other")
    root = workdir.path if isinstance(workdir, RunFolder) else Path(workdir)
    results: list[RunResult] = []
    try:
        for group in groups:
            if results and (stop() or not all(r.finished for r in results)):
                break
            results += _fit(config, group, dataset, workdir, resume, log, progress, stop, several=True, layout=seeds)
    finally:
        if len(results) < len(seeds) and is_primary() and ckpt.holds_checkpoints(root):
            for seed in seeds[len(results):]:  # an empty folder each: --resume trains them
                with contextlib.suppress(OSError):
                    (root / SEED_FOLDER.format(seed)).mkdir(exist_ok=True)
    return results


class Built(NamedTuple):
    """What a training builds of its config: the config resolved (``resolve``), one config
    per seed, the model and its inference function, a fresh state per seed, the mesh and
    the strategy that computes the updates."""

    config: Config
    configs: list[Config]
    model: LeNet5
    infer_fn: Callable[..., Any]
    states: list[TrainState]
    mesh: Mesh
    strategy: Strategy


def build(config: Config, seeds: list[int], updates_per_epoch: int, one_device: bool = False) -> Built:
    """Everything a training of ``config`` for ``seeds`` builds, from the config resolved
    once: on one device (``one_device``: seeds trained together share it) or on the
    devices ``config.devices`` asks for."""
    config = resolve(config.validate())
    configs = [config.replace(seed=s).validate() for s in seeds]
    mesh = data_mesh(1 if one_device else choose_devices(config.batch_size, config.devices))
    strategy = Strategy.build(config, len(seeds), updates_per_epoch, mesh)
    states = create_states(config, updates_per_epoch, seeds)
    return Built(config, configs, make_model(config), make_inference(config), states, mesh, strategy)


def _fit(config: Config, seeds: list[int], dataset: Dataset, workdir: Path | str | RunFolder, resume: bool,
         log: Callable[[str], None], progress: bool, stop: Callable[[], bool], several: bool,
         layout: list[int] | None = None, alongside: bool = False, pause_after: int | None = None) -> list[RunResult]:
    """Build, open, loop (``layout``: all of the run's seeds, when they train in groups)."""
    config = config.validate()
    positions = [training_positions(config.replace(seed=s), len(dataset.train_labels)) for s in seeds]
    updates = positions[0][0] // config.batch_size
    built = build(config, seeds, updates, one_device=several)
    say = log if is_primary() else (lambda message: None)
    with runs.open(workdir, built.configs, built.states, updates, resume, several, dataset.source, say, layout) as (opened, starts):
        experiment, seed_runs = _place(built, dataset, positions, opened, updates)
        return _train(experiment, seed_runs, starts, Controls(say, progress and is_primary(), stop, pause_after), alongside)


def _place(built: Built, dataset: Dataset, positions: list[tuple[int, np.ndarray | None, np.ndarray | None]], opened: list[Run],
           updates: int) -> tuple[Experiment, list[SeedRun]]:
    """The data on the devices of the mesh: the training images (the first ``size`` ones
    alone when no seed takes others), the test set, each seed's positions of its
    training images and its validation set."""
    device = lambda x: put_replicated(x, built.mesh)  # noqa: E731
    seed_runs = [
        SeedRun(config=run.config, run=run, train_index=None if kept is None else device(kept.astype(np.int32)),
                validation=None if held_out is None else (device(dataset.train_images[held_out]), device(dataset.train_labels[held_out])))
        for run, (_, kept, held_out) in zip(opened, positions)
    ]
    size, first = positions[0][0], positions[0][1] is None
    shown = slice(0, size) if first else slice(None)
    config = built.config
    experiment = Experiment(
        config=config, model=built.model, images=device(pad_images(dataset.train_images[shown])), labels=device(dataset.train_labels[shown]),
        test=(device(dataset.test_images), device(dataset.test_labels)), mesh=built.mesh, strategy=built.strategy,
        updates_per_epoch=updates, chunk_len=math.ceil(updates / min(config.chunks, updates)), infer_fn=built.infer_fn,
    )
    return experiment, seed_runs


# --------------------------------------------------------------------------- the loop


def _pauses(ctl: Controls, position: Position, epochs: int) -> bool:
    """Whether the run pauses here: a complete epoch at or past ``ctl.pause_after``,
    before its last one."""
    return ctl.pause_after is not None and position.complete and ctl.pause_after <= position.epoch < epochs


PAUSED = "paused after epoch {}: the rest of this seed trains in another process"


def _train(exp: Experiment, seed_runs: list[SeedRun], starts: list[Start], ctl: Controls, alongside: bool = False) -> list[RunResult]:
    """The epochs from where the seeds stand to the last, each saved when it completes;
    a stop request saves every seed where it is and returns. With ``alongside`` (one
    seed, epochs of at least ``ALONGSIDE_MIN_UPDATES`` updates in more than one chunk,
    another epoch still to train) each epoch is evaluated by a helper process while the
    next one trains (``lenet_jax.alongside``), and saved at the first chunk's end after
    its scores are back (with one chunk an epoch, that would be a whole epoch later)."""
    config, s = exp.config, exp.strategy
    state = put_replicated(s.stack([start.state for start in starts]), exp.mesh)  # placed as the data is: one compiled program
    histories = [start.history for start in starts]
    start = starts[0].position
    seeds = f"; seeds {','.join(str(m.config.seed) for m in seed_runs)}" if len(seed_runs) > 1 else ""
    ctl.say(describe_run(config, starts[0].state, exp.updates_per_epoch * config.batch_size, exp.mesh, exp.model) + seeds)

    def results(position: Position) -> list[RunResult]:
        return [RunResult(s.unstack(state, r), histories[r], m.workdir, position, config.epochs) for r, m in enumerate(seed_runs)]

    if starts[0].pending:
        if _end_epoch(exp, ctl, seed_runs, state, histories, start, [st.totals for st in starts], saved=True):
            return results(start)
    if _pauses(ctl, start, config.epochs):
        ctl.say(PAUSED.format(start.epoch))
        return results(start)
    first = start.epoch + 1 if start.complete else start.epoch
    spare = _spare_cores(config) if alongside and len(seed_runs) == 1 and first < config.epochs else set()
    wanted = bool(spare) and exp.updates_per_epoch >= ALONGSIDE_MIN_UPDATES and exp.chunk_len < exp.updates_per_epoch
    helper: Helper | None = None
    pending: tuple[Position, list[dict[str, float]], TrainState] | None = None

    def settle(wait: bool) -> None:
        """End the epoch the helper evaluates, once its scores are back (``wait``: now).
        The helper starts at the first call, after a chunk: while the run compiles, its
        start would slow the compiling down."""
        nonlocal pending, helper, wanted
        if wanted and not wait:  # a helper is worth starting only while the run goes on
            with tqdm.external_write_mode():  # what it says goes above the progress bar
                wanted, helper = False, _start_helper(exp, seed_runs, ctl, spare)
        if pending is None or not (wait or helper is None or helper.ready()):
            return
        (position, totals, kept), pending = pending, None
        scored = None
        with tqdm.external_write_mode():
            if helper is not None:
                try:
                    scored = helper.result()
                except HelperFailed as e:
                    helper = _give_up(helper, e, ctl)
            _end_epoch(exp, ctl, seed_runs, kept, histories, position, totals, saved=False, scored=scored)

    position = start
    try:
        for epoch in range(first, config.epochs + 1):
            resumed = epoch == start.epoch
            totals = [st.totals for st in starts] if resumed else [zero_totals() for _ in seed_runs]
            state, totals, done = _train_epoch(exp, ctl, seed_runs, state, epoch, start.update if resumed else 0, totals, settle)
            settle(wait=True)
            position = Position(epoch, done, exp.updates_per_epoch)
            if not position.complete:
                _save_all(exp, seed_runs, state, histories, position, [{"totals": t} for t in totals])
                ctl.say(f"stopped in epoch {epoch} after {done:,} of {exp.updates_per_epoch:,} updates; {_where(seed_runs)}")
                return results(position)
            if helper is not None and epoch < config.epochs:
                try:
                    helper.submit(jax.device_get(state.params))
                    pending = (position, totals, jax.tree.map(jnp.copy, state))  # the next chunk updates the state in place
                except HelperFailed as e:
                    helper = _give_up(helper, e, ctl)
            if pending is None and _end_epoch(exp, ctl, seed_runs, state, histories, position, totals, saved=False):
                return results(position)
            if epoch < config.epochs and ctl.stop():
                settle(wait=True)
                ctl.say(f"stopped after epoch {epoch}; {_where(seed_runs)}")
                return results(position)
            if _pauses(ctl, position, config.epochs):
                settle(wait=True)
                ctl.say(PAUSED.format(epoch))
                return results(position)
        return results(position)
    finally:
        if helper is not None:
            helper.close()


ALONGSIDE_MIN_UPDATES = 10_000
"""The shortest epoch whose evaluation a helper process takes over: starting one costs a
few seconds of the other core, and an evaluation alongside saves 0.55-0.6 s an epoch."""


def _spare_cores(config: Config) -> set[int]:
    """The cores a run's training leaves to a helper: those other than the one its
    chunks are pinned to (``cores.batch1_core``), or none when they are not pinned."""
    core = cores.batch1_core(jax.default_backend(), config.batch_size, 1)
    return set() if core is None else os.sched_getaffinity(0) - {core}


def _start_helper(exp: Experiment, seed_runs: list[SeedRun], ctl: Controls, spare: set[int]) -> Helper | None:
    validation = seed_runs[0].validation
    try:
        helper = Helper.start(exp.config, jax.device_get(exp.test), None if validation is None else jax.device_get(validation), spare)
    except HelperFailed as e:
        ctl.say(f"warning: {e}; the epochs are evaluated in this process")
        return None
    ctl.say("evaluation: each epoch's in a second process, alongside the next epoch's training (lenet_jax.alongside)")
    return helper


def _give_up(helper: Helper, error: HelperFailed, ctl: Controls) -> None:
    helper.close()
    ctl.say(f"warning: {error}; the epochs are evaluated in this process from now on (the same numbers)")
    return None


def _where(seed_runs: list[SeedRun]) -> str:
    if len(seed_runs) == 1:
        return f"checkpoint in {seed_runs[0].workdir / CHECKPOINTS}"
    return f"checkpoints in {seed_runs[0].workdir.parent}/seed-*"


def describe_run(config: Config, state: TrainState, images: int, mesh: Mesh, model: LeNet5 | None = None) -> str:
    """The run's first line: the model (``config``'s, unless given), the optimiser, the
    data and how it executes."""
    parameters = count_parameters(state.params, (model or make_model(config)).c3_table)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (
        f"training LeNet-5 ({config.head} head, {config.loss} loss, {parameters:,} parameters) "
        f"with {config.optimizer} on {images:,} {config.dataset} images, batch {config.batch_size}, {config.epochs} epochs, "
        f"on {mesh.size} {jax.devices()[0].platform} device(s){processes}; "
        f"precision {config.precision}, convolutions {config.conv_impl}, updates {config.update_impl}"
    )


def wait(tree: Any) -> Any:
    """``tree`` on the host once computed; the wait sleeps in Python, so a signal handler
    runs (and a second signal can end the process) while a compiled chunk is running."""
    while not all(leaf.is_ready() for leaf in jax.tree.leaves(tree)):
        time.sleep(0.002)
    return jax.device_get(tree)


def _train_epoch(exp: Experiment, ctl: Controls, seed_runs: list[SeedRun], state: TrainState, epoch: int, first: int,
                 totals: list[dict[str, float]], settle: Callable[[bool], None] = lambda wait: None
                 ) -> tuple[TrainState, list[dict[str, float]], int]:
    """Updates ``first``.. of ``epoch`` for every seed, chunk by chunk (the curvature
    refreshed first when the epoch starts, and within it where ``--hessian-refresh-first-epoch``
    asks, a chunk ending at each such update); returns the state, each seed's running sums
    and how many updates of the epoch are done (fewer than all when a stop request came).
    ``settle`` is called after every chunk, to end the previous epoch once its
    evaluation alongside is back, and with ``wait`` before a divergence is reported."""
    s, config, updates = exp.strategy, exp.config, exp.updates_per_epoch
    t0, settling = time.perf_counter(), 0.0

    def settled(wait: bool) -> None:  # the other epoch's ending is not this epoch's time
        nonlocal settling
        t = time.perf_counter()
        settle(wait)
        settling += time.perf_counter() - t

    if first == 0 and uses_curvature(state.opt_state) and config.refreshes_curvature(epoch):
        state = s.refresh(state, exp.images, exp.labels, [m.config for m in seed_runs], [m.train_index for m in seed_runs], epoch)
    n = exp.labels.shape[0] if seed_runs[0].train_index is None else seed_runs[0].train_index.shape[0]
    batches = [epoch_batches(m.config.seed, epoch, n, config.batch_size, config.shuffle) for m in seed_runs]
    batches = [b if m.train_index is None else m.train_index[b] for b, m in zip(batches, seed_runs)]
    keys = s.stack([update_key(m.config.seed) for m in seed_runs])
    bs, r = config.batch_size, len(seed_runs)
    bar = tqdm(total=updates * bs * r, initial=first * bs * r, desc=f"epoch {epoch}/{config.epochs}", unit="img", disable=not ctl.progress, leave=False)
    done = first
    core = cores.batch1_core(jax.default_backend(), bs, r)  # a pool of several threads: faster on one core (lenet_jax.cores)
    with cores.pinned(core):
        try:
            within = config.refreshes_within(epoch, updates) if uses_curvature(state.opt_state) else []
            starts = sorted({*range(first, updates, exp.chunk_len), *(u for u in within if u > first)})
            for c, end in zip(starts, [*starts[1:], updates]):
                if c in within:  # a refresh in the epoch: a stop never comes between it and its chunk
                    state = s.refresh(state, exp.images, exp.labels, [m.config for m in seed_runs], [m.train_index for m in seed_runs], epoch, c)
                chunk = s.stack([b[c:end] for b in batches])
                state, m = s.chunk(state, exp.images, exp.labels, chunk, keys)
                m = wait(m)
                done = end
                finite = s.per_seed(m["finite"])
                if not finite.all():
                    settled(True)  # the previous epoch saved first: the message names the last good checkpoint
                    raise Diverged(_divergence(seed_runs, finite, epoch, c, done, updates))
                losses, errors = s.per_seed(m["loss"]), s.per_seed(m["errors"])
                totals = [{"loss": t["loss"] + float(losses[i]), "errors": t["errors"] + int(errors[i]), "seconds": t["seconds"]}
                          for i, t in enumerate(totals)]
                bar.update((done - c) * bs * r)
                settled(False)
                if done < updates and ctl.stop():
                    break
        finally:
            bar.close()
    elapsed = time.perf_counter() - t0 - settling
    return state, [dict(t, seconds=t["seconds"] + elapsed) for t in totals], done


def _divergence(seed_runs: list[SeedRun], finite: np.ndarray, epoch: int, c: int, done: int, updates: int) -> str:
    """The one line of a run whose loss or parameters stopped being finite: where, and
    the last good checkpoint."""
    bad = [m for m, ok in zip(seed_runs, finite) if not ok]
    who = "" if len(seed_runs) == 1 else f" for seed(s) {','.join(str(m.config.seed) for m in bad)}"
    last = bad[0].run.newest_count()
    if len(seed_runs) == 1:
        where = f"{Position.at_count(last, updates).describe()} in {seed_runs[0].workdir / CHECKPOINTS}" if last is not None else "none"
        good = f"the last good checkpoint is {where}"
    else:
        good = f"the last good checkpoints are in {seed_runs[0].workdir.parent}/seed-*" if last is not None else "no checkpoint was saved"
    return f"the loss or the parameters became NaN or infinite{who} in epoch {epoch}, updates {c + 1}-{done} of {updates}; {good}"


def _end_epoch(exp: Experiment, ctl: Controls, seed_runs: list[SeedRun], state: TrainState, histories: list[list[dict[str, Any]]],
               position: Position, totals: list[dict[str, float]], saved: bool, scored: dict[str, Any] | None = None) -> bool:
    """Evaluate every seed after a completed epoch, save it with its row, log the rows
    and check that no seed answers at chance (``scored``: the one seed's evaluation,
    computed by the helper). A stop request between two seeds' evaluations saves the
    seeds with the evaluation still to do (unless ``saved``: they already are) and
    returns True."""
    s, epoch = exp.strategy, position.epoch
    rows, chance = [], []
    for r, m in enumerate(seed_runs):
        if r > 0 and ctl.stop():  # each seed's test set takes a while: many seeds must not delay a stop
            if not saved:
                _save_all(exp, seed_runs, state, histories, position, [{"totals": t} for t in totals])
            ctl.say(f"stopped at the end of epoch {epoch}, before its evaluation; {_where(seed_runs)}")
            return True
        row, at_chance = evaluate_epoch(exp, m, s.unstack(state, r), epoch, totals[r], scored)
        rows.append(row)
        chance.append(at_chance)
    for r, row in enumerate(rows):
        histories[r] = histories[r] + [row]
    if not saved:
        _save_all(exp, seed_runs, state, histories, position, [{"metrics": row} for row in rows])
    for m, row in zip(seed_runs, rows):
        m.run.log(row)
    if len(seed_runs) == 1:
        row = rows[0]
        val = f"  val {row['val_error']:.2%}" if "val_error" in row else ""
        ctl.say(f"epoch {epoch:3d}  loss {row['train_loss']:.4f}  train {row['train_error']:.2%}{val}"
                f"  test {row['test_error']:.2%}  {row['seconds']:.1f}s")
    else:
        errors = [row["test_error"] for row in rows]
        ctl.say(f"epoch {epoch:3d}  test " + "  ".join(f"{e:.2%}" for e in errors) + f"  (mean {mean_and_spread(errors)[0]:.2%})  {rows[0]['seconds']:.1f}s")
    if any(chance):
        who = "" if len(seed_runs) == 1 else f" (seed(s) {','.join(str(m.config.seed) for m, c in zip(seed_runs, chance) if c)})"
        line = (f"epoch {epoch}: the network answers at chance{who}: its units have likely saturated "
                "(a learning rate too large for the initialisation, or a mu too small)")
        if exp.config.stop_at_chance:
            raise Diverged(f"{line}; stopped (the checkpoint of epoch {epoch} is kept; --no-stop-at-chance goes on)")
        ctl.say(f"warning: {line}")
    return False


def evaluate_epoch(exp: Experiment, seed_run: SeedRun, state: TrainState, epoch: int, totals: dict[str, float],
                   scored: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
    """The history row of a completed epoch (its running training loss and error, its
    seconds, the test and validation loss and error after it: ``scored`` when they were
    computed elsewhere, ``alongside.scores``), and whether the network answers at chance:
    one answer for every test digit, or, after an epoch of at least ``CHANCE_UPDATES``
    updates, one answer for at least half of them (``COLLAPSED``) or a test error of at
    least ``CHANCE_ERROR``."""
    seen = exp.updates_per_epoch * exp.config.batch_size
    row: dict[str, Any] = {"epoch": epoch, "train_loss": totals["loss"] / seen, "train_error": totals["errors"] / seen, "seconds": totals["seconds"]}
    if scored is None:
        scored = scores(jax.device_get(state.params), exp.infer_fn, exp.test, seed_run.validation, exp.config.objective,
                        exp.config.eval_batch_size)
    if scored["validation"] is not None:
        row.update(val_loss=scored["validation"]["loss"], val_error=scored["validation"]["error"])
    t = scored["test"]
    row.update(test_loss=t["loss"], test_error=t["error"])
    shares = np.bincount(t["predictions"]) / len(t["predictions"])
    trained = exp.updates_per_epoch >= CHANCE_UPDATES  # after fewer updates a network may simply not have learned yet
    at_chance = shares.max() == 1.0 or (trained and (shares.max() >= COLLAPSED or t["error"] >= CHANCE_ERROR))
    return row, at_chance


def _save_all(exp: Experiment, seed_runs: list[SeedRun], state: TrainState, histories: list[list[dict[str, Any]]], position: Position,
              extras: list[dict[str, Any]]) -> None:
    """Save every seed at ``position``, then prune each: a run stopped while it saves
    keeps every checkpoint the saved seeds had before."""
    for r, m in enumerate(seed_runs):
        m.run.save(position, exp.strategy.unstack(state, r), histories[r], **extras[r])
    for m in seed_runs:
        m.run.prune()


# --------------------------------------------------------------------------- several seeds' results


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """The mean of per-seed ``values`` and their sample standard deviation (0 for one)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seeds_table(results: dict[int, float]) -> str:
    """Per-seed test errors, then their mean and sample standard deviation."""
    lines = ["seed  test error"] + [f"{s:>4d}  {e:.2%}" for s, e in results.items()]
    values = list(results.values())
    mean, spread = mean_and_spread(values)
    lines.append(f"mean  {mean:.2%}" + (f" ± {spread:.2%}" if len(values) > 1 else "") + f" over {len(values)} seed(s)")
    return "\n".join(lines)

