"""A failure is sorted by what it is, in both directions (issue 27, section 2): a user's
mistake is one ``error:`` line and exit code 2, never a traceback; a bug is a traceback
and exit code 1, never taken for damage: it moves no checkpoint aside and deletes no
cache."""

from __future__ import annotations

import errno
import hashlib
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_hostile_round3 import quick

from lenet_jax import checkpoint as ckpt
from lenet_jax import data, parallel, runs
from lenet_jax.config import Config
from lenet_jax.errors import CheckpointError, ConfigError
from lenet_jax.factories import create_state

from conftest import run_script, write_idx_folder

# --------------------------------------------------------------------------- user mistakes: one line, exit 2


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(("devices", "options", "message"), [
    (1, ["--devices", "2", "--batch-size", "8"], "error: --devices 2: there are 1 device(s)"),
    (3, ["--devices", "3", "--batch-size", "8"],
     "error: the global batch 8 does not divide evenly over 3 devices; use a multiple of 3 for --batch-size, or set --devices"),
])
def test_devices_and_a_batch_that_do_not_fit_are_one_line(tmp_path, devices, options, message):
    """``train.py --devices 2 --batch-size 8`` on one device, and a batch of 8 over 3
    devices: one line, exit 2, and the run folder it would have created is gone."""
    run = tmp_path / "R"
    args = [a for a in quick(tmp_path, "--epochs", "1", "--workdir", str(run)) if a not in ("--batch-size", "8")]
    result = run_script(*args, *options, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    assert one_error_line(result) == message
    assert not run.exists()


@pytest.mark.slow
@pytest.mark.parametrize(("environ", "message"), [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1"},
     "error: JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not: set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "error: JAX_NUM_PROCESSES='two' is not a whole number"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
     "error: could not join the JAX cluster (manual): process_id and num_processes must be nonnegative, with process_id < num_processes. "
     "Got process_id=5, num_processes=2."),
])
def test_a_cluster_that_cannot_be_joined_is_one_line(tmp_path, environ, message):
    result = run_script(*quick(tmp_path, "--epochs", "1", "--workdir", str(tmp_path / "R")), **environ)
    assert one_error_line(result) == message
    assert not (tmp_path / "R").exists()


def test_a_run_over_several_processes_refuses_what_it_cannot_do(monkeypatch):
    """The checks of a several-process run, without the processes: ConfigError, which the
    commands print in one line (a plain ValueError would be a traceback)."""
    monkeypatch.setattr(parallel.jax, "process_count", lambda: 2)
    monkeypatch.setattr(parallel.jax, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match=r"batch size 1 \(the paper's mode\) runs on one device: launch it as a single process"):
        parallel.choose_devices(1)
    with pytest.raises(ConfigError, match=r"--devices 2: a run over 2 processes uses all 4 devices \(give 0\)"):
        parallel.choose_devices(8, 2)
    assert parallel.choose_devices(8) == 4
    beyond = len(jax.devices()) + 1
    with pytest.raises(ConfigError, match=rf"--devices {beyond}: there are {beyond - 1} \w+ device\(s\)"):
        parallel.data_mesh(beyond)


# --------------------------------------------------------------------------- bugs: a traceback, exit 1, nothing moved or deleted

BUGGY_RESTORE = """
import sys
import orbax.checkpoint as ocp

real = ocp.CheckpointManager.restore

def restore(self, step, args=None, **kwargs):  # a bug in restoring the state, as a changed call would be
    if args is not None and "state" in args:
        raise TypeError("restore() got an unexpected keyword argument 'state'")
    return real(self, step, args=args, **kwargs)

ocp.CheckpointManager.restore = restore
from lenet_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_bug_in_restoring_is_a_traceback_and_moves_no_step(tmp_path):
    """orbax's restore of the state raising a TypeError on resume: exit 1 with the
    traceback, no step skipped or moved, no "no checkpoint loads"; the same run resumes
    once the bug is gone."""
    run = tmp_path / "R"
    first = run_script(*quick(tmp_path, "--epochs", "2", "--workdir", str(run)))
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert {"checkpoints/8", "checkpoints/16"} <= set(before)
    resume = quick(tmp_path, "--epochs", "3", "--workdir", str(run), "--resume")[1:]
    result = run_script("-c", BUGGY_RESTORE, *resume)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "TypeError: restore() got an unexpected keyword argument 'state'"
    assert "skipping" not in result.stdout + result.stderr and "no checkpoint loads" not in result.stderr
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*") if not p.name.startswith(".lock")) == [
        b for b in before if not b.startswith(".lock")]
    again = run_script(*quick(tmp_path, "--epochs", "3", "--workdir", str(run), "--resume"))
    assert again.returncode == 0 and f"resuming {run} at the end of epoch 2" in again.stdout, again.stderr[-3000:]


def test_a_bug_in_reading_a_checkpoint_propagates_and_touches_nothing(tmp_path, monkeypatch):
    """In process, for the writer (resume) and the readers (eval.py, the demo server): a
    TypeError from orbax's restore propagates as it is, every step stays where it was."""
    folder = tmp_path / "checkpoints"
    mngr = ckpt.writer(folder)
    config = Config(optimizer="sgd")
    for step in (10, 20):
        ckpt.save(mngr, step, create_state(config, 10), {"epoch": step // 10, "update": 10, "updates_per_epoch": 10,
                                                         "config": config.to_dict(), "format": ckpt.FORMAT})
    before = sorted(p.name for p in folder.iterdir())
    real = ocp.CheckpointManager.restore

    def buggy(self, step, args=None, **kwargs):
        if args is not None and "state" in args:
            raise TypeError("a bug in restoring")
        return real(self, step, args=args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", buggy)
    said = []
    with pytest.raises(TypeError, match="a bug in restoring"):
        ckpt.restore_newest_good(mngr, lambda record: create_state(config, 10), log=said.append,
                                 damaged=lambda step: str(ckpt.move_aside(mngr, step)))
    mngr.close()
    with pytest.raises(TypeError, match="a bug in restoring"):
        runs.restore_run(folder, "latest", log=said.append)
    assert said == [] and sorted(p.name for p in folder.iterdir()) == before == ["10", "20"]


def test_a_failed_save_is_one_line_only_when_the_system_refused_it(tmp_path, monkeypatch):
    """A full disk or a file size limit (an OSError, or TensorStore's error carrying the
    errno) is one CheckpointError; a bug in saving (a TypeError) propagates as it is.
    Either way no partial step is left."""
    mngr = ckpt.writer(tmp_path / "checkpoints")
    state = create_state(Config(optimizer="sgd"), 10)
    failure: list[BaseException] = []

    def save(self, step, args=None, **kwargs):
        (Path(self.directory) / f"{step}.orbax-checkpoint-tmp-1").mkdir()  # what a failed save leaves
        raise failure[0]

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    for error, reason in [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        (ValueError("OUT_OF_RANGE: Error writing \"step/0\" in OCDBT database at local file \"/x/\": Failed to write 121028 bytes "
                    "to file 14: File too large [os_error_code='27']"), "File too large (errno 27)"),
    ]:
        failure[:] = [error]
        with pytest.raises(CheckpointError, match=re.escape(f"cannot save checkpoint 10 ({reason})") + "$"):
            ckpt.save(mngr, 10, state, {})
        assert list((tmp_path / "checkpoints").iterdir()) == []
    for error in (TypeError("a bug in saving"), ValueError("User-provided item tree does not match")):
        failure[:] = [error]
        with pytest.raises(type(error), match="a bug in saving|does not match"):
            ckpt.save(mngr, 10, state, {})
        assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_bug_in_reading_the_data_cache_propagates_and_deletes_nothing(tmp_path, monkeypatch):
    """data.load_cache: a bug (a TypeError in its checksum) and a failure of the reading
    (an I/O error) propagate as they are and the cache stays; a damaged cache is deleted."""
    ds = write_idx_folder(tmp_path / "idx")
    path = tmp_path / "cache" / "mnist.npz"
    data.save_cache(ds, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def buggy(arrays):
        raise TypeError("a bug in the checksum")

    with monkeypatch.context() as m:
        m.setattr(data, "_checksum", buggy)
        with pytest.raises(TypeError, match="a bug in the checksum"):
            data.load_cache(path)
        with pytest.raises(TypeError, match="a bug in the checksum"):  # and through the loader, whatever the source
            data.load_dataset("mnist", "auto", tmp_path / "idx", tmp_path / "cache", log=lambda m: None)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    real_load = np.load

    def failing_read(*args, **kwargs):
        if kwargs.get("allow_pickle") is False and not failing_read.members_read:
            failing_read.members_read = True  # the member list reads; reading the arrays then fails
            return real_load(*args, **kwargs)
        raise OSError(errno.EIO, "Input/output error")

    failing_read.members_read = False
    with monkeypatch.context() as m:
        m.setattr(data.np, "load", failing_read)
        with pytest.raises(OSError, match="Input/output error"):
            data.load_cache(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    np.testing.assert_array_equal(data.load_cache(path).test_images, ds.test_images)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # damage: a member fails its CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DamagedCache, match="removed it"):
        data.load_cache(path)
    assert not path.exists()


BUGGY_CACHE = """
import sys
from lenet_jax import data

def checksum(arrays):
    raise TypeError("a bug in the checksum")

data._checksum = checksum
from lenet_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_bug_in_reading_the_data_cache_is_a_traceback_and_keeps_the_cache(tmp_path):
    """At the command line: exit 1 with the traceback, the cache as it was."""
    write_idx_folder(tmp_path / "idx", n_train=64, n_test=10)
    path = tmp_path / "cache" / "mnist.npz"
    data.save_cache(data.load_idx_folder(tmp_path / "idx"), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = run_script("-c", BUGGY_CACHE, *quick(tmp_path, "--epochs", "1", "--workdir", str(tmp_path / "R"))[1:])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "TypeError: a bug in the checksum"
    assert "removed it" not in result.stdout + result.stderr
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
