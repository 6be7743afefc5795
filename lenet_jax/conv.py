"""Three implementations of the same 'VALID', stride-1 convolution (C1, C3 and C5).

``xla``         ``lax.conv_general_dilated``, differentiated by JAX: the fastest forward
                pass on the CPU (inference) and the default on GPUs and TPUs.
``patches``     the k*k shifted windows concatenated along channels, then one matrix
                product; JAX differentiates it in both modes (``jax.jvp`` included).
``custom_vjp``  the windows taken by one gather with a constant index table (for one
                image, by row: ``windows_by_row``), and a hand-written backward pass
                of matrix products: the fastest for training on the CPU at every
                batch size (docs/speed.md). JAX cannot forward-differentiate it.

Every product runs at the given precision policy (``lenet_jax.precision``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import precision as prec

CONV_IMPLS = ("xla", "patches", "custom_vjp")
FORWARD_DIFFERENTIABLE = ("xla", "patches")
"""The implementations ``jax.jvp`` can differentiate."""


def _window_index(h: int, w: int, c: int, k: int) -> np.ndarray:
    """Where each entry of each k x k window sits in flattened (H, W, C) maps:
    (H-k+1, W-k+1, k, k, C), the windows in HWIO-kernel row order."""
    r = np.arange
    rows = r(h - k + 1)[:, None, None, None] + r(k)[:, None]  # (ho, 1, k, 1)
    cols = r(w - k + 1)[:, None, None] + r(k)  # (wo, k, k) broadcast against rows
    return (rows * w + cols)[..., None] * c + r(c)


def patches(x: jax.Array, k: int, gather: bool = False) -> jax.Array:
    """The k x k windows of (..., H, W, C) maps, flattened in HWIO-kernel row order:
    (..., H-k+1, W-k+1, k*k*C). By default the k*k shifted slices concatenated, whose
    gradient autodiff writes as pads; ``gather=True`` takes them in one gather by a
    constant index table, which XLA fuses with whatever produced ``x`` (for C1, the
    batch's gather from the dataset)."""
    h, w, c = x.shape[-3:]
    ho, wo = h - k + 1, w - k + 1
    if ho == 1 and wo == 1:  # C5: the whole input is one window
        return x.reshape(x.shape[:-3] + (1, 1, k * k * c))
    if gather:
        return x.reshape(x.shape[:-3] + (h * w * c,))[..., _window_index(h, w, c, k).reshape(ho, wo, k * k * c)]
    return jnp.concatenate([x[..., i : i + ho, j : j + wo, :] for i in range(k) for j in range(k)], axis=-1)


def overlap_add(cols: jax.Array, k: int, c: int) -> jax.Array:
    """The adjoint of ``patches``: (..., Ho, Wo, k*k*C) window entries added back where
    they came from, (..., Ho+k-1, Wo+k-1, C); the k column shifts of each kernel row
    first, then the k row shifts (2k pads, not k*k)."""
    *lead, ho, wo, _ = cols.shape
    h, w = ho + k - 1, wo + k - 1
    cols = cols.reshape(*lead, ho, wo, k, k, c)
    keep = [(0, 0)] * len(lead)
    rows = sum(jnp.pad(cols[..., j, :], keep + [(0, 0), (j, w - wo - j), (0, 0), (0, 0)]) for j in range(k))
    return sum(jnp.pad(rows[..., i, :], keep + [(i, h - ho - i), (0, 0), (0, 0)]) for i in range(k))


def _patch_conv(x: jax.Array, kernel: jax.Array, policy: str, gather: bool = False) -> jax.Array:
    k, _, c, f = kernel.shape
    return prec.matmul(patches(x, k, gather), kernel.reshape(k * k * c, f), policy)


def _lax_conv(x: jax.Array, kernel: jax.Array, policy: str) -> jax.Array:
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    y = prec.conv(x.reshape((-1, h, w, c)), kernel, policy)
    return y.reshape(lead + y.shape[1:])


def windows_by_row(x: jax.Array, k: int) -> jax.Array:
    """The k x k windows of (..., H, W, C) maps as one (k*k*C, N) matrix: a row per
    kernel entry (HWIO row order), a column per output position of every image (N =
    images * (H-k+1) * (W-k+1)), the transpose of ``patches``. For one map (C1's input)
    the k*k shifted slices, each copied in runs of whole rows; for several, one gather by
    a constant index table."""
    h, w, c = x.shape[-3:]
    ho, wo = h - k + 1, w - k + 1
    if c == 1:
        return jnp.stack([x[..., i : i + ho, j : j + wo, 0] for i in range(k) for j in range(k)]).reshape(k * k, -1)
    index = _window_index(h, w, c, k).reshape(ho * wo, k * k * c).T
    taken = x.reshape(x.shape[:-3] + (h * w * c,))[..., index]  # (..., k*k*C, positions)
    return jnp.moveaxis(taken, -2, 0).reshape(k * k * c, -1)


def _by_row(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether the custom_vjp convolution of ``x`` takes its windows by row: for one image
    (the paper's batch 1, where it is the faster layout on the CPU; at batch 256 it is the
    slower, docs/speed.md), unless the window is the whole input (C5)."""
    return int(np.prod(x.shape[:-3], dtype=np.int64)) == 1 and x.shape[-3:-1] != kernel.shape[:2]


def _by_row_conv(x: jax.Array, kernel: jax.Array, policy: str) -> jax.Array:
    """The convolution as (F, k*k*C) kernel rows times the (k*k*C, N) windows: a product
    with the positions as its long, vectorised side. The barriers keep XLA from folding
    the two transposes into the product, which it would then run as a generic (slower)
    product in another layout."""
    k, _, c, f = kernel.shape
    kernel_t = jax.lax.optimization_barrier(kernel.reshape(k * k * c, f).T)
    y_t = jax.lax.optimization_barrier(prec.matmul(kernel_t, windows_by_row(x, k), policy))  # (F, N)
    return y_t.T.reshape(x.shape[:-3] + (x.shape[-3] - k + 1, x.shape[-2] - k + 1, f))


def _windows_conv(x: jax.Array, kernel: jax.Array, policy: str) -> jax.Array:
    return _by_row_conv(x, kernel, policy) if _by_row(x, kernel) else _patch_conv(x, kernel, policy, gather=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _custom_vjp_conv(x: jax.Array, kernel: jax.Array, policy: str) -> jax.Array:
    return _windows_conv(x, kernel, policy)


def _custom_vjp_forward(x: jax.Array, kernel: jax.Array, policy: str) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _windows_conv(x, kernel, policy), (x, kernel)


def _custom_vjp_backward(policy: str, residuals: tuple[jax.Array, jax.Array], dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both gradients as matrix products, the form XLA's CPU backend runs fast inside a
    loop: the kernel's is the windows (extracted again; XLA shares them with the forward
    pass) times ``dy``; the input's is ``dy`` times the kernel, overlap-added back onto
    the input grid (for C5, whose output is 1x1, a plain reshape). C1's input gradient is
    unused, and XLA drops it."""
    x, kernel = residuals
    k, _, c, f = kernel.shape
    if _by_row(x, kernel):
        dkernel = prec.matmul(windows_by_row(x, k), dy.reshape(-1, f), policy).reshape(kernel.shape)
    else:
        dkernel = prec.matmul(patches(x, k, gather=True).reshape(-1, k * k * c).T, dy.reshape(-1, f), policy).reshape(kernel.shape)
    dcols = prec.matmul(dy, kernel.reshape(k * k * c, f).T, policy)
    dx = dcols.reshape(x.shape) if dy.shape[-3:-1] == (1, 1) else overlap_add(dcols, k, c)
    return dx, dkernel


_custom_vjp_conv.defvjp(_custom_vjp_forward, _custom_vjp_backward)


def valid_conv(x: jax.Array, kernel: jax.Array, impl: str = "xla", policy: str = "float32") -> jax.Array:
    """'VALID' stride-1 convolution of (..., H, W, C) maps by an HWIO kernel, computed by
    ``impl`` (one of ``CONV_IMPLS``) at precision ``policy``."""
    if impl == "patches":
        return _patch_conv(x, kernel, policy)
    if impl == "custom_vjp":
        return _custom_vjp_conv(x, kernel, policy)
    if impl != "xla":
        raise ValueError(f"unknown convolution implementation {impl!r}; choose from {', '.join(CONV_IMPLS)}")
    return _lax_conv(x, kernel, policy)
