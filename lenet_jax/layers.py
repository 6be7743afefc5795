"""The building blocks of LeNet-5, one small Flax module per paper component.

Section II-B of LeCun et al. (1998) and appendix A. All layers work on NHWC arrays with
any number of leading batch dimensions folded into one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax import precision as prec
from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.conv import valid_conv

AMPLITUDE = 1.7159
"""A in the squashing function f(a) = A tanh(S a) (appendix A)."""

SLOPE = 2.0 / 3.0
"""S in the squashing function f(a) = A tanh(S a) (appendix A)."""

INIT_SCALE = 2.4
"""Weights start uniform in [-2.4 / F, 2.4 / F], F the fan-in of the unit (appendix C)."""

C3_TABLE: tuple[tuple[int, ...], ...] = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)
"""Table I of the paper: the S2 maps read by each of the 16 C3 maps (60 connections)."""


def connection_mask(table: Sequence[Sequence[int]], n_inputs: int) -> np.ndarray:
    """A 0/1 float32 mask of shape (n_inputs, n_outputs): mask[i, k] = 1 iff map k reads map i."""
    mask = np.zeros((n_inputs, len(table)), np.float32)
    for k, inputs in enumerate(table):
        if not inputs or min(inputs) < 0 or max(inputs) >= n_inputs:
            raise ValueError(f"connection table row {k} = {inputs!r} is not a non-empty subset of 0..{n_inputs - 1}")
        mask[list(inputs), k] = 1.0
    return mask


COEFFICIENT_INITS = ("fan_in", "fixed")
"""How S2/S4's coefficients start: uniform like weights ("fan_in"), or all at the bound
of that range ("fixed": the Lush code's ``idx-f1fill :coeff:x (/ v (** 4 (/ p)))``, 0.5)."""

BIAS_INITS = ("fan_in", "zero")
"""How biases start: like the weights of their unit ("fan_in", the paper's rule as this
project reads it), or at zero (the authors' later Lush code)."""


def bias_initializer(kind: str, fan_in: np.ndarray | float, exponent: float, scale: float) -> nn.initializers.Initializer:
    """The initialiser of a bias: ``fan_in_uniform`` or zeros, by ``kind``."""
    if kind == "zero":
        return nn.initializers.zeros_init()
    if kind != "fan_in":
        raise ValueError(f"unknown bias initialisation {kind!r}; choose from {', '.join(BIAS_INITS)}")
    return fan_in_uniform(fan_in, exponent, scale)


def fan_in_uniform(fan_in: np.ndarray | float, exponent: float = 1.0, scale: float = INIT_SCALE) -> nn.initializers.Initializer:
    """Initialiser drawing uniformly from [-scale / F^exponent, scale / F^exponent]; F (the
    fan-in) may vary along the last axis. scale 2.4, exponent 1 is the paper's rule."""
    limit = scale / np.asarray(fan_in, np.float32) ** exponent

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * jnp.asarray(limit, dtype)

    return init


@dataclass(frozen=True)
class Init:
    """How a layer's parameters start: weights uniform in +-scale / F**exponent, F the
    fan-in of their unit (2.4 and 1: the paper's rule, appendix C), and biases drawn like
    their unit's weights (``bias="fan_in"``) or at zero (``"zero"``)."""

    exponent: float = 1.0
    scale: float = INIT_SCALE
    bias: str = "fan_in"
    count_bias: bool = False
    """Whether F counts the bias as one more input (a reading of "the number of inputs"
    the paper leaves open)."""

    def weights(self, fan_in: np.ndarray | float) -> nn.initializers.Initializer:
        """The initialiser of weights of fan-in ``fan_in`` (which may vary along the last axis)."""
        return fan_in_uniform(self.fan(fan_in), self.exponent, self.scale)

    def biases(self, fan_in: np.ndarray | float) -> nn.initializers.Initializer:
        """The initialiser of the biases of units of fan-in ``fan_in``."""
        return bias_initializer(self.bias, self.fan(fan_in), self.exponent, self.scale)

    def fan(self, fan_in: np.ndarray | float) -> np.ndarray | float:
        """F: the inputs of a unit, and its bias with ``count_bias``."""
        return np.asarray(fan_in) + 1 if self.count_bias else fan_in


def scaled_tanh(a: jax.Array, amplitude: float = AMPLITUDE, slope: float = SLOPE) -> jax.Array:
    """The squashing function f(a) = A tanh(S a) (appendix A)."""
    return amplitude * jnp.tanh(slope * a)


def squash_slope_from_output(x: jax.Array, amplitude: float = AMPLITUDE, slope: float = SLOPE) -> jax.Array:
    """f'(a) written in terms of x = f(a): S (A - x^2 / A). Used by the curvature pass
    and by the fused kernel's backward pass."""
    return slope * (amplitude - x * x / amplitude)


class ScaledTanh(nn.Module):
    """The squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (appendix A)."""

    amplitude: float = AMPLITUDE
    slope: float = SLOPE

    def __call__(self, a: jax.Array) -> jax.Array:
        return scaled_tanh(a, self.amplitude, self.slope)

    def derivative_from_output(self, x: jax.Array) -> jax.Array:
        return squash_slope_from_output(x, self.amplitude, self.slope)


class ReLU(nn.Module):
    """The modern replacement of the squashing function: max(a, 0)."""

    def __call__(self, a: jax.Array) -> jax.Array:
        return jax.nn.relu(a)

    def derivative_from_output(self, x: jax.Array) -> jax.Array:
        return (x > 0).astype(x.dtype)


class SELU(nn.Module):
    """Scaled exponential linear unit (Klambauer et al., 2017)."""

    def __call__(self, a: jax.Array) -> jax.Array:
        return jax.nn.selu(a)

    def derivative_from_output(self, x: jax.Array) -> jax.Array:
        lam, alpha = 1.0507009873554805, 1.6732632423543772
        return jnp.where(x > 0, lam, x + lam * alpha)


ACTIVATIONS = {"scaled_tanh": ScaledTanh, "relu": ReLU, "selu": SELU}
"""Each has ``derivative_from_output``: the slope f'(a) written in terms of f(a), which
the paper's curvature pass needs."""


def window_sums(x: jax.Array, k: int) -> jax.Array:
    """The sum of each non-overlapping k x k window of (..., H, W, C) maps, written as
    sums of contiguous slices (first the k rows of each band, then the k neighbours in
    each row), which XLA's CPU backend runs, and differentiates, faster than a reduction
    over the two window axes."""
    *lead, h, w, c = x.shape
    rows = x.reshape(*lead, h // k, k, w * c)
    rows = sum(rows[..., i, :] for i in range(k)).reshape(*lead, h // k, w // k, k, c)
    return sum(rows[..., j, :] for j in range(k))


class TrainableSubsampling(nn.Module):
    """S2 and S4: each non-overlapping window summed, times a trainable coefficient, plus a
    trainable bias, one pair per feature map (section II-B). Squashing is applied outside.
    The coefficients start drawn like weights, or (``coefficient_init="fixed"``) all at
    the bound of that range."""

    window: int = 2
    initialization: Init = Init()
    coefficient_init: str = "fan_in"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, h, w, c = x.shape
        k = self.window
        if h % k or w % k:
            raise ValueError(f"subsampling window {k} does not tile a {h}x{w} map")
        if self.coefficient_init == "fixed":
            start = nn.initializers.constant(self.initialization.scale / float(k * k) ** self.initialization.exponent)
        elif self.coefficient_init == "fan_in":
            start = self.initialization.weights(k * k)
        else:
            raise ValueError(f"unknown coefficient initialisation {self.coefficient_init!r}; choose from {', '.join(COEFFICIENT_INITS)}")
        coefficient = self.param("coefficient", start, (c,))
        bias = self.param("bias", self.initialization.biases(k * k), (c,))
        return window_sums(x, k) * coefficient + bias


class FixedSubsampling(nn.Module):
    """The modern, parameter-free subsampling: the mean ("average") or the maximum ("max")
    of each non-overlapping window.

    ``squared=True`` is the counterpart the paper's curvature pass applies to squared
    inputs: the average with squared weights (1/16 for 2x2), and for the max the input
    where the true input ``reference`` peaks, with weight 1 (1/n^2 each for n tied maxima,
    which share the gradient equally under autodiff).
    """

    kind: str = "average"
    window: int = 2

    def __call__(self, x: jax.Array, squared: bool = False, reference: jax.Array | None = None) -> jax.Array:
        *lead, h, w, c = x.shape
        k = self.window
        if h % k or w % k:
            raise ValueError(f"subsampling window {k} does not tile a {h}x{w} map")

        def windows(a: jax.Array) -> jax.Array:  # (..., h/k, w/k, c, k*k)
            a = a.reshape(*lead, h // k, k, w // k, k, c)
            return jnp.moveaxis(a, (-4, -2), (-2, -1)).reshape(*lead, h // k, w // k, c, k * k)

        if self.kind == "max":
            if not squared:
                return windows(x).max(axis=-1)
            if reference is None:
                raise ValueError("the squared form of max subsampling needs the true input as reference")
            ref = windows(reference)
            tied = (ref == ref.max(axis=-1, keepdims=True)).astype(x.dtype)
            weight = tied / jnp.sum(tied, axis=-1, keepdims=True)  # what autodiff gives each of n tied maxima
            return jnp.sum(windows(x) * jnp.square(weight), axis=-1)
        if self.kind != "average":
            raise ValueError(f"unknown subsampling {self.kind!r}")
        weight = 1.0 / (k * k)
        return windows(x).sum(axis=-1) * (weight * weight if squared else weight)


class MaskedConv(nn.Module):
    """A 'VALID' convolution with stride 1 whose kernel is multiplied by a fixed 0/1
    connection mask (C3's table I). ``table=None`` connects every input map to every
    output map: that is C1 and C5. Masked kernel entries start at zero, receive zero
    gradient and are not counted as parameters; the fan-in of each output map counts
    only the connections its table row allows (75, 100 or 150 in C3)."""

    features: int
    kernel_size: int = 5
    table: tuple[tuple[int, ...], ...] | None = None
    initialization: Init = Init()
    impl: str = "xla"
    precision: str = "float32"

    def mask(self, n_inputs: int) -> np.ndarray:
        """The (n_inputs, features) connection mask."""
        if self.table is None:
            return np.ones((n_inputs, self.features), np.float32)
        if len(self.table) != self.features:
            raise ValueError(f"connection table has {len(self.table)} rows for {self.features} maps")
        return connection_mask(self.table, n_inputs)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        mask = self.mask(x.shape[-1])
        fan_in = k * k * mask.sum(axis=0)
        weight_init = self.initialization.weights(fan_in)

        def kernel_init(key, shape, dtype=jnp.float32):
            return weight_init(key, shape, dtype) * mask

        kernel = self.param("kernel", kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", self.initialization.biases(fan_in), (self.features,))
        return valid_conv(x, kernel * mask, self.impl, self.precision) + bias


class SeparableConv(nn.Module):
    """A depthwise-separable 'VALID' convolution: one k x k kernel per input map, then a
    1x1 convolution (its connections masked by ``table`` like ``MaskedConv``): the modern
    counterpart of C3 and C5. Both parts are linear, so the paper's curvature pass treats
    them as two layers with no squashing in between."""

    features: int
    kernel_size: int = 5
    table: tuple[tuple[int, ...], ...] | None = None
    initialization: Init = Init()
    precision: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, c = self.kernel_size, x.shape[-1]
        h, w = x.shape[-3:-1]
        depthwise = self.param("depthwise", self.initialization.weights(k * k), (k, k, c))
        ho, wo = h - k + 1, w - k + 1
        y = sum(x[..., i : i + ho, j : j + wo, :] * depthwise[i, j] for i in range(k) for j in range(k))
        mask = np.ones((c, self.features), np.float32) if self.table is None else connection_mask(self.table, c)
        if mask.shape[1] != self.features:
            raise ValueError(f"connection table has {mask.shape[1]} rows for {self.features} maps")
        fan_in = mask.sum(axis=0)
        weight_init = self.initialization.weights(fan_in)
        pointwise = self.param("pointwise", lambda key, shape: weight_init(key, shape) * mask, (c, self.features))
        bias = self.param("bias", self.initialization.biases(fan_in), (self.features,))
        return prec.matmul(y, pointwise * mask, self.precision) + bias


class FullConnection(nn.Module):
    """F6 (and the softmax head): a dense layer with the paper's fan-in initialisation."""

    features: int
    initialization: Init = Init()
    precision: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", self.initialization.weights(fan_in), (fan_in, self.features))
        bias = self.param("bias", self.initialization.biases(fan_in), (self.features,))
        return prec.matmul(x, kernel, self.precision) + bias


class EuclideanRBF(nn.Module):
    """The output layer: y_i = sum_j (x_j - w_ij)^2 with fixed +-1 centres (section II-B).

    The centres are constants (the 7x12 digit bitmaps of ``lenet_jax.bitmaps``), not
    parameters, so no optimiser can move them. The output is a penalty: lower is better.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        centres = jnp.asarray(RBF_CENTRES, x.dtype)
        if x.shape[-1] != centres.shape[-1]:
            raise ValueError(f"the RBF layer needs {centres.shape[-1]} inputs, got {x.shape[-1]}")
        return jnp.sum(jnp.square(x[..., None, :] - centres), axis=-1)
