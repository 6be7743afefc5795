"""Data parallelism over forced host devices: the same run on 4 devices, and on 2 processes
of 2 devices each (a multi-host cluster on one machine), gives the parameters of the run on
1 device, for SGD and for SDLM (whose Hessian refresh averages the global sample)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lenet_jax.errors import ConfigError
from lenet_jax.parallel import cluster_environment, initialize_distributed

ROOT = Path(__file__).resolve().parents[1]

COMMON = """
import json, sys
from pathlib import Path
from lenet_jax.parallel import initialize_distributed
initialize_distributed()
import jax, numpy as np
from lenet_jax.config import Config
from lenet_jax.data import Dataset, load_dataset
from lenet_jax.parallel import choose_devices
from lenet_jax.training import fit

work = Path(sys.argv[1])
full = load_dataset("mnist", "auto", log=lambda m: None)
data = Dataset(full.train_images[:512], full.train_labels[:512], full.test_images[:200], full.test_labels[:200])

def run(optimizer, devices, folder):
    config = Config(optimizer=optimizer, batch_size=8, epochs=2, devices=devices, hessian_samples=64,
                    lr=1e-3 if optimizer == "sgd" else 2.5e-4)
    result = fit(config, data, work / folder, log=print, progress=False)
    return [np.asarray(x).tolist() for x in jax.tree.leaves(jax.device_get(result.state.params))]
"""

ONE_PROCESS = COMMON + textwrap.dedent(
    """
    assert len(jax.devices()) == 4, jax.devices()
    out = {"batch1_devices": choose_devices(1), "batch8_devices": choose_devices(8)}
    try:
        choose_devices(6)
    except ValueError as e:
        out["uneven"] = str(e)
    for optimizer in ("sgd", "sdlm"):
        out[optimizer] = {devices: run(optimizer, devices, f"{optimizer}{devices}") for devices in (1, 4)}
    (work / "one_process.json").write_text(json.dumps(out))
    """
)

EACH_PROCESS = COMMON + textwrap.dedent(
    """
    out = {"processes": jax.process_count(), "devices": jax.device_count()}
    try:
        choose_devices(1)
    except ValueError as e:
        out["batch1"] = str(e)
    out["sdlm"] = run("sdlm", 0, "sdlm")
    (work / f"process{jax.process_index()}.json").write_text(json.dumps(out))
    """
)


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.update(extra)
    return env


def _relative_gap(a: list, b: list) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(np.asarray(x))) + 1e-12)) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def one_process(mnist, tmp_path_factory):
    work = tmp_path_factory.mktemp("one_process")
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(work)], cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "one_process.json").read_text())


@pytest.fixture(scope="module")
def two_processes(mnist, tmp_path_factory):
    """Two processes of two forced CPU devices each, joined by jax.distributed through
    the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables."""
    work = tmp_path_factory.mktemp("two_processes")
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EACH_PROCESS, str(work)], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return work, [json.loads((work / f"process{i}.json").read_text()) for i in range(2)], [out for out, _ in outputs]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "sdlm"])
def test_four_devices_give_the_parameters_of_one(one_process, optimizer):
    assert _relative_gap(one_process[optimizer]["1"], one_process[optimizer]["4"]) < 1e-4


@pytest.mark.slow
def test_device_choice(one_process):
    assert one_process["batch1_devices"] == 1
    assert one_process["batch8_devices"] == 4
    assert "does not divide evenly over 4 devices" in one_process["uneven"]


@pytest.mark.slow
def test_two_hosts_give_the_parameters_of_one_device(one_process, two_processes):
    """SDLM, the harder case: its Hessian refresh must see the same sample on every host."""
    _, results, _ = two_processes
    assert [r["processes"] for r in results] == [2, 2] and results[0]["devices"] == 4
    assert _relative_gap(one_process["sdlm"]["1"], results[0]["sdlm"]) < 1e-4
    assert results[0]["sdlm"] == results[1]["sdlm"]  # every process holds the same replicated parameters


@pytest.mark.slow
def test_only_process_zero_writes_and_logs(two_processes):
    work, results, stdouts = two_processes
    assert len((work / "sdlm" / "metrics.jsonl").read_text().splitlines()) == 2  # one line per epoch, not per process
    assert sorted(int(p.name) for p in (work / "sdlm" / "checkpoints").iterdir()) == [64, 128]  # 512 / 8 updates per pass
    assert "epoch   2" in stdouts[0] and "epoch" not in stdouts[1]
    assert "launch it as a single process" in results[1]["batch1"]


@pytest.mark.parametrize(
    "environ,kind",
    [
        ({}, None),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "manual"),
        ({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}, None),
        ({"SLURM_NTASKS": "8"}, "slurm"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
        ({"TPU_WORKER_HOSTNAMES": "host-a,host-b"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ],
)
def test_cluster_detection(environ, kind):
    assert cluster_environment(environ) == kind


def test_a_half_described_cluster_is_refused_before_jax_starts():
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES is not"):
        initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "localhost:1"})
    with pytest.raises(ConfigError, match="'two' is not a whole number"):
        initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
    assert initialize_distributed(environ={}) is False
