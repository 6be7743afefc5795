"""Each epoch evaluated in a helper process while the next one trains
(``lenet_jax.alongside``): the same numbers as evaluating in the run's own process, saved
with the same checkpoints, on the cores the training leaves free; a helper that fails is
replaced by the run's own evaluation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from lenet_jax import alongside, cores, training
from lenet_jax import checkpoint as ckpt
from lenet_jax.config import Config
from lenet_jax.factories import create_state, make_model, resolve
from lenet_jax.runs import Run, restore_run
from lenet_jax.training import fit

from conftest import QUIET, run_script, small

ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
TWO_CORES = pytest.mark.skipif(len(ALLOWED) < 2 or not cores.linux_threads(), reason="needs two cores (Linux)")
CONFIG = Config(epochs=3, hessian_samples=20, validation_size=50)


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def records(folder):
    mngr = ckpt.reader(folder / ckpt.CHECKPOINTS)
    found = {count: ckpt.read_record(mngr, count) for count in mngr.all_steps()}
    for record in found.values():
        record["history"] = without_seconds(record["history"])
        record.get("metrics", {}).pop("seconds", None)
    return found


@pytest.fixture
def every_epoch(monkeypatch):
    """Epochs of any length evaluated alongside; each helper answer, each helper and each
    save recorded."""
    monkeypatch.setattr(training, "ALONGSIDE_MIN_UPDATES", 1)
    seen = {"answers": [], "helpers": [], "saves": []}
    result, start, save = alongside.Helper.result, alongside.Helper.start, Run.save

    def recorded(self, *args, **kwargs):
        seen["answers"].append(result(self, *args, **kwargs))
        return seen["answers"][-1]

    def started(*args, **kwargs):
        seen["helpers"].append(start(*args, **kwargs))
        return seen["helpers"][-1]

    def saving(self, position, *args, **kwargs):
        seen["saves"].append((self.path.name, position.count))
        return save(self, position, *args, **kwargs)

    monkeypatch.setattr(alongside.Helper, "result", recorded)
    monkeypatch.setattr(alongside.Helper, "start", started)
    monkeypatch.setattr(Run, "save", saving)
    return seen


def saves(seen, folder):
    return [count for name, count in seen["saves"] if name == folder]


def yes_at(n):
    """A stop request that says yes the n-th time it is asked."""
    asked = []

    def stop():
        asked.append(1)
        return len(asked) == n

    return stop


def ended(helper):
    return helper._process.poll() is not None and not Path(helper._logs.name).exists()


@pytest.mark.slow
@TWO_CORES
@pytest.mark.parametrize("back", ["in the next epoch", "at its end"])
def test_epochs_evaluated_alongside_are_logged_and_saved_as_the_runs_own_evaluation(mnist, tmp_path, every_epoch, monkeypatch, back):
    """The scores back within the next epoch (the helper waited for after its first chunk)
    or only when it ends: either way the same rows, checkpoints and saves as a run that
    evaluates itself."""
    if back == "in the next epoch":
        monkeypatch.setattr(alongside.Helper, "ready", lambda self: self._waiting and self._readable(alongside.ANSWER_SECONDS))
    data = small(mnist, 150, 400)
    config = CONFIG.replace(chunks=4)
    said = []
    here = fit(config, data, tmp_path / "here", **QUIET)
    beside = fit(config, data, tmp_path / "beside", alongside=True, log=said.append, progress=False)
    assert any(line.startswith("evaluation: each epoch's in a second process") for line in said)
    assert len(every_epoch["answers"]) == 2  # epochs 1 and 2; the last has nothing to overlap with
    assert all(answer["cores"] == sorted(ALLOWED - {min(ALLOWED)}) for answer in every_epoch["answers"])  # not the training's core
    assert without_seconds(beside.history) == without_seconds(here.history)  # test and validation loss bit for bit
    assert [r["epoch"] for r in beside.history] == [1, 2, 3]
    assert saves(every_epoch, "beside") == saves(every_epoch, "here") == [100, 200, 300]  # each epoch once, in order
    assert records(tmp_path / "beside") == records(tmp_path / "here")
    chex.assert_trees_all_equal(beside.state.params, here.state.params)
    state, _, record = restore_run(tmp_path / "beside", "best")
    kept, _, expected = restore_run(tmp_path / "here", "best")
    chex.assert_trees_all_equal(state.params, kept.params)
    assert record["epoch"] == expected["epoch"]
    assert len(every_epoch["helpers"]) == 1 and ended(every_epoch["helpers"][0])  # gone, and its files with it


@pytest.mark.slow
@TWO_CORES
def test_a_stop_in_the_epoch_after_one_evaluated_alongside_saves_that_one_first(mnist, tmp_path, every_epoch):
    data = small(mnist, 150, 400)
    config = CONFIG.replace(chunks=2)
    straight = fit(config, data, tmp_path / "straight", **QUIET)
    # asked after epoch 1's first chunk, between epochs 1 and 2, after epoch 2's first chunk: yes there
    stopped = fit(config, data, tmp_path / "stopped", alongside=True, stop=yes_at(3), **QUIET)
    assert len(every_epoch["answers"]) == 1 and not stopped.finished and stopped.position == ckpt.Position(2, 50, 100)
    assert saves(every_epoch, "stopped") == [100, 150]  # epoch 1 with its evaluation, then the middle of epoch 2
    assert records(tmp_path / "stopped")[100] == records(tmp_path / "straight")[100]
    assert without_seconds(records(tmp_path / "stopped")[150]["history"]) == without_seconds(straight.history[:1])
    resumed = fit(config, data, tmp_path / "stopped", resume=True, alongside=True, **QUIET)
    assert without_seconds(resumed.history) == without_seconds(straight.history)
    chex.assert_trees_all_equal(resumed.state.params, straight.state.params)
    assert all(ended(helper) for helper in every_epoch["helpers"])


@pytest.mark.slow
@TWO_CORES
def test_a_stop_after_an_epoch_saves_it_with_its_evaluation_and_a_resume_goes_on_exactly(mnist, tmp_path, every_epoch):
    data = small(mnist, 150, 400)
    config = CONFIG.replace(chunks=2)
    straight = fit(config, data, tmp_path / "straight", **QUIET)
    # asked after epoch 1's first chunk, then between epochs 1 and 2: yes there
    stopped = fit(config, data, tmp_path / "stopped", alongside=True, stop=yes_at(2), **QUIET)
    assert len(every_epoch["answers"]) == 1 and not stopped.finished and stopped.position == ckpt.Position(1, 100, 100)
    assert without_seconds(stopped.history) == without_seconds(straight.history[:1])
    first = records(tmp_path / "straight")[100]  # 150 images, 50 of them held out: 100 updates an epoch
    assert records(tmp_path / "stopped") == {100: first}
    resumed = fit(config, data, tmp_path / "stopped", resume=True, alongside=True, **QUIET)
    assert without_seconds(resumed.history) == without_seconds(straight.history)
    chex.assert_trees_all_equal(resumed.state.params, straight.state.params)


@pytest.mark.slow
@TWO_CORES
def test_with_one_chunk_an_epoch_the_run_evaluates_itself(mnist, tmp_path, every_epoch):
    """The epoch would be saved only when the next one ends: a second Ctrl-C in between
    would lose it (tests/test_preemption.py counts on it being saved at once)."""
    result = fit(CONFIG.replace(chunks=1), small(mnist, 150, 400), tmp_path, alongside=True, **QUIET)
    assert result.finished and every_epoch["helpers"] == [] and saves(every_epoch, tmp_path.name) == [100, 200, 300]


@pytest.mark.slow
@TWO_CORES
def test_a_helper_that_fails_leaves_the_evaluation_to_the_run(mnist, tmp_path, every_epoch, monkeypatch):
    data = small(mnist, 150, 400)
    monkeypatch.setattr(alongside.Helper, "MODULE", "lenet_jax.no_such_module")
    said = []
    here = fit(CONFIG, data, tmp_path / "here", **QUIET)
    beside = fit(CONFIG, data, tmp_path / "beside", alongside=True, log=said.append, progress=False)
    warnings = [line for line in said if line.startswith("warning: the evaluation process failed")]
    assert len(warnings) == 1 and "No module named lenet_jax.no_such_module" in warnings[0]
    assert "evaluated in this process from now on" in warnings[0]
    assert without_seconds(beside.history) == without_seconds(here.history)
    assert records(tmp_path / "beside") == records(tmp_path / "here")


@pytest.mark.slow
@TWO_CORES
def test_a_helper_killed_while_it_evaluates_says_how_it_ended(mnist):
    config = resolve(Config())
    params = jax.device_get(create_state(config, 10).params)
    test = (mnist.test_images[:100], mnist.test_labels[:100])
    helper = alongside.Helper.start(config, test, None, {max(ALLOWED)})
    try:
        helper.submit(params)
        answer = helper.result()
        expected = alongside.scores(params, make_model(config, inference=True).apply, test, None, config.objective, config.eval_batch_size)
        assert answer["test"]["loss"] == expected["test"]["loss"] and answer["validation"] is None
        np.testing.assert_array_equal(answer["test"]["predictions"], expected["test"]["predictions"])
        assert answer["cores"] == [max(ALLOWED)]
        helper._process.kill()
        helper.submit(params)
    except alongside.HelperFailed as e:
        assert "exit code -9" in str(e)
    else:
        with pytest.raises(alongside.HelperFailed, match="exit code -9"):
            helper.result()
    finally:
        helper.close()


@pytest.mark.slow
@TWO_CORES
@pytest.mark.parametrize("batch", [1, 2])
def test_the_command_evaluates_alongside_at_batch_1_on_a_cpu_with_cores_to_spare(mnist, tmp_path, batch):
    """Epochs of 10,000 updates (``ALONGSIDE_MIN_UPDATES``): at batch 1 the run's XLA pool
    has one thread and a helper evaluates; at batch 2 the pool has a thread per core and
    the run evaluates itself."""
    work = tmp_path / "run"
    out = run_script("train.py", "--epochs", "2", "--train-subset", str(10_000 * batch), "--batch-size", str(batch), "--hessian-samples",
                     "20", "--workdir", str(work), "--no-progress", "--optimizer", "sdlm")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert ("evaluation: each epoch's in a second process, alongside the next epoch's training (lenet_jax.alongside)" in lines) == (batch == 1)
    assert [line.split()[:2] for line in lines if line.startswith("epoch")] == [["epoch", "1"], ["epoch", "2"]]
    assert "warning" not in out.stdout + out.stderr


@pytest.mark.slow
@TWO_CORES
def test_a_helper_that_stops_answering_is_ended_and_given_up(mnist):
    config = resolve(Config())
    params = jax.device_get(create_state(config, 10).params)
    helper = alongside.Helper.start(config, (mnist.test_images[:100], mnist.test_labels[:100]), None, {max(ALLOWED)})
    try:
        helper.submit(params)
        helper.result()
        os.kill(helper._process.pid, signal.SIGSTOP)  # a helper that hangs
        helper.submit(params)
        with pytest.raises(alongside.HelperFailed, match=r"no answer within 0.5 s; exit code -9"):
            helper.result(timeout=0.5)
    finally:
        helper.close()
