"""The two commands: presets and options, one error line and exit 2 for every bad input,
and the programs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import main as train_main
from lenet_jax.cli.train import parse_command_line, resolve_config
from lenet_jax.config import MODERN, Config

from conftest import one_line, run_script


@pytest.mark.parametrize(
    "args,message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--optimizer", "rmsprop"], "--optimizer 'rmsprop' is not one of"),
        (["--head", "softmax"], "the softmax head takes loss xent"),
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
        (["--step", "foo"], "invalid --step 'foo': give best, latest or a pass number"),
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
    with pytest.raises(ValueError, match="--preset starts a new run"):
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
    assert report["n_test"] == 10_000 and report["checkpoint_step"] == 1
    assert 0 <= report["test_error"] < 0.5 and np.asarray(report["confusion"]).sum() == 10_000
    out = run_script("eval.py", "--workdir", str(work))
    assert "confusion matrix" in out.stdout and "per-class error" in out.stdout
