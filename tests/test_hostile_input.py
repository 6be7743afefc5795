"""Careless and hostile input: never delete a user's file, one bad image never sinks the
batch, the epoch's checkpoint before its log line, one error line instead of a traceback,
nothing half-written left behind. Each test names the case it covers."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_jax import checkpoint as ckpt
from lenet_jax import data, pretrained
from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.cli.train import main as train_main
from lenet_jax.config import Config
from lenet_jax.errors import DataError, FolderBusy
from lenet_jax.factories import make_model
from lenet_jax.fileio import atomic_write, claim, new_run_folder
from lenet_jax.idx import read_idx
from lenet_jax.predict import ImageError, predict_images, predict_stream, read_picture
from lenet_jax.training import fit

from conftest import QUIET, idx_bytes, one_line, small, write_idx_folder

# --------------------------------------------------------------------------- 1. the cache


@pytest.mark.parametrize("content", ["keras", "text", "folder"])
def test_a_file_the_project_did_not_write_is_refused_and_left_alone(tmp_path, content):
    cache = tmp_path / "cache" / "mnist.npz"
    cache.parent.mkdir()
    if content == "keras":  # Keras's mnist.npz: the same name, other members
        np.savez(cache, x_train=np.zeros((2, 28, 28), np.uint8), y_train=np.zeros(2, np.uint8))
    elif content == "text":
        cache.write_text("my notes")
    else:
        cache.mkdir()
    before = cache.read_bytes() if cache.is_file() else None
    with pytest.raises(DataError, match=r"mnist.npz: .*(not a lenet-jax data cache|is a folder).*left alone"):
        data.load_dataset("mnist", "cache", cache_dir=tmp_path / "cache", log=lambda m: None)
    said = []
    expected = write_idx_folder(tmp_path / "idx")
    got = data.load_dataset("mnist", "auto", tmp_path / "idx", tmp_path / "cache", log=said.append)  # auto goes on without it
    np.testing.assert_array_equal(got.train_images, expected.train_images)
    assert any(m.startswith("skipping cache:") for m in said) and any(m.startswith("warning: not cached") for m in said)
    assert (cache.read_bytes() == before) if before is not None else cache.is_dir()


def test_an_empty_cache_variable_means_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LENET_JAX_CACHE", "")
    assert data.default_cache_dir() == tmp_path / ".cache" / "lenet_jax"
    monkeypatch.setenv("LENET_JAX_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"


def test_the_projects_own_damaged_cache_is_replaced(tmp_path):
    ds = write_idx_folder(tmp_path / "idx")
    cache = tmp_path / "cache" / "mnist.npz"
    data.save_cache(ds, cache)
    raw = bytearray(cache.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    cache.write_bytes(bytes(raw))
    said = []
    data.load_dataset("mnist", "auto", tmp_path / "idx", tmp_path / "cache", log=said.append)
    assert any("removed it" in m for m in said) and any(m.startswith("cached mnist") for m in said)
    np.testing.assert_array_equal(data.load_cache(cache).test_images, ds.test_images)


def test_a_cache_write_a_killed_process_left_is_removed_but_not_one_in_progress(tmp_path):
    write_idx_folder(tmp_path / "idx")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead = cache_dir / ".mnist.npz.k1ll3d.tmp"
    older = cache_dir / "mnist.npzq8x2.tmp"  # how earlier versions named it
    alive = cache_dir / ".mnist.npz.wr1t1ng.tmp"
    for p in (dead, older, alive):
        p.write_bytes(b"half a cache")
    with open(alive, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer still at work
        data.load_dataset("mnist", "auto", tmp_path / "idx", cache_dir, log=lambda m: None)
        assert not dead.exists() and not older.exists() and alive.exists()


def test_a_cache_folder_that_cannot_be_written_is_a_warning(tmp_path):
    write_idx_folder(tmp_path / "idx")
    (tmp_path / "afile").write_text("x")
    for cache_dir in ("/proc/lenet", tmp_path / "afile"):
        said = []
        ds = data.load_dataset("mnist", "auto", tmp_path / "idx", cache_dir, log=said.append)
        assert ds.source.startswith("idx") and any(m.startswith("warning: not cached") for m in said), said


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.json"
    target.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]


# --------------------------------------------------------------------------- 2-3. images


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""
    Image.new("L", (1, 1), 255).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    raw[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    raw[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4 : ihdr + 13])))
    path.write_bytes(bytes(raw))
    return path


def digit_drawing(digit: np.ndarray) -> Image.Image:
    """An MNIST digit as a user draws it: dark ink on white, enlarged, off-centre."""
    canvas = Image.new("L", (300, 240), 255)
    canvas.paste(Image.fromarray(255 - digit).resize((140, 160)), (40, 50))
    return canvas


@pytest.fixture(scope="module")
def shipped():
    params, config, _ = pretrained.load()
    return params, make_model(config, inference=True).apply, config.objective


@pytest.mark.parametrize("width,height,why", [(60000, 60000, "declares more pixels"), (13000, 13000, "13000x13000 pixels, more than")])
def test_an_oversized_image_is_one_line_and_the_others_are_answered(mnist, tmp_path, capsys, width, height, why):
    digit_drawing(mnist.test_images[0]).save(tmp_path / "ok.png")
    png_declaring(tmp_path / "bomb.png", width, height)
    code = eval_main(["--image", str(tmp_path / "ok.png"), str(tmp_path / "bomb.png")])
    out, err = capsys.readouterr()
    assert code == 2
    assert out.startswith(f"{tmp_path / 'ok.png'}: {mnist.test_labels[0]}")
    assert f"error: {tmp_path / 'bomb.png'}:" in err and why in err and "Traceback" not in err


def test_the_pixel_limit_is_an_option(tmp_path):
    Image.new("L", (100, 100), 255).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="100x100 pixels, more than the limit of 5,000"):
        read_picture(tmp_path / "a.png", max_pixels=5000)


def test_a_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = []
    reader = threading.Thread(target=lambda: result.append(pytest.raises(ImageError, read_picture, fifo)))
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive() and "not a regular file" in str(result[0].value)


def test_large_folders_go_through_the_network_in_batches(mnist, tmp_path, shipped):
    paths = []
    for i in range(5):
        digit_drawing(mnist.test_images[i]).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    paths.insert(2, tmp_path / "missing.png")
    batched = list(predict_stream(*shipped, paths, batch=2))
    whole = predict_images(*shipped, paths)
    assert [p.path for p in batched] == [str(p) for p in paths]
    assert batched[2].error and [p.digit for p in batched] == [p.digit for p in whole]
    np.testing.assert_allclose([p.scores for p in batched if p.scores], [p.scores for p in whole if p.scores], rtol=1e-5)


def test_a_16_bit_png_is_scaled_not_clipped(mnist, tmp_path, shipped):
    drawing = np.asarray(digit_drawing(mnist.test_images[1]), np.uint16) * 257
    Image.fromarray(drawing).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_allclose(read_picture(tmp_path / "deep.png").grey, np.asarray(digit_drawing(mnist.test_images[1]), float))
    (p,) = predict_images(*shipped, [tmp_path / "deep.png"])
    assert p.digit == mnist.test_labels[1]


@pytest.mark.parametrize("orientation,rotate", [(6, 90), (8, -90), (3, 180)])
def test_exif_orientation_is_applied(mnist, tmp_path, shipped, orientation, rotate):
    """A phone stores the sensor's pixels and the turn in EXIF; the digit must be read upright."""
    upright = digit_drawing(mnist.test_images[2])
    stored = upright.rotate(rotate, expand=True)  # what the sensor recorded
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    grey = read_picture(tmp_path / "photo.jpg").grey
    assert grey.shape == np.asarray(upright).shape
    (p,) = predict_images(*shipped, [tmp_path / "photo.jpg"])
    assert p.digit == mnist.test_labels[2]


def test_an_animated_image_uses_its_first_frame_with_a_digit_and_says_which(mnist, tmp_path, shipped):
    frames = [Image.new("L", (300, 240), 255), Image.new("L", (300, 240), 240), digit_drawing(mnist.test_images[3])]  # blank, blank, a digit
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.gif").n_frames == 3
    (p,) = predict_images(*shipped, [tmp_path / "anim.gif"])
    assert p.frame == 2 and p.digit == mnist.test_labels[3]
    frames[0].save(tmp_path / "blank.gif", save_all=True, append_images=frames[1:2])
    (p,) = predict_images(*shipped, [tmp_path / "blank.gif"])
    assert "no digit found in any of its 2 frames" in p.error


# --------------------------------------------------------------------------- 4. the log after the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("log", ["full_disk", "folder"])
def test_an_unwritable_log_is_a_warning_and_the_epoch_is_saved(mnist, tmp_path, log):
    work = tmp_path / "run"
    said = []

    def say(message: str) -> None:
        said.append(message)
        if message.startswith("training LeNet-5"):  # the run has started: now the log's disk fills up
            (work / "metrics.jsonl").unlink()
            if log == "full_disk":
                (work / "metrics.jsonl").symlink_to("/dev/full")
            else:
                (work / "metrics.jsonl").mkdir()

    result = fit(Config(epochs=2, hessian_samples=10), small(mnist, 60, 50), work, log=say, progress=False)
    assert result.finished and any(m.startswith("warning: cannot write") for m in said)
    mngr = ckpt.reader(work / "checkpoints")
    assert sorted(mngr.all_steps()) == [60, 120]
    mngr.close()


@pytest.mark.slow
def test_resuming_rewrites_the_log_with_each_epoch_once(mnist, tmp_path):
    data_ = small(mnist, 60, 50)
    config = Config(epochs=2, hessian_samples=10)
    fit(config, data_, tmp_path, **QUIET)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines + lines[-1:]) + "\n")  # a row written twice
    fit(config.replace(epochs=3), data_, tmp_path, resume=True, **QUIET)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


# --------------------------------------------------------------------------- 5. IDX files


def test_a_corrupt_gzip_is_named_under_every_source(tmp_path):
    write_idx_folder(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[30:40] = b"\xff" * 10
    path.write_bytes(bytes(raw))
    for source in ("idx", "auto"):
        with pytest.raises(DataError, match=f"{path}: corrupt gzip data"):
            data.load_dataset("mnist", source, tmp_path, tmp_path / "cache", log=lambda m: None)


def test_absurd_declared_sizes_are_checked_against_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 4194304, 2097152, 2097152) + b"\0" * 16)
    with pytest.raises(DataError, match=r"truncated: header says \(4194304, 2097152, 2097152\) = 18,446,744,073,709,551,616 bytes, file holds 16"):
        read_idx(path)


def test_a_gzip_bomb_is_refused(tmp_path, monkeypatch):
    from lenet_jax import idx

    monkeypatch.setattr(idx, "MAX_DECOMPRESSED", 1000)
    path = tmp_path / "x-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(5000, np.uint8))))
    with pytest.raises(DataError, match="expands to more than"):
        read_idx(path)


# --------------------------------------------------------------------------- 6, 10. commands


@pytest.mark.slow
def test_a_cache_dir_that_is_a_file_trains_anyway_with_a_warning(mnist, tmp_path, capsys):
    write_idx_folder(tmp_path / "idx", n_train=40, n_test=10)
    (tmp_path / "afile").write_text("x")
    code = train_main(["--data-dir", str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "afile"), "--epochs", "1", "--no-stop-at-chance",
                       "--optimizer", "sgd", "--batch-size", "8", "--workdir", str(tmp_path / "run"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "warning: not cached" in out


@pytest.mark.parametrize("saved", ["[]", '{"batch_size": "16"}', "{not json"])
def test_a_bad_saved_config_is_one_line_naming_the_file(tmp_path, capsys, saved):
    (tmp_path / "config.json").write_text(saved)
    message = one_line(capsys, train_main(["--workdir", str(tmp_path), "--resume"]))
    assert str(tmp_path / "config.json") in message


def test_figures_into_a_file_blames_figures(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert "--figures" in one_line(capsys, eval_main(["--figures", str(tmp_path / "afile")]))


def test_a_second_training_in_the_same_folder_is_refused(mnist, tmp_path):
    with claim(tmp_path):
        with pytest.raises(FolderBusy, match="in use by another training process"):
            fit(Config(epochs=1), small(mnist, 10, 10), tmp_path, **QUIET)


def test_default_run_folders_never_collide(tmp_path):
    assert new_run_folder(tmp_path, "20261126-101010") != new_run_folder(tmp_path, "20261126-101010")


@pytest.mark.slow
def test_resume_refuses_fewer_epochs_and_survives_a_garbage_config_json(mnist, tmp_path, capsys):
    write_idx_folder(tmp_path / "idx", n_train=40, n_test=10)
    base = ["--data-dir", str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "cache"), "--optimizer", "sgd", "--batch-size", "8",
            "--workdir", str(tmp_path / "run"), "--no-progress", "--no-stop-at-chance"]  # random digits: at chance by construction
    assert train_main([*base, "--epochs", "2"]) == 0
    saved = (tmp_path / "run" / "config.json").read_text()
    capsys.readouterr()
    message = one_line(capsys, train_main(["--workdir", str(tmp_path / "run"), "--resume", "--epochs", "1"]))
    assert "--epochs 1: the run in" in message and "has already completed 2 epochs" in message
    assert (tmp_path / "run" / "config.json").read_text() == saved
    (tmp_path / "run" / "config.json").write_text("[]")  # every checkpoint still holds the config
    assert train_main(["--workdir", str(tmp_path / "run"), "--resume", "--epochs", "3"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_a_checkpoint_record_without_its_config_is_one_line_on_resume(mnist, tmp_path, capsys):
    write_idx_folder(tmp_path / "idx", n_train=40, n_test=10)
    work = tmp_path / "run"
    assert train_main(["--data-dir", str(tmp_path / "idx"), "--cache-dir", str(tmp_path / "cache"), "--optimizer", "sgd",
                       "--batch-size", "8", "--epochs", "1", "--workdir", str(work), "--no-progress", "--no-stop-at-chance"]) == 0
    record = work / "checkpoints" / "5" / "record" / "metadata"
    data_ = json.loads(record.read_text())
    del data_["config"]
    record.write_text(json.dumps(data_))
    capsys.readouterr()
    message = one_line(capsys, train_main(["--workdir", str(work), "--resume", "--epochs", "2"]))
    assert "a checkpoint record without its config" in message


# --------------------------------------------------------------------------- 9. noise and leftovers


@pytest.mark.slow
def test_a_truncated_checkpoint_is_one_quiet_line_and_a_killed_save_leaves_nothing(mnist, tmp_path, capfd):
    config = Config(epochs=2, hessian_samples=10)
    fit(config, small(mnist, 60, 50), tmp_path, **QUIET)
    for f in (tmp_path / "checkpoints" / "120" / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[:10])
    leftover = tmp_path / "checkpoints" / "90.orbax-checkpoint-tmp-1234567"  # a save killed mid-way
    leftover.mkdir()
    (leftover / "junk").write_text("x")
    capfd.readouterr()
    said = []
    fit(config.replace(epochs=3), small(mnist, 60, 50), tmp_path, resume=True, log=said.append, progress=False)
    err = capfd.readouterr().err
    assert len([m for m in said if m.startswith("skipping checkpoint 120")]) == 1
    assert len(err.strip().splitlines()) <= 2, err[-3000:]
    assert not leftover.exists()


def test_an_explicit_tfds_source_offline_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setattr(data, "_reachable", lambda *a, **k: False)
    with pytest.raises(DataError, match="not in .* and its download server storage.googleapis.com cannot be reached"):
        data.load_dataset("mnist", "tfds", tmp_path / "tfds", tmp_path / "cache", log=lambda m: None)
    assert not any("incomplete" in p.name for p in tmp_path.rglob("*"))
