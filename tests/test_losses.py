"""The MAP and MSE criteria, cross-entropy, and the output curvature each one hands SDLM."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.errors import ConfigError
from lenet_jax.losses import Objective, map_loss, mse_loss, softmax_cross_entropy


def numpy_map(penalties: np.ndarray, labels: np.ndarray, j: float) -> np.ndarray:
    y = penalties.astype(np.float64)
    return y[np.arange(len(y)), labels] + np.log(np.exp(-j) + np.exp(-y).sum(1))


class LossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_map_equals_the_formula(self):
        rng = np.random.default_rng(0)
        y = rng.uniform(0, 30, (16, 10)).astype(np.float32)
        labels = rng.integers(0, 10, 16)
        for j in (0.5, 5.0, 20.0):
            got = self.variant(lambda y, l: map_loss(y, l, j))(y, labels)
            chex.assert_trees_all_close(got, numpy_map(y, labels, j), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_map_stays_finite_for_huge_penalties(self):
        y = jnp.full((2, 10), 1e30).at[0, 3].set(1e4).at[1, 0].set(0.0)
        labels = jnp.array([3, 0])
        got = self.variant(lambda y, l: map_loss(y, l, 5.0))(y, labels)
        chex.assert_tree_all_finite(got)
        # y_c + log(exp(-j) + exp(-y_c) + ...) with the j term dominating for y_c = 1e4
        np.testing.assert_allclose(np.asarray(got), [1e4 - 5.0, np.log1p(np.exp(-5.0))], rtol=1e-6)
        grads = jax.grad(lambda y: jnp.sum(map_loss(y, labels, 5.0)))(y)
        chex.assert_tree_all_finite(grads)

    def test_map_is_never_negative_and_mse_is_the_correct_penalty(self):
        y = jax.random.uniform(jax.random.key(0), (64, 10), maxval=10.0)
        labels = jax.random.randint(jax.random.key(1), (64,), 0, 10)
        assert float(jnp.min(map_loss(y, labels, 5.0))) >= 0
        chex.assert_trees_all_close(mse_loss(y, labels), y[jnp.arange(64), labels])

    def test_cross_entropy(self):
        logits = jax.random.normal(jax.random.key(0), (5, 10))
        labels = jnp.arange(5)
        expected = -np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[np.arange(5), np.arange(5)]
        chex.assert_trees_all_close(softmax_cross_entropy(logits, labels), expected, rtol=1e-5)


def test_objective_refuses_bad_combinations():
    with pytest.raises(ConfigError, match="takes loss"):
        Objective("softmax", "map")
    with pytest.raises(ConfigError, match="positive"):
        Objective("rbf", "map", j=0.0)


def test_rbf_prediction_is_the_smallest_penalty_and_softmax_the_largest_logit():
    scores = jnp.array([[3.0, 1.0, 2.0]])
    assert int(Objective("rbf").predict(scores)[0]) == 1
    assert int(Objective("softmax", "xent").predict(scores)[0]) == 0


def _dense_map_gauss_newton(x: jax.Array, label: int, j: float) -> jax.Array:
    """2 I from y_correct, plus J^T H J of the log-sum-exp term, built with jax.hessian."""
    centres = jnp.asarray(RBF_CENTRES)
    penalties = lambda x: jnp.sum((x[None] - centres) ** 2, -1)
    lse = lambda y: jax.nn.logsumexp(jnp.concatenate([-y, jnp.array([-j])]))
    jac = jax.jacfwd(penalties)(x)
    return 2 * jnp.eye(84) + jac.T @ jax.hessian(lse)(penalties(x)) @ jac


@pytest.mark.parametrize("loss", ["map", "mse"])
def test_rbf_curvature_factor_gives_the_gauss_newton_curvature(loss):
    x = jnp.asarray(RBF_CENTRES[4] * 0.6 + 0.3 * np.random.default_rng(1).normal(size=84), jnp.float32)
    factor = Objective("rbf", loss, 2.0).curvature_factor(x, jnp.array(4))
    got = factor.T @ factor
    expected = jax.jit(_dense_map_gauss_newton, static_argnums=(1, 2))(x, 4, 2.0) if loss == "map" else 2 * jnp.eye(84)
    chex.assert_trees_all_close(got, expected, rtol=1e-4, atol=1e-5)
    # For MSE the Gauss-Newton curvature is the exact Hessian of the loss w.r.t. F6.
    if loss == "mse":
        exact = jax.hessian(lambda x: mse_loss(jnp.sum((x[None] - RBF_CENTRES) ** 2, -1)[None], jnp.array([4]))[0])(x)
        chex.assert_trees_all_close(got, exact, atol=1e-5)


def test_softmax_curvature_factor_gives_the_exact_cross_entropy_hessian():
    logits = jax.random.normal(jax.random.key(0), (10,))
    factor = Objective("softmax", "xent").curvature_factor(logits, jnp.array(2))
    exact = jax.hessian(lambda z: softmax_cross_entropy(z[None], jnp.array([2]))[0])(logits)
    chex.assert_trees_all_close(factor.T @ factor, exact, atol=1e-6)
