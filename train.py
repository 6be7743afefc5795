"""Train LeNet-5. With no flags: the paper's configuration on MNIST (see README)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from lenet_jax.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, Config
from lenet_jax.data import DATASETS, SOURCES

HELP = {
    "dataset": f"dataset to train on ({', '.join(DATASETS)})",
    "data_source": f"where to load it from ({', '.join(SOURCES)}); auto tries them in that order",
    "data_dir": "folder of IDX files (train-images-idx3-ubyte[.gz], ...) for --data-source idx or auto; tfds data_dir for tfds",
    "cache_dir": "folder of the project's .npz data cache (default $LENET_JAX_CACHE or ~/.cache/lenet_jax)",
    "train_subset": "train on the first N training images only (quick runs)",
    "validation_size": "hold out this many training images (fixed by --seed) to choose the best checkpoint; 0 is the paper's protocol",
    "head": "output layer: rbf (the paper's Euclidean RBF with fixed bitmaps) or softmax (trainable 84->10 logits)",
    "loss": "criterion: map or mse for the rbf head, xent for the softmax head",
    "map_j": "the constant j of the MAP criterion (not given in the paper)",
    "init_scale": "weights start uniform in +-s/F**x, F the fan-in: this is s (the paper: 2.4)",
    "init_exponent": "... and this is x (the paper: 1, with which SDLM diverges here; see README)",
    "activation": "squashing function: scaled_tanh (the paper's 1.7159 tanh(2a/3)), relu or selu",
    "subsampling": "S2/S4: trainable (the paper's window sum x coefficient + bias), average or max",
    "c3": "C3's connections: table (the paper's table I) or dense (every S2 map)",
    "conv": "C3/C5 convolutions: plain or separable (depthwise-separable)",
    "dropout": "dropout rate on the C5 and F6 outputs during training (0: none, the paper)",
    "distort": "train on random affine distortions of the training images (the paper's 0.8%% result)",
    "distort_translate": "largest horizontal/vertical shift, in pixels",
    "distort_scale": "scale factor drawn from 1 +- this",
    "distort_squeeze": "horizontal factor q drawn from 1 +- this, vertical 1/q",
    "distort_shear": "horizontal shear x += k*y, k drawn from +- this",
    "distort_probability": "share of training patterns distorted (the paper's 540,000 of 600,000: 0.9)",
    "optimizer": f"{', '.join(OPTIMIZERS)}; sdlm is the paper's stochastic diagonal Levenberg-Marquardt",
    "lr": "starting global step (default per optimizer: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")",
    "schedule": f"step schedule over passes ({', '.join(SCHEDULES)}); paper: x1, x0.4 from pass 3, x0.2 from 6, x0.1 from 9, x0.02 from 13",
    "momentum": "momentum of --optimizer momentum",
    "weight_decay": "L2 weight decay on the weights (not the biases), added to the gradient",
    "mu": "SDLM's mu in eta / (mu + h)",
    "hessian_estimator": "SDLM's Hessian-diagonal estimate: paper, gauss_newton or hutchinson",
    "hessian_samples": "patterns the Hessian estimate averages over before each pass",
    "hutchinson_probes": "random probes per pattern for --hessian-estimator hutchinson",
    "epochs": "passes over the training set",
    "batch_size": "patterns per update; 1 is the paper's pure stochastic mode",
    "seed": "seed of the initial weights, the data order, the Hessian samples and the validation split",
    "devices": "devices for data parallelism: 0 uses every local device; the global --batch-size must divide "
    "evenly over them; batch size 1 (the paper's mode) runs on one device",
    "conv_impl": "how C1/C3/C5 are computed: auto (custom_vjp to train on CPU, xla elsewhere), xla, patches or custom_vjp",
    "chunks": "compiled pieces per epoch (progress-bar granularity)",
    "eval_batch_size": "batch size of evaluation",
    "keep": "how many of the latest epoch checkpoints to keep (the best by validation error is kept too)",
}


OPTIONAL_TYPES = {"data_dir": str, "cache_dir": str, "train_subset": int, "lr": float}
"""Types of the Config fields whose default is None."""


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The parser; with ``defaults=False`` it returns only the options actually given."""
    parser = argparse.ArgumentParser(
        argument_default=None if defaults else argparse.SUPPRESS,
        description="Train LeNet-5 as LeCun et al. (1998) defined it. Every default is the paper's setting, "
        "except where the paper is silent and in two documented places where its setting does not train here "
        "(the initial weight range and SDLM's global step: see the README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Config):
        kind = OPTIONAL_TYPES.get(f.name, type(f.default))
        default = f.default if defaults else argparse.SUPPRESS
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=HELP[f.name])
        else:
            parser.add_argument(flag, type=kind, default=default, help=HELP[f.name])
    parser.add_argument("--workdir", type=Path, help="where checkpoints, metrics.jsonl and config.json go (default runs/<date-time>)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir where it stopped (an interrupted epoch included), with its saved "
        "options; options given here override them (only the epochs, the step and how it runs may change)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="join a multi-process JAX cluster (jax.distributed.initialize); automatic when JAX_COORDINATOR_ADDRESS, "
        "a multi-task SLURM or Open MPI job, or a multi-host TPU slice is detected",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = vars(build_parser(defaults=False).parse_args(argv))
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)}
    if args.resume and args.workdir is None:
        print("error: --resume needs the --workdir of the run to continue", file=sys.stderr)
        return 2
    workdir = args.workdir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    from lenet_jax.cli import run_training

    overrides = {k: v for k, v in given.items() if k in fields}
    return run_training(
        Config(**fields), workdir, resume=args.resume, progress=not args.no_progress,
        distributed=args.distributed, overrides=overrides,
    )


if __name__ == "__main__":
    sys.exit(main())
