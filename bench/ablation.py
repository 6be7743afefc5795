"""What each 1998 choice costs or buys: swap one paper component at a time for its modern
counterpart, train, and print test error and seconds per row.

    python bench/ablation.py                  # every row, 10 passes each
    python bench/ablation.py --epochs 20 --rows paper modern --json runs/ablation.json

Every row starts from this project's paper configuration (``Config()``) and changes only
what its ``changes`` say; the last row, "modern", changes all of them together.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lenet_jax.cli import load_data  # noqa: E402
from lenet_jax.config import MODERN, Config  # noqa: E402
from lenet_jax.training import fit  # noqa: E402

ROWS: dict[str, tuple[str, dict]] = {
    "paper": ("the paper (this project's defaults)", {}),
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
    "modern": ("all of the modern choices (batch 16)", MODERN),
}


def run_row(name: str, epochs: int, seed: int, dataset) -> dict:
    what, changes = ROWS[name]
    config = Config(**changes).replace(epochs=epochs, seed=seed, keep=1).validate()
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        try:
            history = fit(config, dataset, workdir, log=lambda m: None, progress=False).history
        except FloatingPointError as e:
            return {"row": name, "what": what, "changes": changes, "epochs": epochs, "seed": seed, "diverged": str(e)}
        total = time.perf_counter() - t0
    return {
        "row": name,
        "what": what,
        "changes": changes,
        "epochs": epochs,
        "seed": seed,
        "test_error": history[-1]["test_error"],
        "best_test_error": min(r["test_error"] for r in history),
        "train_error": history[-1]["train_error"],
        "seconds_per_pass": sum(r["seconds"] for r in history) / len(history),
        "total_seconds": total,
    }


def table(results: list[dict]) -> str:
    lines = ["| row | change from the paper | test error | best pass | s/pass | total s |", "|---|---|---|---|---|---|"]
    for r in results:
        if "diverged" in r:
            lines.append(f"| {r['row']} | {r['what']} | diverged | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['what']} | {r['test_error']:.2%} | {r['best_test_error']:.2%} "
            f"| {r['seconds_per_pass']:.1f} | {r['total_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="which rows to run")
    parser.add_argument("--epochs", type=int, default=10, help="passes per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here (rewritten after each row)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    dataset = load_data(Config(), log=lambda m: print(m, file=sys.stderr))
    results = []
    for name in args.rows:
        r = run_row(name, args.epochs, args.seed, dataset)
        results.append(r)
        done = r["diverged"] if "diverged" in r else f"test {r['test_error']:.2%}, {r['seconds_per_pass']:.1f} s/pass"
        print(f"{name}: {done}", file=sys.stderr, flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
