"""Training end to end on real MNIST, checkpoints, exact resume, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax.config import Config
from lenet_jax.data import Dataset
from lenet_jax.layers import C3_TABLE, connection_mask
from lenet_jax.training import evaluate, fit, restore_run

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda m: None, progress=False)


def small(mnist, n_train: int, n_test: int = 2000) -> Dataset:
    return Dataset(mnist.train_images[:n_train], mnist.train_labels[:n_train], mnist.test_images[:n_test], mnist.test_labels[:n_test])


def test_paper_configuration_learns_real_digits(mnist, tmp_path):
    """Two passes of batch-1 SDLM over 4,000 real digits: far below the 90% of chance."""
    config = Config(epochs=2, train_subset=4000)
    result = fit(config, small(mnist, 4000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.08
    assert result.history[-1]["train_error"] < result.history[0]["train_error"] + 0.02
    kernel = np.asarray(result.state.params["C3"]["kernel"])
    assert np.all(kernel[:, :, connection_mask(C3_TABLE, 6) == 0] == 0)  # masked weights stay exactly zero


@pytest.mark.parametrize("optimizer,batch", [("sgd", 16), ("adam", 32), ("sdlm", 8)])
def test_other_optimizers_and_minibatches_learn(mnist, tmp_path, optimizer, batch):
    lr = {"sdlm": 1e-3}.get(optimizer)
    config = Config(optimizer=optimizer, batch_size=batch, epochs=2, train_subset=3000, schedule="constant", lr=lr)
    result = fit(config, small(mnist, 3000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.15


def test_softmax_head_learns(mnist, tmp_path):
    config = Config(head="softmax", loss="xent", optimizer="adam", batch_size=32, epochs=2, train_subset=3000)
    result = fit(config, small(mnist, 3000), tmp_path, **QUIET)
    assert result.history[-1]["test_error"] < 0.15


def test_run_is_reproducible_from_its_seed_and_resume_is_exact(mnist, tmp_path):
    data = small(mnist, 300, 200)
    config = Config(epochs=3, train_subset=300, hessian_samples=50)
    straight = fit(config, data, tmp_path / "a", **QUIET)
    again = fit(config, data, tmp_path / "b", **QUIET)
    chex.assert_trees_all_equal(straight.state.params, again.state.params)
    fit(config.replace(epochs=2), data, tmp_path / "c", **QUIET)
    resumed = fit(config, data, tmp_path / "c", resume=True, **QUIET)
    chex.assert_trees_all_equal(straight.state.params, resumed.state.params)
    chex.assert_trees_all_equal(straight.state.opt_state, resumed.state.opt_state)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_checkpoint_round_trip_and_best_step(mnist, tmp_path):
    data = small(mnist, 400, 300)
    config = Config(epochs=3, train_subset=None, validation_size=100, keep=1, optimizer="sgd", batch_size=8, lr=1e-3)
    result = fit(config, data, tmp_path, **QUIET)
    state, restored_config, record = restore_run(tmp_path, "latest")
    assert record["epoch"] == 3 and restored_config == config
    chex.assert_trees_all_equal(state.params, result.state.params)
    best = min(result.history, key=lambda r: r["val_error"])
    _, _, best_record = restore_run(tmp_path, "best")
    assert best_record["epoch"] == best["epoch"]
    r = evaluate(state.params, state.apply_fn, data.test_images, data.test_labels, config.objective)
    assert abs(r["error"] - result.history[-1]["test_error"]) < 1e-9
    assert r["confusion"].sum() == 300


def test_refuses_to_overwrite_or_resume_a_different_model(mnist, tmp_path):
    data = small(mnist, 100, 100)
    fit(Config(epochs=1, hessian_samples=20), data, tmp_path, **QUIET)
    with pytest.raises(Exception, match="already holds checkpoints"):
        fit(Config(epochs=1), data, tmp_path, **QUIET)
    with pytest.raises(Exception, match=r"head \('rbf' there, 'softmax' here\)"):
        fit(Config(epochs=2, head="softmax", loss="xent"), data, tmp_path, resume=True, **QUIET)


def test_batch_larger_than_data_is_refused(mnist, tmp_path):
    with pytest.raises(ValueError, match="larger than the 100 training images"):
        fit(Config(batch_size=101, train_subset=100), small(mnist, 100), tmp_path, **QUIET)


# --------------------------------------------------------------------------- command line


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def test_train_and_eval_scripts(mnist, tmp_path):
    work = tmp_path / "run"
    out = run("train.py", "--epochs", "1", "--train-subset", "500", "--hessian-samples", "50", "--workdir", str(work), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "checkpoints:" in out.stdout and (work / "metrics.jsonl").is_file()
    out = run("eval.py", "--workdir", str(work), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_test"] == 10_000 and report["checkpoint_step"] == 1
    assert 0 <= report["test_error"] < 0.5 and np.asarray(report["confusion"]).sum() == 10_000
    out = run("eval.py", "--workdir", str(work))
    assert "confusion matrix" in out.stdout and "per-class error" in out.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train.py", "--epochs", "0"], "--epochs must be at least 1"),
        (["train.py", "--optimizer", "rmsprop"], "--optimizer 'rmsprop' is not one of"),
        (["train.py", "--head", "softmax"], "the softmax head takes loss xent"),
        (["train.py", "--data-source", "idx", "--data-dir", "/nonexistent"], "is not a folder"),
        (["eval.py", "--workdir", "/nonexistent"], "no checkpoint folder"),
        (["train.py", "--workdir", "/etc/passwd"], "--workdir /etc/passwd: not a writable folder"),
        (["train.py", "--workdir", "/proc/lenet"], "--workdir /proc/lenet: not a writable folder"),
        (["train.py", "--batch-size", "70000"], "--batch-size 70000 is larger than the 60000 training images"),
    ],
)
def test_bad_command_lines_get_one_line_and_exit_2(args, message, tmp_path):
    if args[0] == "train.py" and "--workdir" not in args:
        args = [*args, "--workdir", str(tmp_path / "run")]
    out = run(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.stderr


@pytest.mark.parametrize("fault", ["truncate_data", "delete_manifest", "truncate_metadata", "delete_record"])
def test_a_damaged_newest_checkpoint_is_skipped_and_named(mnist, tmp_path, fault):
    data = small(mnist, 100, 100)
    config = Config(epochs=2, train_subset=100, hessian_samples=20)
    fit(config, data, tmp_path, **QUIET)
    newest = tmp_path / "checkpoints" / "2"
    if fault == "truncate_data":
        for f in (newest / "state").rglob("d/*"):
            f.write_bytes(f.read_bytes()[:10])
    elif fault == "delete_manifest":
        for f in (newest / "state").rglob("manifest.ocdbt"):
            f.unlink()
    elif fault == "truncate_metadata":
        (newest / "state" / "_METADATA").write_text("{\"tr")
    else:
        (newest / "record" / "metadata").unlink()
    said = []
    _, _, record = restore_run(tmp_path, "latest", log=said.append)
    assert record["epoch"] == 1
    assert len(said) == 1 and said[0].startswith("skipping checkpoint step 2:")
    resumed = fit(config.replace(epochs=3), data, tmp_path, resume=True, log=said.append, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_a_diverging_run_stops_naming_where_and_keeps_the_last_good_checkpoint(mnist, tmp_path):
    data = small(mnist, 200, 100)
    fit(Config(optimizer="sgd", lr=1e-3, epochs=1, train_subset=200), data, tmp_path, **QUIET)
    with pytest.raises(FloatingPointError, match=r"NaN or infinite in epoch 2, updates 1-20 of 200; the last good checkpoint is epoch 1"):
        fit(Config(optimizer="sgd", lr=1e38, epochs=2, train_subset=200), data, tmp_path, resume=True, **QUIET)
    _, _, record = restore_run(tmp_path, "latest", log=lambda m: None)
    assert record["epoch"] == 1
