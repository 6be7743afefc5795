"""Predicting digits in the user's own images, prepared the way MNIST's digits were.

MNIST's digits were size-normalised to fit a 20x20 box keeping their aspect ratio
(anti-aliased, hence grey levels), then centred by their centre of mass in a 28x28
field. A photo or a drawing that skips this (a digit filling the frame, dark on light,
off-centre) is the most common reason a network that scores 99% on MNIST fails on a
user's own digits, so ``mnist_recipe`` applies the same steps to any image.

Images are read one at a time and the network runs over batches of them, so a folder of
any size takes bounded memory; an image that cannot be used (unreadable, too large,
blank) gets its own error and never stops the others.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.errors import DataError
from lenet_jax.inputs import preprocess
from lenet_jax.losses import Objective

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")
"""Files a folder given to ``--image`` contributes; anything else in it is skipped."""

MNIST_CENTRE = 14.0
"""Where MNIST's digits have their centre of mass, in pixel indices of the 28x28 field
(measured: 14.00 +- 0.29 on both axes over the first 20,000 training digits)."""

MIN_CONTRAST = 32
"""Fewest grey levels (of 255) between background and ink for an image to hold a digit."""

MAX_PIXELS = 50_000_000
"""The largest image ``eval.py --image`` reads (width x height): a digit needs far fewer,
and a file that declares more (a decompression bomb) would take gigabytes. The drawing
page takes far fewer (``demo.SERVE_MAX_PIXELS``). An animated image is read frame by
frame until this many pixels have been decoded in all."""

SERVE_MAX_PIXELS = 4_000_000
"""Pixels (width x height) an upload to the drawing page (``eval.py --serve``) may
declare: a drawing on the page is 280x280 (78,400) and a scanned or photographed digit
rarely needs more than 2000x2000; ``--max-pixels`` raises it."""

REDUCE_ABOVE = 560
"""An ink box longer than this many pixels is first box-averaged down to at most this
size (an integer factor, on the decoded 8-bit pixels) before the float resize to 20
pixels: a large photo then costs floats only for a 560-pixel crop. Smaller boxes (any
drawing of the page, 280x280) are resized directly, as before."""

BATCH = 512
"""Images per network call when predicting a folder."""


class ImageError(DataError):
    """An image that cannot be read or holds no digit; the message names the file."""


@dataclass
class Picture:
    """A grey image read from a file: (H, W) floats in [0, 255], 255 white; for an
    animated image, which frame it is."""

    grey: np.ndarray
    frame: int | None = None
    frames: int = 1


def _grey(im: Any, where: Path | str) -> np.ndarray:
    """One Pillow frame as grey levels in [0, 255], 255 white: uint8 for 8-bit images (one
    byte a pixel, as the decoder holds them), floats for 16-bit and 32-bit grey (scaled,
    not clipped, to 8 bits); transparency composited over white; an ImageError naming
    ``where`` for a frame whose values are not all finite numbers (a float TIFF can hold
    NaN or infinity)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im, np.float64) / 257.0
    if im.mode in ("I", "F"):
        values = np.asarray(im, np.float64)
        if not np.all(np.isfinite(values)):
            raise ImageError(f"{where}: holds pixel values that are NaN or infinite")
        top = 65535.0 if values.max(initial=0) > 255 else 255.0  # 16-bit PNGs open as "I" in some Pillow versions
        return np.clip(values, 0, top) * (255.0 / top)
    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("L"))


def _median(values: np.ndarray) -> float:
    """``np.median`` of ``values``; of uint8 values from their histogram, without a sorted copy."""
    if values.dtype != np.uint8:
        return float(np.median(values))
    cumulative = np.cumsum(np.bincount(values, minlength=256))
    low, high = (values.size - 1) // 2, values.size // 2
    return (int(np.searchsorted(cumulative, low, side="right")) + int(np.searchsorted(cumulative, high, side="right"))) / 2.0


@dataclass
class _Ink:
    """Where a grey image's ink is, found from per-row and per-column extremes only (no
    array the size of the image): the background (the border's median), whether it is
    light, and the strongest ink in each row and column (never negative)."""

    background: float
    light: bool
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of(cls, grey: np.ndarray) -> "_Ink":
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        background = _median(border)
        light = background >= 128
        if light:  # ink is darker than the background: its strength is background - grey
            rows, cols = background - grey.min(1), background - grey.min(0)
        else:
            rows, cols = grey.max(1) - background, grey.max(0) - background
        return cls(background, light, np.clip(rows, 0, None), np.clip(cols, 0, None))

    @property
    def strongest(self) -> float:
        return float(self.rows.max())

    def of_pixels(self, grey: np.ndarray) -> np.ndarray:
        """The ink of ``grey`` (a crop of the image), as floats, never negative."""
        grey = np.asarray(grey, np.float64)
        return np.clip(self.background - grey if self.light else grey - self.background, 0, None)


def _has_ink(grey: np.ndarray) -> bool:
    return _Ink.of(grey).strongest >= MIN_CONTRAST


def read_picture(path: Path | str, max_pixels: int = MAX_PIXELS) -> Picture:
    """The image at ``path``, turned upright by its EXIF orientation; for an animated
    image its first frame that is not blank. Only regular files are opened, and none
    larger than ``max_pixels``. Every failure is an ImageError naming the file."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if stat.S_ISDIR(mode):
        raise ImageError(f"{path}: is a folder")
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path}: not a regular file")
    return _decode(path, str(path), max_pixels)


def read_picture_bytes(data: bytes, name: str = "the image", max_pixels: int = MAX_PIXELS) -> Picture:
    """``read_picture`` for an image held in memory (an upload): the same checks and
    limits, the messages naming it ``name``; nothing touches the file system."""
    import io

    return _decode(io.BytesIO(data), name, max_pixels)


def _decode(source: Any, where: str, max_pixels: int) -> Picture:
    """Decode ``source`` within ``max_pixels``: the header's size is checked before any
    pixel is decoded, and an animated image is read frame by frame only while the frames
    decoded so far stay within the limit."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours, and lower
            with Image.open(source) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(f"{where}: {width}x{height} pixels, more than the limit of {max_pixels:,} (--max-pixels)")
                frames = getattr(im, "n_frames", 1)
                readable = max(1, min(frames, max_pixels // max(1, width * height)))
                for frame in range(readable):
                    im.seek(frame)
                    grey = _grey(ImageOps.exif_transpose(im) if frame == 0 else im.copy(), where)
                    if frames == 1 or _has_ink(grey):
                        return Picture(grey, frame if frames > 1 else None, frames)
                    del grey
                if readable < frames:
                    raise ImageError(f"{where}: no digit found in the first {readable} of its {frames} frames "
                                     f"(reading more would decode more than {max_pixels:,} pixels, --max-pixels)")
                raise ImageError(f"{where}: no digit found in any of its {frames} frames")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{where}: declares more pixels than the limit of {max_pixels:,} (--max-pixels)") from None
    except MemoryError:
        raise ImageError(f"{where}: too large to decode in memory") from None
    except Exception as e:  # Pillow raises many kinds for damaged files; any of them means unusable
        raise ImageError(f"{where}: not a readable image ({type(e).__name__})") from None


def mnist_recipe(grey: np.ndarray, where: str = "<image>") -> np.ndarray:
    """A uint8 (28, 28) MNIST-style digit (ink high, background 0) from a grey image.

    1. Ink is whatever differs from the background, the median of the border pixels;
       a light background is inverted (MNIST digits are light on dark).
    2. Crop to the bounding box of the ink (pixels above a fifth of the strongest).
    3. Resize so the longer side is 20 pixels, keeping the aspect ratio (anti-aliased).
    4. Paste into 28x28 so the centre of mass sits at pixel (14, 14), where MNIST's
       digits have theirs (shifted as far as the field allows).

    The box is found from per-row and per-column extremes, and only the box is turned
    into floats (box-averaged first if it is longer than ``REDUCE_ABOVE``), so a large
    image costs little beyond its own decoded pixels.
    """
    from PIL import Image

    grey = np.asarray(grey)
    if grey.ndim != 2 or grey.size == 0:
        raise ImageError(f"{where}: expected a non-empty 2-d grey image, got shape {grey.shape}")
    ink = _Ink.of(grey)
    strongest = ink.strongest
    if strongest < MIN_CONTRAST:
        raise ImageError(f"{where}: no digit found (the image is blank or all one colour)")
    scale = 255.0 / strongest
    rows = np.nonzero(ink.rows * scale > 0.2 * 255)[0]
    cols = np.nonzero(ink.cols * scale > 0.2 * 255)[0]
    box = grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    longest = max(box.shape)
    if longest > REDUCE_ABOVE:
        factor = -(-longest // REDUCE_ABOVE)
        box = np.asarray(Image.fromarray(box if box.dtype == np.uint8 else box.astype(np.float32)).reduce(factor))
    box = ink.of_pixels(box) * scale
    h, w = box.shape
    resize = 20.0 / max(h, w)
    size = (max(1, round(w * resize)), max(1, round(h * resize)))
    small = np.asarray(Image.fromarray(box.astype(np.float32)).resize(size, Image.Resampling.LANCZOS), np.float64)
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


def image_paths(inputs: Iterable[Path | str]) -> list[Path]:
    """The files named, with each folder replaced by its regular image files (sorted)."""
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
    lower is better; softmax probabilities; or the squashed head's outputs, higher is
    better), the confidence margin (between the winner's score and the runner-up's), and
    for an animated image the frame read."""

    path: str
    digit: int | None = None
    scores: list[float] | None = None
    score_kind: str = ""
    margin: float | None = None
    frame: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def predict_digits(
    params: Any, apply_fn: Callable, objective: Objective, digits: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Classes, scores, margins and the score kind for uint8 (N, 28, 28) MNIST-style digits."""
    scores = np.asarray(jax.jit(apply_fn)({"params": params}, preprocess(jnp.asarray(digits))))
    return rank_scores(scores, objective.head)


def rank_scores(scores: np.ndarray, head: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Classes, the scores as reported, margins and the score kind from the network's
    scores (N, 10) for ``head``: the smallest RBF penalty wins, or the largest softmax
    probability (the logits turned into them) or squashed output; the margin is the
    distance from the winner's score to the runner-up's."""
    if head == "rbf":
        ranked = np.sort(scores, axis=-1)
        return scores.argmin(-1), scores, ranked[:, 1] - ranked[:, 0], "rbf_penalties"
    kind = "outputs"
    if head == "softmax":
        scores, kind = np.asarray(jax.nn.softmax(scores, axis=-1)), "probabilities"
    ranked = -np.sort(-scores, axis=-1)
    return scores.argmax(-1), scores, ranked[:, 0] - ranked[:, 1], kind


def _prepare(path: Path, max_pixels: int) -> tuple[np.ndarray, int | None]:
    picture = read_picture(path, max_pixels)
    if picture.grey.size == 0:
        raise ImageError(f"{path}: the image is empty (0 pixels)")
    return mnist_recipe(picture.grey, str(path)), picture.frame


def predict_stream(
    params: Any, apply_fn: Callable, objective: Objective, paths: Iterable[Path], max_pixels: int = MAX_PIXELS, batch: int = BATCH
) -> Iterator[Prediction]:
    """A Prediction per path, in order, yielded batch by batch: an image that cannot be
    used gets ``error`` set and the others are still predicted."""
    pending: list[tuple[Prediction, np.ndarray | None]] = []

    def flush() -> Iterator[Prediction]:
        good = [(p, d) for p, d in pending if d is not None]
        if good:
            digits = np.zeros((batch, 28, 28), np.uint8)  # one shape: one compiled program
            digits[: len(good)] = np.stack([d for _, d in good])
            classes, scores, margins, kind = predict_digits(params, apply_fn, objective, digits)
            for j, (p, _) in enumerate(good):
                p.digit, p.scores, p.score_kind, p.margin = int(classes[j]), [float(v) for v in scores[j]], kind, float(margins[j])
        yield from (p for p, _ in pending)
        pending.clear()

    for path in paths:
        p = Prediction(str(path))
        try:
            digit, p.frame = _prepare(Path(path), max_pixels)
        except ImageError as e:
            p.error, digit = str(e), None
        pending.append((p, digit))
        if len(pending) == batch:
            yield from flush()
    yield from flush()


def predict_images(params: Any, apply_fn: Callable, objective: Objective, paths: list[Path], max_pixels: int = MAX_PIXELS) -> list[Prediction]:
    """``predict_stream`` as a list."""
    return list(predict_stream(params, apply_fn, objective, paths, max_pixels, batch=min(BATCH, max(1, len(paths)))))


def format_prediction(p: Prediction) -> str:
    """One line per image: the class, its margin and the ten scores (and the frame read)."""
    if p.error is not None:
        return f"error: {p.error}"
    label = {"rbf_penalties": "penalties", "probabilities": "probabilities"}.get(p.score_kind, "outputs")
    scores = " ".join(f"{d}:{v:.3g}" for d, v in enumerate(p.scores or []))
    frame = f" [frame {p.frame}]" if p.frame is not None else ""
    return f"{p.path}{frame}: {p.digit}  (margin {p.margin:.3g})  {label} {scores}"
