"""Throughput of lenet-jax on real MNIST, on whatever JAX backend is present.

Each figure is the best (and the median) of --repeats timed runs after a warm-up, each
run waited for with ``block_until_ready``:
  - train_b1_images_per_s: batch-1 SDLM updates (the paper's mode), --samples per run
  - train_b256_images_per_s: batch-256 SGD over a full epoch (234 updates)
  - infer_b1000_images_per_s: the 10,000 test images in batches of 1,000
  - sdlm_refresh_s: one SDLM Hessian refresh over 500 training patterns (seconds)
  - compile_s: seconds to lower and compile each of those programs (and their sum)

    python bench/throughput.py [--json] [--conv-impl auto|patches|xla]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_jax.config import Config  # noqa: E402
from lenet_jax.data import load_dataset, pad_images  # noqa: E402
from lenet_jax.layers import CONV_IMPLS  # noqa: E402
from lenet_jax.training import (  # noqa: E402
    create_state,
    epoch_batches,
    estimate_hessian,
    evaluate_arrays,
    make_model,
    refresh_curvature,
    train_chunk,
)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _compile(jitted: Any, *args: Any, **static: Any) -> tuple[Any, float]:
    """The compiled program of ``jitted`` for these arguments, and the seconds it took."""
    return _timed(lambda: jitted.lower(*args, **static).compile())


def _summary(seconds: list[float], work: float) -> dict[str, float]:
    return {"best": work / min(seconds), "median": work / statistics.median(seconds)}


def measure(samples: int = 10_000, repeats: int = 3, conv_impl: str = "auto") -> dict[str, Any]:
    ds = load_dataset("mnist", "auto", log=lambda m: None)
    images, labels = jax.device_put(pad_images(ds.train_images)), jax.device_put(ds.train_labels)  # as training does
    test_images, test_labels = jax.device_put(ds.test_images), jax.device_put(ds.test_labels)
    n = len(ds.train_labels)
    compile_s: dict[str, float] = {}

    # batch 1, SDLM, with a real Hessian estimate in the state
    config = Config(batch_size=1, conv_impl=conv_impl)
    state = refresh_curvature(create_state(config, n), images, labels, config, 1)
    batches = epoch_batches(config.seed, 1, n, 1)[:samples]
    step_b1, compile_s["train_b1"] = _compile(train_chunk, state, images, labels, batches, objective=config.objective, mesh=None)
    state, _ = jax.block_until_ready(step_b1(state, images, labels, batches))  # warm-up
    seconds = []
    for _ in range(repeats):
        (state, _), s = _timed(lambda: step_b1(state, images, labels, batches))
        seconds.append(s)
    b1 = _summary(seconds, samples)

    pick = jax.random.choice(jax.random.key(1), n, (config.hessian_samples,), replace=False)
    args = (state.params, images, labels, pick, jax.random.key(2))
    static = dict(estimator=config.hessian_estimator, model=make_model(config), objective=config.objective, probes=config.hutchinson_probes)
    refresh, compile_s["sdlm_refresh"] = _compile(estimate_hessian, *args, **static)
    refresh(*args)
    refresh_s = min(_timed(lambda: refresh(*args))[1] for _ in range(repeats))

    # batch 256, SGD, a full epoch
    config256 = Config(batch_size=256, optimizer="sgd", schedule="constant", conv_impl=conv_impl)
    state256 = create_state(config256, n // 256)
    batches256 = epoch_batches(config256.seed, 1, n, 256)
    step_b256, compile_s["train_b256"] = _compile(train_chunk, state256, images, labels, batches256, objective=config256.objective, mesh=None)
    state256, _ = jax.block_until_ready(step_b256(state256, images, labels, batches256))
    seconds = []
    for _ in range(repeats):
        (state256, _), s = _timed(lambda: step_b256(state256, images, labels, batches256))
        seconds.append(s)
    b256 = _summary(seconds, batches256.size)

    # inference, batch 1000
    dynamic = dict(params=state.params, images=test_images, labels=test_labels)
    infer_fn = make_model(config, inference=True).apply
    infer, compile_s["infer_b1000"] = _compile(evaluate_arrays, **dynamic, apply_fn=infer_fn, objective=config.objective, batch_size=1000)
    infer(**dynamic)
    seconds = [_timed(lambda: infer(**dynamic))[1] for _ in range(repeats)]
    inf = _summary(seconds, len(ds.test_labels))

    compile_s["total"] = sum(compile_s.values())
    device = jax.devices()[0]
    return {
        "train_b1_images_per_s": b1["best"],
        "train_b256_images_per_s": b256["best"],
        "infer_b1000_images_per_s": inf["best"],
        "sdlm_refresh_s": refresh_s,
        "compile_s": compile_s,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": device.device_kind,
        "framework": f"jax {jax.__version__}",
        "conv_impl": make_model(config).conv_impl,
        "conv_impl_inference": make_model(config, inference=True).conv_impl,
        "median": {"train_b1_images_per_s": b1["median"], "train_b256_images_per_s": b256["median"], "infer_b1000_images_per_s": inf["median"]},
        "b1_pass_s": n / b1["best"] + refresh_s,
        "refresh_share_of_b1_pass": refresh_s / (n / b1["best"] + refresh_s),
        "repeats": repeats,
        "b1_samples": samples,
        "cpu": platform.processor() or platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=10_000, help="batch-1 updates per timed repeat (at least 10,000 for the headline)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conv-impl", default="auto", choices=("auto", *CONV_IMPLS))
    args = parser.parse_args()
    r = measure(args.samples, args.repeats, args.conv_impl)
    if args.json:
        print(json.dumps(r))
        return
    print(
        f"{r['framework']} on {r['backend']} ({r['device_kind']}), {r['devices']} device(s), conv {r['conv_impl']} "
        f"(inference {r['conv_impl_inference']}); best (median) of {r['repeats']}"
    )
    for key in ("train_b1_images_per_s", "train_b256_images_per_s", "infer_b1000_images_per_s"):
        print(f"  {key}: {r[key]:,.0f} ({r['median'][key]:,.0f})")
    print(f"  sdlm_refresh_s: {r['sdlm_refresh_s']:.3f} ({r['refresh_share_of_b1_pass']:.1%} of a batch-1 pass of {r['b1_pass_s']:.1f} s)")
    print("  compile_s: " + ", ".join(f"{k} {v:.2f}" for k, v in r["compile_s"].items()))


if __name__ == "__main__":
    main()
