"""The forward pass of 1,000 images two ways, timed standalone under jit (the best of
three means of 20 calls each): the module with its NHWC convolutions (``lax.conv``, what
evaluation ran before) and ``lenet_jax.batch_minor`` at several step sizes (``CHUNK``).
Prints milliseconds, the seconds to lower and compile each, and the largest difference
in the scores. Asserts nothing.

    python -m bench.batch_minor
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from bench.c1_layouts import ms
from lenet_jax import batch_minor
from lenet_jax.config import Config
from lenet_jax.factories import make_model
from lenet_jax.model import init_params


def best_ms(f: Callable[..., Any], *args: Any, calls: int = 20, rounds: int = 3) -> float:
    return min(ms(f, *args, repeats=calls) for _ in range(rounds))


def compile_s(f: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    jax.jit(lambda *a: f(*a)).lower(*args).compile()  # a new function: nothing cached
    return time.perf_counter() - t0


def main() -> None:
    model = make_model(Config(), inference=True)
    params = init_params(model, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (1000, 32, 32, 1), minval=-0.1, maxval=1.175)
    module = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    reference = jax.jit(module)(params, x)
    print(f"backend {jax.default_backend()}; the paper's LeNet-5 on 1,000 images")
    print(f"module (NHWC, lax.conv)      {best_ms(jax.jit(module), params, x):6.2f} ms  compile {compile_s(module, params, x):.2f} s")
    default = batch_minor.CHUNK
    try:
        for chunk in (128, 256, 512):
            batch_minor.CHUNK = chunk
            f = lambda p, x: batch_minor.scores(p, x, model)  # noqa: E731
            diff = float(jnp.max(jnp.abs(jax.jit(f)(params, x) - reference)))
            mark = " (the default)" if chunk == default else ""
            print(f"batch-minor, steps of {chunk:3d}   {best_ms(jax.jit(f), params, x):6.2f} ms  compile {compile_s(f, params, x):.2f} s"
                  f"  largest score difference {diff:.1e}{mark}")
    finally:
        batch_minor.CHUNK = default


if __name__ == "__main__":
    main()
