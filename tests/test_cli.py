"""The two commands: presets and options, one error line and exit 2 for every bad input,
and the programs end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import main as train_main
from lenet_jax.cli.train import parse_command_line, resolve_config
from lenet_jax.config import MODERN, Config
from lenet_jax.errors import ConfigError

from conftest import one_line, run_script


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--optimizer", "rmsprop"], "--optimizer 'rmsprop' is not one of"),
        (["--head", "softmax", "--loss", "map"], "the softmax head takes loss xent"),
        (["--seed", "99999999999999999999999"], "--seed must be at most 4294967295"),
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--preset", "moden"], "--preset 'moden' is neither a preset"),
        (["--data-source", "idx", "--data-dir", "/nonexistent"], "/nonexistent is not a folder"),
        (["--workdir", "/etc/passwd"], "--workdir /etc/passwd: not a writable folder"),
        (["--workdir", "/proc/lenet"], "--workdir /proc/lenet: not a writable folder"),
        (["--batch-size", "70000"], "--batch-size 70000 is larger than the 60000 training images"),
        (["--train-subset", "70000"], "--train-subset 70000 is larger than the 60,000 training images"),
        (["--resume"], "--resume needs the --workdir of the run to continue"),
        (["--resume", "--workdir", "/nonexistent/run"], "--workdir /nonexistent/run: no such folder"),
    ],
)
def test_bad_training_command_lines_get_one_line_and_exit_2(args, message, tmp_path, capsys):
    if "--workdir" not in args and "--resume" not in args:
        args = [*args, "--workdir", str(tmp_path / "run")]
    assert message in one_line(capsys, train_main(args))
    assert not (tmp_path / "run").exists()  # a failed run leaves no folder behind


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workdir", "/nonexistent"], "no checkpoint folder"),
        (["--epoch", "foo"], "invalid --epoch 'foo': give best, latest or an epoch number"),
        (["--epoch", "0"], "invalid --epoch '0': give best, latest or an epoch number"),
        (["--summary", "--image", "x.png"], "not allowed with argument"),
    ],
)
def test_bad_evaluation_command_lines_get_one_line_and_exit_2(args, message, capsys):
    assert message in one_line(capsys, eval_main(args))


def resolved(*argv: str) -> Config:
    return resolve_config(*parse_command_line(list(argv)))


def test_options_go_on_top_of_a_preset_and_a_saved_config_is_a_preset(tmp_path):
    config = resolved("--preset", "modern", "--batch-size", "8", "--seed", "3")
    assert config == Config(**MODERN).replace(batch_size=8, seed=3)
    assert resolved() == Config() and resolved("--preset", "lush").bias_init == "zero"
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    assert resolved("--config", str(tmp_path / "config.json"), "--seed", "4") == config.replace(seed=4)


def test_resume_starts_from_the_runs_saved_config_not_a_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(Config(batch_size=4, epochs=2).to_dict()))
    assert resolved("--resume", "--workdir", str(tmp_path), "--epochs", "5") == Config(batch_size=4, epochs=5)
    with pytest.raises(ConfigError, match="--preset starts a new run"):
        resolved("--resume", "--workdir", str(tmp_path), "--preset", "modern")


@pytest.mark.slow
def test_a_preset_with_options_on_top_and_a_saved_config_as_preset(tmp_path, capsys):
    work = tmp_path / "run"
    code = train_main(["--preset", "modern", "--batch-size", "8", "--epochs", "1", "--train-subset", "64", "--workdir", str(work), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((work / "config.json").read_text())
    assert saved["optimizer"] == "adam" and saved["head"] == "softmax" and saved["batch_size"] == 8 and saved["epochs"] == 1
    out = capsys.readouterr().out
    assert "with adam on 64 mnist images, batch 8" in out and "precision float32" in out
    code = train_main(["--preset", str(work / "config.json"), "--seed", "1", "--workdir", str(tmp_path / "again"), "--no-progress"])
    assert code == 0
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again == dict(saved, seed=1)


@pytest.mark.slow
def test_train_and_eval_programs(mnist, tmp_path):
    work = tmp_path / "run"
    out = run_script("train.py", "--epochs", "1", "--train-subset", "500", "--hessian-samples", "50", "--workdir", str(work), "--no-progress")
    assert out.returncode == 0, out.stderr
    assert "checkpoints:" in out.stdout and (work / "metrics.jsonl").is_file()
    out = run_script("eval.py", "--workdir", str(work), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["n_test"] == 10_000 and report["epoch"] == 1 and report["update"] == 500
    assert report["test_error"] < 0.28 and np.asarray(report["confusion"]).sum() == 10_000  # measured: 21.91% after 500 updates
    out = run_script("eval.py", "--workdir", str(work))
    assert "confusion matrix" in out.stdout and "per-class error" in out.stdout


def test_a_bug_keeps_its_traceback_and_exits_1(tmp_path):
    """Only failures a user causes are one line: a ValueError raised inside the library
    (here planted in the data loader) is a bug, and shows its traceback."""
    code = ("import sys, lenet_jax.data as d\n"
            "def broken(*a, **k):\n    raise ValueError('planted inside the library')\n"
            "d.load_dataset = broken\n"
            "from lenet_jax.cli.train import main\n"
            f"sys.exit(main(['--workdir', {str(tmp_path / 'run')!r}, '--no-progress']))\n")
    out = run_script("-c", code)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "ValueError: planted inside the library" in out.stderr
    assert not out.stderr.startswith("error:")
    assert not (tmp_path / "run").exists()  # what the command created is still removed


@pytest.mark.slow
def test_exporting_a_run_as_the_pretrained_model(mnist, tmp_path):
    work = tmp_path / "run"
    assert run_script("train.py", "--epochs", "2", "--train-subset", "200", "--hessian-samples", "20", "--workdir", str(work),
                      "--no-progress").returncode == 0
    out = run_script("-m", "lenet_jax.pretrained", str(work), "--epoch", "1", "--to", str(tmp_path / "model"))
    assert out.returncode == 0, out.stderr
    assert f"exported epoch 1 of {work}" in out.stdout
    from lenet_jax import pretrained
    from lenet_jax.runs import restore_run

    params, config, meta = pretrained.load(tmp_path / "model")
    state, _, record = restore_run(work, "1")
    assert meta["epoch"] == 1 and meta["test_error"] == record["history"][0]["test_error"] and config.train_subset == 200
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_the_ablation_runs_each_row_as_its_change_from_the_paper(mnist, tmp_path):
    out = run_script("-m", "bench.ablation", "--epochs", "1", "--train-subset", "300", "--rows", "paper", "relu", "--json", str(tmp_path / "a.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["row"]: r for r in json.loads((tmp_path / "a.json").read_text())}
    assert rows["paper"]["changes"] == {"epochs": 1, "keep": 1, "train_subset": 300} and rows["relu"]["changes"]["activation"] == "relu"
    assert rows["paper"]["test_error"] < 0.35  # 300 batch-1 SDLM updates learn (measured: about 20%)
    assert "| paper | the paper" in out.stdout and "| relu | activation: ReLU" in out.stdout


def test_the_earlier_step_option_without_a_run_is_one_line(capsys):
    """--step selects an epoch of a run (its note, with a run: tests/test_options.py)."""
    assert "--step 3 selects an epoch of a run" in one_line(capsys, eval_main(["--step", "3", "--summary"]))
