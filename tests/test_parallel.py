"""Data parallelism over forced host devices: the same run on 4 devices and on 1 gives the
same parameters, for SGD and for SDLM (whose Hessian refresh averages the global sample)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    import jax, numpy as np
    from lenet_jax.config import Config
    from lenet_jax.data import Dataset, load_dataset
    from lenet_jax.parallel import choose_devices
    from lenet_jax.training import fit

    assert len(jax.devices()) == 4, jax.devices()
    full = load_dataset("mnist", "auto", log=lambda m: None)
    data = Dataset(full.train_images[:512], full.train_labels[:512], full.test_images[:200], full.test_labels[:200])
    out = {"batch1_devices": choose_devices(1), "batch8_devices": choose_devices(8)}
    try:
        choose_devices(6)
    except ValueError as e:
        out["uneven"] = str(e)
    for optimizer in ("sgd", "sdlm"):
        params = {}
        for devices in (1, 4):
            config = Config(optimizer=optimizer, batch_size=8, epochs=2, devices=devices, hessian_samples=64,
                            lr=1e-3 if optimizer == "sgd" else 2.5e-4)
            with tempfile.TemporaryDirectory() as work:
                result = fit(config, data, work, log=lambda m: None, progress=False)
            params[devices] = jax.tree.leaves(jax.device_get(result.state.params))
        out[optimizer] = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(params[1], params[4]))
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def four_device_run(mnist):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("optimizer", ["sgd", "sdlm"])
def test_four_devices_give_the_parameters_of_one(four_device_run, optimizer):
    assert four_device_run[optimizer] < 1e-4


def test_device_choice(four_device_run):
    assert four_device_run["batch1_devices"] == 1
    assert four_device_run["batch8_devices"] == 4
    assert "does not divide evenly over 4 devices" in four_device_run["uneven"]
