"""Evaluate a trained LeNet-5 checkpoint on the test set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lenet_jax.data import SOURCES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", type=Path, help="a run folder written by train.py")
    where.add_argument("--checkpoint", type=Path, help="a checkpoints folder (or a run folder)")
    parser.add_argument("--step", default="best", help="which epoch: best (lowest validation error, else latest), latest, or a number")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    parser.add_argument("--data-source", choices=SOURCES, default=None, help="override the run's data source")
    parser.add_argument("--data-dir", default=None, help="override the run's IDX / tfds folder")
    parser.add_argument("--cache-dir", default=None, help="override the run's data cache folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lenet_jax.cli import run_evaluation

    overrides = {"data_source": args.data_source, "data_dir": args.data_dir, "cache_dir": args.cache_dir}
    return run_evaluation(args.workdir or args.checkpoint, args.step, args.json, overrides)


if __name__ == "__main__":
    sys.exit(main())
