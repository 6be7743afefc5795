"""The modern counterparts of each paper component: each computes what it claims, counts
its parameters, and trains; the paper's curvature pass still applies where it can."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lenet_jax.config import MODERN, Config
from lenet_jax.conv import valid_conv
from lenet_jax.errors import ConfigError
from lenet_jax.factories import create_state, make_model, make_optimizer
from lenet_jax.layers import ACTIVATIONS, C3_TABLE, FixedSubsampling, SeparableConv, connection_mask
from lenet_jax.model import LeNet5, count_parameters, init_params, layer_table
from lenet_jax.training import fit

from conftest import QUIET, compiled_init, estimate, paper_diagonal, refresh_curvature, small


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_slope_from_output_matches_autodiff(name):
    f = ACTIVATIONS[name]()
    a = jnp.linspace(-3.0, 3.0, 61) + 0.013  # avoid ReLU's kink at exactly 0
    x = f.apply({}, a)
    slope = jax.vmap(jax.grad(lambda v: f.apply({}, v)))(a)
    np.testing.assert_allclose(f.apply({}, x, method="derivative_from_output"), slope, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["average", "max"])
def test_fixed_subsampling_matches_numpy(kind):
    x = np.random.default_rng(0).normal(size=(3, 8, 6, 5)).astype(np.float32)
    got = FixedSubsampling(kind).apply({}, jnp.asarray(x))
    win = x.reshape(3, 4, 2, 3, 2, 5)
    expected = win.mean((2, 4)) if kind == "average" else win.max((2, 4))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_separable_conv_is_the_conv_of_its_factored_kernel():
    x = jax.random.normal(jax.random.key(0), (2, 14, 14, 6))
    layer = SeparableConv(features=16, table=C3_TABLE)
    params = layer.init(jax.random.key(1), x)["params"]
    mask = connection_mask(C3_TABLE, 6)
    assert np.all(np.asarray(params["pointwise"])[mask == 0] == 0)
    kernel = params["depthwise"][..., :, None] * (params["pointwise"] * mask)[None, None]
    expected = valid_conv(x, kernel, "xla") + params["bias"]
    np.testing.assert_allclose(layer.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "changes,parameters,connections",
    [
        ({}, 60_000, 340_908),
        ({"c3": "dense"}, 60_900, 430_908),  # C3: 6*16*25 + 16 = 2,416 instead of 1,516
        ({"subsampling": "max"}, 60_000 - 44, 340_908 - 5_880 - 2_000 + 4_704 + 1_600),
        ({"conv": "separable"}, 13_030, None),
    ],
)
def test_parameter_counts_of_the_variants(changes, parameters, connections):
    model = make_model(Config(**changes))
    params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))  # the counts need the shapes alone
    assert count_parameters(params, model.c3_table) == parameters
    rows = layer_table(params, model.c3_table)
    assert sum(r["parameters"] for r in rows) == parameters
    if connections is not None:
        assert sum(r["connections"] for r in rows) == connections


VARIANTS = [
    dict(activation="relu"),
    *(pytest.param(c, marks=pytest.mark.slow) for c in (dict(subsampling="max"), dict(head="softmax", loss="xent"), dict(activation="selu"),
                                                       dict(subsampling="average"), dict(c3="dense"),
                                                       dict(conv="separable"), dict(dropout=0.3))),
]


def _variant_id(changes: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in changes.items())


@pytest.mark.parametrize("changes", VARIANTS, ids=_variant_id)
def test_every_variant_has_finite_gradients_and_a_nonnegative_curvature_estimate(changes, digits):
    config = Config(**changes)
    model = make_model(config)
    params = compiled_init(model, jax.random.key(0))
    x, y = digits[0][:4], digits[1][:4]

    def loss(p):
        scores = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(2)})
        return jnp.mean(config.objective.per_sample(scores, y))

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads))) > 0
    h = paper_diagonal(model, config.objective, params, x, y)
    chex.assert_trees_all_equal_shapes(h, params)
    assert min(float(jnp.min(v)) for v in jax.tree.leaves(h)) >= 0


@pytest.mark.slow
def test_dropout_is_random_in_training_and_off_in_evaluation(digits):
    model = LeNet5(dropout=0.5)
    params = compiled_init(model, jax.random.key(0))
    x = digits[0][:2]
    plain = LeNet5().apply({"params": params}, x)
    np.testing.assert_array_equal(model.apply({"params": params}, x), plain)
    a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, plain) and not np.allclose(a, b)


def test_weight_decay_reaches_weights_but_not_biases():
    config = Config(optimizer="sgd", lr=0.1, weight_decay=0.01, schedule="constant")
    params = compiled_init(make_model(config), jax.random.key(0))
    tx = make_optimizer(config, 10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["F6"]["kernel"], -0.1 * 0.01 * params["F6"]["kernel"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(updates["F6"]["bias"]))) == 0.0
    assert float(jnp.max(jnp.abs(updates["S2"]["coefficient"]))) > 0  # the subsampling coefficients are weights


@pytest.mark.slow
def test_modern_configuration_learns(mnist, tmp_path):
    config = Config(**MODERN).replace(epochs=3, train_subset=5000)
    result = fit(config, small(mnist, 5000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.09  # 6.9% measured; chance is 90%


@pytest.mark.slow
def test_sdlm_with_max_pooling_learns(mnist, tmp_path):
    config = Config(subsampling="max", epochs=2, train_subset=2000, hessian_samples=100)
    result = fit(config, small(mnist, 2000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.12  # 9.25% measured


def test_bad_variant_values_are_refused():
    for changes, message in [
        (dict(activation="gelu"), "--activation 'gelu' is not one of"),
        (dict(subsampling="median"), "--subsampling 'median' is not one of"),
        (dict(dropout=1.0), "--dropout must be below 1.0"),
        (dict(weight_decay=-1.0), "--weight-decay must be at least 0.0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Config(**changes).validate()
    with pytest.raises(ValueError, match="unknown activation"):
        init_params(LeNet5(activation="gelu"), jax.random.key(0))



def test_auto_convolutions_resolve_by_use():
    assert make_model(Config(), inference=True).conv_impl == "xla"
    assert make_model(Config()).conv_impl == ("custom_vjp" if jax.default_backend() == "cpu" else "xla")
    assert make_model(Config(conv_impl="patches"), inference=True).conv_impl == "patches"
    assert make_model(Config(conv_impl="custom_vjp"), forward_mode=True).conv_impl == "patches"
    assert make_model(Config(conv_impl="xla"), forward_mode=True).conv_impl == "xla"


@pytest.mark.slow  # ~8 s; the fast tier has the paths' equality, forward and backward (test_model), and the estimators on one path
@pytest.mark.parametrize("estimator", ["paper", "gauss_newton"])
def test_curvature_estimates_agree_on_every_convolution_path(estimator, digits):
    x, y = digits[0][:2], digits[1][:2]
    params = compiled_init(LeNet5(), jax.random.key(4))
    estimates = [
        estimate(estimator, LeNet5(conv_impl=impl), Config().objective, params, x, y, jax.random.key(0))
        for impl in ("custom_vjp", "xla")
    ]
    chex.assert_trees_all_close(*estimates, rtol=1e-3, atol=1e-9)


@pytest.mark.slow
def test_the_hutchinson_refresh_runs_with_the_custom_vjp_convolutions(digits):
    """jax.jvp cannot differentiate a custom VJP: the refresh swaps in "patches"."""
    config = Config(conv_impl="custom_vjp", hessian_estimator="hutchinson", hessian_samples=4, hutchinson_probes=2)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 28, 28)), jnp.uint8)
    labels = jnp.arange(8, dtype=jnp.int32)
    state = refresh_curvature(create_state(config, 8), images, labels, config, 1)
    leaves = jax.tree.leaves(optax.tree_utils.tree_get(state.opt_state, "hessian"))
    assert all(bool(jnp.all(jnp.isfinite(l) & (l >= 0))) for l in leaves)
    assert sum(float(jnp.sum(l)) for l in leaves) > 0
