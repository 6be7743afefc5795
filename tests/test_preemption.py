"""Stopping and resuming: a run stopped anywhere (mid-epoch included) and resumed ends with
bit-identical parameters and optimiser state; real SIGTERM/SIGINT on train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import chex
import pytest

from lenet_jax.checkpoint import Position
from lenet_jax.config import Config
from lenet_jax.data import Dataset
from lenet_jax.factories import resolve
from lenet_jax.runs import restore_run
from lenet_jax.training import fit

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
    config = Config(epochs=2, hessian_samples=40, chunks=4)
    return config, fit(config, data, tmp_path_factory.mktemp("straight"), **QUIET)


@pytest.mark.parametrize("calls", [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(7, marks=pytest.mark.slow)])  # mid-epoch 1, end of 1, mid-2
def test_stopped_anywhere_and_resumed_is_bit_identical(data, straight, tmp_path, calls):
    config, reference = straight
    stopped = fit(config, data, tmp_path, stop=stop_after(calls), **QUIET)
    epoch, update = divmod(calls, 4)
    expected = Position(epoch + 1, update * 60, 240) if update else Position(epoch, 240, 240)
    assert stopped.position == expected and not stopped.finished and int(stopped.state.step) == expected.count
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())[-1] == expected.count
    said = []
    resumed = fit(config, data, tmp_path, resume=True, log=said.append, progress=False)
    where = f"epoch {epoch + 1}, update {update * 60} of 240" if update else f"the end of epoch {epoch}"
    assert f"resuming {tmp_path} at {where}" in said
    chex.assert_trees_all_equal(reference.state.params, resumed.state.params)
    chex.assert_trees_all_equal(reference.state.opt_state, resumed.state.opt_state)  # Hessian, step count, schedule
    assert resumed.history == [{**r, "seconds": s["seconds"]} for r, s in zip(reference.history, resumed.history)]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [240, 480]  # the mid-pass checkpoint went


@pytest.mark.slow
def test_a_damaged_interrupted_checkpoint_falls_back_to_the_epoch_before(data, straight, tmp_path):
    config, reference = straight
    fit(config, data, tmp_path, stop=stop_after(6), **QUIET)  # epoch 2, update 120
    step = tmp_path / "checkpoints" / "360"
    for f in (step / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:10])
    said = []
    resumed = fit(config, data, tmp_path, resume=True, log=said.append, progress=False)
    assert any(m.startswith("skipping checkpoint 360: its state does not load") for m in said)
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

TRAIN = ["train.py", "--epochs", "2", "--train-subset", "3000", "--hessian-samples", "50"]


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0")
    return subprocess.Popen([sys.executable, *TRAIN, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


class Stream:
    """A pipe read by a thread, so a test can wait for a piece of text to appear."""

    def __init__(self, pipe) -> None:
        self.text = ""
        self._seen = threading.Condition()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe) -> None:
        for chunk in iter(lambda: pipe.read1(4096), b""):
            with self._seen:
                self.text += chunk.decode(errors="replace")
                self._seen.notify_all()
        with self._seen:
            self.closed = True
            self._seen.notify_all()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        with self._seen:
            if not self._seen.wait_for(lambda: text in self.text or getattr(self, "closed", False), timeout):
                raise AssertionError(f"{text!r} did not appear within {timeout} s: {self.text[-2000:]}")
            if text not in self.text:
                raise AssertionError(f"the process ended before {text!r}: {self.text[-2000:]}")


@pytest.mark.slow
def test_sigterm_mid_epoch_checkpoints_exits_0_and_resumes_exactly(mnist, tmp_path):
    sig = signal.SIGTERM
    work = tmp_path / "run"
    proc = start("--workdir", str(work), "--chunks", "100", "--train-subset", "6000")
    out, err = Stream(proc.stdout), Stream(proc.stderr)
    err.wait_for("epoch 2/2")  # epoch 2's progress bar: past the stop check after epoch 1, before its first chunk ends
    proc.send_signal(sig)
    proc.wait(timeout=300)
    err.wait_for(f"{sig.name}: stopping after the current chunk")
    out.wait_for("to continue:")
    assert proc.returncode == 0, err.text[-2000:]
    assert "stopped in epoch 2 after" in out.text and f"to continue: python train.py --workdir {work} --resume" in out.text
    assert len(list((work / "checkpoints").iterdir())) == 2  # epoch 1 and the mid-epoch step
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "train.py", "--workdir", str(work), "--resume", "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming" in done.stdout and "update" in done.stdout  # continued mid-epoch, with the saved options
    config = Config(epochs=2, train_subset=6000, hessian_samples=50)
    reference = fit(config, mnist, tmp_path / "straight", **QUIET)
    state, saved, _ = restore_run(work, "latest", log=lambda m: None)
    assert saved.replace(chunks=10) == resolve(config)
    chex.assert_trees_all_equal(reference.state.params, state.params)


@pytest.mark.slow
def test_sigint_asks_and_a_second_one_stops_at_once(mnist, tmp_path):
    """The first SIGINT asks for a stop after the running chunk (here the whole of epoch 2,
    one chunk); the second ends the process by the signal itself, before that chunk is
    done: nothing is saved after epoch 1."""
    work = tmp_path / "run"
    proc = start("--workdir", str(work), "--chunks", "1", "--train-subset", "12000")  # epoch 2 is one chunk of 2-3 s
    out, err = Stream(proc.stdout), Stream(proc.stderr)
    err.wait_for("epoch 2/2")  # its progress bar: past the stop check after epoch 1
    proc.send_signal(signal.SIGINT)
    err.wait_for("SIGINT: stopping")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGINT
    assert [p.name for p in (work / "checkpoints").iterdir()] == ["12000"]  # epoch 1 only: the chunk of epoch 2 never finished
    assert "stopped" not in out.text
    assert json.loads((work / "config.json").read_text())["epochs"] == 2
