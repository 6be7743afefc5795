"""Summarise finished runs: a markdown table (final test error, training error of the last
pass, seconds per pass) and the error-curve figure.

    python -m bench.summarize LABEL=RUN_DIR [LABEL=RUN_DIR ...] [--plot docs/curves.png]

A label given to several runs (different seeds) is reported as mean and spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from lenet_jax.plots import error_curves


def read_history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def fmt(values: list[float], pct: bool = True) -> str:
    scale = 100 if pct else 1
    unit = "%" if pct else ""
    if len(values) == 1:
        return f"{scale * values[0]:.2f}{unit}"
    return f"{scale * statistics.mean(values):.2f}{unit} ± {scale * statistics.stdev(values):.2f} (n={len(values)}: " + ", ".join(f"{scale * v:.2f}" for v in values) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("--plot", type=Path, help="write the error curves (first run of each label) here")
    args = parser.parse_args()
    groups: dict[str, list[list[dict]]] = defaultdict(list)
    for item in args.runs:
        label, _, run = item.partition("=")
        groups[label].append(read_history(Path(run)))
    print("| run | passes | test error | training error (last pass, on the fly) | median wall seconds per pass during the run |")
    print("|---|---|---|---|---|")
    for label, histories in groups.items():
        last = [h[-1] for h in histories]
        seconds = [statistics.median(r["seconds"] for r in h) for h in histories]
        print(
            f"| {label} | {last[0]['epoch']} | {fmt([r['test_error'] for r in last])} | "
            f"{fmt([r['train_error'] for r in last])} | {statistics.mean(seconds):.1f} |"
        )
    if args.plot:
        error_curves({label: hs[0] for label, hs in groups.items()}, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
