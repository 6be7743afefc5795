"""Predicting digits in the user's own images, prepared the way MNIST's digits were.

MNIST's digits were size-normalised to fit a 20x20 box keeping their aspect ratio
(anti-aliased, hence grey levels), then centred by their centre of mass in a 28x28
field. A photo or a drawing that skips this (a digit filling the frame, dark on light,
off-centre) is the most common reason a network that scores 99% on MNIST fails on a
user's own digits, so ``mnist_recipe`` applies the same steps to any image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.inputs import preprocess
from lenet_jax.losses import Objective

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
"""Files a folder given to ``--image`` contributes; anything else in it is skipped."""

MNIST_CENTRE = 14.0
"""Where MNIST's digits have their centre of mass, in pixel indices of the 28x28 field
(measured: 14.00 +- 0.29 on both axes over the first 20,000 training digits)."""

MIN_CONTRAST = 32
"""Fewest grey levels (of 255) between background and ink for an image to hold a digit."""


class ImageError(ValueError):
    """An image that cannot be read or holds no digit; the message names the file."""


def read_grey(path: Path | str) -> np.ndarray:
    """The image at ``path`` as a float (H, W) array in [0, 255], 255 white. Transparent
    pixels count as white (a digit drawn on a transparent canvas)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            grey = np.asarray(im.convert("L"), np.float64)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__})") from None
    if grey.size == 0:
        raise ImageError(f"{path}: the image is empty (0 pixels)")
    return grey


def mnist_recipe(grey: np.ndarray, where: str = "<image>") -> np.ndarray:
    """A uint8 (28, 28) MNIST-style digit (ink high, background 0) from a grey image.

    1. Ink is whatever differs from the background, the median of the border pixels;
       a light background is inverted (MNIST digits are light on dark).
    2. Crop to the bounding box of the ink (pixels above a fifth of the strongest).
    3. Resize so the longer side is 20 pixels, keeping the aspect ratio (anti-aliased).
    4. Paste into 28x28 so the centre of mass sits at pixel (14, 14), where MNIST's
       digits have theirs (shifted as far as the field allows).
    """
    from PIL import Image

    grey = np.asarray(grey, np.float64)
    if grey.ndim != 2 or grey.size == 0:
        raise ImageError(f"{where}: expected a non-empty 2-d grey image, got shape {grey.shape}")
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    ink = grey - background if background < 128 else background - grey
    ink = np.clip(ink, 0, None)
    if ink.max() < MIN_CONTRAST:
        raise ImageError(f"{where}: no digit found (the image is blank or all one colour)")
    ink = ink * (255.0 / ink.max())
    rows, cols = np.nonzero(ink > 0.2 * 255)
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = ink.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(ink.astype(np.float32)).resize(size, Image.Resampling.LANCZOS), np.float64)
    small = np.clip(small, 0, 255)
    field = np.zeros((28, 28))
    top, left = (28 - small.shape[0]) // 2, (28 - small.shape[1]) // 2
    field[top : top + small.shape[0], left : left + small.shape[1]] = small
    total = field.sum()
    r, c = np.indices(field.shape)
    dy = int(round(MNIST_CENTRE - (r * field).sum() / total))
    dx = int(round(MNIST_CENTRE - (c * field).sum() / total))
    dy = int(np.clip(dy, -top, 28 - top - small.shape[0]))
    dx = int(np.clip(dx, -left, 28 - left - small.shape[1]))
    field = np.roll(field, (dy, dx), axis=(0, 1))
    return np.round(field).astype(np.uint8)


def image_paths(inputs: list[Path | str]) -> list[Path]:
    """The files named, with each folder replaced by its image files (sorted)."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            out += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            out.append(item)
    return out


@dataclass
class Prediction:
    """What the network says about one image: the class, the ten scores (RBF penalties,
    lower is better, or softmax probabilities) and the confidence margin (runner-up
    penalty minus the winner's, or the winner's probability minus the runner-up's)."""

    path: str
    digit: int | None = None
    scores: list[float] | None = None
    score_kind: str = ""
    margin: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def predict_digits(
    params: Any, apply_fn: Callable, objective: Objective, digits: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Classes, scores, margins and the score kind for uint8 (N, 28, 28) MNIST-style digits."""
    scores = np.asarray(jax.jit(apply_fn)({"params": params}, preprocess(jnp.asarray(digits))))
    if objective.head == "softmax":
        scores = np.asarray(jax.nn.softmax(scores, axis=-1))
        ranked = -np.sort(-scores, axis=-1)
        return scores.argmax(-1), scores, ranked[:, 0] - ranked[:, 1], "probabilities"
    ranked = np.sort(scores, axis=-1)
    return scores.argmin(-1), scores, ranked[:, 1] - ranked[:, 0], "rbf_penalties"


def predict_images(params: Any, apply_fn: Callable, objective: Objective, paths: list[Path]) -> list[Prediction]:
    """A Prediction per path, in order; an unreadable or blank image gets ``error`` set
    and the others are still predicted."""
    results = [Prediction(str(p)) for p in paths]
    digits, good = [], []
    for i, p in enumerate(paths):
        try:
            digits.append(mnist_recipe(read_grey(p), str(p)))
            good.append(i)
        except ImageError as e:
            results[i].error = str(e)
    if good:
        classes, scores, margins, kind = predict_digits(params, apply_fn, objective, np.stack(digits))
        for j, i in enumerate(good):
            results[i].digit = int(classes[j])
            results[i].scores = [float(v) for v in scores[j]]
            results[i].score_kind = kind
            results[i].margin = float(margins[j])
    return results


def format_prediction(p: Prediction) -> str:
    """One line per image: the class, its margin and the ten scores."""
    if p.error is not None:
        return f"error: {p.error}"
    label = "penalties" if p.score_kind == "rbf_penalties" else "probabilities"
    scores = " ".join(f"{d}:{v:.3g}" for d, v in enumerate(p.scores or []))
    return f"{p.path}: {p.digit}  (margin {p.margin:.3g})  {label} {scores}"
