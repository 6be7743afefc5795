"""The fused batch-1 step (one Pallas kernel per chunk of updates): it computes what the
XLA path computes, in Pallas' interpret mode on the CPU, and it lowers to Triton for CUDA."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

from lenet_jax import fused
from lenet_jax.config import Config
from lenet_jax.errors import ConfigError
from lenet_jax.factories import create_state, make_schedule, update_impl_for
from lenet_jax.inputs import pad_images
from lenet_jax.sdlm import get_hessian, set_hessian
from lenet_jax.training import fit
from lenet_jax.updates import compiled_train_chunk, epoch_batches, update_key

from conftest import QUIET, refresh_curvature, small


@pytest.fixture(scope="module")
def start(mnist):
    """A state holding a refreshed curvature estimate (the paper's, over 100 patterns), as
    every epoch of a run starts."""
    config = Config(hessian_samples=100)
    images, labels = pad_images(jnp.asarray(mnist.train_images[:600])), jnp.asarray(mnist.train_labels[:600])
    state = refresh_curvature(create_state(config, 600), images, labels, config, 1)
    return config, images, labels, state


@pytest.fixture(scope="module")
def across_a_change_of_rate(start):
    """30 updates of real digits from the refreshed state, by the XLA path and by the
    kernel, across the paper schedule's change of rate (10 updates per epoch: epoch 2 to
    3 at update 20, 2.5e-4 to 1e-4): the state they start from, then each one's state and
    metrics after."""
    config, images, labels, state = start
    at = dict(step=jnp.asarray(10, jnp.int32))
    before = create_state(config, 10)  # the optimiser of a run with 10 updates per epoch
    before = before.replace(params=state.params, opt_state=optax.tree_utils.tree_set(
        set_hessian(before.opt_state, get_hessian(state.opt_state)), count=jnp.asarray(10, jnp.int32)), **at)
    schedule = make_schedule(config, 10)
    assert float(schedule(19)) != float(schedule(20))
    batches = epoch_batches(0, 1, 600, 1)[:30]
    xla = compiled_train_chunk(jax.tree.map(jnp.copy, before), images, labels, batches, update_key(0), objective=config.objective)
    got = fused.fused_train_chunk(jax.tree.map(jnp.copy, before), images, labels, batches, schedule=schedule, mu=config.mu,
                                  j=config.map_j, interpret=True)
    return before, xla, got


def test_the_fused_kernel_computes_what_the_xla_path_computes(across_a_change_of_rate):
    """30 batch-1 SDLM updates of real digits: the same error count, the same loss, the
    same optimiser position, the curvature estimate held (the parameters: below)."""
    before, (xla, m_xla), (got, m) = across_a_change_of_rate
    assert int(m["errors"]) == int(m_xla["errors"]) and float(m["loss"]) == pytest.approx(float(m_xla["loss"]), rel=1e-5)
    assert bool(m["finite"]) and bool(m_xla["finite"])
    assert int(got.step) == int(xla.step) == 40
    count = optax.tree_utils.tree_get
    assert int(count(got.opt_state, "count")) == int(count(xla.opt_state, "count")) == 40  # the schedule moved on with the step
    chex.assert_trees_all_equal(get_hessian(got.opt_state), get_hessian(xla.opt_state), get_hessian(before.opt_state))  # held


def test_the_fused_kernel_steps_each_update_at_its_own_learning_rate(across_a_change_of_rate):
    """The same parameters as the XLA path's after the 30 updates across the change of
    rate, to float32 rounding (measured: under 1e-6 relative, the rounding scaling with a
    leaf's largest entry), so one update stepped at its neighbour's rate would show."""
    before, (xla, _), (got, _) = across_a_change_of_rate
    for a, b, start in zip(jax.tree.leaves(got.params), jax.tree.leaves(xla.params), jax.tree.leaves(before.params)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * float(jnp.max(jnp.abs(b)))
        assert not bool(jnp.all(a == start))  # every leaf moved


def test_packing_the_parameters_is_lossless(rbf_model):
    _, params = rbf_model
    chex.assert_trees_all_equal(fused.unpack(fused.pack(params), params), params)


def test_only_the_papers_configuration_is_fused():
    assert update_impl_for(Config()) == "xla" and update_impl_for(Config(update_impl="fused")) == "fused"
    with pytest.raises(ConfigError, match=r"paper's configuration at batch 1 only; this run asks for --batch-size 8, --dropout 0.1"):
        update_impl_for(Config(update_impl="fused", batch_size=8, dropout=0.1))


def test_the_fused_kernel_lowers_to_triton_for_cuda(start):
    """What the GPU would compile: every operation of the kernel has a Triton lowering
    (the compilation to PTX itself needs a GPU)."""
    config, images, labels, state = start
    traced = fused.fused_train_chunk.trace(state, images, labels, epoch_batches(0, 1, 600, 1)[:8], schedule=make_schedule(config, 600),
                                           mu=config.mu, j=config.map_j, interpret=False)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text


@pytest.mark.slow
def test_a_fused_run_trains_and_resumes_exactly(mnist, tmp_path):
    data = small(mnist, 150, 500)
    config = Config(update_impl="fused", epochs=2, hessian_samples=20)
    straight = fit(config, data, tmp_path / "a", **QUIET)
    fit(config.replace(epochs=1), data, tmp_path / "b", **QUIET)
    resumed = fit(config, data, tmp_path / "b", resume=True, **QUIET)
    chex.assert_trees_all_equal(straight.state.params, resumed.state.params)
    xla = fit(config.replace(update_impl="xla"), data, tmp_path / "c", **QUIET)
    assert straight.history[-1]["test_error"] == pytest.approx(xla.history[-1]["test_error"], abs=0.01)
