"""Throughput of lenet-jax on real MNIST, on whatever JAX backend is present.

  train_b1       batch-1 SDLM updates (the paper's mode), --samples per repeat, as train.py
                 runs them: on the CPU in a process of its own with XLA's pool of one
                 thread (lenet_jax.cores), as is the refresh and --pass
  train_b256     batch-256 SGD over one epoch (234 updates)
  train_b4096    batch-4096 SGD over one epoch (on accelerators, or with --large-batch)
  infer_b1000    the 10,000 test images in batches of 1,000
  sdlm_refresh   one SDLM Hessian refresh over 500 training patterns, in seconds
  paper_pass     with --pass: one whole pass of the paper's training (refresh and 60,000
                 batch-1 updates), in seconds
  train_b1_xN    with --seeds N: batch-1 SDLM for N seeds in one compiled program,
                 seed-updates per second (all N together)
  compile_s      seconds to lower and compile each program

Rates are the best and the median of --repeats timed runs after a warm-up.

    python -m bench.throughput [--json] [--conv-impl auto|xla|patches|custom_vjp] [--precision float32|tf32|bfloat16] [--pass]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax

from bench import common
from lenet_jax import cores
from lenet_jax.config import Config
from lenet_jax.conv import CONV_IMPLS
from lenet_jax.evaluation import evaluate_arrays
from lenet_jax.factories import conv_impl_for, create_state, create_states, make_inference
from lenet_jax.hessian import ESTIMATORS
from lenet_jax.inputs import pad_images
from lenet_jax.precision import PRECISIONS
from lenet_jax.updates import (
    Strategy,
    compiled_train_chunk,
    curvature_model,
    curvature_sample,
    epoch_batches,
    estimate_hessian,
    seeds_train_chunk,
    update_key,
)


def _compile(jitted: Any, *args: Any, **static: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return compiled, time.perf_counter() - t0


def measure(samples: int = 10_000, repeats: int = 3, conv_impl: str = "auto", precision: str = "float32",
            estimator: str = "paper", large_batch: bool | None = None, full_pass: bool = False, n_seeds: int = 0,
            part: str = "all") -> dict[str, Any]:
    """The rates of ``part``: "batch1" (train_b1, sdlm_refresh and paper_pass: what a
    batch-1 run computes), "other" (the rest) or "all"."""
    ds = common.mnist()
    images, labels = jax.device_put(pad_images(ds.train_images)), jax.device_put(ds.train_labels)  # as training holds them
    test_images, test_labels = jax.device_put(ds.test_images), jax.device_put(ds.test_labels)
    n = len(ds.train_labels)
    wait = jax.block_until_ready
    results: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    keys = update_key(0)

    def train(name: str, config: Config, batches: jax.Array, work: int) -> Any:
        state = create_state(config, n // config.batch_size)
        if config.optimizer == "sdlm":
            state = common.refresh_curvature(state, images, labels, config, 1)
        run, compile_s[name] = _compile(compiled_train_chunk, state, images, labels, batches, keys, objective=config.objective)
        with cores.pinned(cores.batch1_core(jax.default_backend(), config.batch_size, 1)):  # as the training loop runs it
            state, _ = wait(run(state, images, labels, batches, keys))  # warm-up
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                state, m = wait(run(state, images, labels, batches, keys))
                seconds.append(time.perf_counter() - t0)
        results[name] = common.rate(seconds, work)
        return state

    sdlm = Config(batch_size=1, conv_impl=conv_impl, precision=precision, hessian_estimator=estimator)
    batch1, other = part in ("all", "batch1"), part in ("all", "other")
    state = train("train_b1", sdlm, epoch_batches(0, 1, n, 1)[:samples], samples) if batch1 else create_state(sdlm, n)
    if batch1:
        pick, key = curvature_sample(sdlm, 1, n)
        static = dict(estimator=estimator, model=curvature_model(sdlm), objective=sdlm.objective, probes=sdlm.hutchinson_probes)
        refresh, compile_s["sdlm_refresh"] = _compile(estimate_hessian, state.params, images, labels, pick, key, **static)
        wait(refresh(state.params, images, labels, pick, key))
        seconds = common.repeat(lambda: refresh(state.params, images, labels, pick, key), repeats, wait)
        results["sdlm_refresh"] = {"best": min(seconds), "median": sorted(seconds)[len(seconds) // 2], "unit": "s"}
    if other:  # larger batches, inference and (with n_seeds) several seeds in one program
        for batch in (256, 4096) if (large_batch if large_batch is not None else jax.default_backend() != "cpu") else (256,):
            config = Config(batch_size=batch, optimizer="sgd", schedule="constant", conv_impl=conv_impl, precision=precision)
            batches = epoch_batches(0, 1, n, batch)
            train(f"train_b{batch}", config, batches, batches.size)

        infer_fn = make_inference(sdlm)
        dynamic = dict(params=state.params, images=test_images, labels=test_labels)
        infer, compile_s["infer_b1000"] = _compile(evaluate_arrays, **dynamic, apply_fn=infer_fn, objective=sdlm.objective, batch_size=1000)
        wait(infer(**dynamic))
        results["infer_b1000"] = common.rate(common.repeat(lambda: infer(**dynamic), repeats, wait), test_labels.shape[0])

        if n_seeds:
            seeds = list(range(n_seeds))
            several = Strategy.build(sdlm, n_seeds, n)
            many = several.refresh(several.stack(create_states(sdlm, n, seeds)), images, labels, [sdlm.replace(seed=s) for s in seeds],
                                   [None] * n_seeds, 1)
            rb = several.stack([epoch_batches(s, 1, n, 1)[:samples] for s in seeds])
            rk = several.stack([update_key(s) for s in seeds])
            run, compile_s[f"train_b1_x{n_seeds}"] = _compile(seeds_train_chunk, many, images, labels, rb, rk, objective=sdlm.objective)
            many, _ = wait(run(many, images, labels, rb, rk))
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                many, _ = wait(run(many, images, labels, rb, rk))
                seconds.append(time.perf_counter() - t0)
            results[f"train_b1_x{n_seeds}"] = common.rate(seconds, samples * n_seeds, "seed-updates/s")
    if batch1 and full_pass:
        batches = epoch_batches(0, 2, n, 1)
        whole, compile_s["paper_pass"] = _compile(compiled_train_chunk, state, images, labels, batches, keys, objective=sdlm.objective)
        t0 = time.perf_counter()
        state = wait(common.refresh_curvature(state, images, labels, sdlm, 2))
        t1 = time.perf_counter()
        state, _ = wait(whole(state, images, labels, batches, keys))
        t2 = time.perf_counter()
        results["paper_pass"] = {"best": t2 - t0, "median": t2 - t0, "unit": "s", "refresh_s": t1 - t0, "updates_per_s": n / (t2 - t1)}

    device = jax.devices()[0]
    settings = {"conv_impl": conv_impl_for(sdlm), "conv_impl_inference": "batch_minor" if make_inference(sdlm).batch_minor else conv_impl_for(sdlm, inference=True),
                "precision": precision, "estimator": estimator, "repeats": repeats, "b1_samples": samples}
    notes = []
    if batch1:
        b1_pass = n / results["train_b1"]["best"] + results["sdlm_refresh"]["best"]
        notes.append(f"a batch-1 SDLM pass of {n:,} at the best rate: {b1_pass:.1f} s, "
                     f"the refresh {results['sdlm_refresh']['best'] / b1_pass:.1%} of it")
    return common.result(f"jax {jax.__version__}", jax.default_backend(), None if device.platform == "cpu" else device.device_kind,
                         settings, results, compile_s, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--samples", type=int, default=10_000, help="batch-1 updates per timed repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conv-impl", default="auto", choices=("auto", *CONV_IMPLS))
    parser.add_argument("--precision", default="float32", choices=PRECISIONS)
    parser.add_argument("--estimator", default="paper", choices=tuple(ESTIMATORS), help="the Hessian estimator of the refresh")
    parser.add_argument("--large-batch", action=argparse.BooleanOptionalAction, default=None,
                        help="also batch 4096 (default: on accelerators only)")
    parser.add_argument("--pass", dest="full_pass", action="store_true", help="also time one whole pass of the paper's training")
    parser.add_argument("--seeds", "--replicas", type=int, default=0, dest="seeds",
                        help="also batch-1 SDLM for this many seeds in one compiled program (--replicas: its earlier name)")
    parser.add_argument("--part", choices=("batch1", "other"), help=argparse.SUPPRESS)  # one process of two (below)
    args = parser.parse_args(argv)
    options = (args.samples, args.repeats, args.conv_impl, args.precision, args.estimator, args.large_batch, args.full_pass, args.seeds)
    if args.part:
        cores.start_jax(one_thread=args.part == "batch1")
        result = measure(*options, part=args.part)
    elif cores.one_thread_applies():  # train.py's batch-1 runs start XLA with one thread, the others with one per core
        done = subprocess.run([sys.executable, "-m", "bench.throughput", *(argv if argv is not None else sys.argv[1:]), "--json",
                               "--part", "batch1"], capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"error: the batch-1 measurement failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
        batch1 = json.loads(done.stdout.strip().splitlines()[-1])
        cores.start_jax(one_thread=False)
        result = measure(*options, part="other")
        result["results"] = batch1["results"] | result["results"]
        result["compile_s"] = batch1["compile_s"] | result["compile_s"]
        result["notes"] = batch1["notes"] + result["notes"]
        result["settings"]["xla_threads"] = f"1 at batch 1, {len(os.sched_getaffinity(0))} for the rest"
    else:
        result = measure(*options)
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
