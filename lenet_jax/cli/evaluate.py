"""``eval.py``: evaluate LeNet-5, predict digits in your own images, print its layer table,
draw its figures. Without --workdir or --checkpoint it uses the pretrained model that
ships with the package."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lenet_jax.checkpoint import several_seeds
from lenet_jax.cli import ArgumentParser, parse
from lenet_jax.config import Config
from lenet_jax.data import SOURCES, Dataset, load_dataset
from lenet_jax.errors import ConfigError, command, fail, path_error
from lenet_jax.predict import MAX_PIXELS, SERVE_MAX_PIXELS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {value}")
    return value


def epoch_choice(text: str) -> str:
    """--epoch: best, latest or an epoch number."""
    if text in ("best", "latest") or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"invalid --epoch {text!r}: give best, latest or an epoch number")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="eval.py", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workdir", type=Path, help="a run folder written by train.py (default: the pretrained model)")
    where.add_argument("--checkpoint", type=Path, help="a checkpoints folder (or a run folder)")
    parser.add_argument("--epoch", type=epoch_choice, default=argparse.SUPPRESS,  # absent unless given: --step may stand in for it
                        help="which completed epoch of the run of --workdir or --checkpoint: best (lowest validation error, "
                        "else latest), latest, or a number (default: best); refused without a run (the shipped model has no other epoch)")
    parser.add_argument("--step", type=epoch_choice, dest="step_alias", default=None, help=argparse.SUPPRESS)  # --epoch's earlier name, with a note
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--image", type=Path, nargs="+", metavar="PATH",
                      help="predict the digit in these images (or the images in these folders), prepared like MNIST's digits")
    what.add_argument("--summary", action="store_true", help="print the layer table (output shapes, parameters, connections) "
                      "and the cost of one recognition (multiply-adds, parameter memory)")
    what.add_argument("--figures", type=Path, metavar="DIR", help="evaluate and write the PNG figures into DIR")
    what.add_argument("--serve", action="store_true",
                      help="serve a web page to draw digits on and watch every layer read them (needs the demo extra)")
    parser.add_argument("--host", default="127.0.0.1", help="with --serve: the address to listen on (another than loopback lets "
                        "anyone who can reach the port use the page); a request's Host header must name it or a loopback name "
                        "(for 0.0.0.0 or ::, this machine's name too), and a POST's Origin the page's own")
    parser.add_argument("--port", type=port_number, default=8000, help="with --serve: the port (0: a free one)")
    parser.add_argument("--max-body", type=positive_int, default=1_000_000, help="with --serve: the largest image accepted, in bytes (a body still arriving after 10 s is refused too)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the human summary")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="refuse images with more pixels than this (width x height), checked from the file's header "
                        f"before decoding; default {MAX_PIXELS:,} with --image, {SERVE_MAX_PIXELS:,} with --serve "
                        "(a drawing on the page is 78,400)")
    parser.add_argument("--data-source", choices=SOURCES, default=None, help="override the run's data source")
    parser.add_argument("--data-dir", default=None, help="override the run's IDX / tfds folder")
    parser.add_argument("--cache-dir", default=None, help="override the run's data cache folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    path = args.workdir or args.checkpoint
    try:
        which = chosen_epoch(args, path)
    except ConfigError as e:
        return fail(str(e))
    if args.serve:
        return run_server(path, which, args.host, args.port, args.max_body, args.max_pixels)
    if args.summary:
        return run_summary(path, which, args.json)
    if args.image:
        return run_prediction(path, which, args.image, args.json, args.max_pixels)
    overrides = {"data_source": args.data_source, "data_dir": args.data_dir, "cache_dir": args.cache_dir}
    return run_evaluation(path, which, args.json, overrides, args.figures)


def chosen_epoch(args: argparse.Namespace, path: Path | None) -> str:
    """The epoch --epoch (or its earlier name --step, with its note) selects, "best" when
    neither is given; ConfigError for both, or for either without a run to select in."""
    given = [f"{name} {value}" for name, value in (("--epoch", getattr(args, "epoch", None)), ("--step", args.step_alias))
             if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)}: --step is the earlier name of --epoch; give one of them")
    if given and path is None:
        raise ConfigError(f"{given[0]} selects an epoch of a run: give its --workdir or --checkpoint (without them eval.py "
                          "uses the shipped model, which has one epoch)")
    if args.step_alias is not None:
        print(f"note: --step {args.step_alias} selects epoch {args.step_alias} (checkpoints are numbered by update); "
              "use --epoch, --step goes in a later version", file=sys.stderr)
        return args.step_alias
    return getattr(args, "epoch", "best")


@dataclass
class LoadedModel:
    """A model to evaluate or predict with: a run's checkpoint or the shipped one."""

    params: Any
    apply_fn: Callable
    config: Config
    epoch: int
    update: int | None
    history: list[dict[str, Any]]
    name: str


def single_run(path: Path | None) -> Path | None:
    """``path``, refused when it is the folder of several seeds' runs (one run folder a seed)."""
    folders = {} if path is None else several_seeds(path)
    if folders:
        names = ", ".join(p.name for p in folders.values())
        raise ConfigError(f"{path} holds the runs of several seeds ({names}): give one seed's folder, e.g. {path}/{next(iter(folders.values())).name}")
    return path


def load_model(path: Path | None, which: str = "best") -> LoadedModel:
    """The checkpoint of run/checkpoints folder ``path`` (completed epoch ``which``), or
    the pretrained model shipped with the package when ``path`` is None; its parameters
    checked finite."""
    from lenet_jax import pretrained
    from lenet_jax.factories import make_inference
    from lenet_jax.runs import restore_run

    if path is None:
        params, config, meta = pretrained.load()
        return LoadedModel(params, make_inference(config), config, meta["epoch"], None, meta.get("history", []),
                           f"pretrained {pretrained.PRETRAINED.name}")
    state, config, record = restore_run(single_run(path), which, log=lambda m: print(m, file=sys.stderr))
    return LoadedModel(state.params, make_inference(config), config, int(record["epoch"]), int(state.step),
                       record.get("history", []), str(path))


def format_report(report: dict[str, Any]) -> str:
    """The human summary of an evaluation: loss, error, per-class error, confusion matrix."""
    lines = [
        f"checkpoint: {report['checkpoint']} (epoch {report['epoch']}" + (f", update {report['update']:,})" if report.get("update") else ")"),
        f"test loss {report['test_loss']:.4f}  test error {report['test_error']:.2%} ({report['test_errors']} of {report['n_test']})",
        "per-class error: " + "  ".join(f"{d}:{e:.2%}" for d, e in enumerate(report["per_class_error"])),
        "confusion matrix (rows: true digit, columns: predicted):",
        "      " + "".join(f"{d:>6d}" for d in range(10)),
    ]
    lines += [f"{d:>6d}" + "".join(f"{v:>6d}" for v in row) for d, row in enumerate(report["confusion"])]
    if "rejection" in report:
        lines.append(format_rejection(report["rejection"]))
    lines += [f"figure: {f}" for f in report.get("figures", [])]
    return "\n".join(lines)


def format_rejection(r: dict[str, Any]) -> str:
    """One line: the share of test patterns rejected, least confident first, to reach the
    target error on the rest (the paper's Fig. 10 measure)."""
    return (f"rejection for {r['target_error']:.1%} error: {r['rejected_share']:.2%} of the test patterns "
            f"({r['rejected']:,} of {r['n']:,}, smallest margin first) leave {r['error_on_kept']:.2%} error on the rest")


PAPER_COST = {"multiply_adds": 340_000, "parameters": 60_000, "parameter_bytes": None}
"""The paper's cost of LeNet-5 as the project's statement of the paper gives it: about 340,000
connections (multiply-adds) per recognition and about 60,000 parameters; it gives no memory in bytes."""


def format_cost(cost: dict[str, Any]) -> str:
    """The cost of one recognition beside the paper's (Figs. 11 and 12) and how it is counted."""
    from lenet_jax.model import COUNTING_RULE

    return "\n".join([
        f"multiply-adds per recognition: {cost['multiply_adds']:,} (paper: about {PAPER_COST['multiply_adds']:,})",
        f"parameter memory: {cost['parameter_bytes']:,} bytes, {cost['parameters']:,} float32 parameters (paper: about "
        f"{PAPER_COST['parameters']:,} parameters, no figure in bytes)"
        + (f"; {cost['held_bytes']:,} bytes as held (C3's kernel whole, its disconnected entries at zero)"
           if cost["held_bytes"] != cost["parameter_bytes"] else ""),
        f"counted: {COUNTING_RULE}",
    ])


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The layer table as the paper gives it: layer, output shape, parameters, connections, totals."""
    lines = [f"{'layer':<18}{'output':>14}{'parameters':>12}{'connections':>13}"]
    for r in rows:
        shape = "x".join(map(str, r["output"]))
        lines.append(f"{r['layer']:<18}{shape:>14}{r['parameters']:>12,}{r['connections']:>13,}")
    lines.append(f"{'total':<18}{'':>14}{sum(r['parameters'] for r in rows):>12,}{sum(r['connections'] for r in rows):>13,}")
    return "\n".join(lines)


@command
def run_server(path: Path | None, which: str, host: str, port: int, max_body: int, max_pixels: int | None = None) -> int:
    """Serve the draw-a-digit page for a run's model (the shipped one without ``path``)."""
    from lenet_jax import demo

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError(demo.MISSING) from None
    loaded = load_model(single_run(path), which)
    name = loaded.name if path is None else f"{path.resolve().name}, epoch {loaded.epoch}"  # the folder's name: no path of this machine
    reader = demo.DigitReader(loaded.params, loaded.config, name, max_pixels or SERVE_MAX_PIXELS)
    try:
        demo.serve(reader, host, port, max_body, say=lambda m: print(m, flush=True))
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or type(e).__name__})") from None
    return 0


@command
def run_summary(path: Path | None, which: str = "best", as_json: bool = False) -> int:
    """Print the layer table of a run's model (the pretrained one's without ``path``)."""
    import jax

    from lenet_jax import pretrained
    from lenet_jax.factories import make_model
    from lenet_jax.model import COUNTING_RULE, init_params, layer_table, recognition_cost

    config = pretrained.load()[1] if path is None else load_model(single_run(path), which).config
    model = make_model(config)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))  # the table needs shapes, not values
    rows = layer_table(shapes, model.c3_table)
    cost = recognition_cost(shapes, model.c3_table)._asdict()
    if as_json:
        print(json.dumps({"layers": [dict(r, output=list(r["output"])) for r in rows],
                          "cost": dict(cost, counting=COUNTING_RULE, paper_about=PAPER_COST)}))
    else:
        print(format_cost(cost) + "\n" + format_summary(rows))  # the table last: its total is the last line
    return 0


@command
def run_prediction(path: Path | None, which: str, images: list[Path], as_json: bool = False, max_pixels: int | None = None) -> int:
    """Predict the digit in each image, printing each batch's lines as it is done; exit
    code 2 if any image could not be used."""
    from lenet_jax.predict import format_prediction, image_paths, predict_stream

    paths = image_paths(images)
    if not paths:
        raise ConfigError("--image: no image files found in " + ", ".join(map(str, images)))
    loaded = load_model(single_run(path), which)
    total = failed = 0
    for r in predict_stream(loaded.params, loaded.apply_fn, loaded.config.objective, paths, max_pixels or MAX_PIXELS):
        total += 1
        failed += r.error is not None
        if as_json:
            print(json.dumps(r.to_dict()), flush=True)
        else:
            print(format_prediction(r), file=sys.stdout if r.error is None else sys.stderr, flush=True)
    if failed:
        print(f"error: {failed} of {total} images could not be used", file=sys.stderr)
    return 2 if failed else 0


def write_figures(loaded: LoadedModel, dataset: Dataset, result: dict[str, Any], folder: Path) -> list[Path]:
    """The PNG figures of a model: error curves (from its history), confusion matrix,
    misclassified test digits, RBF bitmaps (RBF head) and C1/C3 maps of one test digit."""
    try:
        return _draw_figures(loaded, dataset, result, folder)
    except OSError as e:
        raise path_error(folder, e, "cannot write the figures") from None


def _draw_figures(loaded: LoadedModel, dataset: Dataset, result: dict[str, Any], folder: Path) -> list[Path]:
    import jax
    import jax.numpy as jnp

    from lenet_jax import plots
    from lenet_jax.inputs import preprocess

    written = []
    if loaded.history:
        written.append(plots.error_curves({loaded.config.dataset: loaded.history}, folder / "error_curves.png"))
    written.append(plots.confusion_matrix(result["confusion"], folder / "confusion.png"))
    written.append(plots.misclassified(dataset.test_images, dataset.test_labels, result["predictions"], folder / "misclassified.png"))
    if loaded.config.head == "rbf":
        written.append(plots.rbf_bitmaps(folder / "rbf_bitmaps.png"))
    rejection = result["rejection"]
    written.append(plots.rejection_curve(rejection.curve.share, rejection.curve.error, folder / "rejection.png",
                                         rejection.target, rejection.share))
    digit = dataset.test_images[0]
    acts = loaded.apply_fn({"params": loaded.params}, preprocess(jnp.asarray(digit[None])), method="activations")
    written.append(plots.feature_maps(digit, [a[0] for a in jax.device_get(acts)], folder / "feature_maps.png"))
    return written


def evaluation_report(loaded: LoadedModel, data_overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], Dataset, dict[str, Any]]:
    """The test-set report of a loaded model (on its dataset, the data options on top),
    the dataset and the raw evaluation (with its ``rejection.Rejection`` under "rejection")."""
    import jax.numpy as jnp

    from lenet_jax.evaluation import evaluate_arrays, summarize_evaluation
    from lenet_jax.rejection import MARGINS, TARGET_ERROR, scores_rejection

    config = loaded.config.replace(**{k: v for k, v in (data_overrides or {}).items() if v is not None})
    dataset = load_dataset(config.dataset, config.data_source, config.data_dir, config.cache_dir, log=lambda m: print(m, file=sys.stderr))
    labels = dataset.test_labels
    out = evaluate_arrays(loaded.params, loaded.apply_fn, jnp.asarray(dataset.test_images), jnp.asarray(labels), config.objective,
                          min(config.eval_batch_size, len(labels)))  # one compiled pass gives the report and the rejection
    r = summarize_evaluation(out, labels)
    r["rejection"] = scores_rejection(np.asarray(out["scores"]), config.head, labels, TARGET_ERROR)
    confusion = r["confusion"]
    per_class = 1.0 - np.diag(confusion) / np.maximum(confusion.sum(1), 1)
    report = {
        "checkpoint": loaded.name,
        "epoch": loaded.epoch,
        **({"update": loaded.update} if loaded.update is not None else {}),
        "dataset": config.dataset,
        "test_error": r["error"],
        "test_loss": r["loss"],
        "test_errors": r["errors"],
        "n_test": r["n"],
        "per_class_error": [float(e) for e in per_class],
        "confusion": confusion.tolist(),
        "rejection": dict(r["rejection"].to_dict(), margin_between=MARGINS[config.head]),
    }
    return report, dataset, r


@command
def run_evaluation(
    path: Path | None, which: str = "best", as_json: bool = False, data_overrides: dict[str, Any] | None = None, figures: Path | None = None
) -> int:
    """Evaluate a saved checkpoint (the pretrained model without ``path``) on its
    dataset's test split; with ``figures``, write the PNG figures there too. A run of
    several seeds (``train.py --seeds``) is evaluated seed by seed, with the mean."""
    from lenet_jax.fileio import check_writable_folder
    from lenet_jax.training import mean_and_spread, seeds_table

    folders = {} if path is None else several_seeds(path)
    if folders:
        if figures is not None:
            raise ConfigError(f"--figures draws one model: give --workdir {path}/seed-S")
        reports = {s: evaluation_report(load_model(folder, which), data_overrides)[0] for s, folder in folders.items()}
        errors = {s: r["test_error"] for s, r in reports.items()}
        epochs = {s: r["epoch"] for s, r in reports.items()}
        level = len(set(epochs.values())) == 1
        mean, spread = mean_and_spread(list(errors.values()))
        if as_json:
            print(json.dumps({"seeds": reports, "epochs": epochs,
                              "mean_test_error": float(mean) if level else None, "std_test_error": float(spread) if level else None}))
        elif level:
            print(seeds_table(errors))
        else:
            print("seed  epoch  test error\n" + "\n".join(f"{s:>4d}  {epochs[s]:>5d}  {e:.2%}" for s, e in errors.items()))
        if not level:
            where = ", ".join(f"seed {s}: {e}" for s, e in epochs.items())
            print(f"note: the seeds stand at different epochs ({where}), so no mean is taken; "
                  "resume the run to bring them level, or give --epoch N", file=sys.stderr)
        return 0
    if figures is not None:
        check_writable_folder(figures, "--figures")
    loaded = load_model(path, which)
    report, dataset, r = evaluation_report(loaded, data_overrides)
    if figures is not None:
        report["figures"] = [str(p) for p in write_figures(loaded, dataset, r, figures)]
    print(json.dumps(report) if as_json else format_report(report))
    return 0
