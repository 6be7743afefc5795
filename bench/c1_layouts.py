"""C1 on 1,000 images written four ways, timed standalone under jit (best-of-10 mean):
the "patches" and "xla" convolutions of lenet_jax, 25 shifted multiply-adds in NHWC
("fma"), and the same channels-first ("planar", output (B, 6, 28, 28)). Prints the
forward, forward + tanh, and kernel-gradient milliseconds and the error against
lax.conv, then the whole LeNet-5 forward pass for scale. Asserts nothing.

    python -m bench.c1_layouts
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lenet_jax.conv import valid_conv
from lenet_jax.model import LeNet5, init_params


def ms(f: Callable[..., Any], *args: Any, repeats: int = 10) -> float:
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(f(*args))
    return (time.perf_counter() - t0) / repeats * 1e3


def fma(x: jax.Array, k: jax.Array) -> jax.Array:
    return sum(x[:, i : i + 28, j : j + 28, :] * k[i, j, 0] for i in range(5) for j in range(5))


def planar(x: jax.Array, k: jax.Array) -> jax.Array:
    xs = x[..., 0]
    return jnp.stack([sum(xs[:, i : i + 28, j : j + 28] * k[i, j, 0, f] for i in range(5) for j in range(5)) for f in range(6)], axis=1)


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (1000, 32, 32, 1))
    k = jax.random.normal(jax.random.key(1), (5, 5, 1, 6))
    ways = {"patches": lambda x, k: valid_conv(x, k, "patches"), "xla": lambda x, k: valid_conv(x, k, "xla"), "fma": fma, "planar": planar}
    reference = ways["xla"](x, k)
    print(f"backend {jax.default_backend()}; C1 of 1,000 images, milliseconds")
    for name, f in ways.items():
        y = jax.jit(f)(x, k)
        y = jnp.moveaxis(y, 1, -1) if name == "planar" else y
        grad = jax.jit(jax.grad(lambda k, x, f=f: jnp.sum(jnp.tanh(f(x, k)))))
        print(
            f"{name:8s} forward {ms(jax.jit(f), x, k):6.1f}  + tanh {ms(jax.jit(lambda x, k, f=f: jnp.tanh(f(x, k))), x, k):6.1f}"
            f"  kernel gradient {ms(grad, k, x):6.1f}  max error {float(jnp.max(jnp.abs(y - reference))):.1e}"
        )
    for impl in ("patches", "xla"):
        model = LeNet5(conv_impl=impl)
        params = init_params(model, jax.random.key(2))
        print(f"whole LeNet-5 forward ({impl}): {ms(jax.jit(lambda p, x: model.apply({'params': p}, x)), params, x):.1f}")


if __name__ == "__main__":
    main()
