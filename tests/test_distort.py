"""Affine distortions: the warp is exact where it can be checked, the draws stay in their
ranges, and distorted training runs inside the compiled epoch, reproducibly."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.cli.train import main as train_main
from lenet_jax.config import Config
from lenet_jax.distort import Distortion, distort_batch, random_affine, warp
from lenet_jax.factories import create_state
from lenet_jax.inputs import BACKGROUND, preprocess
from lenet_jax.training import fit
from lenet_jax.updates import Strategy, train_chunk

from conftest import QUIET, one_line, small


def test_identity_warp_returns_the_image(digits):
    x = digits[0][0]
    np.testing.assert_allclose(warp(x, jnp.eye(2), jnp.zeros(2)), x, atol=1e-6)


def test_integer_translation_moves_pixels_and_fills_with_background(digits):
    x = np.asarray(digits[0][0])
    got = np.asarray(warp(jnp.asarray(x), jnp.eye(2), jnp.array([2.0, -3.0])))
    np.testing.assert_allclose(got[2:, :-3], x[:-2, 3:], atol=1e-6)  # down 2, left 3
    np.testing.assert_allclose(got[:2], BACKGROUND, atol=1e-6)
    np.testing.assert_allclose(got[:, -3:], BACKGROUND, atol=1e-6)


def test_scaling_about_the_centre_keeps_the_centre_pixel(digits):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(33, 33, 1)).astype(np.float32))
    got = warp(x, 1.3 * jnp.eye(2), jnp.zeros(2))
    assert float(got[16, 16, 0]) == pytest.approx(float(x[16, 16, 0]), abs=1e-5)


def test_draws_stay_within_their_ranges():
    d = Distortion(translate=2.0, scale=0.1, squeeze=0.2, shear=0.3)
    matrices, shifts = jax.vmap(lambda k: random_affine(k, d))(jax.random.split(jax.random.key(0), 2000))
    matrices, shifts = np.asarray(matrices), np.asarray(shifts)
    assert np.abs(shifts).max() <= 2.0 and np.abs(shifts).max() > 1.9
    s_over_q, s_times_q = matrices[:, 0, 0], matrices[:, 1, 1]
    scale, squeeze = np.sqrt(s_over_q * s_times_q), np.sqrt(s_times_q / s_over_q)
    assert 0.9 - 1e-6 <= scale.min() and scale.max() <= 1.1 + 1e-6
    assert 0.8 - 1e-6 <= squeeze.min() and squeeze.max() <= 1.2 + 1e-6
    shear = matrices[:, 1, 0] / s_over_q
    assert np.abs(shear).max() <= 0.3 + 1e-6 and np.abs(shear).max() > 0.28
    np.testing.assert_allclose(matrices[:, 0, 1], 0.0)


def test_probability_decides_how_many_are_distorted(digits):
    x = jnp.repeat(digits[0][:1], 400, axis=0)
    never = distort_batch(jax.random.key(0), x, Distortion(probability=0.0))
    np.testing.assert_array_equal(never, x)
    some = distort_batch(jax.random.key(0), x, Distortion(probability=0.9))
    changed = np.mean(np.any(np.abs(np.asarray(some - x)) > 1e-4, axis=(1, 2, 3)))
    assert 0.85 < changed < 0.95


@pytest.mark.slow
def test_distorted_training_differs_and_is_reproducible(mnist):
    config = Config(epochs=1, train_subset=64)
    images, labels = jnp.asarray(mnist.train_images[:64]), jnp.asarray(mnist.train_labels[:64])
    batches = jnp.arange(64).reshape(64, 1)
    key = jax.random.key(5)

    def train(augment):
        state = create_state(config, 64)
        return train_chunk(state, images, labels, batches, key, objective=config.objective, augment=augment)[0].params

    plain, a, b = train(None), train(Distortion()), train(Distortion())
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(plain["F6"]["kernel"], a["F6"]["kernel"])


def test_the_chunks_of_a_distorted_run_are_given_its_distortion():
    """``Strategy.build`` hands ``--distort``'s ``Distortion`` to the compiled chunk, of one
    model and of several (what the chunk does with it: the slow tests above and below)."""
    for n_seeds in (1, 2):
        plain = Strategy.build(Config(), n_seeds=n_seeds, updates_per_epoch=8).chunk
        distorted = Strategy.build(Config(distort=True, distort_translate=1.5), n_seeds=n_seeds, updates_per_epoch=8).chunk
        assert plain.keywords["augment"] is None
        assert distorted.keywords["augment"] == Distortion(translate=1.5) != Distortion()


@pytest.mark.slow
def test_distorted_run_resumes_exactly(mnist, tmp_path):
    data = small(mnist, 200, 100)
    config = Config(epochs=2, train_subset=200, hessian_samples=20, distort=True, dropout=0.2)
    straight = fit(config, data, tmp_path / "a", **QUIET)
    first = fit(config.replace(epochs=1), data, tmp_path / "b", **QUIET)
    resumed = fit(config, data, tmp_path / "b", resume=True, **QUIET)
    chex.assert_trees_all_equal(straight.state.params, resumed.state.params)
    undistorted = fit(config.replace(epochs=1, distort=False), data, tmp_path / "c", **QUIET)  # the run above did distort
    assert not np.allclose(first.state.params["C1"]["kernel"], undistorted.state.params["C1"]["kernel"], rtol=0, atol=1e-7)


def test_each_image_gets_its_own_draw_applied_to_the_padded_input(mnist):
    """distort_batch = warp of each padded 32x32 input by its own key's affine map."""
    x = preprocess(jnp.asarray(np.repeat(mnist.train_images[:1], 3, axis=0)))
    d = Distortion(probability=1.0)
    got = distort_batch(jax.random.key(4), x, d)
    for i, k in enumerate(jax.random.split(jax.random.key(4), 3)):
        matrix, shift = random_affine(jax.random.split(k)[1], d)
        np.testing.assert_allclose(got[i], warp(x[i], matrix, shift), atol=1e-6)
    assert not np.allclose(got[0], got[1]) and not np.allclose(got[0], x[0])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--distort-scale", "1.5"], "must be below 1"),
        (["--distort-probability", "2"], "--distort-probability must be at most 1.0"),
        (["--distort-shear", "-0.1"], "--distort-shear must be at least 0.0"),
        (["--distort-translate", "inf"], "--distort-translate must be a finite number"),
    ],
)
def test_bad_distortion_ranges_exit_2(args, message, tmp_path, capsys):
    assert message in one_line(capsys, train_main(["--distort", *args, "--workdir", str(tmp_path / "r")]))
