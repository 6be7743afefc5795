"""LeNet-5 (section II-B), composed from the modules of ``lenet_jax.layers``.

Every trainable layer is followed by the squashing function. The network's *output*
(what the loss and the curvature estimators see) is the squashed F6 vector for the RBF
head, and the logits for the softmax head; its *scores* (``__call__``) are the RBF
penalties (lower is better) or the logits (higher is better).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.layers import (
    C3_TABLE,
    INIT_SCALE,
    EuclideanRBF,
    FullConnection,
    MaskedConv,
    ScaledTanh,
    TrainableSubsampling,
    squash_slope_from_output,
)

HEADS = ("rbf", "softmax")
STAGES = ("C1", "S2", "C3", "S4", "C5", "F6")
"""The trainable layers in order; each is followed by the squashing function."""

Params = Any


class LeNet5(nn.Module):
    """LeNet-5 on a (..., 32, 32, 1) input.

    head: ``"rbf"`` for the paper's Euclidean RBF output with fixed digit bitmaps, or
    ``"softmax"`` for a trainable 84 -> 10 layer read as logits (the modern default).
    init_scale, init_exponent: weights start uniform in +-init_scale / F**init_exponent,
    F the fan-in (2.4 and 1: the paper).
    conv_impl: how C1, C3 and C5 are computed ("patches" or "xla", the same function;
    see ``lenet_jax.layers.valid_conv``).
    """

    head: str = "rbf"
    init_exponent: float = 1.0
    init_scale: float = INIT_SCALE
    conv_impl: str = "patches"

    def setup(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {', '.join(HEADS)}")
        e, s = self.init_exponent, self.init_scale
        self.C1 = MaskedConv(features=6, init_exponent=e, init_scale=s, impl=self.conv_impl)
        self.S2 = TrainableSubsampling(init_exponent=e, init_scale=s)
        self.C3 = MaskedConv(features=16, table=C3_TABLE, init_exponent=e, init_scale=s, impl=self.conv_impl)
        self.S4 = TrainableSubsampling(init_exponent=e, init_scale=s)
        self.C5 = MaskedConv(features=120, init_exponent=e, init_scale=s, impl=self.conv_impl)
        self.F6 = FullConnection(features=84, init_exponent=e, init_scale=s)
        self.squash = ScaledTanh()
        if self.head == "softmax":
            self.output = FullConnection(features=10, init_exponent=e, init_scale=s)
        else:
            self.rbf = EuclideanRBF()

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in STAGES]

    def _apply_stage(self, stage: nn.Module, x: jax.Array) -> jax.Array:
        if stage is self.F6:
            x = x.reshape(x.shape[:-3] + (-1,))  # C5's 1x1x120 maps as a vector
        return stage(x)

    def activations(self, x: jax.Array) -> list[jax.Array]:
        """The squashed output of every stage C1..F6, in order."""
        outs = []
        for stage in self._stages():
            x = self.squash(self._apply_stage(stage, x))
            outs.append(x)
        return outs

    def trace(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The network output and the squashed output of every stage on the way."""
        acts = self.activations(x)
        return (self.output(acts[-1]) if self.head == "softmax" else acts[-1]), acts

    def outputs(self, x: jax.Array) -> jax.Array:
        """What the loss reads: squashed F6 (RBF head) or the logits (softmax head)."""
        return self.trace(x)[0]

    def scores(self, outputs: jax.Array) -> jax.Array:
        """Class scores from ``outputs``: RBF penalties, or the logits unchanged."""
        return outputs if self.head == "softmax" else self.rbf(outputs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scores(self.outputs(x))

    def squared_network(self, x_squared: jax.Array, activations: list[jax.Array]) -> jax.Array:
        """A linear surrogate whose vector-Jacobian product is the paper's diagonal
        second-derivative back-propagation (section II-D / appendix C, Gauss-Newton).

        Apply it with every parameter squared. Each stage then computes L(w^2, x^2) on the
        square of its true input, and between stages the value is replaced by the true
        squared activation while the derivative is scaled by f'(a)^2:
        d2E/da^2 = f'(a)^2 d2E/dx^2, d2E/dx_j^2 = sum_i w_ij^2 d2E/da_i^2 and
        d2E/dw_ij^2 = x_j^2 d2E/da_i^2 (summed over shared connections) are then exactly
        what reverse-mode differentiation computes, without a second hand-written
        backward pass. ``activations`` are those of the real forward pass on x.
        """
        u = x_squared
        for stage, act in zip(self._stages(), activations):
            a = self._apply_stage(stage, u)
            gain = jnp.square(squash_slope_from_output(act, self.squash.amplitude, self.squash.slope))
            u = jax.lax.stop_gradient(jnp.square(act)) + jax.lax.stop_gradient(gain) * (a - jax.lax.stop_gradient(a))
        return self.output(u) if self.head == "softmax" else u


def layer_table(params: Params) -> list[dict[str, Any]]:
    """Per trainable layer: name, output shape, trainable parameters, connections.

    Counts follow the paper: masked C3 kernel entries are not parameters; a connection is
    one multiply-add (or, in S2/S4, one input to a window sum, plus the bias).
    """
    shapes = {"C1": (28, 28, 6), "S2": (14, 14, 6), "C3": (10, 10, 16), "S4": (5, 5, 16), "C5": (1, 1, 120), "F6": (84,)}
    rows = []
    for name in STAGES:
        n = count_parameters({name: params[name]})
        positions = int(np.prod(shapes[name][:-1])) if len(shapes[name]) > 1 else 1
        if name.startswith("S"):
            connections = positions * shapes[name][-1] * 5
        else:
            connections = positions * n
        rows.append({"layer": name, "output": shapes[name], "parameters": n, "connections": connections})
    if "output" in params:
        n = count_parameters(params["output"])
        rows.append({"layer": "output (softmax)", "output": (10,), "parameters": n, "connections": n})
    else:
        rows.append({"layer": "output (RBF)", "output": (10,), "parameters": 0, "connections": 840})
    return rows


def count_parameters(params: Params) -> int:
    """Trainable parameters, not counting C3 kernel entries that its table disconnects."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", None) for k in path]
        if "C3" in keys and keys[-1] == "kernel":
            mask = MaskedConv(features=16, table=C3_TABLE).mask(leaf.shape[2])
            total += int(mask.sum()) * leaf.shape[0] * leaf.shape[1]
        else:
            total += int(np.prod(leaf.shape))
    return total


def init_params(model: LeNet5, key: jax.Array) -> Params:
    """Fresh parameters drawn with the paper's initialisation."""
    return model.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]
