"""The compiled updates: pure functions of the state and the data, which lives on the device.

An epoch is a few calls of ``train_chunk``, a jitted ``lax.scan`` of ``train_update`` over
index batches into the device-resident dataset, so nothing runs in Python per update:
batch size 1 (the paper's pure stochastic updates) costs what its arithmetic costs.

A ``Strategy`` says how the chunks of updates and the curvature refreshes of the seeds
trained together are computed: one seed runs the compiled chunk as it is (the XLA scan,
or the fused Pallas kernel), several run its ``jax.vmap`` over a leading seed axis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax.training.train_state import TrainState
from jax.sharding import Mesh

from lenet_jax import hessian
from lenet_jax.config import Config
from lenet_jax.distort import Distortion, distort_batch
from lenet_jax.errors import ConfigError
from lenet_jax.factories import make_model, make_schedule, update_impl_for
from lenet_jax.finite import all_finite
from lenet_jax.inputs import preprocess
from lenet_jax.losses import Objective
from lenet_jax.model import LeNet5
from lenet_jax.parallel import split_batch
from lenet_jax.sdlm import set_hessian

Metrics = dict[str, jax.Array]

PURPOSE_ORDER, PURPOSE_CURVATURE, PURPOSE_UPDATES = 0, 1, 2
"""What each stream of randomness derived from a run's seed is for."""


def epoch_key(seed: int, epoch: int, purpose: int) -> jax.Array:
    """Stateless per-epoch randomness: a run is reproducible and resumable from its seed."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), epoch), purpose)


def update_key(seed: int) -> jax.Array:
    """The key every update's own randomness (dropout, distortions) is folded from, with
    the update count."""
    return jax.random.fold_in(jax.random.key(seed), PURPOSE_UPDATES)


def epoch_batches(seed: int, epoch: int, n: int, batch_size: int, shuffle: bool = True) -> jax.Array:
    """The epoch's batches of positions 0..n-1, (n // batch_size, batch_size), shuffled
    from the seed and the epoch (or, without ``shuffle``, in order); a remainder smaller
    than a batch is left out of that epoch (a different one each epoch when shuffled)."""
    perm = jax.random.permutation(epoch_key(seed, epoch, PURPOSE_ORDER), n) if shuffle else jnp.arange(n)
    updates = n // batch_size
    return perm[: updates * batch_size].reshape(updates, batch_size)


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


def train_update(
    state: TrainState, x: jax.Array, y: jax.Array, objective: Objective, key: jax.Array | None = None
) -> tuple[TrainState, Metrics]:
    """One update on a preprocessed batch; ``key`` drives dropout."""
    (loss, errors), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.apply_fn, objective, x, y, key)
    state = state.apply_gradients(grads=grads)
    return state, {"loss": loss * y.shape[0], "errors": errors, "finite": jnp.isfinite(loss)}


CHUNK_STATIC = ("objective", "mesh", "augment")


def train_chunk(
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    batches: jax.Array,
    key: jax.Array | None = None,
    *,
    objective: Objective,
    mesh: Mesh | None = None,
    augment: Distortion | None = None,
) -> tuple[TrainState, Metrics]:
    """Scan ``train_update`` over rows of ``batches`` (indices into the uint8 ``images``:
    28x28, or faster padded once by ``pad_images``), each batch split over ``mesh`` when
    one is given (data parallelism). Returns the state and the summed loss, the error
    count and whether every loss and the final parameters are finite.

    With a ``key``, each update's randomness (dropout, and the distortion ``augment`` of
    its batch) is drawn from ``key`` folded with the update count, so a resumed run
    draws exactly what an uninterrupted one would."""

    def body(carry, idx):
        state, totals = carry
        x = preprocess(images[idx])
        update_key = None if key is None else jax.random.fold_in(key, state.step)
        if augment is not None:
            if update_key is None:
                raise ValueError("distorting the training batches needs a key")
            update_key, distort_key = jax.random.split(update_key)
            x = distort_batch(distort_key, x, augment)
        x, y = split_batch(x, mesh), split_batch(labels[idx], mesh)
        state, m = train_update(state, x, y, objective, update_key)
        totals = {"loss": totals["loss"] + m["loss"], "errors": totals["errors"] + m["errors"], "finite": totals["finite"] & m["finite"]}
        return (state, totals), None

    zero = {"loss": jnp.zeros((), jnp.float32), "errors": jnp.zeros((), jnp.int32), "finite": jnp.ones((), bool)}
    (state, totals), _ = jax.lax.scan(body, (state, zero), batches)
    return state, dict(totals, finite=totals["finite"] & all_finite(state.params))


compiled_train_chunk = jax.jit(train_chunk, static_argnames=CHUNK_STATIC, donate_argnames=("state",))
"""``train_chunk`` compiled; the state's buffers are donated (updated in place)."""


def _seeds_chunk(state: TrainState, images: jax.Array, labels: jax.Array, batches: jax.Array, key: jax.Array, **static: Any
                      ) -> tuple[TrainState, Metrics]:
    return jax.vmap(lambda s, b, k: train_chunk(s, images, labels, b, k, **static))(state, batches, key)


seeds_train_chunk = jax.jit(_seeds_chunk, static_argnames=CHUNK_STATIC, donate_argnames=("state",))
"""``train_chunk`` for several seeds at once: the leaves of ``state``, ``batches`` and
``key`` carry a leading seed axis; the data is shared."""

Chunk = Callable[[TrainState, jax.Array, jax.Array, jax.Array, jax.Array], tuple[TrainState, Metrics]]
"""(state, images, labels, batches, key) -> (state, metrics): a chunk of updates."""


def _estimate(
    params: Any, images: jax.Array, labels: jax.Array, pick: jax.Array, key: jax.Array, *,
    estimator: str, model: LeNet5, objective: Objective, probes: int = 8,
) -> Any:
    return hessian.estimate(estimator, model, objective, params, preprocess(images[pick]), labels[pick], key, probes=probes)


ESTIMATE_STATIC = ("estimator", "model", "objective", "probes")

estimate_hessian = jax.jit(_estimate, static_argnames=ESTIMATE_STATIC)
"""A compiled Hessian-diagonal estimate over the uint8 ``images[pick]`` (see
``lenet_jax.hessian``); ``key`` drives the estimator's own randomness."""

seeds_estimate = jax.jit(
    lambda params, images, labels, pick, key, **static: jax.vmap(lambda p, i, k: _estimate(p, images, labels, i, k, **static))(params, pick, key),
    static_argnames=ESTIMATE_STATIC)
"""``estimate_hessian`` for several seeds at once, each over its own sample of patterns."""


def curvature_model(config: Config) -> LeNet5:
    """The model the configured estimator differentiates (forward-differentiable when it
    takes ``jax.jvp``)."""
    return make_model(config, forward_mode=hessian.get_estimator(config.hessian_estimator).forward_mode)


def curvature_sample(config: Config, epoch: int, n: int, update: int = 0) -> tuple[jax.Array, jax.Array]:
    """The positions (0..n-1 in the training set) of the patterns the estimate before
    update ``update`` of ``epoch`` averages over (drawn from the seed, the epoch and the
    update, or the first ones), and the key of its own randomness."""
    key = epoch_key(config.seed, epoch, PURPOSE_CURVATURE)
    key = key if update == 0 else jax.random.fold_in(key, update + 1)
    size = min(config.hessian_samples, n)
    pick = jax.random.choice(key, n, (size,), replace=False) if config.hessian_sample == "random" else jnp.arange(size)
    return pick, jax.random.fold_in(key, 1)


# --------------------------------------------------------------------------- several seeds at once


@dataclass(frozen=True)
class Strategy:
    """How the updates and curvature refreshes of ``n_seeds`` seeds trained together are
    computed. One seed runs the compiled chunk as it is, the XLA scan or the fused
    kernel; several run the ``vmap``ped XLA chunk, their states, batches and keys stacked
    along a leading seed axis, the data shared.

    ``stack`` and ``unstack`` move between the seeds' own values and what the compiled
    programs take: one seed leaves a value as it is (no seed axis), so it runs the
    compiled chunk on its own state."""

    n_seeds: int
    chunk: Chunk = field(repr=False)
    estimate: Callable[..., Any] = field(repr=False)

    @classmethod
    def build(cls, config: Config, n_seeds: int, updates_per_epoch: int, mesh: Mesh | None = None) -> "Strategy":
        """The strategy for ``n_seeds`` seeds of ``config`` (``factories.update_impl_for``
        picks the implementation; the fused kernel trains one seed at a time)."""
        impl = update_impl_for(config)
        estimator = dict(estimator=config.hessian_estimator, model=curvature_model(config), objective=config.objective,
                         probes=config.hutchinson_probes)
        static = dict(objective=config.objective, augment=config.distortion)
        if n_seeds > 1:
            if impl != "xla":
                raise ConfigError("several seeds at once run the xla update: the fused kernel trains one seed at a time (--update-impl xla)")
            return cls(n_seeds, functools.partial(seeds_train_chunk, **static), functools.partial(seeds_estimate, **estimator))
        if impl == "fused":
            from lenet_jax.fused import fused_train_chunk

            chunk = functools.partial(fused_train_chunk, schedule=make_schedule(config, updates_per_epoch), mu=config.mu, j=config.map_j,
                                      interpret=jax.default_backend() == "cpu")
        else:
            chunk = functools.partial(compiled_train_chunk, mesh=mesh, **static)
        return cls(1, chunk, functools.partial(estimate_hessian, **estimator))

    def stack(self, values: list[Any]) -> Any:
        """The seeds' own values (states, batches, keys) as the compiled programs take them."""
        if len(values) != self.n_seeds:
            raise ValueError(f"expected {self.n_seeds} values, got {len(values)}")
        return values[0] if self.n_seeds == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *values)

    def unstack(self, value: Any, r: int) -> Any:
        """Seed ``r``'s own part of a stacked value."""
        return value if self.n_seeds == 1 else jax.tree.map(lambda x: x[r], value)

    def per_seed(self, metric: Any) -> np.ndarray:
        """A metric of the compiled chunk as one host value per seed."""
        return np.asarray(metric).reshape(self.n_seeds)

    def refresh(self, state: TrainState, images: jax.Array, labels: jax.Array, configs: list[Config],
                train_index: list[jax.Array | None], epoch: int, update: int = 0) -> TrainState:
        """Each seed's curvature estimate before update ``update`` of ``epoch`` (its start
        unless ``--hessian-refresh-first-epoch`` asks for more), over its own sample of its own
        training patterns (``curvature_sample``: drawn or the first ones, as its
        ``--hessian-sample`` says; positions mapped through ``train_index`` when it has
        one), put into its optimiser state, which holds it until the next refresh (appendix C).
        With ``--hessian-reduce sum`` the estimate is of the sum over the patterns: the mean
        times their number."""
        picks, keys = [], []
        for config, index in zip(configs, train_index):
            n = labels.shape[0] if index is None else index.shape[0]
            pick, key = curvature_sample(config, epoch, n, update)
            picks.append(pick if index is None else index[pick])
            keys.append(key)
        h = self.estimate(state.params, images, labels, self.stack(picks), self.stack(keys))
        if configs[0].hessian_reduce == "sum":
            h = jax.tree.map(lambda v: v * picks[0].shape[0], h)
        return state.replace(opt_state=set_hessian(state.opt_state, h))
