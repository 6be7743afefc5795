"""Estimates of the diagonal of the Gauss-Newton matrix, for SDLM (appendix C).

Each estimator returns a parameter-shaped tree: the mean over the given patterns of a
per-pattern estimate, never negative. They are registered in ``ESTIMATORS`` by name:

``paper``         the paper's layer-wise back-propagation of diagonal second derivatives
                  (f'' dropped, cross terms between weights ignored, the contributions of
                  shared weights summed): one forward and one backward pass of the
                  network's squared surrogate.
``gauss_newton``  the exact diagonal of J^T H J, H = C^T C the output curvature of
                  ``Objective.curvature_factor``: one vector-Jacobian product per row of C.
``hutchinson``    Hutchinson's estimator E_v[v * (J^T H J v)], v Rademacher, with
                  Gauss-Newton-vector products by a jvp then a vjp; the mean over probes
                  is unbiased, and clipping it at zero (so that SDLM never divides by less
                  than mu) biases the clipped entries upward.

References:
  LeCun, Bottou, Bengio and Haffner, *Gradient-based learning applied to document
  recognition*, Proc. IEEE 86(11), 1998: appendix C.
  Hutchinson, *A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines*, Comm. Statist. Simulation Comput. 18(3), 1989.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from lenet_jax import precision as prec
from lenet_jax.losses import Objective

Params = Any


@runtime_checkable
class CurvatureModel(Protocol):
    """What the estimators need of a model: a Flax module with these methods, each
    reached through ``apply(variables, ..., method=name)``. ``lenet_jax.model.LeNet5``
    is one; so is any small module a test builds.

    ``outputs(x)``: what the loss reads (squashed F6, or logits), (N, D).
    ``trace(x)``: ``(outputs, activations)``, the squashed output of every stage.
    ``squared_network(x, activations)``: the linear surrogate whose vector-Jacobian
    product with squared parameters is the paper's recursion (it squares the input x
    itself, after whatever scaling the model applies to it).
    """

    def apply(self, variables: Mapping[str, Any], *args: Any, method: Any = None, **kwargs: Any) -> Any: ...

    def outputs(self, x: jax.Array) -> jax.Array: ...

    def trace(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]: ...

    def squared_network(self, x: jax.Array, activations: list[jax.Array]) -> jax.Array: ...


def _output_fn(model: CurvatureModel, x: jax.Array) -> Callable[[Params], jax.Array]:
    return lambda p: model.apply({"params": p}, x[None], method="outputs")[0]


def _mean_over_samples(per_sample: Callable[..., Params], *xs: jax.Array, batch_size: int) -> Params:
    n = xs[0].shape[0]
    total = jax.lax.map(lambda args: per_sample(*args), xs, batch_size=min(batch_size, n))
    return jax.tree.map(lambda t: jnp.sum(t, 0) / n, total)


def paper_diagonal(model: CurvatureModel, objective: Objective, params: Params, images: jax.Array, labels: jax.Array) -> Params:
    """The paper's estimate of the Hessian diagonal (appendix C).

    Back-propagation with squared weights, squared inputs and squared slopes, started from
    the diagonal of the output curvature: d2E/da^2 = f'(a)^2 d2E/dx^2,
    d2E/dx_j^2 = sum_i w_ij^2 d2E/da_i^2, d2E/dw^2 = sum over the connections sharing w
    of x_j^2 d2E/da_i^2.

    Args:
      model: the network (see ``CurvatureModel``).
      objective: the loss, whose ``curvature_factor`` gives the output curvature.
      params: the parameters the estimate is taken at.
      images: preprocessed inputs, (N, 32, 32, 1).
      labels: int labels, (N,).

    Returns:
      A tree shaped like ``params``: the mean over the N patterns, non-negative.
    """
    outputs, activations = model.apply({"params": params}, images, method="trace")
    factors = jax.vmap(objective.curvature_factor)(outputs, labels)
    output_diag = jnp.sum(jnp.square(factors), axis=-2)
    squared = jax.tree.map(jnp.square, params)

    def surrogate(p: Params) -> jax.Array:
        return model.apply({"params": p}, images, activations, method="squared_network")

    _, vjp = jax.vjp(surrogate, squared)
    (total,) = vjp(output_diag)
    return jax.tree.map(lambda t: t / images.shape[0], total)


def gauss_newton_diagonal(
    model: CurvatureModel, objective: Objective, params: Params, images: jax.Array, labels: jax.Array, *, batch_size: int = 16
) -> Params:
    """The exact diagonal of the Gauss-Newton matrix J^T C^T C J, as the sum over the rows
    c of C of (J^T c)^2.

    Args:
      model, objective, params, images, labels: as for ``paper_diagonal``.
      batch_size: patterns vectorised together (memory against speed).

    Returns:
      A tree shaped like ``params``: the mean over the N patterns, non-negative.
    """

    def per_sample(x: jax.Array, y: jax.Array) -> Params:
        out, vjp = jax.vjp(_output_fn(model, x), params)
        rows = objective.curvature_factor(out, y)
        (cols,) = jax.vmap(vjp)(rows)
        return jax.tree.map(lambda g: jnp.sum(jnp.square(g), 0), cols)

    return _mean_over_samples(per_sample, images, labels, batch_size=batch_size)


def hutchinson_diagonal(
    model: CurvatureModel,
    objective: Objective,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    probes: int = 8,
    batch_size: int = 16,
) -> Params:
    """Hutchinson's estimate of the Gauss-Newton diagonal: the mean of v * (J^T H J v)
    over ``probes`` Rademacher vectors v per pattern, clipped at zero.

    The mean over probes is unbiased; the clipping (an estimate below zero would let SDLM
    divide by less than mu) biases those entries upward.

    Args:
      model: the network; it must be forward-differentiable (``jax.jvp``).
      objective, params, images, labels: as for ``paper_diagonal``.
      key: the PRNG key the probes are drawn from.
      probes: Rademacher vectors per pattern.
      batch_size: patterns vectorised together.

    Returns:
      A tree shaped like ``params``, non-negative.
    """
    leaves, treedef = jax.tree.flatten(params)

    def per_sample(x: jax.Array, y: jax.Array, k: jax.Array) -> Params:
        f = _output_fn(model, x)
        out, vjp = jax.vjp(f, params)
        keys = jax.random.split(k, len(leaves))
        probes_tree = jax.tree.unflatten(
            treedef, [jax.random.rademacher(kk, (probes,) + l.shape, l.dtype) for kk, l in zip(keys, leaves)]
        )
        jv = jax.vmap(lambda v: jax.jvp(f, (params,), (v,))[1])(probes_tree)
        rows = objective.curvature_factor(out, y)
        hjv = prec.matmul(prec.matmul(jv, rows.T, objective.precision), rows, objective.precision)
        (gnv,) = jax.vmap(vjp)(hjv)
        return jax.tree.map(lambda v, g: jnp.mean(v * g, 0), probes_tree, gnv)

    keys = jax.random.split(key, images.shape[0])
    mean = _mean_over_samples(per_sample, images, labels, keys, batch_size=batch_size)
    return jax.tree.map(lambda h: jnp.maximum(h, 0.0), mean)


class Estimator(NamedTuple):
    """A registered estimator: ``fn(model, objective, params, images, labels, key, probes)``,
    and whether it takes ``jax.jvp`` of the network (then the model must avoid custom VJPs)."""

    fn: Callable[[CurvatureModel, Objective, Params, jax.Array, jax.Array, jax.Array, int], Params]
    forward_mode: bool = False


ESTIMATORS: dict[str, Estimator] = {
    "paper": Estimator(lambda m, o, p, x, y, key, probes: paper_diagonal(m, o, p, x, y)),
    "gauss_newton": Estimator(lambda m, o, p, x, y, key, probes: gauss_newton_diagonal(m, o, p, x, y)),
    "hutchinson": Estimator(lambda m, o, p, x, y, key, probes: hutchinson_diagonal(m, o, p, x, y, key, probes=probes), forward_mode=True),
}


def get_estimator(name: str) -> Estimator:
    """The registered estimator called ``name``, or ValueError listing them."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown Hessian estimator {name!r}; choose from {', '.join(ESTIMATORS)}") from None


def estimate(
    name: str,
    model: CurvatureModel,
    objective: Objective,
    params: Params,
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    probes: int = 8,
) -> Params:
    """The estimate of the registered estimator ``name`` (see ``ESTIMATORS``)."""
    return get_estimator(name).fn(model, objective, params, images, labels, key, probes)
