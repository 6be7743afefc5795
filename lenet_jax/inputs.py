"""The paper's input scaling (section II-B), applied on the device inside compiled programs.

Datasets are kept as uint8 (N, 28, 28); padding to 32x32 and scaling happen here, so the
data costs 47 MB of device memory rather than 245 MB of floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKGROUND = -0.1
INK = 1.175
"""Background (white) -> -0.1, full ink (black) -> 1.175: the input's mean is then about 0
and its variance about 1 (section II-B)."""


SCALINGS = {"paper": (BACKGROUND, INK), "lush": (0.0, 2.55)}
"""What background and full ink become in the network's input: the paper's -0.1 and
1.175, or the authors' Lush demo's pixel x 0.01 on a background of 0
(``dsource-mnist ... 32 32 0 0.01``: 0 to 2.55)."""


def rescale(x: jax.Array, scaling: str = "paper") -> jax.Array:
    """An input prepared by ``preprocess`` (the paper's scale) on the scale ``scaling``
    names, by the affine map that takes background and ink to its values; the paper's
    scale is returned as it is."""
    if scaling == "paper":
        return x
    if scaling not in SCALINGS:
        raise ValueError(f"unknown input scaling {scaling!r}; choose from {', '.join(SCALINGS)}")
    low, high = SCALINGS[scaling]
    return low + (x - BACKGROUND) * ((high - low) / (INK - BACKGROUND))


def pad_images(images: jax.Array) -> jax.Array:
    """uint8 (..., 28, 28) -> uint8 (..., 32, 32): the 2-pixel border in pixel value 0,
    which ``preprocess`` maps to the background. Training pads its dataset once, so each
    batch is a plain gather from it that XLA fuses with C1's window extraction."""
    return jnp.pad(images, [(0, 0)] * (images.ndim - 2) + [(2, 2), (2, 2)])


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (..., 28, 28), or (..., 32, 32) from ``pad_images`` -> float32 (..., 32, 32, 1):
    a 2-pixel background border, then pixel 0 -> -0.1 and pixel 255 -> 1.175, linearly."""
    if images.shape[-2:] == (28, 28):
        images = pad_images(images)
    elif images.shape[-2:] != (32, 32):
        raise ValueError(f"expected 28x28 images (or 32x32 padded ones), got {images.shape[-2:]}")
    return (BACKGROUND + images.astype(jnp.float32) * ((INK - BACKGROUND) / 255.0))[..., None]
