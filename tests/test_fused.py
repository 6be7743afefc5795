"""The fused batch-1 step (one Pallas kernel per chunk of updates): it computes what the
XLA path computes, in Pallas' interpret mode on the CPU, and it lowers to Triton for CUDA."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lenet_jax import fused
from lenet_jax.config import Config
from lenet_jax.factories import create_state, make_schedule, step_impl_for
from lenet_jax.inputs import pad_images
from lenet_jax.sdlm import get_hessian, set_hessian
from lenet_jax.steps import compiled_train_chunk, epoch_batches, step_keys
from lenet_jax.training import fit

from conftest import QUIET, small


@pytest.fixture(scope="module")
def start(mnist):
    """A state holding a curvature estimate (random and positive, so no refresh need compile)."""
    config = Config()
    images, labels = pad_images(jnp.asarray(mnist.train_images[:600])), jnp.asarray(mnist.train_labels[:600])
    state = create_state(config, 600)
    rng = np.random.default_rng(9)
    estimate = jax.tree.map(lambda x: rng.uniform(0.0, 2.0, x.shape).astype(np.float32), state.params)
    return config, images, labels, state.replace(opt_state=set_hessian(state.opt_state, estimate))


def test_the_fused_kernel_computes_what_the_xla_path_computes(start):
    """100 batch-1 SDLM updates of real digits: the same parameters to float32 rounding
    (measured: under 1e-6 relative), the same error count, the same loss, the same
    optimiser position."""
    config, images, labels, state = start
    batches = epoch_batches(0, 1, 600, 1)[:100]
    xla, m_xla = compiled_train_chunk(jax.tree.map(jnp.copy, state), images, labels, batches, step_keys(0), objective=config.objective)
    got, m = fused.fused_train_chunk(jax.tree.map(jnp.copy, state), images, labels, batches, schedule=make_schedule(config, 600),
                                     mu=config.mu, j=config.map_j, interpret=True)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(xla.params)):  # rounding scales with the largest entry
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
    assert int(m["errors"]) == int(m_xla["errors"]) and float(m["loss"]) == pytest.approx(float(m_xla["loss"]), rel=1e-5)
    assert int(got.step) == int(xla.step) == 100
    count = optax.tree_utils.tree_get
    assert int(count(got.opt_state, "count")) == int(count(xla.opt_state, "count")) == 100  # the schedule moved on with the step
    chex.assert_trees_all_equal(get_hessian(got.opt_state), get_hessian(xla.opt_state))  # held for the pass


def test_packing_the_parameters_is_lossless(rbf_model):
    _, params = rbf_model
    chex.assert_trees_all_equal(fused.unpack(fused.pack(params), params), params)


def test_only_the_papers_configuration_is_fused():
    assert step_impl_for(Config()) == "xla" and step_impl_for(Config(step_impl="fused")) == "fused"
    with pytest.raises(ValueError, match=r"paper's configuration at batch 1 only; this run asks for --batch-size 8, --dropout 0.1"):
        step_impl_for(Config(step_impl="fused", batch_size=8, dropout=0.1))


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
    config = Config(step_impl="fused", epochs=2, hessian_samples=20)
    straight = fit(config, data, tmp_path / "a", **QUIET)
    fit(config.replace(epochs=1), data, tmp_path / "b", **QUIET)
    resumed = fit(config, data, tmp_path / "b", resume=True, **QUIET)
    chex.assert_trees_all_equal(straight.state.params, resumed.state.params)
    xla = fit(config.replace(step_impl="xla"), data, tmp_path / "c", **QUIET)
    assert straight.history[-1]["test_error"] == pytest.approx(xla.history[-1]["test_error"], abs=0.01)
