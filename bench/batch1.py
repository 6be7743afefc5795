"""Batch 1, the paper's mode, on whatever backend is present: microseconds per SDLM update
of the XLA path and of the fused Pallas kernel, and whether the two agree.

Both start from the same refreshed state and train on the same patterns; the check is the
largest relative difference of any parameter after --check updates (float32 rounding:
about 1e-6 on the CPU) and the error counts. On the CPU the fused kernel runs in Pallas'
interpret mode, so its speed there means nothing; on a GPU it is the figure that decides
``--update-impl auto``.

    python -m bench.batch1 [--json] [--samples 10000] [--check 1000]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp

from bench import common
from lenet_jax.config import Config
from lenet_jax.factories import create_state
from lenet_jax.inputs import pad_images
from lenet_jax.updates import Strategy, epoch_batches, update_key


def measure(samples: int = 10_000, check: int = 1_000, repeats: int = 3) -> dict[str, Any]:
    ds = common.mnist()
    images, labels = jax.device_put(pad_images(ds.train_images)), jax.device_put(ds.train_labels)
    n = len(ds.train_labels)
    base = Config()
    start = common.refresh_curvature(create_state(base, n), images, labels, base, 1)
    keys = update_key(0)
    results: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    finals = {}
    for impl in ("xla", "fused"):
        config = base.replace(update_impl=impl)
        chunk = Strategy.build(config, 1, n).chunk
        first = epoch_batches(0, 1, n, 1)[:check]
        t0 = time.perf_counter()
        state, m = jax.block_until_ready(chunk(jax.tree.map(jnp.copy, start), images, labels, first, keys))
        compile_s[impl] = time.perf_counter() - t0
        finals[impl] = (jax.tree.map(jnp.copy, state.params), m)  # the state itself is donated below
        batches = epoch_batches(0, 2, n, 1)[:samples]
        state, _ = jax.block_until_ready(chunk(state, images, labels, batches, keys))  # warm-up at this length
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, _ = jax.block_until_ready(chunk(state, images, labels, batches, keys))
            seconds.append(time.perf_counter() - t0)
        results[f"{impl}_updates_per_s"] = common.rate(seconds, samples, "updates/s")
        results[f"{impl}_us_per_update"] = {"best": 1e6 * min(seconds) / samples, "median": 1e6 * sorted(seconds)[len(seconds) // 2] / samples,
                                            "unit": "us"}
    (a, ma), (b, mb) = finals["xla"], finals["fused"]
    gap = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(x)) + 1e-12)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    results[f"agreement_after_{check}_updates"] = {"max_relative_difference": gap, "errors_xla": int(ma["errors"]), "errors_fused": int(mb["errors"])}
    device = jax.devices()[0]
    notes = ["the fused kernel runs in Pallas' interpret mode on the CPU: its speed there is not a measurement"] if device.platform == "cpu" else []
    return common.result(f"jax {jax.__version__}", jax.default_backend(), None if device.platform == "cpu" else device.device_kind,
                         {"samples": samples, "repeats": repeats, "check": check}, results, compile_s, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--samples", type=int, default=10_000, help="updates per timed repeat")
    parser.add_argument("--check", type=int, default=1_000, help="updates before comparing the two paths")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    common.emit(measure(args.samples, args.check, args.repeats), args.json)


if __name__ == "__main__":
    main()
