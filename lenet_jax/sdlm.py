"""Stochastic diagonal Levenberg-Marquardt (SDLM) as an optax transformation (appendix C).

Each parameter w_k moves by -eps_k dE/dw_k with eps_k = eta / (mu + h_kk), eta the
learning rate (the paper's "global step") and h_kk an estimate of the k-th diagonal
entry of the Hessian (its Gauss-Newton approximation). The estimate lives in the
optimiser state; the paper recomputes it before each pass over the training set (each
epoch), over 500 patterns, and holds it fixed for the epoch. Put a new one in with
``set_hessian`` (or pass ``hessian=`` to ``update``); compute one with
``lenet_jax.hessian``. Until one is set the held estimate is NaN: an update without an
estimate raises (outside ``jit``) or gives NaN steps (inside it), never a silent step.

References:
  LeCun, Bottou, Bengio and Haffner, *Gradient-based learning applied to document
  recognition*, Proc. IEEE 86(11), 1998: appendix C.
  LeCun, Bottou, Orr and Mueller, *Efficient BackProp*, in Neural Networks: Tricks of the
  Trade, 1998: section 9.1.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PAPER_MU = 0.02
PAPER_ETAS = (5e-4, 5e-4, 2e-4, 2e-4, 2e-4, 1e-4, 1e-4, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5, 1e-5)
"""The paper's global step eta (the learning rate) for passes 1..13 (appendix C); 1e-5
for every later pass."""


class ScaleByInverseCurvatureState(NamedTuple):
    """The held Hessian-diagonal estimate, one array per parameter, in the parameters'
    dtypes; NaN until an estimate is set."""

    hessian: optax.Params


def _cast_like(tree: optax.Params, like: optax.Params) -> optax.Params:
    return jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), tree, like)


def scale_by_inverse_curvature(mu: float | jax.Array = PAPER_MU) -> optax.GradientTransformationExtraArgs:
    """Divide each gradient entry by (mu + h_kk), h the held Hessian-diagonal estimate.

    An estimate is taken by passing ``hessian=`` to ``update`` (it is then held for later
    calls) or with ``set_hessian``; it is cast to the parameters' dtypes. Until one is
    set the held estimate is NaN, so an update without one raises ValueError when called
    with concrete values and gives NaN inside ``jit``: never the silent step g / mu.

    Args:
      mu: the damping added to every h_kk (the paper: 0.02); a float or, under
        ``optax.inject_hyperparams``, a scalar array.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if isinstance(mu, (int, float)) and not mu > 0:  # a traced mu (inject_hyperparams) is not checked
        raise ValueError(f"mu must be positive, got {mu}")

    def init_fn(params: optax.Params) -> ScaleByInverseCurvatureState:
        return ScaleByInverseCurvatureState(hessian=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), params))

    def update_fn(updates: optax.Updates, state: ScaleByInverseCurvatureState, params: optax.Params | None = None,
                  *, hessian: optax.Params | None = None, **extra_args: Any) -> tuple[optax.Updates, ScaleByInverseCurvatureState]:
        del params, extra_args
        if hessian is not None:
            state = ScaleByInverseCurvatureState(hessian=_cast_like(hessian, state.hessian))
        _require_estimate(state.hessian)
        updates = jax.tree.map(lambda g, h: (g / (mu + h)).astype(g.dtype), updates, state.hessian)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _require_estimate(held: optax.Params) -> None:
    """ValueError when a concrete held estimate is still the NaN of ``init`` (a traced one
    cannot be looked at: its NaN then reaches the steps)."""
    leaves = jax.tree.leaves(held)
    if any(isinstance(h, jax.core.Tracer) for h in leaves):
        return
    if any(bool(jnp.any(jnp.isnan(h))) for h in leaves):
        raise ValueError("sdlm has no curvature estimate (or a NaN in it): set one with set_hessian(opt_state, h) or pass "
                         "hessian= to update; lenet_jax.hessian computes one")


def sdlm(learning_rate: optax.ScalarOrSchedule, mu: float | jax.Array = PAPER_MU) -> optax.GradientTransformationExtraArgs:
    """Stochastic diagonal Levenberg-Marquardt: w <- w - eta / (mu + h) * g.

    Args:
      learning_rate: eta, the paper's global step: a float or an optax schedule (the
        paper's is ``paper_schedule``).
      mu: the damping (the paper: 0.02).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; its state holds the Hessian-diagonal
      estimate (``get_hessian``, ``set_hessian``). Works under ``optax.inject_hyperparams``.

    Usage::

      tx = sdlm(paper_schedule(updates_per_epoch=60_000))
      state = set_hessian(tx.init(params), lenet_jax.hessian.paper_diagonal(model, objective, params, x, y))
      updates, state = tx.update(grads, state)
    """
    return optax.chain(scale_by_inverse_curvature(mu), optax.scale_by_learning_rate(learning_rate))


def set_hessian(opt_state: Any, hessian: optax.Params) -> Any:
    """``opt_state`` with its held estimate replaced by ``hessian`` (cast to the held
    estimate's dtypes), wherever it sits in a chained or injected state."""
    return optax.tree_utils.tree_set(opt_state, hessian=_cast_like(hessian, get_hessian(opt_state)))


def get_hessian(opt_state: Any) -> optax.Params:
    """The held estimate, found anywhere inside a (possibly chained) optimiser state."""
    return optax.tree_utils.tree_get(opt_state, "hessian")


def uses_curvature(opt_state: Any) -> bool:
    """Whether ``opt_state`` holds an SDLM curvature estimate to refresh."""
    return optax.tree_utils.tree_get(opt_state, "hessian", default=None) is not None


def paper_schedule(updates_per_epoch: int, eta: float = PAPER_ETAS[0]) -> optax.Schedule:
    """The paper's learning rate (its global step) by epoch (0.0005 x2, 0.0002 x3, 0.0001
    x3, 0.00005 x4, then 0.00001), as a function of the update count.

    Args:
      updates_per_epoch: optimiser updates in one epoch (one pass over the training set).
      eta: the first epoch's rate; the whole table is rescaled by eta / 0.0005.

    Returns:
      An ``optax.Schedule``.
    """
    if updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be at least 1, got {updates_per_epoch}")
    scale = eta / PAPER_ETAS[0]
    values = [v * scale for v in PAPER_ETAS]
    boundaries = [e * updates_per_epoch for e in range(1, len(values))]
    return optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries)
