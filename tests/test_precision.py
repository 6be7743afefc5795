"""The precision policy reaches every matrix product and convolution: of training (each
convolution path, forward and backward), of the curvature pass (each estimator) and of
inference; and it changes the numbers only as much as its rounding allows."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax import precision as prec
from lenet_jax.config import Config
from lenet_jax.evaluation import evaluate_arrays
from lenet_jax.factories import create_state, make_model
from lenet_jax.inputs import pad_images
from lenet_jax.updates import CHUNK_STATIC, curvature_model, estimate_hessian, train_chunk

PRODUCT = re.compile(r"stablehlo\.(dot_general|convolution)\b.*")


def products(text: str) -> list[str]:
    lines = [m.group(0) for m in PRODUCT.finditer(text)]
    assert lines, "no product found"
    return lines


def follows(line: str, policy: str) -> bool:
    operands = re.findall(r"tensor<[^>]*x(\w+)>", line.split(":")[-1])[:2]
    if policy == "bfloat16":
        return operands == ["bf16", "bf16"]
    levels = re.findall(r"\b(DEFAULT|HIGHEST|HIGH)\b", line)
    return operands == ["f32", "f32"] and levels == [{"float32": "HIGHEST", "tf32": "HIGH"}[policy]] * 2


def lowered_programs(config: Config) -> dict[str, str]:
    """The StableHLO of a training chunk, a curvature refresh and an evaluation of ``config``."""
    images, labels = pad_images(jnp.zeros((4, 28, 28), jnp.uint8)), jnp.zeros(4, jnp.int32)
    state = create_state(config, 4)
    chunk = jax.jit(train_chunk, static_argnames=CHUNK_STATIC)
    batches = jnp.zeros((2, config.batch_size), jnp.int32)
    out = {"train": chunk.lower(state, images, labels, batches, jax.random.key(0), objective=config.objective).as_text()}
    out["curvature"] = estimate_hessian.lower(state.params, images, labels, jnp.arange(2), jax.random.key(1), estimator=config.hessian_estimator,
                                              model=curvature_model(config), objective=config.objective, probes=2).as_text()
    out["inference"] = evaluate_arrays.lower(state.params, make_model(config, inference=True).apply, images, labels, config.objective, 2).as_text()
    return out


PATHS = [("custom_vjp", "paper", "rbf"), ("xla", "gauss_newton", "softmax"), ("patches", "hutchinson", "rbf")]
CASES = [pytest.param(policy, *path, marks=() if (i, j) == (2, 0) else pytest.mark.slow)  # bfloat16, custom_vjp in the fast tier
         for i, policy in enumerate(["float32", "tf32", "bfloat16"]) for j, path in enumerate(PATHS)]


@pytest.mark.parametrize("policy,conv_impl,estimator,head", CASES)
def test_every_product_follows_the_policy(policy, conv_impl, estimator, head):
    config = Config(precision=policy, conv_impl=conv_impl, hessian_estimator=estimator, hutchinson_probes=2,
                    head=head, loss="xent" if head == "softmax" else "map", batch_size=2)
    with jax.default_matmul_precision("bfloat16"):  # so that a product the policy missed would show
        programs = lowered_programs(config)
    for name, text in programs.items():
        missed = [line for line in products(text) if not follows(line, policy)]
        assert not missed, f"{name}: {missed[:2]}"


def test_reduced_precision_changes_products_only_by_its_rounding():
    a = jax.random.normal(jax.random.key(0), (64, 256))
    b = jax.random.normal(jax.random.key(1), (256, 32))
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    f32 = np.asarray(prec.matmul(a, b, "float32"))
    bf16 = np.asarray(prec.matmul(a, b, "bfloat16"))
    assert prec.matmul(a, b, "bfloat16").dtype == jnp.float32
    scale = np.abs(exact).max()
    assert np.abs(f32 - exact).max() < 1e-5 * scale
    assert 1e-4 * scale < np.abs(bf16 - exact).max() < 3e-2 * scale  # bfloat16 keeps 8 bits of mantissa


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'; choose from float32, tf32, bfloat16"):
        prec.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), "fp8")
