"""Stochastic diagonal Levenberg-Marquardt (SDLM) as an optax transformation (appendix C).

Each parameter w_k moves by -eps_k dE/dw_k with eps_k = eta / (mu + h_kk), h_kk an
estimate of the diagonal of the Hessian (Gauss-Newton). The estimate lives in the
optimiser state; the paper recomputes it before each pass over a sample of 500 patterns
and keeps it fixed for the pass. Put a new estimate in with ``set_hessian`` (or pass
``hessian=`` to ``update``); compute one with ``lenet_jax.hessian``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PAPER_MU = 0.02
PAPER_ETAS = (5e-4, 5e-4, 2e-4, 2e-4, 2e-4, 1e-4, 1e-4, 1e-4, 5e-5, 5e-5, 5e-5, 5e-5, 1e-5)
"""The global step eta for passes 1..13 (appendix C); 1e-5 for every later pass."""


class ScaleByInverseCurvatureState(NamedTuple):
    """The held Hessian-diagonal estimate, one array per parameter."""

    hessian: optax.Params


def scale_by_inverse_curvature(mu: float = PAPER_MU) -> optax.GradientTransformationExtraArgs:
    """Divide each gradient entry by (mu + h_kk). The estimate starts at zero (so the first
    steps are plain gradient steps scaled by 1/mu) until one is set."""
    if not mu > 0:
        raise ValueError(f"mu must be positive, got {mu}")

    def init_fn(params: optax.Params) -> ScaleByInverseCurvatureState:
        return ScaleByInverseCurvatureState(hessian=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, *, hessian=None, **extra_args):
        del params, extra_args
        if hessian is not None:
            state = ScaleByInverseCurvatureState(hessian=hessian)
        updates = jax.tree.map(lambda g, h: g / (mu + h), updates, state.hessian)
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sdlm(learning_rate: optax.ScalarOrSchedule, mu: float = PAPER_MU) -> optax.GradientTransformationExtraArgs:
    """SDLM: w <- w - eta / (mu + h) * g, eta a float or an optax schedule."""
    return optax.chain(scale_by_inverse_curvature(mu), optax.scale_by_learning_rate(learning_rate))


def set_hessian(opt_state: Any, hessian: optax.Params) -> Any:
    """Replace the held estimate anywhere inside a (possibly chained) optimiser state."""
    return optax.tree_utils.tree_set(opt_state, hessian=hessian)


def get_hessian(opt_state: Any) -> optax.Params:
    """The held estimate, found anywhere inside a (possibly chained) optimiser state."""
    return optax.tree_utils.tree_get(opt_state, "hessian")


def uses_curvature(opt_state: Any) -> bool:
    """Whether ``opt_state`` holds an SDLM curvature estimate to refresh."""
    return optax.tree_utils.tree_get(opt_state, "hessian", default=None) is not None


def paper_schedule(steps_per_pass: int, eta: float = PAPER_ETAS[0]) -> optax.Schedule:
    """The paper's global step by pass (0.0005 x2, 0.0002 x3, 0.0001 x3, 0.00005 x4, then
    0.00001), as a function of the optimiser step; ``eta`` rescales the whole table."""
    if steps_per_pass < 1:
        raise ValueError(f"steps_per_pass must be at least 1, got {steps_per_pass}")
    scale = eta / PAPER_ETAS[0]
    values = [v * scale for v in PAPER_ETAS]
    boundaries = [p * steps_per_pass for p in range(1, len(values))]
    return optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries)
