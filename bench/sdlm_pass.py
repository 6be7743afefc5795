"""Time one pass of the paper's training: batch-1 SDLM over 60,000 MNIST images, Hessian
refresh included, on whatever JAX backend is present. Prints the numbers; asserts nothing.

    python bench/sdlm_pass.py [--estimator paper] [--passes 1] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_jax.config import Config  # noqa: E402
from lenet_jax.data import load_dataset, pad_images  # noqa: E402
from lenet_jax.sdlm import uses_curvature  # noqa: E402
from lenet_jax.training import create_state, epoch_batches, refresh_curvature, train_chunk  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", default="paper", choices=("paper", "gauss_newton", "hutchinson"))
    parser.add_argument("--optimizer", default="sdlm")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--passes", type=int, default=2, help="timed passes after the warm-up pass")
    parser.add_argument("--conv-impl", default="auto")
    args = parser.parse_args()

    config = Config(hessian_estimator=args.estimator, optimizer=args.optimizer, batch_size=args.batch_size, conv_impl=args.conv_impl)
    ds = load_dataset(config.dataset, config.data_source, log=lambda m: None)
    images, labels = jax.device_put(pad_images(ds.train_images)), jax.device_put(ds.train_labels)  # as training does
    n = len(ds.train_labels)
    steps = n // config.batch_size
    state = create_state(config, steps)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {config.batch_size}, {config.optimizer}, estimator {args.estimator}")

    def one_pass(state, epoch):
        t0 = time.perf_counter()
        if uses_curvature(state.opt_state):
            state = refresh_curvature(state, images, labels, config, epoch)
            jax.block_until_ready(state.opt_state)
        t1 = time.perf_counter()
        batches = epoch_batches(config.seed, epoch, n, config.batch_size)
        state, metrics = train_chunk(state, images, labels, batches, config.objective)
        jax.block_until_ready(metrics)
        return state, t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    state, refresh, train = one_pass(state, 1)
    print(f"first pass (compiles included): {time.perf_counter() - t0:.2f} s")
    for epoch in range(2, 2 + args.passes):
        state, refresh, train = one_pass(state, epoch)
        total = refresh + train
        print(
            f"pass {epoch}: {total:.2f} s = refresh {refresh:.3f} s ({refresh / total:.1%}) + updates {train:.2f} s; "
            f"{steps * config.batch_size / train:,.0f} images/s"
        )


if __name__ == "__main__":
    main()
