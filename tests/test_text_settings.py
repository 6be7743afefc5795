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


def test_refreshes_within_the_first_epoch_come_every_n_updates():
    config = Config(hessian_refresh_first_epoch=6)
    assert config.refreshes_within(1, 20) == [6, 12, 18] and config.refreshes_within(1, 18) == [6, 12]
    assert config.refreshes_within(2, 20) == [] and Config().refreshes_within(1, 20) == []


def _recording_refreshes(monkeypatch) -> list[tuple[int, int]]:
    from lenet_jax import updates

    seen: list[tuple[int, int]] = []
    real = updates.Strategy.refresh

    def recording(self, state, images, labels, configs, train_index, epoch, update=0):
        seen.append((epoch, update))
        return real(self, state, images, labels, configs, train_index, epoch, update)

    monkeypatch.setattr(updates.Strategy, "refresh", recording)
    return seen


FIRST_EPOCH = Config(epochs=2, train_subset=20, hessian_samples=8, hessian_refresh_first_epoch=6, chunks=2, stop_at_chance=False)


def test_the_loop_refreshes_at_those_updates_and_resumes_exactly_across_them(mnist, tmp_path, monkeypatch):
    from lenet_jax.training import fit

    from conftest import QUIET, small

    data = small(mnist, 20, 10)
    seen = _recording_refreshes(monkeypatch)
    straight = fit(FIRST_EPOCH, data, tmp_path / "straight", **QUIET)
    assert seen == [(1, 0), (1, 6), (1, 12), (1, 18), (2, 0)]
    for calls in (2, 3):  # epoch 1's chunks are updates 0-6, 6-10, 10-12, 12-18, 18-20: stops at 10 and at 12
        asked = []
        stopped = fit(FIRST_EPOCH, data, tmp_path / f"stop{calls}", stop=lambda: asked.append(1) or len(asked) == calls, **QUIET)
        assert stopped.position.update == (10 if calls == 2 else 12)
        resumed = fit(FIRST_EPOCH, data, tmp_path / f"stop{calls}", resume=True, **QUIET)
        chex.assert_trees_all_equal(straight.state.params, resumed.state.params)
    other = fit(FIRST_EPOCH.replace(hessian_refresh_first_epoch=0), data, tmp_path / "plain", **QUIET)
    assert not all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(other.state.params), jax.tree.leaves(straight.state.params)))


def test_a_constant_rbf_curvature_is_2_per_f6_output_whatever_the_outputs():
    from lenet_jax.errors import ConfigError
    from lenet_jax.losses import DEFAULT_J, RBF_CENTRES, Objective

    near = jnp.asarray(RBF_CENTRES[0]) + jnp.sqrt(DEFAULT_J / 84)  # penalty j from class 0: the MAP term's share is half
    far = jax.random.normal(jax.random.key(0), (84,))
    for outputs in (near, far):
        for label in (0, 7):
            factor = Objective(rbf_curvature="constant").curvature_factor(outputs, jnp.asarray(label))
            chex.assert_trees_all_close(factor.T @ factor, 2.0 * jnp.eye(84), atol=1e-6)
    exact = Objective().curvature_factor(near, jnp.asarray(0))
    assert float(jnp.max(jnp.abs(exact.T @ exact - 2.0 * jnp.eye(84)))) > 1e-3  # the default adds the MAP term's part
    with pytest.raises(ConfigError, match="the softmax head has no RBF layer"):
        Objective("softmax", "xent", rbf_curvature="constant")
    assert Config(rbf_curvature="constant").objective.rbf_curvature == "constant"
