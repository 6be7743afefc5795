"""The pretrained LeNet-5 that ships with the package, and how it was made.

``lenet5_mnist.npz`` holds only the parameters (one array per "layer/name"); the JSON
beside it holds the run's config, its per-pass history and its measured test error, so
``eval.py`` can predict, evaluate and plot without any training. It is exported from a
run of this project's paper configuration with::

    python train.py --workdir runs/paper
    python -m lenet_jax.pretrained runs/paper
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lenet_jax.config import Config
from lenet_jax.errors import command
from lenet_jax.factories import make_model
from lenet_jax.fileio import atomic_write, atomic_write_text
from lenet_jax.layers import connection_mask
from lenet_jax.model import init_params

PRETRAINED = Path(__file__).parent / "pretrained" / "lenet5_mnist"
"""The shipped model: ``PRETRAINED.with_suffix('.npz')`` and ``.json``."""


def _flatten(params: Any) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(k.key for k in path)] = np.asarray(leaf, np.float32)
    return flat


def export(params: Any, config: Config, record: dict[str, Any], base: Path | str = PRETRAINED) -> Path:
    """Write ``params`` (as float32) and the run's metadata to ``base``.npz / .json."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    history = record.get("history", [])
    meta = {
        "config": config.to_dict(),
        "epoch": int(record["epoch"]),
        "test_error": history[-1]["test_error"] if history else None,
        "history": history,
    }
    atomic_write(base.with_suffix(".npz"), lambda f: np.savez(f, **_flatten(params)))
    atomic_write_text(base.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    return base


def load(base: Path | str = PRETRAINED) -> tuple[Any, Config, dict[str, Any]]:
    """The parameters, config and metadata of an exported model, checked against the
    parameter shapes the config's model has."""
    base = Path(base)
    npz, meta_path = base.with_suffix(".npz"), base.with_suffix(".json")
    for p in (npz, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: the pretrained model is missing (export one with python -m lenet_jax.pretrained RUN)")
    try:
        meta = json.loads(meta_path.read_text())
        config = Config.from_dict(meta["config"], str(meta_path))
        with np.load(npz, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ValueError(f"{base}: not a model exported by lenet_jax.pretrained ({type(e).__name__}: {e})") from None
    model = make_model(config)
    template = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    wanted = _flatten(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template))
    if set(flat) != set(wanted) or any(flat[k].shape != wanted[k].shape for k in wanted):
        raise ValueError(f"{npz}: its parameters do not fit the model its config describes")
    if model.c3_table is not None and config.conv == "plain":
        mask = connection_mask(model.c3_table, flat["C3/kernel"].shape[2])
        if np.any(flat["C3/kernel"][:, :, mask == 0]):
            raise ValueError(f"{npz}: C3 weights that table I disconnects are not zero")
    leaves = [flat["/".join(k.key for k in path)] for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
    params = jax.tree.unflatten(jax.tree.structure(template), leaves)
    return params, config, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a trained run as the package's pretrained model.")
    parser.add_argument("run", type=Path, help="a run folder written by train.py")
    parser.add_argument("--step", default="latest", help="which epoch: latest, best or a number")
    parser.add_argument("--to", type=Path, default=PRETRAINED, help="output path without suffix")
    args = parser.parse_args(argv)
    return _export_run(args.run, args.step, args.to)


@command
def _export_run(run: Path, step: str, to: Path) -> int:
    from lenet_jax.training import restore_run  # only the exporter reads checkpoints; loading the model does not

    state, config, record = restore_run(run, step)
    base = export(jax.device_get(state.params), config, record, to)
    print(f"exported epoch {record['epoch']} of {run} to {base}.npz / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
