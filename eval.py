"""Evaluate LeNet-5, predict digits in your own images, print its layer table, draw its figures.

Without --workdir or --checkpoint it uses the pretrained model that ships with the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lenet_jax.data import SOURCES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workdir", type=Path, help="a run folder written by train.py (default: the pretrained model)")
    where.add_argument("--checkpoint", type=Path, help="a checkpoints folder (or a run folder)")
    parser.add_argument("--step", default="best", help="which epoch: best (lowest validation error, else latest), latest, or a number")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--image", type=Path, nargs="+", metavar="PATH",
        help="predict the digit in these images (or the images in these folders), prepared like MNIST's digits",
    )
    what.add_argument("--summary", action="store_true", help="print the layer table (output shapes, parameters, connections)")
    what.add_argument("--figures", type=Path, metavar="DIR", help="evaluate and write the PNG figures into DIR")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the human summary")
    parser.add_argument("--data-source", choices=SOURCES, default=None, help="override the run's data source")
    parser.add_argument("--data-dir", default=None, help="override the run's IDX / tfds folder")
    parser.add_argument("--cache-dir", default=None, help="override the run's data cache folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lenet_jax import cli

    path = args.workdir or args.checkpoint
    if args.summary:
        return cli.run_summary(path, args.step, args.json)
    if args.image:
        return cli.run_prediction(path, args.step, args.image, args.json)
    overrides = {"data_source": args.data_source, "data_dir": args.data_dir, "cache_dir": args.cache_dir}
    return cli.run_evaluation(path, args.step, args.json, overrides, args.figures)


if __name__ == "__main__":
    sys.exit(main())
