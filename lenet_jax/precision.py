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


def _operands(policy: str, *xs: jax.Array) -> tuple[jax.Array, ...]:
    if policy == "bfloat16":
        return tuple(x.astype(jnp.bfloat16) for x in xs)
    return xs


def matmul(a: jax.Array, b: jax.Array, policy: str = "float32") -> jax.Array:
    """``a @ b`` at ``policy``; the result has ``a``'s dtype."""
    out_dtype = a.dtype
    a, b = _operands(check(policy), a, b)
    return jnp.matmul(a, b, precision=_LEVELS[policy], preferred_element_type=out_dtype)


def conv(x: jax.Array, kernel: jax.Array, policy: str = "float32") -> jax.Array:
    """A 'VALID', stride-1 NHWC x HWIO convolution at ``policy``; the result has ``x``'s dtype."""
    out_dtype = x.dtype
    x, kernel = _operands(check(policy), x, kernel)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_LEVELS[policy], preferred_element_type=out_dtype,
    )
