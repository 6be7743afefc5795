"""Random planar affine distortions, drawn and applied on the device (section III-B's
second result: 0.8% test error when the training set is enlarged with distorted copies).

The paper names the transforms (horizontal and vertical translation, scaling, squeezing,
horizontal shearing) but not their ranges; the defaults of ``Distortion`` are this
project's choice (README). Each distortion is applied to the preprocessed 32x32 input,
around its centre, by bilinear interpolation with the background value outside, so a
translated digit can move into the 2-pixel border that padding adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lenet_jax.inputs import BACKGROUND


@dataclass(frozen=True)
class Distortion:
    """Ranges of the random affine distortion; each parameter is uniform in its range.

    translate: pixels, horizontal and vertical, each in [-translate, translate].
    scale: the digit is scaled by s in [1 - scale, 1 + scale].
    squeeze: horizontal factor q, vertical 1/q, q in [1 - squeeze, 1 + squeeze].
    shear: horizontal shear x' = x + k y, k in [-shear, shear].
    probability: share of training patterns that are distorted (the paper's 540,000
    distorted of 600,000 is 0.9).

    The ranges are checked where they are given, as options (``config.Config``).
    """

    translate: float = 2.0
    scale: float = 0.1
    squeeze: float = 0.1
    shear: float = 0.2
    probability: float = 0.9


def random_affine(key: jax.Array, d: Distortion) -> tuple[jax.Array, jax.Array]:
    """One draw: a 2x2 matrix A (acting on (row, column) offsets from the centre) and a
    translation t, the forward map p' = A p + t of the distortion."""
    k = jax.random.split(key, 5)
    u = lambda key, r: jax.random.uniform(key, (), jnp.float32, -r, r)  # noqa: E731
    s = 1.0 + u(k[0], d.scale)
    q = 1.0 + u(k[1], d.squeeze)
    shear = u(k[2], d.shear)
    t = jnp.stack([u(k[3], d.translate), u(k[4], d.translate)])
    scale = jnp.array([[s / q, 0.0], [0.0, s * q]])  # rows (vertical), columns (horizontal)
    shear_m = jnp.array([[1.0, 0.0], [shear, 1.0]])  # column += shear * row
    return shear_m @ scale, t


def warp(image: jax.Array, matrix: jax.Array, shift: jax.Array, fill: float = BACKGROUND) -> jax.Array:
    """Apply the forward affine map (matrix, shift) to one (H, W, 1) image around its centre:
    each output pixel reads the input at the inverse-mapped point, bilinearly."""
    h, w = image.shape[:2]
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    out = jnp.stack([rows.ravel(), cols.ravel()]) - centre[:, None] - shift[:, None]
    src = jnp.linalg.inv(matrix) @ out + centre[:, None]
    values = jax.scipy.ndimage.map_coordinates(image[..., 0], [src[0], src[1]], order=1, mode="constant", cval=fill)
    return values.reshape(h, w, 1)


def distort_batch(key: jax.Array, images: jax.Array, d: Distortion) -> jax.Array:
    """Distort each of the preprocessed (N, H, W, 1) ``images`` with probability
    ``d.probability``, each with its own random affine map."""
    n = images.shape[0]
    keys = jax.random.split(key, n)

    def one(k, x):
        k_apply, k_map = jax.random.split(k)
        matrix, shift = random_affine(k_map, d)
        return jnp.where(jax.random.uniform(k_apply) < d.probability, warp(x, matrix, shift), x)

    return jax.vmap(one)(keys, images)
