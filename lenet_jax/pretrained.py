"""The pretrained LeNet-5 that ships with the package, and how it was made.

``lenet5_mnist.npz`` holds only the parameters (one array per "layer/name"); the JSON
beside it holds the run's config, its per-epoch history, its measured test error and
the sha256 of the .npz, so ``eval.py`` can predict, evaluate and plot without any
training, and a damaged or tampered file is refused with one line. It is exported from
a run of this project's paper configuration with::

    python train.py --conv-impl patches --workdir runs/paper-seed0
    python -m lenet_jax.pretrained runs/paper-seed0
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lenet_jax.config import Config
from lenet_jax.errors import DataError, command
from lenet_jax.factories import make_model
from lenet_jax.fileio import atomic_write, atomic_write_text
from lenet_jax.finite import all_finite
from lenet_jax.layers import connection_mask
from lenet_jax.model import init_params

PRETRAINED = Path(__file__).parent / "pretrained" / "lenet5_mnist"
"""The shipped model: ``PRETRAINED.with_suffix('.npz')`` and ``.json``."""


def _flatten(params: Any) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(k.key for k in path)] = np.asarray(leaf, np.float32)
    return flat


def export(params: Any, config: Config, record: dict[str, Any], base: Path | str | None = None) -> Path:
    """Write ``params`` (as float32) and the run's metadata, with the sha256 of the
    parameters' file, to ``base``.npz / .json (the shipped model's place by default)."""
    base = Path(PRETRAINED if base is None else base)
    base.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **_flatten(params))
    payload = buffer.getvalue()
    history = record.get("history", [])
    meta = {
        "config": config.to_dict(),
        "epoch": int(record["epoch"]),
        "test_error": history[-1]["test_error"] if history else None,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "history": history,
    }
    atomic_write(base.with_suffix(".npz"), lambda f: f.write(payload))
    atomic_write_text(base.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return base


MAX_META_BYTES = 1 << 20
"""The metadata of an exported model is a few tens of KB; anything far larger is not one."""


def _read_meta(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_META_BYTES:
        raise DataError(f"{path}: {path.stat().st_size:,} bytes, not the metadata of an exported model")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not the metadata of an exported model ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not the metadata of an exported model (a JSON {type(meta).__name__}, not an object)")
    for key, kind in (("config", dict), ("epoch", int), ("history", list), ("sha256", str)):
        if key not in meta:
            raise DataError(f"{path}: its metadata has no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise DataError(f"{path}: its metadata's {key!r} is {type(meta[key]).__name__}, not {kind.__name__}")
    return meta


def load(base: Path | str | None = None) -> tuple[Any, Config, dict[str, Any]]:
    """The parameters, config and metadata of an exported model (the shipped one by
    default), checked: the .npz against the sha256 its metadata records, its parameters
    against the shapes of the config's model, finite, and zero where table I disconnects
    C3. DataError naming the file otherwise."""
    base = Path(PRETRAINED if base is None else base)
    npz, meta_path = base.with_suffix(".npz"), base.with_suffix(".json")
    for p in (npz, meta_path):
        if not p.is_file():
            raise DataError(f"{p}: the pretrained model is missing (export one with python -m lenet_jax.pretrained RUN)")
    meta = _read_meta(meta_path)
    config = Config.from_dict(meta["config"], str(meta_path))
    payload = npz.read_bytes()
    if hashlib.sha256(payload).hexdigest() != meta["sha256"]:
        raise DataError(f"{npz}: does not match the sha256 recorded in {meta_path.name} (damaged or replaced); export the model again")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except Exception as e:  # numpy and zipfile raise many kinds for a damaged archive
        raise DataError(f"{npz}: not a model exported by lenet_jax.pretrained ({type(e).__name__})") from None
    model = make_model(config)
    template = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    wanted = _flatten(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template))
    if set(flat) != set(wanted) or any(flat[k].shape != wanted[k].shape for k in wanted):
        raise DataError(f"{npz}: its parameters do not fit the model its config describes")
    if any(flat[k].dtype != np.float32 for k in flat):
        raise DataError(f"{npz}: its parameters are not float32")
    if not bool(all_finite(flat)):
        raise DataError(f"{npz}: holds parameters that are NaN or infinite")
    if model.c3_table is not None and config.conv == "plain":
        mask = connection_mask(model.c3_table, flat["C3/kernel"].shape[2])
        if np.any(flat["C3/kernel"][:, :, mask == 0]):
            raise DataError(f"{npz}: C3 weights that table I disconnects are not zero")
    leaves = [flat["/".join(k.key for k in path)] for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    test_error = meta.get("test_error")
    if test_error is not None and not (isinstance(test_error, float) and math.isfinite(test_error)):
        raise DataError(f"{meta_path}: its test_error is not a number")
    return params, config, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a trained run as the package's pretrained model.")
    parser.add_argument("run", type=Path, help="a run folder written by train.py")
    parser.add_argument("--epoch", default="latest", help="which completed epoch: latest, best or a number")
    parser.add_argument("--to", type=Path, default=None, help="output path without suffix (default: the shipped model's)")
    args = parser.parse_args(argv)
    return _export_run(args.run, args.epoch, args.to)


@command
def _export_run(run: Path, epoch: str, to: Path) -> int:
    from lenet_jax.runs import restore_run  # only the exporter reads checkpoints; loading the model does not

    state, config, record = restore_run(run, epoch)
    base = export(jax.device_get(state.params), config, record, to)
    print(f"exported epoch {record['epoch']} of {run} to {base}.npz / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
