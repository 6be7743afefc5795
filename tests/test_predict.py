"""Predicting the user's own digits: the MNIST recipe, bad images, the shipped model,
the layer table and the figures, through the library and through ``eval.py``."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from test_plots import dark, near, pixels

from lenet_jax import plots, pretrained
from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.config import Config
from lenet_jax.errors import DataError
from lenet_jax.evaluation import evaluate
from lenet_jax.factories import make_model
from lenet_jax.predict import ImageError, image_paths, mnist_recipe, predict_digits, predict_images, read_picture

from conftest import compiled_init, numpy_rbf_penalties, run_script


def eval_py(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``eval.py`` run in this process: its exit code, stdout and stderr."""
    code = eval_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def photo_of(
    digit: np.ndarray, path: Path, offset: tuple[int, int] = (30, 90), mode: str = "RGB", size: tuple[int, int] = (150, 200)
) -> Path:
    """The MNIST ``digit`` as a user would give it: dark ink on white paper, enlarged to
    ``size`` (width, height; stretched by default) and placed off-centre on a 400x300 canvas."""
    big = Image.fromarray(255 - digit).resize(size, Image.Resampling.BILINEAR)
    canvas = Image.new("L", (400, 300), 255)
    canvas.paste(big, offset)
    if mode == "RGBA":  # ink in the alpha channel, a transparent background
        rgba = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        rgba.putalpha(Image.eval(canvas, lambda v: 255 - v))
        rgba.save(path)
    else:
        canvas.convert(mode).save(path)
    return path


def centre_of_mass(img: np.ndarray) -> np.ndarray:
    r, c = np.indices(img.shape)
    w = img.astype(float)
    return np.array([(r * w).sum(), (c * w).sum()]) / w.sum()


def test_recipe_recovers_an_mnist_digit_from_a_photo_of_it(mnist, tmp_path):
    digit = mnist.test_images[3]
    got = mnist_recipe(read_picture(photo_of(digit, tmp_path / "d.png", size=(196, 196))).grey)  # 7x, aspect kept
    assert got.shape == (28, 28) and got.dtype == np.uint8
    rows, cols = np.nonzero(got > 0.2 * got.max())
    assert max(np.ptp(rows), np.ptp(cols)) + 1 in (19, 20, 21)  # the longer side fills the 20-pixel box
    np.testing.assert_allclose(centre_of_mass(got), [14.0, 14.0], atol=0.6)
    a, b = got.astype(float).ravel(), digit.astype(float).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.95  # 0.986 measured: the recipe is how MNIST was made


def test_recipe_keeps_the_aspect_ratio_of_a_thin_stroke():
    grey = np.full((100, 100), 255.0)
    grey[10:90, 48:52] = 0  # a vertical bar, 80 tall and 4 wide
    got = mnist_recipe(grey)
    rows, cols = np.nonzero(got > 50)
    assert np.ptp(rows) + 1 >= 19 and np.ptp(cols) + 1 <= 3


def test_light_on_dark_is_not_inverted():
    grey = np.zeros((40, 40))
    grey[10:30, 15:25] = 255
    got = mnist_recipe(grey)
    assert got[14, 14] > 200 and got[0, 0] == 0


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: Image.new("L", (40, 40), 128).save(p), "no digit found"),
        (lambda p: Image.new("RGB", (40, 40), (250, 250, 250)).save(p), "no digit found"),
        (lambda p: p.write_bytes(b""), "not a readable image"),
        (lambda p: p.write_text("not a picture"), "not a readable image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20), "not a readable image"),
    ],
)
def test_bad_images_get_a_named_error(tmp_path, make, message):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError, match=f"{path}: {message}"):
        mnist_recipe(read_picture(path).grey, str(path))


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        read_picture(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a folder"):
        read_picture(tmp_path)


def test_pretrained_model_reads_photos_and_skips_bad_images(mnist, tmp_path):
    params, config, meta = pretrained.load()
    paths = [photo_of(mnist.test_images[i], tmp_path / f"{i}.png", mode=("RGBA" if i == 2 else "RGB")) for i in range(8)]
    (tmp_path / "blank.png").write_bytes((tmp_path / "0.png").read_bytes())
    Image.new("L", (30, 30), 255).save(tmp_path / "blank.png")
    paths.insert(3, tmp_path / "blank.png")
    results = predict_images(params, make_model(config).apply, config.objective, paths)
    assert results[3].error is not None and "no digit found" in results[3].error
    good = [r for r in results if r.error is None]
    assert len(good) == 8
    right = sum(r.digit == int(mnist.test_labels[i]) for i, r in enumerate(good))
    assert right >= 7
    for r in good:
        assert r.score_kind == "rbf_penalties" and len(r.scores) == 10
        assert r.margin == pytest.approx(sorted(r.scores)[1] - min(r.scores))


def test_eval_image_command_answers_the_good_ones_and_exits_2(mnist, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        photo_of(mnist.test_images[i], folder / f"d{i}.png")
    (folder / "notes.txt").write_text("skipped: not an image suffix")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    code, out, err = eval_py(capsys, "--image", str(folder))
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all("penalties 0:" in line and "margin" in line for line in lines)
    assert [line.split(": ")[1][0] for line in lines] == [str(mnist.test_labels[i]) for i in range(3)]
    assert "broken.jpg: not a readable image" in err and "1 of 4 images could not be used" in err
    code, out, err = eval_py(capsys, "--image", str(folder / "d0.png"), "--json")
    assert code == 0, err
    assert json.loads(out)["digit"] == int(mnist.test_labels[0])


@pytest.mark.slow
def test_eval_py_predicts_as_a_program(mnist, tmp_path):
    photo_of(mnist.test_images[0], tmp_path / "d0.png")
    out = run_script("eval.py", "--image", str(tmp_path / "d0.png"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["digit"] == int(mnist.test_labels[0])


def test_image_folder_without_images_is_one_line_error(tmp_path, capsys):
    code, _, err = eval_py(capsys, "--image", str(tmp_path))
    assert code == 2 and err.strip().startswith("error: --image: no image files found")
    assert image_paths([tmp_path]) == []


def test_summary_prints_the_papers_totals(capsys):
    code, out, err = eval_py(capsys, "--summary")
    assert code == 0, err
    total = out.strip().splitlines()[-1].split()
    assert total == ["total", "60,000", "340,908"]
    assert "C3" in out and "10x10x16" in out and "1,516" in out


@pytest.mark.slow
def test_shipped_model_is_the_recorded_paper_run(mnist):
    """The shipped weights, read by a forward pass written here in numpy (not the
    package's), get the 84 test digits wrong that the run recorded (0.84%)."""
    params, config, meta = pretrained.load()
    assert config.optimizer == "sdlm" and config.batch_size == 1 and config.head == "rbf" and meta["epoch"] == config.epochs
    wrong = int(np.sum(numpy_rbf_penalties(params, mnist.test_images).argmin(-1) != mnist.test_labels))
    assert wrong == 84 == round(meta["test_error"] * 10_000)
    r = evaluate(params, make_model(config, inference=True).apply, mnist.test_images, mnist.test_labels, config.objective)
    assert r["errors"] == wrong


def test_a_pretrained_file_that_does_not_fit_its_config_is_refused(tmp_path):
    for suffix in (".npz", ".json"):
        shutil.copy(pretrained.PRETRAINED.with_suffix(suffix), tmp_path / f"m{suffix}")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["config"]["subsampling"] = "max"  # a model without S2/S4 parameters
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="do not fit the model its config describes"):
        pretrained.load(tmp_path / "m")
    meta["config"]["subsampling"] = "trainable"
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with np.load(tmp_path / "m.npz") as z:
        flat = {k: z[k].copy() for k in z.files}
    flat["C3/kernel"][2, 2, 5, 0] = 0.1  # C3 map 0 reads S2 maps 0-2 only
    np.savez(tmp_path / "m.npz", **flat)
    with pytest.raises(DataError, match="does not match the sha256 recorded in m.json"):
        pretrained.load(tmp_path / "m")
    meta["sha256"] = hashlib.sha256((tmp_path / "m.npz").read_bytes()).hexdigest()  # a file re-exported by hand
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="C3 weights that table I disconnects are not zero"):
        pretrained.load(tmp_path / "m")
    with pytest.raises(DataError, match="the pretrained model is missing"):
        pretrained.load(tmp_path / "absent")


def test_export_round_trip(tmp_path):
    params, config, meta = pretrained.load()
    base = pretrained.export(params, config, {"epoch": 3, "history": meta["history"][:3]}, tmp_path / "copy")
    again, config2, meta2 = pretrained.load(base)
    assert config2 == config and meta2["epoch"] == 3 and meta2["test_error"] == meta["history"][2]["test_error"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_eval_writes_every_figure(tmp_path, capsys):
    code, out, err = eval_py(capsys, "--figures", str(tmp_path / "figs"), "--json")
    assert code == 0, err
    report = json.loads(out)
    figures = {Path(f).name: pixels(f) for f in report["figures"]}
    assert sorted(figures) == ["confusion.png", "error_curves.png", "feature_maps.png", "misclassified.png", "rbf_bitmaps.png", "rejection.png"]
    assert near(figures["error_curves.png"], (31, 119, 180)) > 300  # the shipped run's curves
    empty = dark(pixels(plots.misclassified(np.zeros((1, 28, 28), np.uint8), [0], [0], tmp_path / "none.png")))
    assert dark(figures["misclassified.png"]) > empty + 91 * 40  # the shipped model's 91 wrong digits, each with ink
    assert near(figures["confusion.png"], (103, 0, 13), 60) > 20  # the darkest red: the most frequent confusion
    assert dark(figures["feature_maps.png"]) > 2000


def test_softmax_models_report_probabilities(mnist):
    config = Config(head="softmax", loss="xent")
    model = make_model(config)
    params = compiled_init(model, jax.random.key(0))
    classes, probs, margins, kind = predict_digits(params, model.apply, config.objective, mnist.test_images[:5])
    assert kind == "probabilities"
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(classes, probs.argmax(-1))
    top = np.sort(probs, -1)
    np.testing.assert_allclose(margins, top[:, -1] - top[:, -2], rtol=1e-6)
