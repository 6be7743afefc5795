"""Options for the text's own settings (issue 29, section 5): what each changes, against
the project's default computation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import pytest

from lenet_jax.config import Config
from lenet_jax.factories import create_state
from lenet_jax.inputs import pad_images
from lenet_jax.sdlm import get_hessian

from conftest import refresh_curvature


@pytest.mark.parametrize("samples", [7, 40])
def test_a_summed_curvature_is_the_mean_times_the_patterns(mnist, samples):
    images, labels = jnp.asarray(pad_images(mnist.train_images[:60])), jnp.asarray(mnist.train_labels[:60])
    mean_config = Config(hessian_samples=samples)
    state = create_state(mean_config, 60)
    mean = get_hessian(refresh_curvature(state, images, labels, mean_config, 1).opt_state)
    summed = get_hessian(refresh_curvature(state, images, labels, mean_config.replace(hessian_reduce="sum"), 1).opt_state)
    chex.assert_trees_all_close(summed, jax.tree.map(lambda h: h * samples, mean), rtol=1e-6)
    assert float(jax.tree.leaves(jax.tree.map(jnp.max, mean))[0]) > 0


def test_a_fan_in_counting_the_bias_narrows_every_initial_range_to_f_plus_1():
    """C1's weights (F = 25) are drawn from the same uniforms scaled by 2.4/26 instead of
    2.4/25, C5's (F = 400) by 2.4/401; the other options stay as they were."""
    from lenet_jax.factories import make_model
    from lenet_jax.model import init_params

    plain_config = Config(init_exponent=1.0)
    plain = init_params(make_model(plain_config), jax.random.key(0))
    counted = init_params(make_model(plain_config.replace(init_fan_in="inputs+bias")), jax.random.key(0))
    for layer, fan_in in (("C1", 25), ("C5", 400), ("F6", 120)):
        chex.assert_trees_all_close(counted[layer]["kernel"], plain[layer]["kernel"] * fan_in / (fan_in + 1), rtol=1e-6)
        chex.assert_trees_all_close(counted[layer]["bias"], plain[layer]["bias"] * fan_in / (fan_in + 1), rtol=1e-6)
