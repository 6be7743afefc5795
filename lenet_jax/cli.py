"""What ``train.py`` and ``eval.py`` run once their arguments are parsed: load the data,
call the library, turn every error a user can cause into one line and an exit code."""

from __future__ import annotations

import json
import sys
import tempfile
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
    return "\n".join(lines)


def run_evaluation(path: Path, which: str = "best", as_json: bool = False, data_overrides: dict[str, Any] | None = None) -> int:
    """Evaluate a saved checkpoint on its dataset's test split."""

    def go() -> int:
        from lenet_jax.training import evaluate, restore_run

        state, config, record = restore_run(path, which, log=lambda m: print(m, file=sys.stderr))
        config = config.replace(**{k: v for k, v in (data_overrides or {}).items() if v is not None})
        dataset = load_data(config, log=lambda m: print(m, file=sys.stderr))
        r = evaluate(state.params, state.apply_fn, dataset.test_images, dataset.test_labels, config.objective, config.eval_batch_size)
        confusion = r["confusion"]
        per_class = 1.0 - np.diag(confusion) / np.maximum(confusion.sum(1), 1)
        report = {
            "checkpoint": str(path),
            "checkpoint_step": int(record["epoch"]),
            "test_error": r["error"],
            "test_loss": r["loss"],
            "test_errors": r["errors"],
            "n_test": r["n"],
            "per_class_error": [float(e) for e in per_class],
            "confusion": confusion.tolist(),
        }
        print(json.dumps(report) if as_json else format_report(report))
        return 0

    return guarded(go)
