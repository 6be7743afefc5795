"""``train.py``: train LeNet-5, from a named preset (the paper's configuration by default)
with the options given on top, or resume a run where it stopped."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lenet_jax.checkpoint import CHECKPOINTS, METRICS, holds_checkpoints, seed_folders
from lenet_jax.cli import ArgumentParser, parse
from lenet_jax.config import PRESETS, RENAMED, Config, field_type, flag, preset, preset_label, settle_options
from lenet_jax.errors import ConfigError, command
from lenet_jax.fileio import claim, new_run_folder

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))


def seed_list(text: str) -> list[int]:
    """--seeds: comma-separated whole numbers."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --seeds {text!r}: give whole numbers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"invalid --seeds {text!r}: give distinct whole numbers, e.g. 0,1,2")
    if any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"invalid --seeds {text!r}: seeds are 0 or more")
    return seeds


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The parser; with ``defaults=False`` parsing returns only the options actually given."""
    parser = ArgumentParser(
        prog="train.py",
        argument_default=None if defaults else argparse.SUPPRESS,
        description="Train LeNet-5 as LeCun et al. (1998) defined it. The default preset, paper, is the paper's setting "
        "except where the paper is silent and in two documented places where its setting does not train here.",
        epilog="presets: " + "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", "--config", dest="preset", default="paper" if defaults else argparse.SUPPRESS,
                        metavar="NAME|FILE", help=f"start from a named preset ({', '.join(PRESETS)}) or a JSON file of options "
                        "such as a run's config.json; the options given here go on top")
    for f in dataclasses.fields(Config):
        kind, _ = field_type(f)
        default = f.default if defaults else argparse.SUPPRESS
        help = f.metadata["help"] + (f" ({', '.join(f.metadata['choices'])})" if "choices" in f.metadata else "")
        earlier = [flag(old) for old, new in RENAMED.items() if new == f.name]
        help += "".join(f"; {name} is its earlier name" for name in earlier)
        if kind is bool:
            parser.add_argument(flag(f.name), *earlier, action=argparse.BooleanOptionalAction, default=default, help=help)
        else:
            parser.add_argument(flag(f.name), *earlier, type=kind, default=default, help=help)
    parser.add_argument("--seeds", type=seed_list, metavar="S,S,...",
                        help="train one model per seed (instead of --seed), each into WORKDIR/seed-S; ends with the test error of "
                        "each and their mean and spread. On a CPU with several cores at batch 1, each core trains an even share of the "
                        "epochs in a process of its own, one seed after the other (a seed that does not fit on one core trains "
                        "its first epochs on the next and is resumed on its own), each exactly as its own --seed run; otherwise "
                        "all seeds train in one compiled program. Seeds whose memory, estimated before anything "
                        "runs, exceeds what the device has free train in groups that fit, one group after the other (each group "
                        "computes what it would alone); refused when not even one seed fits")
    parser.add_argument("--one-program", action="store_true",
                        help="with --seeds: train the seeds in one compiled program even where each core could take its share "
                        "(the form of the --seeds figures in docs/ measured before 2026-12-02; the seeds then add in another order "
                        "than their own runs)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints, metrics.jsonl and config.json go (default: a new runs/<date-time>)")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in --workdir where it stopped (mid-epoch included), with its saved options; options given here "
        "override them (only the epochs, the learning rate and how it runs may change)",
    )
    parser.add_argument(
        "--distributed", action="store_true",
        help="join a multi-process JAX cluster (jax.distributed.initialize); automatic when JAX_COORDINATOR_ADDRESS, "
        "a multi-task SLURM or Open MPI job, or a multi-host TPU slice is detected",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_command_line(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any], bool] | int:
    """The parsed arguments, the Config options given explicitly, and whether a preset
    was named; or argparse's exit code."""
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    given = vars(build_parser(defaults=False).parse_args(argv))
    return args, {k: v for k, v in given.items() if k in CONFIG_FIELDS}, "preset" in given


def main(argv: list[str] | None = None) -> int:
    parsed = parse_command_line(argv)
    if isinstance(parsed, int):
        return parsed
    note_earlier_names(sys.argv[1:] if argv is None else argv)
    return run(*parsed)


def note_earlier_names(argv: list[str]) -> None:
    """A note for each option given by its earlier name, saying what it is called now."""
    for old, new in RENAMED.items():
        if any(a == flag(old) or a.startswith(flag(old) + "=") for a in argv):
            note_on_stderr(f"note: {flag(old)} is now {flag(new)} (the same option); the earlier name goes in a later version")


def note_on_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_config(args: argparse.Namespace, overrides: dict[str, Any], preset_given: bool,
                   note: Callable[[str], None] = note_on_stderr) -> Config:
    """The config a command line asks for: the preset (or, with --resume, the run's saved
    config) with the options given on top, made coherent (``config.settle_options``: what
    of the preset's was dropped goes to ``note``, once the config is known to be good)
    and checked."""
    from lenet_jax.runs import saved_config

    if args.resume:
        if args.workdir is None:
            raise ConfigError("--resume needs the --workdir of the run to continue")
        if preset_given:
            raise ConfigError("--preset starts a new run; --resume continues a run with its saved options (give only the ones to change)")
        if not args.workdir.is_dir():
            raise ConfigError(f"--workdir {args.workdir}: no such folder; --resume continues an existing run (check the path)")
        folders = seed_folders(args.workdir)
        base = saved_config(next(iter(folders.values())) if folders else args.workdir) or preset(args.preset)
    else:
        base = preset(args.preset)
    config, notes = settle_options(base, overrides, preset_label(args.preset), resume=args.resume)
    config = config.validate()
    for line in notes:
        note(line)
    return config


@command
def run(args: argparse.Namespace, overrides: dict[str, Any], preset_given: bool) -> int:
    """Resolve the config, then train."""
    config = resolve_config(args, overrides, preset_given)
    seeds = args.seeds
    if args.resume and not seeds and seed_folders(args.workdir):
        seeds = list(seed_folders(args.workdir))
    if seeds and "seed" in overrides:
        raise ConfigError("give either --seed or --seeds")
    if args.one_program and not seeds:
        raise ConfigError("--one-program is for --seeds (several seeds in one program); a single run is one program already")
    return train(config, args.workdir, resume=args.resume, progress=not args.no_progress, distributed=args.distributed, seeds=seeds,
                 one_program=args.one_program)


def curvature_sample_used(config: Config, n_train: int, note: Callable[[str], None] = print) -> Config:
    """``config`` with a --hessian-samples above the number of images it trains on (of a
    training set of ``n_train``) replaced by that number, which is what the estimate
    averages over, so that config.json records the number used; ``note`` says so (with
    the run's other output: it is no mistake)."""
    from lenet_jax.training import training_positions

    if config.optimizer != "sdlm":
        return config
    size = training_positions(config, n_train)[0]
    if config.hessian_samples <= size:
        return config
    note(f"note: --hessian-samples {config.hessian_samples:,} is more than the {size:,} training images: the Hessian estimate "
         f"averages over all {size:,}, and config.json records {size:,}")
    return config.replace(hessian_samples=size)


def train(config: Config, workdir: Path | None, resume: bool = False, progress: bool = True, distributed: bool = False,
          seeds: list[int] | None = None, one_program: bool = False) -> int:
    """Train ``config`` into ``workdir`` (a new ``runs/<date-time>`` when None; one model
    per seed of ``seeds``, if given: spread over the CPU's cores where ``spread.places``
    says so, unless ``one_program``) and say where everything went.

    The folder's lock is taken before anything is written, and held until the command
    ends; a command that fails before its first checkpoint removes what it created, and
    only that. SIGTERM/SIGINT stop training cleanly with a checkpoint (exit 0); a second
    one stops it at once; one before training starts ends the command (exit 130)."""
    from lenet_jax import cores, spread
    from lenet_jax.data import load_dataset
    from lenet_jax.parallel import initialize_distributed, is_primary
    from lenet_jax.preemption import StopRequest
    from lenet_jax.training import fit, fit_seeds, seeds_table

    with StopRequest() as stop:
        initialize_distributed(distributed)
        one_thread = cores.start_jax(one_thread=config.batch_size == 1 and not (seeds and one_program))
        primary = is_primary()
        created = workdir is None
        workdir = workdir or new_run_folder(Path("runs"), time.strftime("%Y%m%d-%H%M%S"))
        say = (lambda m: print(m, flush=True)) if primary else (lambda m: None)
        with claim(workdir, lock=primary, created=created, durable=holds_checkpoints) as folder:
            dataset = load_dataset(config.dataset, config.data_source, config.data_dir, config.cache_dir, log=say)
            say(f"data: {dataset.source}")
            if one_thread:
                say("threads: one XLA thread on the CPU, the fastest at batch 1 (lenet_jax.cores)")
            if not resume:  # a resumed run goes on with its saved options
                config = curvature_sample_used(config, len(dataset.train_labels), say)
            done = spread.completed_epochs(folder.path, seeds) if resume and seeds else None
            places = spread.places(config, seeds, len(dataset.train_labels), done) if seeds and not one_program else None
            with stop.asking():
                if places:
                    results = spread.fit_spread(config, places, folder, resume, say, stop)
                elif seeds:
                    results = fit_seeds(config, seeds, dataset, folder, resume=resume, log=say, progress=progress, stop=stop)
                else:
                    results = [fit(config, dataset, folder, resume=resume, log=say, progress=progress, stop=stop, alongside=one_thread)]
    if not all(r.finished for r in results) or len(results) < len(seeds or [0]):  # seeds in turn: a stop may leave some out
        say(f"to continue: python train.py --workdir {workdir} --resume")
        return 0
    if seeds:
        done = {s: r.history[-1]["test_error"] for s, r in zip(seeds, results)}
        say(f"done after {results[0].history[-1]['epoch']} epochs:\n" + seeds_table(done))
        say(f"runs: {workdir}/seed-{{{','.join(map(str, seeds))}}}\nevaluate with: python eval.py --workdir {workdir}")
        return 0
    last = results[0].history[-1] if results[0].history else {}
    say(f"done: test error {last.get('test_error', float('nan')):.2%} after {results[0].position.epoch} epochs")
    say(f"checkpoints: {workdir / CHECKPOINTS}\nmetrics log: {workdir / METRICS}")
    say(f"evaluate with: python eval.py --workdir {workdir}")
    return 0
