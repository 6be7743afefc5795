"""The batch-minor forward pass (lenet_jax.batch_minor) computes the module's scores, and
the evaluation of a training run on the CPU uses it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax import batch_minor
from lenet_jax.config import Config, preset
from lenet_jax.factories import make_inference, make_model
from lenet_jax.layers import C3_TABLE
from lenet_jax.model import init_params
from lenet_jax.training import build

CONFIGS = {
    "paper": Config(),
    "softmax-relu-max": Config(head="softmax", activation="relu", subsampling="max"),
    "squashed-selu-average-dense-lush": Config(head="squashed", activation="selu", subsampling="average", c3="dense", input_scaling="lush"),
    "modern": preset("modern"),
    "lush": preset("lush"),
}


def perturbed_params(config: Config, seed: int = 0):
    """Fresh parameters with every entry moved, the C3 entries table I leaves out
    included: those must be ignored, as the module's mask ignores them."""
    model = make_model(config, inference=True)
    params = init_params(model, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return model, jax.tree.unflatten(tree, [v + 0.05 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


SHAPES = [(300,), (2, 3), (1,)]
"""300 images (two steps of 160, the last 20 padding), leading axes, one image."""


@pytest.mark.parametrize("name, shape", [("paper", shape) for shape in SHAPES]
                         + [pytest.param(name, shape, marks=pytest.mark.slow) for name in list(CONFIGS)[1:] for shape in SHAPES])
def test_scores_equal_the_module(name, shape):
    """Every head, squashing function, subsampling, C3, input scaling and preset, at
    each of SHAPES."""
    model, params = perturbed_params(CONFIGS[name])
    x = jax.random.uniform(jax.random.key(7), shape + (32, 32, 1), minval=-0.1, maxval=1.175)
    expected = model.apply({"params": params}, x)
    got = jax.jit(lambda p, x: batch_minor.scores(p, x, model))(params, x)
    chex.assert_shape(got, expected.shape)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(expected))))


def test_groups_cover_table_one_once():
    connections = [(maps[g], read[g]) for maps, reads in batch_minor.groups(C3_TABLE, 6, 16) for read in reads for g in range(len(maps))]
    assert sorted(connections) == sorted((f, c) for f, row in enumerate(C3_TABLE) for c in row)
    assert [len(maps) for maps, _ in batch_minor.groups(C3_TABLE, 6, 16)] == [6, 6, 3, 1]
    assert len(batch_minor.groups(None, 6, 16)) == 1


def test_which_forward_pass_inference_uses():
    assert make_inference(Config(), backend="cpu").batch_minor
    assert make_inference(Config(conv_impl="custom_vjp"), backend="cpu").batch_minor
    assert not make_inference(Config(), backend="gpu").batch_minor  # nothing changes on GPUs and TPUs
    assert not make_inference(Config(conv_impl="xla"), backend="cpu").batch_minor
    assert not make_inference(Config(conv="separable"), backend="cpu").batch_minor
    assert not make_inference(Config(precision="bfloat16"), backend="cpu").batch_minor


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a run takes the batch-minor pass on the CPU only")
def test_calls_of_one_step_or_more_take_the_batch_minor_pass():
    """A training run's evaluation takes the batch-minor pass for calls of at least
    MIN_IMAGES images (a lax.map, traced as a scan, and no convolution), the module below
    that."""
    model, params = perturbed_params(Config())
    built = build(Config(), [0], 100)
    assert built.infer_fn.batch_minor
    for n, batch_minor_pass in ((batch_minor.MIN_IMAGES, True), (batch_minor.MIN_IMAGES - 1, False)):
        program = str(jax.make_jaxpr(lambda p, x: built.infer_fn({"params": p}, x))(params, jnp.zeros((n, 32, 32, 1))))
        assert ("conv_general_dilated" not in program and "scan" in program) == batch_minor_pass, n


def test_inference_keeps_the_modules_other_methods():
    """Another method, or a call with arguments (dropout in training), at a batch the
    batch-minor pass would otherwise take, goes to the module."""
    config = Config(dropout=0.5)
    model, params = perturbed_params(config)
    infer = make_inference(config, backend="cpu")
    n = batch_minor.MIN_IMAGES
    x = jax.random.uniform(jax.random.key(3), (n, 32, 32, 1))
    acts = infer({"params": params}, x, method="activations")
    assert [a.shape for a in acts] == [(n, 28, 28, 6), (n, 14, 14, 6), (n, 10, 10, 16), (n, 5, 5, 16), (n, 1, 1, 120), (n, 84)]
    rngs = {"dropout": jax.random.key(4)}
    np.testing.assert_array_equal(infer({"params": params}, x, train=True, rngs=rngs), model.apply({"params": params}, x, train=True, rngs=rngs))
    with pytest.raises(ValueError, match="separable convolutions"):
        batch_minor.scores(params, x, make_model(Config(conv="separable"), inference=True))
