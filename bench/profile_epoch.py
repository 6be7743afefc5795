"""Where a compiled training epoch spends its time, per layer and per XLA operation.

Traces a piece of the compiled epoch (``train_chunk``: the scan of ``train_update``) with
``jax.profiler``, reads the per-operation times from the trace, and maps each operation
to the layer and direction (forward, or backward: autodiff's transpose) that produced it,
from the metadata of the compiled HLO. Real MNIST, after a warm-up call.

    python -m bench.profile_epoch [--batch-size 256] [--conv-impl auto] [--updates N] [--top 15]

Batch size 1 profiles SDLM (the paper's mode), any other plain SGD, as
``bench.throughput`` does.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

from bench import common
from lenet_jax import cores
from lenet_jax.config import Config
from lenet_jax.conv import CONV_IMPLS
from lenet_jax.factories import create_state, make_model
from lenet_jax.inputs import pad_images
from lenet_jax.model import STAGES
from lenet_jax.updates import epoch_batches, train_chunk

SQUASH = "squashing, every layer"
OP_LINE = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def where(op_name: str | None) -> tuple[str, str]:
    """(layer, direction) of an HLO op from its ``op_name`` metadata."""
    if op_name is None:
        return "no metadata", ""
    parts = op_name.split("/")
    layer = next((p for p in parts if p in STAGES or p == "squash"), None)
    if layer == "squash":
        layer = SQUASH
    elif layer is None:
        layer = "head and loss" if "LeNet5" in op_name or "loss" in op_name else "optimizer, data, loop"
    return layer, "backward" if "transpose(" in op_name else "forward"


def op_times(trace_dir: str) -> collections.Counter:
    """Microseconds per HLO op, summed over the trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz"))
    events = json.load(gzip.open(path))["traceEvents"]
    times: collections.Counter = collections.Counter()
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            times[op] += e["dur"]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--conv-impl", default="auto", choices=("auto",) + CONV_IMPLS)
    parser.add_argument("--updates", "--steps", type=int, default=0, dest="updates", help="updates traced (default: 30,720 images' worth)")
    parser.add_argument("--top", type=int, default=15, help="operations listed")
    args = parser.parse_args()

    bs = args.batch_size
    cores.start_jax(one_thread=bs == 1)  # as train.py runs this batch size (lenet_jax.cores)
    config = Config(batch_size=bs, conv_impl=args.conv_impl, **({} if bs == 1 else dict(optimizer="sgd", schedule="constant")))
    ds = common.mnist()
    images, labels = jax.device_put(pad_images(ds.train_images)), jax.device_put(ds.train_labels)
    n = len(ds.train_labels)
    updates = args.updates or max(1, 30_720 // bs)
    batches = epoch_batches(config.seed, 1, n, bs)[:updates]
    state = create_state(config, n // bs)
    chunk = jax.jit(lambda s, b: train_chunk(s, images, labels, b, objective=config.objective))
    compiled = chunk.lower(state, batches).compile()
    names = dict(m.groups() for line in compiled.as_text().splitlines() if (m := OP_LINE.match(line)))
    jax.block_until_ready(compiled(state, batches))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(compiled(state, batches))
        times = op_times(trace_dir)

    per_update = {op: us / 1000 / updates for op, us in times.items()}
    total = sum(per_update.values())
    layers: dict[tuple[str, str], float] = collections.defaultdict(float)
    for op, ms in per_update.items():
        layers[where(names.get(op))] += ms
    print(f"batch {bs}, conv {make_model(config).conv_impl}, {updates} updates traced; ms per update, summed over operations: {total:.3f}")
    print(f"{'layer':24s} {'forward':>9s} {'backward':>9s}")
    for layer in list(STAGES) + [SQUASH, "head and loss", "optimizer, data, loop"]:
        f, b = layers.get((layer, "forward"), 0.0), layers.get((layer, "backward"), 0.0)
        if f or b:
            print(f"{layer:24s} {f:9.3f} {b:9.3f}")
    if layers.get(("no metadata", "")):
        print(f"{'(ops without metadata)':24s} {layers[('no metadata', '')]:9.3f}")
    loop = sum(ms for op, ms in per_update.items() if op.startswith("while"))
    print(f"of which the scan's while thunk itself: {loop:.3f} (at small batches tracing adds its own cost to every thunk)")
    print(f"\ntop {args.top} operations (ms per update, layer, direction):")
    for op, ms in sorted(per_update.items(), key=lambda kv: -kv[1])[: args.top]:
        layer, direction = where(names.get(op))
        print(f"{ms:8.3f}  {layer:22s} {direction:9s} {op}")


if __name__ == "__main__":
    main()
