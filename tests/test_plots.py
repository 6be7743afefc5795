"""The figures show what they say: curves in their colours, one tile per misclassified
digit, the ten bitmaps, read back from the PNG files' pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lenet_jax.bitmaps import DIGIT_BITMAPS
from lenet_jax.plots import error_curves, misclassified, rbf_bitmaps, size_curves


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int32)


def near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels are within ``tolerance`` of the colour ``rgb``."""
    return int(np.sum(np.abs(image - np.asarray(rgb)).sum(-1) < tolerance))


def dark(image: np.ndarray) -> int:
    return int(np.sum(image.mean(-1) < 100))


def test_error_curves_draw_one_colour_per_run(tmp_path):
    history = [{"epoch": e, "train_error": 0.1 / e, "test_error": 0.12 / e} for e in range(1, 4)]
    one = pixels(error_curves({"run": history}, tmp_path / "one.png"))
    two = pixels(error_curves({"run": history, "other": [dict(r, test_error=r["test_error"] / 2) for r in history]}, tmp_path / "two.png"))
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1
    assert near(one, blue) > 300 and near(one, orange) == 0
    assert near(two, orange) > 300


def test_the_misclassified_grid_has_one_tile_per_wrong_digit(mnist, tmp_path):
    """The ink grows by about as much for each wrong digit: 0, 3 and 9 of them."""
    images, labels = mnist.test_images[:40], mnist.test_labels[:40]
    ink = []
    for k in (0, 3, 9):
        predictions = labels.copy()
        predictions[:k] = (labels[:k] + 1) % 10
        ink.append(dark(pixels(misclassified(images, labels, predictions, tmp_path / f"m{k}.png", columns=12))))
    per_digit_3, per_digit_9 = (ink[1] - ink[0]) / 3, (ink[2] - ink[0]) / 9
    assert per_digit_3 > 50 and abs(per_digit_9 - per_digit_3) < 0.25 * per_digit_3, ink


def test_the_bitmap_figure_shows_each_bitmap(tmp_path):
    """Each of the ten tiles holds a 7x12 grid of cells, dark where the bitmap is +1."""
    image = pixels(rbf_bitmaps(tmp_path / "b.png"))
    rows = np.nonzero(image.mean((1, 2)) < 250)[0]
    assert dark(image) > 10 * 50
    on = [(DIGIT_BITMAPS[d] > 0).sum() for d in range(10)]
    columns = np.array_split(np.arange(image.shape[1]), 10)
    ink = [dark(image[rows.min() : rows.max() + 1, c]) for c in columns]
    assert np.corrcoef(on, ink)[0, 1] > 0.9, (on, ink)  # more +1 cells, more ink


def test_the_size_figure_draws_each_error_at_its_height(tmp_path):
    """Without distortions (C0) at 1% test and 2% training error, with them (C1) at 4% and
    3%: the orange marks sit higher on the figure than the blue ones."""
    sizes = [15_000, 30_000, 60_000]
    errors = {(d, n, key): ([0.04, 0.041, 0.039] if key == "test_error" else [0.03] * 3) if d else
              ([0.01, 0.011, 0.009] if key == "test_error" else [0.02] * 3) for d in (False, True) for n in sizes for key in ("test_error", "train_error")}
    image = pixels(size_curves(sizes, errors, tmp_path / "s.png"))
    blue, orange = (31, 119, 180), (255, 127, 14)
    rows = lambda colour: np.nonzero(np.all(np.abs(image[..., :3].astype(int) - colour) < 40, axis=-1))[0]  # noqa: E731
    body = image.shape[0] * 0.8  # the legend sits in the upper part; the marks of 1-4% lie below it
    assert len(rows(blue)) > 100 and len(rows(orange)) > 100
    assert np.median(rows(orange)[rows(orange) < body]) < np.median(rows(blue)[rows(blue) < body])
