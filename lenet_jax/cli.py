"""What ``train.py`` and ``eval.py`` run once their arguments are parsed: load the data,
call the library, turn every error a user can cause into one line and an exit code."""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lenet_jax.checkpoint import CheckpointError
from lenet_jax.config import Config
from lenet_jax.data import DataError, Dataset, load_dataset

USER_ERRORS = (ValueError, DataError, CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def guarded(fn: Callable[[], int]) -> int:
    """Run ``fn``; a user-caused error becomes 'error: ...' on stderr and exit code 2,
    a diverged run exit code 1, an interrupt exit code 130."""
    try:
        return fn()
    except FloatingPointError as e:
        return _fail(str(e), 1)
    except USER_ERRORS as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def load_data(config: Config, log: Callable[[str], None] = print) -> Dataset:
    return load_dataset(config.dataset, config.data_source, config.data_dir, config.cache_dir, log=log)


def check_workdir(workdir: Path) -> None:
    """Create ``workdir`` if needed and make sure files can be written in it, before any
    time is spent on data or compiling."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=workdir, prefix=".write-test-")
        probe.close()
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: not a writable folder ({e.strerror or type(e).__name__})") from None


def resume_config(config: Config, workdir: Path, overrides: dict[str, Any]) -> Config:
    """The config a resumed run continues with: the one saved in ``workdir`` with the
    options given on the command line (``overrides``) on top; ``config`` if none is saved."""
    saved = workdir / "config.json"
    if not saved.is_file():
        return config
    try:
        base = Config.from_dict(json.loads(saved.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{saved}: not a config written by train.py ({e})") from None
    return base.replace(**overrides)


def run_training(
    config: Config,
    workdir: Path,
    resume: bool = False,
    progress: bool = True,
    distributed: bool = False,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Train ``config`` into ``workdir`` and report where everything went. SIGTERM/SIGINT
    stop it cleanly with a checkpoint (exit 0); a second one stops it at once."""

    def go() -> int:
        from lenet_jax.parallel import initialize_distributed, is_primary
        from lenet_jax.preemption import StopRequest
        from lenet_jax.training import fit

        initialize_distributed(distributed)
        run_config = resume_config(config, workdir, overrides or {}) if resume else config
        run_config.validate()
        if is_primary():
            check_workdir(workdir)
        say = (lambda m: print(m, flush=True)) if is_primary() else (lambda m: None)
        dataset = load_data(run_config, log=say)
        say(f"data: {dataset.source}")
        with StopRequest() as stop:
            result = fit(run_config, dataset, workdir, resume=resume, log=say, progress=progress, stop=stop)
        if result.stopped:
            say(f"to continue: python train.py --workdir {workdir} --resume")
            return 0
        last = result.history[-1] if result.history else {}
        say(f"done: test error {last.get('test_error', float('nan')):.2%} after {run_config.epochs} epochs")
        say(f"checkpoints: {workdir / 'checkpoints'}\nmetrics log: {workdir / 'metrics.jsonl'}")
        say(f"evaluate with: python eval.py --workdir {workdir}")
        return 0

    return guarded(go)


def format_report(report: dict[str, Any]) -> str:
    """The human summary of ``eval.py``: loss, error, per-class error, confusion matrix."""
    lines = [
        f"checkpoint: {report['checkpoint']} (epoch {report['checkpoint_step']})",
        f"test loss {report['test_loss']:.4f}  test error {report['test_error']:.2%} "
        f"({report['test_errors']} of {report['n_test']})",
        "per-class error: " + "  ".join(f"{d}:{e:.2%}" for d, e in enumerate(report["per_class_error"])),
        "confusion matrix (rows: true digit, columns: predicted):",
        "      " + "".join(f"{d:>6d}" for d in range(10)),
    ]
    lines += [f"{d:>6d}" + "".join(f"{v:>6d}" for v in row) for d, row in enumerate(report["confusion"])]
    lines += [f"figure: {f}" for f in report.get("figures", [])]
    return "\n".join(lines)


@dataclass
class LoadedModel:
    """A model to evaluate or predict with: a run's checkpoint or the shipped one."""

    params: Any
    apply_fn: Callable
    config: Config
    epoch: int
    history: list[dict[str, Any]]
    name: str


def load_model(path: Path | None, which: str = "best") -> LoadedModel:
    """The checkpoint of run/checkpoints folder ``path`` (epoch ``which``), or the
    pretrained model shipped with the package when ``path`` is None."""
    from lenet_jax import pretrained
    from lenet_jax.training import make_model, restore_run

    if path is None:
        params, config, meta = pretrained.load()
        return LoadedModel(params, make_model(config, inference=True).apply, config, meta["epoch"], meta.get("history", []),
                           f"pretrained {pretrained.PRETRAINED.name}")
    state, config, record = restore_run(path, which, log=lambda m: print(m, file=sys.stderr))
    return LoadedModel(state.params, make_model(config, inference=True).apply, config, int(record["epoch"]),
                       record.get("history", []), str(path))


def summary_rows(config: Config) -> list[dict[str, Any]]:
    """The layer table of the model ``config`` describes, computed from the model."""
    import jax

    from lenet_jax.model import init_params, layer_table
    from lenet_jax.training import make_model

    model = make_model(config)
    return layer_table(init_params(model, jax.random.key(0)), model.c3_table)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The rows as the paper's table: layer, output shape, parameters, connections, totals."""
    lines = [f"{'layer':<18}{'output':>14}{'parameters':>12}{'connections':>13}"]
    for r in rows:
        shape = "x".join(map(str, r["output"]))
        lines.append(f"{r['layer']:<18}{shape:>14}{r['parameters']:>12,}{r['connections']:>13,}")
    lines.append(f"{'total':<18}{'':>14}{sum(r['parameters'] for r in rows):>12,}{sum(r['connections'] for r in rows):>13,}")
    return "\n".join(lines)


def run_summary(path: Path | None, which: str = "best", as_json: bool = False) -> int:
    """Print the layer table of a run's model (the pretrained one's without ``path``)."""

    def go() -> int:
        if path is None:
            from lenet_jax import pretrained

            config = pretrained.load()[1]
        else:
            config = load_model(path, which).config
        rows = summary_rows(config)
        if as_json:
            print(json.dumps([dict(r, output=list(r["output"])) for r in rows]))
        else:
            print(format_summary(rows))
        return 0

    return guarded(go)


def run_prediction(path: Path | None, which: str, images: list[Path], as_json: bool = False) -> int:
    """Predict the digit in each image; exit code 2 if any image could not be used."""

    def go() -> int:
        from lenet_jax.predict import format_prediction, image_paths, predict_images

        paths = image_paths(images)
        if not paths:
            raise ValueError("--image: no image files found in " + ", ".join(map(str, images)))
        loaded = load_model(path, which)
        results = predict_images(loaded.params, loaded.apply_fn, loaded.config.objective, paths)
        for r in results:
            if as_json:
                print(json.dumps(r.to_dict()))
            elif r.error is None:
                print(format_prediction(r))
            else:
                print(format_prediction(r), file=sys.stderr)
        failed = sum(r.error is not None for r in results)
        if failed:
            print(f"error: {failed} of {len(results)} images could not be used", file=sys.stderr)
        return 2 if failed else 0

    return guarded(go)


def write_figures(loaded: LoadedModel, dataset: Dataset, result: dict[str, Any], folder: Path) -> list[Path]:
    """The PNG figures of a model: error curves (from its history), confusion matrix,
    misclassified test digits, RBF bitmaps (RBF head) and C1/C3 maps of one test digit."""
    import jax
    import jax.numpy as jnp

    from lenet_jax import plots
    from lenet_jax.data import preprocess

    check_workdir(folder)
    written = []
    if loaded.history:
        written.append(plots.error_curves({loaded.config.dataset: loaded.history}, folder / "error_curves.png"))
    written.append(plots.confusion_matrix(result["confusion"], folder / "confusion.png"))
    written.append(plots.misclassified(dataset.test_images, dataset.test_labels, result["predictions"], folder / "misclassified.png"))
    if loaded.config.head == "rbf":
        written.append(plots.rbf_bitmaps(folder / "rbf_bitmaps.png"))
    digit = dataset.test_images[0]
    acts = loaded.apply_fn({"params": loaded.params}, preprocess(jnp.asarray(digit[None])), method="activations")
    written.append(plots.feature_maps(digit, [a[0] for a in jax.device_get(acts)], folder / "feature_maps.png"))
    return written


def run_evaluation(
    path: Path | None,
    which: str = "best",
    as_json: bool = False,
    data_overrides: dict[str, Any] | None = None,
    figures: Path | None = None,
) -> int:
    """Evaluate a saved checkpoint (the pretrained model without ``path``) on its
    dataset's test split; with ``figures``, write the PNG figures there too."""

    def go() -> int:
        from lenet_jax.training import evaluate

        loaded = load_model(path, which)
        config = loaded.config.replace(**{k: v for k, v in (data_overrides or {}).items() if v is not None})
        dataset = load_data(config, log=lambda m: print(m, file=sys.stderr))
        r = evaluate(loaded.params, loaded.apply_fn, dataset.test_images, dataset.test_labels, config.objective, config.eval_batch_size)
        confusion = r["confusion"]
        per_class = 1.0 - np.diag(confusion) / np.maximum(confusion.sum(1), 1)
        report = {
            "checkpoint": loaded.name,
            "checkpoint_step": loaded.epoch,
            "dataset": config.dataset,
            "test_error": r["error"],
            "test_loss": r["loss"],
            "test_errors": r["errors"],
            "n_test": r["n"],
            "per_class_error": [float(e) for e in per_class],
            "confusion": confusion.tolist(),
        }
        if figures is not None:
            report["figures"] = [str(p) for p in write_figures(loaded, dataset, r, figures)]
        print(json.dumps(report) if as_json else format_report(report))
        return 0

    return guarded(go)
