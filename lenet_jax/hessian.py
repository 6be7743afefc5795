"""Estimates of the diagonal of the Gauss-Newton matrix, for SDLM (appendix C).

Each estimator is a pure function of (model, objective, params, images, labels) that
returns a parameter-shaped tree, the plain mean over the given samples of the per-sample
estimate, never negative:

``paper``         the paper's layer-wise back-propagation of diagonal second derivatives
                  (f'' dropped, cross terms ignored, shared weights summed): one forward
                  and one backward pass of the network's squared surrogate.
``gauss_newton``  the exact diagonal of J^T H J, H = C^T C the output curvature of
                  ``Objective.curvature_factor``: one vector-Jacobian product per row of C.
``hutchinson``    the unbiased estimate E_v[v * (J^T H J v)], v Rademacher, with
                  Gauss-Newton-vector products by a jvp then a vjp.

``images`` are preprocessed inputs of shape (N, 32, 32, 1). ``model`` is a LeNet5, or
any Flax module with the same ``outputs``, ``trace`` and ``squared_network`` methods.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lenet_jax.losses import Objective
from lenet_jax.model import Params

ESTIMATORS = ("paper", "gauss_newton", "hutchinson")
FORWARD_MODE_ESTIMATORS = ("hutchinson",)
"""Those that take ``jax.jvp`` of the network, so need a model without custom VJPs."""


def _output_fn(model: nn.Module, x: jax.Array) -> Callable[[Params], jax.Array]:
    return lambda p: model.apply({"params": p}, x[None], method="outputs")[0]


def _mean_over_samples(per_sample, *xs, batch_size: int) -> Params:
    n = xs[0].shape[0]
    total = jax.lax.map(lambda args: per_sample(*args), xs, batch_size=min(batch_size, n))
    return jax.tree.map(lambda t: jnp.sum(t, 0) / n, total)


def paper_diagonal(model: nn.Module, objective: Objective, params: Params, images: jax.Array, labels: jax.Array) -> Params:
    """The paper's estimate: back-propagation with squared weights, inputs and slopes,
    started from the diagonal of the output curvature."""
    outputs, activations = model.apply({"params": params}, images, method="trace")
    factors = jax.vmap(objective.curvature_factor)(outputs, labels)
    output_diag = jnp.sum(jnp.square(factors), axis=-2)
    squared = jax.tree.map(jnp.square, params)

    def surrogate(p: Params) -> jax.Array:
        return model.apply({"params": p}, jnp.square(images), activations, method="squared_network")

    _, vjp = jax.vjp(surrogate, squared)
    (total,) = vjp(output_diag)
    return jax.tree.map(lambda t: t / images.shape[0], total)


def gauss_newton_diagonal(
    model: nn.Module, objective: Objective, params: Params, images: jax.Array, labels: jax.Array, *, batch_size: int = 16
) -> Params:
    """The exact diagonal of the Gauss-Newton matrix: sum over rows c of C of (J^T c)^2."""

    def per_sample(x, y):
        out, vjp = jax.vjp(_output_fn(model, x), params)
        rows = objective.curvature_factor(out, y)
        (cols,) = jax.vmap(vjp)(rows)
        return jax.tree.map(lambda g: jnp.sum(jnp.square(g), 0), cols)

    return _mean_over_samples(per_sample, images, labels, batch_size=batch_size)


def hutchinson_diagonal(
    model: nn.Module,
    objective: Objective,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    probes: int = 8,
    batch_size: int = 16,
) -> Params:
    """E[v * (J^T H J v)] over ``probes`` Rademacher vectors per sample; unbiased for the
    Gauss-Newton diagonal, non-negative because every estimate is clipped at zero."""
    leaves, treedef = jax.tree.flatten(params)

    def per_sample(x, y, k):
        f = _output_fn(model, x)
        out, vjp = jax.vjp(f, params)
        keys = jax.random.split(k, len(leaves))
        probes_tree = jax.tree.unflatten(
            treedef, [jax.random.rademacher(kk, (probes,) + l.shape, l.dtype) for kk, l in zip(keys, leaves)]
        )
        jv = jax.vmap(lambda v: jax.jvp(f, (params,), (v,))[1])(probes_tree)
        rows = objective.curvature_factor(out, y)
        hjv = (jv @ rows.T) @ rows
        (gnv,) = jax.vmap(vjp)(hjv)
        return jax.tree.map(lambda v, g: jnp.mean(v * g, 0), probes_tree, gnv)

    keys = jax.random.split(key, images.shape[0])
    mean = _mean_over_samples(per_sample, images, labels, keys, batch_size=batch_size)
    return jax.tree.map(lambda h: jnp.maximum(h, 0.0), mean)


def estimate(
    name: str,
    model: nn.Module,
    objective: Objective,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    probes: int = 8,
) -> Params:
    """Dispatch on the estimator name (one of ``ESTIMATORS``)."""
    if name == "paper":
        return paper_diagonal(model, objective, params, images, labels)
    if name == "gauss_newton":
        return gauss_newton_diagonal(model, objective, params, images, labels)
    if name == "hutchinson":
        return hutchinson_diagonal(model, objective, params, images, labels, key, probes=probes)
    raise ValueError(f"unknown Hessian estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
