"""What each 1998 choice costs or buys: swap one paper component at a time for its modern
counterpart, train, and print test error and seconds per row.

    python -m bench.ablation                  # every row, 10 epochs each
    python -m bench.ablation --epochs 20 --rows paper modern --json runs/ablation.json
    python -m bench.ablation --seeds 0,1,2    # each row three seeds, trained together; mean and spread

Every row starts from the ``paper`` preset and changes only what its ``changes`` say;
the "modern" row is the ``modern`` preset (all of them together).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lenet_jax.config import Config, preset
from lenet_jax.data import Dataset, load_dataset
from lenet_jax.training import fit, fit_seeds

SWAPS: dict[str, tuple[str, dict[str, Any]]] = {
    "relu": ("activation: ReLU", dict(activation="relu")),
    "selu": ("activation: SELU", dict(activation="selu")),
    "average": ("subsampling: average pooling", dict(subsampling="average")),
    "max": ("subsampling: max pooling", dict(subsampling="max")),
    "dense_c3": ("C3: dense (no table I)", dict(c3="dense")),
    "separable": ("C3/C5: depthwise-separable", dict(conv="separable")),
    "softmax": ("head/loss: softmax cross-entropy", dict(head="softmax", loss="xent")),
    "momentum": ("optimiser: SGD momentum 0.9, lr 1e-4", dict(optimizer="momentum", lr=1e-4)),
    "adam": ("optimiser: Adam, lr 1e-4", dict(optimizer="adam", lr=1e-4)),
    "dropout": ("dropout 0.25 on C5/F6", dict(dropout=0.25)),
    "weight_decay": ("weight decay 1e-4", dict(weight_decay=1e-4)),
}
"""One component swapped from the paper preset; each optimiser row keeps the paper's
per-epoch schedule shape at its own starting learning rate (picked by a two-epoch probe)."""


def rows() -> dict[str, tuple[str, Config]]:
    """Every row: the paper preset, each swap on top of it, and the modern preset."""
    out = {"paper": ("the paper (this project's defaults)", preset("paper"))}
    out.update({name: (what, preset("paper").replace(**changes)) for name, (what, changes) in SWAPS.items()})
    out["modern"] = ("all of the modern choices (batch 16)", preset("modern"))
    return out


def changes_from_paper(config: Config) -> dict[str, Any]:
    paper = preset("paper").to_dict()
    return {k: v for k, v in config.to_dict().items() if paper[k] != v}


def run_row(name: str, epochs: int, seeds: list[int], dataset: Dataset, train_subset: int | None = None) -> dict[str, Any]:
    """One row: a run per seed (several seeds in one compiled program), their mean."""
    what, config = rows()[name]
    config = config.replace(epochs=epochs, seed=seeds[0], keep=1, train_subset=train_subset).validate()
    head = {"row": name, "what": what, "changes": changes_from_paper(config), "epochs": epochs, "seeds": seeds}
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        try:
            if len(seeds) == 1:
                histories = [fit(config, dataset, workdir, log=lambda m: None, progress=False).history]
            else:
                histories = [r.history for r in fit_seeds(config, seeds, dataset, workdir, log=lambda m: None, progress=False)]
        except FloatingPointError as e:
            return {**head, "diverged": str(e)}
        total = time.perf_counter() - t0
    finals = [h[-1]["test_error"] for h in histories]
    return {
        **head,
        "test_error": statistics.mean(finals),
        "test_error_spread": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "test_errors": finals,
        "best_test_error": statistics.mean(min(r["test_error"] for r in h) for h in histories),
        "train_error": statistics.mean(h[-1]["train_error"] for h in histories),
        "seconds_per_epoch": sum(r["seconds"] for r in histories[0]) / len(histories[0]),
        "total_seconds": total,
    }


def table(results: list[dict]) -> str:
    lines = ["| row | change from the paper | test error | best epoch | s/epoch | total s |", "|---|---|---|---|---|---|"]
    for r in results:
        if "diverged" in r:
            lines.append(f"| {r['row']} | {r['what']} | diverged | | | |")
            continue
        spread = f" ± {r['test_error_spread']:.2%}" if r.get("test_error_spread") else ""
        lines.append(
            f"| {r['row']} | {r['what']} | {r['test_error']:.2%}{spread} | {r['best_test_error']:.2%} "
            f"| {r['seconds_per_epoch']:.1f} | {r['total_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(rows()), default=list(rows()), help="which rows to run")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per row")
    parser.add_argument("--seeds", default="0", help="seeds per row, comma-separated (several train together; the row reports their mean)")
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after each row)")
    parser.add_argument("--train-subset", type=int, default=None, help="train on the first N training images only (a quick check)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    seeds = [int(s) for s in args.seeds.split(",")]
    dataset = load_dataset("mnist", log=lambda m: print(m, file=sys.stderr))
    results = []
    for name in args.rows:
        r = run_row(name, args.epochs, seeds, dataset, args.train_subset)
        results.append(r)
        done = r["diverged"] if "diverged" in r else f"test {r['test_error']:.2%}, {r['seconds_per_epoch']:.1f} s/epoch"
        print(f"{name}: {done}", file=sys.stderr, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
