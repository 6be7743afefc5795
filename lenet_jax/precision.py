"""The precision policy of every matrix product and convolution in the project.

On NVIDIA GPUs a float32 product defaults to TensorFloat-32 (10 mantissa bits), on TPUs
to one bfloat16 pass; on the CPU it is exact. So that the paper's reproduction gives the
same numbers on every backend, each product here names its precision explicitly:

``float32``   exact float32 (``lax.Precision.HIGHEST``): the default everywhere.
``tf32``      ``lax.Precision.HIGH``: TensorFloat-32 on NVIDIA GPUs, three bfloat16 passes
              on TPUs, exact float32 on the CPU.
``bfloat16``  operands rounded to bfloat16, products accumulated in float32: the fastest
              on GPUs and TPUs (the parameters themselves stay float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("float32", "tf32", "bfloat16")

_LEVELS = {"float32": jax.lax.Precision.HIGHEST, "tf32": jax.lax.Precision.HIGH, "bfloat16": jax.lax.Precision.DEFAULT}


def check(policy: str) -> str:
    """``policy`` if it is one of ``PRECISIONS``, else ValueError."""
    if policy not in _LEVELS:
        raise ValueError(f"unknown precision {policy!r}; choose from {', '.join(PRECISIONS)}")
    return policy


def _dot(x: jax.Array, y: jax.Array, policy: str, out_dtype: jnp.dtype) -> jax.Array:
    return jnp.matmul(x, y, precision=_LEVELS[policy], preferred_element_type=out_dtype)


def _conv(x: jax.Array, kernel: jax.Array, policy: str, out_dtype: jnp.dtype) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_LEVELS[policy], preferred_element_type=out_dtype,
    )


def _in_bfloat16(op):
    """``op`` (a bilinear product) on bfloat16 operands with a float32 result, whose
    derivatives, forward and backward, are bfloat16 products too: the tangent products
    have bfloat16 results, so their transposes (the backward pass) multiply bfloat16
    operands rather than falling back to float32 products at the default precision."""

    @jax.custom_jvp
    def product(x: jax.Array, y: jax.Array) -> jax.Array:
        return op(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16), "bfloat16", x.dtype)

    @product.defjvp
    def product_jvp(primals, tangents):
        (x, y), (dx, dy) = primals, tangents
        x16, y16 = x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)
        out = op(x16, y16, "bfloat16", x.dtype)
        half = lambda a, b: op(a, b, "bfloat16", jnp.bfloat16).astype(x.dtype)  # noqa: E731
        return out, half(dx.astype(jnp.bfloat16), y16) + half(x16, dy.astype(jnp.bfloat16))

    return product


_bf16_dot, _bf16_conv = _in_bfloat16(_dot), _in_bfloat16(_conv)


def matmul(a: jax.Array, b: jax.Array, policy: str = "float32") -> jax.Array:
    """``a @ b`` at ``policy``, its derivatives too; the result has ``a``'s dtype."""
    if check(policy) == "bfloat16":
        return _bf16_dot(a, b)
    return _dot(a, b, policy, a.dtype)


def conv(x: jax.Array, kernel: jax.Array, policy: str = "float32") -> jax.Array:
    """A 'VALID', stride-1 NHWC x HWIO convolution at ``policy``, its derivatives too; the
    result has ``x``'s dtype."""
    if check(policy) == "bfloat16":
        return _bf16_conv(x, kernel)
    return _conv(x, kernel, policy, x.dtype)
