"""Stopping and resuming: a run stopped anywhere (mid-epoch included) and resumed ends with
bit-identical parameters and optimiser state; real SIGTERM/SIGINT on train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import chex
import pytest

from lenet_jax.checkpoint import Position
from lenet_jax.config import Config
from lenet_jax.data import Dataset
from lenet_jax.training import fit, restore_run

from conftest import QUIET, ROOT


def stop_after(calls: int):
    """A ``stop`` that says yes at its ``calls``-th question (one is asked per chunk)."""
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) == calls

    return stop


@pytest.fixture(scope="module")
def data(mnist):
    return Dataset(mnist.train_images[:240], mnist.train_labels[:240], mnist.test_images[:100], mnist.test_labels[:100])


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    config = Config(epochs=3, hessian_samples=40, chunks=4)
    return config, fit(config, data, tmp_path_factory.mktemp("straight"), **QUIET)


@pytest.mark.parametrize("calls", [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(9, marks=pytest.mark.slow)])  # mid-epoch 1, end of 1, mid-3
def test_stopped_anywhere_and_resumed_is_bit_identical(data, straight, tmp_path, calls):
    config, reference = straight
    stopped = fit(config, data, tmp_path, stop=stop_after(calls), **QUIET)
    epoch, update = divmod(calls, 4)
    expected = Position(epoch + 1, update * 60, 240) if update else Position(epoch, 240, 240)
    assert stopped.position == expected and not stopped.finished and int(stopped.state.step) == expected.step
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())[-1] == expected.step
    said = []
    resumed = fit(config, data, tmp_path, resume=True, log=said.append, progress=False)
    where = f"epoch {epoch + 1}, update {update * 60} of 240" if update else f"the end of epoch {epoch}"
    assert f"resuming {tmp_path} at {where}" in said
    chex.assert_trees_all_equal(reference.state.params, resumed.state.params)
    chex.assert_trees_all_equal(reference.state.opt_state, resumed.state.opt_state)  # Hessian, step count, schedule
    assert resumed.history == [{**r, "seconds": s["seconds"]} for r, s in zip(reference.history, resumed.history)]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [240, 480, 720]  # the mid-pass step went


@pytest.mark.slow
def test_a_damaged_interrupted_checkpoint_falls_back_to_the_epoch_before(data, straight, tmp_path):
    config, reference = straight
    fit(config, data, tmp_path, stop=stop_after(6), **QUIET)  # epoch 2, update 120
    step = tmp_path / "checkpoints" / "360"
    for f in (step / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:10])
    said = []
    resumed = fit(config, data, tmp_path, resume=True, log=said.append, progress=False)
    assert any(m.startswith("skipping checkpoint step 360: its state does not load") for m in said)
    assert f"resuming {tmp_path} at the end of epoch 1" in said
    chex.assert_trees_all_equal(reference.state.params, resumed.state.params)


@pytest.mark.slow
def test_resuming_with_other_settings_names_each_one(data, tmp_path):
    config = Config(epochs=2, hessian_samples=40, chunks=4)
    fit(config, data, tmp_path, stop=stop_after(2), **QUIET)
    with pytest.raises(Exception, match=r"batch_size \(1 there, 4 here\), seed \(0 there, 3 here\)"):
        fit(config.replace(batch_size=4, seed=3), data, tmp_path, resume=True, **QUIET)
    fit(config.replace(epochs=3), data, tmp_path, resume=True, **QUIET)  # more epochs is fine


# --------------------------------------------------------------------------- real signals

TRAIN = ["train.py", "--epochs", "2", "--train-subset", "3000", "--hessian-samples", "50", "--no-progress"]


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *TRAIN, *args], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_epoch_one(proc: subprocess.Popen) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("epoch   1"):
            return lines
    raise AssertionError("train.py ended before epoch 1: " + "".join(lines) + proc.stderr.read()[-2000:])


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_exactly(mnist, tmp_path):
    sig = signal.SIGTERM
    work = tmp_path / "run"
    proc = start("--workdir", str(work), "--chunks", "100", "--train-subset", "6000")
    wait_for_epoch_one(proc)
    time.sleep(0.3)  # past the end-of-epoch check, well inside epoch 2 (~2 s of 100 chunks)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert f"{sig.name}: stopping after the current chunk" in err
    assert "stopped in epoch 2 after" in out and f"to continue: python train.py --workdir {work} --resume" in out
    assert len(list((work / "checkpoints").iterdir())) == 2  # pass 1 and the mid-pass step
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "train.py", "--workdir", str(work), "--resume", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout and "update" in done.stdout  # continued mid-epoch, with the saved options
    config = Config(epochs=2, train_subset=6000, hessian_samples=50)
    reference = fit(config, mnist, tmp_path / "straight", **QUIET)
    state, saved, _ = restore_run(work, "latest", log=lambda m: None)
    assert saved.replace(chunks=10) == config
    chex.assert_trees_all_equal(reference.state.params, state.params)


@pytest.mark.slow
def test_sigint_asks_and_a_second_one_stops_at_once(mnist, tmp_path):
    work = tmp_path / "run"
    proc = start("--workdir", str(work), "--chunks", "1")  # one compiled chunk per epoch: ~1 s busy in XLA
    wait_for_epoch_one(proc)
    proc.send_signal(signal.SIGINT)
    assert proc.stderr.readline().startswith("SIGINT: stopping")
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGINT
    assert time.perf_counter() - sent < 0.5  # did not wait for the chunk
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["3000"]  # pass 1 only: nothing saved after the second signal
    assert json.loads((work / "config.json").read_text())["epochs"] == 2
