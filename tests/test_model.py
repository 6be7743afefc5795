"""The paper's layers, the 60,000 parameters, the fixed RBF, the C3 table, initialisation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.bitmaps import DIGIT_BITMAPS, RBF_CENTRES, ascii_art, hamming_distances
from lenet_jax.conv import overlap_add, patches, valid_conv, windows_by_row
from lenet_jax.layers import (
    AMPLITUDE,
    C3_TABLE,
    EuclideanRBF,
    FullConnection,
    Init,
    MaskedConv,
    ScaledTanh,
    TrainableSubsampling,
    connection_mask,
)
from lenet_jax.model import STAGES, LeNet5, count_parameters, init_params, layer_table

from conftest import compiled_init

SPEC = {  # layer: (output shape, parameters, connections), from the paper
    "C1": ((28, 28, 6), 156, 122_304),
    "S2": ((14, 14, 6), 12, 5_880),
    "C3": ((10, 10, 16), 1_516, 151_600),
    "S4": ((5, 5, 16), 32, 2_000),
    "C5": ((1, 1, 120), 48_120, 48_120),
    "F6": ((84,), 10_164, 10_164),
}


def test_parameter_count_is_60000_and_per_layer_counts_match_the_paper(rbf_model):
    _, params = rbf_model
    assert count_parameters(params) == 60_000
    rows = {r["layer"]: r for r in layer_table(params)}
    for name, (shape, n_params, n_conn) in SPEC.items():
        assert rows[name]["output"] == shape
        assert rows[name]["parameters"] == n_params, name
        assert rows[name]["connections"] == n_conn, name
    assert sum(r["connections"] for r in rows.values()) == 340_908
    assert rows["output (RBF)"]["parameters"] == 0


def test_every_stage_output_has_the_paper_shape(rbf_model, digits):
    model, params = rbf_model
    x, _ = digits
    acts = model.apply({"params": params}, x, method=LeNet5.activations)
    for name, act in zip(STAGES, acts):
        chex.assert_shape(act, (x.shape[0],) + SPEC[name][0])
    chex.assert_shape(model.apply({"params": params}, x), (x.shape[0], 10))


def test_rbf_centres_are_constants_outside_the_parameter_tree(rbf_model):
    _, params = rbf_model
    assert set(params) == set(STAGES)
    leaves = jax.tree.leaves(params)
    assert not any(leaf.shape == RBF_CENTRES.shape for leaf in leaves)


@pytest.mark.slow
def test_softmax_head_adds_a_trainable_output_layer():
    model = LeNet5(head="softmax")
    params = compiled_init(model, jax.random.key(0))
    assert count_parameters(params) == 60_000 + 84 * 10 + 10
    chex.assert_shape(model.apply({"params": params}, jnp.zeros((2, 32, 32, 1))), (2, 10))


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="unknown head"):
        init_params(LeNet5(head="svm"), jax.random.key(0))


class LayerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_scaled_tanh_constants(self):
        f = self.variant(lambda a: ScaledTanh().apply({}, a))
        out = f(jnp.array([1.0, -1.0, 0.0, 100.0]))
        chex.assert_trees_all_close(out, jnp.array([1.0, -1.0, 0.0, AMPLITUDE]), atol=1e-4)
        slope = jax.grad(lambda a: ScaledTanh().apply({}, a))(0.0)
        assert abs(slope - AMPLITUDE * 2 / 3) < 1e-6  # gain near 0 about 1

    @chex.variants(with_jit=True, without_jit=True)
    def test_subsampling_is_window_sum_times_coefficient_plus_bias(self):
        layer = TrainableSubsampling()
        x = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
        params = layer.init(jax.random.key(0), x)["params"]
        out = self.variant(lambda p, x: layer.apply({"params": p}, x))(params, x)
        xn = np.asarray(x)
        sums = xn[:, 0::2, 0::2] + xn[:, 1::2, 0::2] + xn[:, 0::2, 1::2] + xn[:, 1::2, 1::2]
        expected = sums * np.asarray(params["coefficient"]) + np.asarray(params["bias"])
        chex.assert_trees_all_close(out, expected, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_rbf_is_squared_distance_to_the_bitmaps(self):
        x = jax.random.normal(jax.random.key(2), (3, 84))
        out = self.variant(lambda x: EuclideanRBF().apply({}, x))(x)
        expected = ((np.asarray(x)[:, None, :] - RBF_CENTRES[None]) ** 2).sum(-1)
        chex.assert_trees_all_close(out, expected, rtol=1e-5)
        zero = EuclideanRBF().apply({}, jnp.asarray(RBF_CENTRES[3]))
        assert float(zero[3]) == 0.0 and float(jnp.min(zero.at[3].set(1e9))) >= 4 * 20


def test_c3_table_has_60_connections_and_the_papers_rows():
    mask = connection_mask(C3_TABLE, 6)
    assert mask.sum() == 60
    np.testing.assert_array_equal(mask.sum(0), [3] * 6 + [4] * 9 + [6])
    assert set(C3_TABLE[12]) == {0, 1, 3, 4} and set(C3_TABLE[14]) == {0, 2, 3, 5}


def test_masked_kernel_entries_start_at_zero_and_get_zero_gradient(rbf_model, digits):
    model, params = rbf_model
    x, y = digits
    mask = connection_mask(C3_TABLE, 6)[None, None]
    kernel = params["C3"]["kernel"]
    assert np.all(np.asarray(kernel)[..., mask[0, 0] == 0] == 0)

    def loss(p):
        return jnp.sum(model.apply({"params": p}, x)[jnp.arange(len(y)), y])

    grad = jax.jit(jax.grad(loss))(params)["C3"]["kernel"]
    assert np.all(np.asarray(grad) * (1 - mask) == 0)
    assert np.any(np.asarray(grad) * mask != 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_initialisation_is_uniform_in_2_4_over_fan_in(seed):
    params = compiled_init(LeNet5(), jax.random.key(seed))
    fan_ins = {"C1": 25, "S2": 4, "C5": 400, "F6": 120}
    for name, fan_in in fan_ins.items():
        values = np.abs(np.concatenate([np.ravel(leaf) for leaf in params[name].values()]))
        bound = 2.4 / fan_in
        assert values.max() <= bound
        assert values.max() > 0.5 * bound  # it uses the range
    per_map = 25 * connection_mask(C3_TABLE, 6).sum(0)  # 75, 100 or 150
    kernel = np.abs(np.asarray(params["C3"]["kernel"])).max(axis=(0, 1, 2))
    assert np.all(kernel <= 2.4 / per_map) and np.all(kernel > 0.5 * 2.4 / per_map)
    bias = np.abs(np.asarray(params["C3"]["bias"]))
    assert np.all(bias <= 2.4 / per_map)


def test_init_exponent_one_half_scales_by_square_root_of_fan_in():
    params = compiled_init(LeNet5(initialization=Init(exponent=0.5)), jax.random.key(0))
    assert float(jnp.max(jnp.abs(params["C5"]["kernel"]))) <= 2.4 / 20
    assert float(jnp.max(jnp.abs(params["C5"]["kernel"]))) > 0.9 * 2.4 / 20


@pytest.mark.parametrize("impl", ["patches", "custom_vjp"])
@pytest.mark.parametrize("shape", [(2, 32, 32, 1), (1, 5, 5, 16), (1, 32, 32, 1), (14, 14, 6), (1, 1, 11, 9, 4),
                                   *(pytest.param(s, marks=pytest.mark.slow) for s in ((3, 14, 14, 6), (2, 3, 14, 14, 6)))])
def test_every_convolution_path_equals_lax_conv_with_gradients(impl, shape):
    """One image (C1's and C3's inputs at batch 1, a non-square one) takes custom_vjp's
    windows by row; several images, and C5's single window, the window matrix."""
    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (5, 5, shape[-1], 7))

    def f(impl):
        return lambda x, k: jnp.sum(jnp.sin(valid_conv(x, k, impl)))

    conv = jax.jit(valid_conv, static_argnums=2)
    chex.assert_trees_all_close(conv(x, kernel, impl), conv(x, kernel, "xla"), rtol=1e-4, atol=1e-4)
    grads = jax.jit(jax.grad(f(impl), argnums=(0, 1)))(x, kernel)
    g_xla = jax.jit(jax.grad(f("xla"), argnums=(0, 1)))(x, kernel)
    for got, want in zip(grads, g_xla):  # sums of many mixed-sign terms: float error scales with the largest entry
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("shape,k", [((1, 32, 32, 1), 5), ((14, 14, 6), 5), ((2, 9, 7, 4), 3), ((2, 3, 11, 9, 1), 3)])
def test_windows_by_row_are_the_window_matrix_transposed(shape, k):
    x = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_array_equal(windows_by_row(x, k), patches(x, k).reshape(-1, k * k * shape[-1]).T)


@pytest.mark.parametrize("shape,k", [((2, 32, 32, 1), 5), *(pytest.param(s, k, marks=pytest.mark.slow) for s, k in (((3, 14, 14, 6), 5), ((2, 3, 9, 7, 4), 3)))])
def test_window_extraction_by_gather_and_its_overlap_add_adjoint(shape, k):
    x = jax.random.normal(jax.random.key(0), shape)
    cols = patches(x, k, gather=True)
    np.testing.assert_array_equal(cols, patches(x, k))
    y = jax.random.normal(jax.random.key(1), cols.shape)
    back = overlap_add(y, k, shape[-1])
    chex.assert_shape(back, shape)
    np.testing.assert_allclose(float(jnp.vdot(cols, y)), float(jnp.vdot(x, back)), rtol=1e-5)  # <Px, y> = <x, P^T y>


def test_an_unknown_convolution_path_is_refused():
    with pytest.raises(ValueError, match="unknown convolution implementation 'fft'"):
        valid_conv(jnp.zeros((1, 6, 6, 1)), jnp.zeros((5, 5, 1, 2)), "fft")


@pytest.mark.parametrize("impl,images", [pytest.param("patches", None, marks=pytest.mark.slow), ("custom_vjp", None), ("custom_vjp", 1)])
def test_every_convolution_path_gives_the_same_network_and_gradients(impl, images, digits):
    x, y = (a[:images] for a in digits)
    a, b = LeNet5(conv_impl=impl), LeNet5(conv_impl="xla")
    params = compiled_init(a, jax.random.key(3))
    chex.assert_trees_all_close(jax.jit(a.apply)({"params": params}, x), jax.jit(b.apply)({"params": params}, x), rtol=1e-4, atol=1e-4)

    def loss(model):
        return lambda p: jnp.sum(jnp.take_along_axis(model.apply({"params": p}, x), y[:, None], 1))

    g, g_xla = jax.jit(jax.grad(loss(a)))(params), jax.jit(jax.grad(loss(b)))(params)
    chex.assert_trees_all_close(g, g_xla, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(g["C3"]["kernel"] * (1 - connection_mask(C3_TABLE, 6))))) == 0.0  # C3's table holds


def test_full_connection_and_masked_conv_shapes():
    x = jnp.zeros((4, 120))
    p = FullConnection(84).init(jax.random.key(0), x)["params"]
    chex.assert_shape(p["kernel"], (120, 84))
    conv = MaskedConv(16, table=C3_TABLE)
    p = conv.init(jax.random.key(0), jnp.zeros((1, 14, 14, 6)))["params"]
    chex.assert_shape(conv.apply({"params": p}, jnp.zeros((2, 14, 14, 6))), (2, 10, 10, 16))


def test_bitmaps_are_distinct_plus_minus_one_glyphs():
    assert DIGIT_BITMAPS.shape == (10, 12, 7)
    assert set(np.unique(DIGIT_BITMAPS)) == {-1.0, 1.0}
    d = hamming_distances()
    assert d[~np.eye(10, dtype=bool)].min() >= 20
    art = ascii_art(1).splitlines()
    assert len(art) == 12 and all(len(r) == 7 for r in art)
