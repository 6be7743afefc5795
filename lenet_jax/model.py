"""LeNet-5 (section II-B), composed from the modules of ``lenet_jax.layers``.

Every trainable layer is followed by the squashing function. The network's *output*
(what the loss and the curvature estimators see) is the squashed F6 vector for the RBF
head, the logits for the softmax head, and the ten squashed output units for the
squashed head (the authors' Lush demo: C5 feeds them directly, there is no F6); its
*scores* (``__call__``) are the RBF penalties (lower is better), the logits or the
squashed outputs (higher is better).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.inputs import SCALINGS, rescale
from lenet_jax.layers import (
    ACTIVATIONS,
    C3_TABLE,
    COEFFICIENT_INITS,
    EuclideanRBF,
    FixedSubsampling,
    FullConnection,
    Init,
    MaskedConv,
    SeparableConv,
    TrainableSubsampling,
)

HEADS = ("rbf", "softmax", "squashed")
SUBSAMPLINGS = ("trainable", "average", "max")
C3_KINDS = ("table", "dense")
CONVS = ("plain", "separable")
STAGES = ("C1", "S2", "C3", "S4", "C5", "F6")
"""The trainable layers in order; each is followed by the squashing function. The
squashed head has ``output`` (10 units) where the others have F6."""

Params = Any


class LeNet5(nn.Module):
    """LeNet-5 on a (..., 32, 32, 1) input.

    head: ``"rbf"`` for the paper's Euclidean RBF output with fixed digit bitmaps,
    ``"softmax"`` for a trainable 84 -> 10 layer read as logits (the modern default), or
    ``"squashed"`` for ten squashed units fed by C5 directly, no F6 (the authors' Lush
    demo, read against +-1 target codes).
    input_scaling: ``"paper"`` (the input as ``inputs.preprocess`` makes it) or ``"lush"``
    (mapped to pixel x 0.01 on a 0 background first; ``inputs.rescale``).
    coefficient_init: S2/S4's coefficients uniform like weights (``"fan_in"``) or all at
    the bound of that range (``"fixed"``; the Lush code's 0.5).
    initialization: how weights and biases start (``layers.Init``: weights uniform in +-scale /
    F**exponent, F the fan-in, 2.4 and 1 the paper's; biases like their unit's weights or
    zero), passed on to every layer.
    conv_impl: how C1, C3 and C5 are computed ("xla", "patches" or "custom_vjp", the same
    function; see ``lenet_jax.conv``).
    precision: the policy of every matrix product and convolution ("float32", "tf32",
    "bfloat16"; see ``lenet_jax.precision``).

    The modern counterparts of the paper's components, one switch each (the defaults are
    the paper's): ``activation`` ("scaled_tanh", "relu", "selu"), ``subsampling``
    ("trainable", "average", "max"), ``c3`` ("table": table I, "dense": every S2 map),
    ``conv`` ("plain", "separable": depthwise-separable C3 and C5; C1 reads one map,
    where a separable convolution degenerates) and ``dropout`` (the rate on the C5 and
    F6 outputs during training).
    """

    head: str = "rbf"
    initialization: Init = Init()
    conv_impl: str = "patches"
    precision: str = "float32"
    activation: str = "scaled_tanh"
    subsampling: str = "trainable"
    c3: str = "table"
    conv: str = "plain"
    dropout: float = 0.0
    input_scaling: str = "paper"
    coefficient_init: str = "fan_in"

    @property
    def c3_table(self) -> tuple[tuple[int, ...], ...] | None:
        """C3's connection table, None when C3 is dense."""
        return C3_TABLE if self.c3 == "table" else None

    def setup(self) -> None:
        for name, allowed in (("head", HEADS), ("activation", tuple(ACTIVATIONS)), ("subsampling", SUBSAMPLINGS),
                              ("c3", C3_KINDS), ("conv", CONVS), ("input_scaling", tuple(SCALINGS)), ("coefficient_init", COEFFICIENT_INITS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose from {', '.join(allowed)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"the dropout rate must be in [0, 1), got {self.dropout}")
        init = self.initialization
        conv = dict(impl=self.conv_impl, precision=self.precision)
        self.C1 = MaskedConv(features=6, initialization=init, **conv)
        self.S2 = self._subsampling()
        if self.conv == "separable":
            self.C3 = SeparableConv(features=16, table=self.c3_table, precision=self.precision, initialization=init)
            self.C5 = SeparableConv(features=120, precision=self.precision, initialization=init)
        else:
            self.C3 = MaskedConv(features=16, table=self.c3_table, initialization=init, **conv)
            self.C5 = MaskedConv(features=120, initialization=init, **conv)
        self.S4 = self._subsampling()
        if self.head != "squashed":
            self.F6 = FullConnection(features=84, precision=self.precision, initialization=init)
        self.squash = ACTIVATIONS[self.activation]()
        self.drop = nn.Dropout(rate=self.dropout)
        if self.head in ("softmax", "squashed"):
            self.output = FullConnection(features=10, precision=self.precision, initialization=init)
        else:
            self.rbf = EuclideanRBF()

    def _subsampling(self) -> nn.Module:
        if self.subsampling == "trainable":
            return TrainableSubsampling(initialization=self.initialization, coefficient_init=self.coefficient_init)
        return FixedSubsampling(kind=self.subsampling)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The squashed stages in order: C1..C5, then F6 (or the output units of the
        squashed head)."""
        return STAGES[:5] + (("output",) if self.head == "squashed" else ("F6",))

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def _apply_stage(self, i: int, stage: nn.Module, x: jax.Array, squared: bool = False, reference: jax.Array | None = None) -> jax.Array:
        if i == 5:
            x = x.reshape(x.shape[:-3] + (-1,))  # C5's 1x1x120 maps as a vector
        if isinstance(stage, FixedSubsampling):
            return stage(x, squared=squared, reference=reference)
        return stage(x)

    def activations(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """The squashed output of every stage (``stage_names``), in order (with dropout on
        C5 and F6 when ``train``)."""
        outs = []
        x = rescale(x, self.input_scaling)
        for i, (name, stage) in enumerate(zip(self.stage_names, self._stages())):
            x = self.squash(self._apply_stage(i, stage, x))
            if self.dropout and name in ("C5", "F6"):
                x = self.drop(x, deterministic=not train)
            outs.append(x)
        return outs

    def trace(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
        """The network output and the squashed output of every stage on the way."""
        acts = self.activations(x, train)
        return (self.output(acts[-1]) if self.head == "softmax" else acts[-1]), acts

    def outputs(self, x: jax.Array, train: bool = False) -> jax.Array:
        """What the loss reads: squashed F6 (RBF head), the logits (softmax head) or the
        ten squashed outputs (squashed head)."""
        return self.trace(x, train)[0]

    def scores(self, outputs: jax.Array) -> jax.Array:
        """Class scores from ``outputs``: RBF penalties, or the outputs unchanged."""
        return self.rbf(outputs) if self.head == "rbf" else outputs

    def read(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """The class scores and the squashed output of every stage on the way (what the
        demo page shows): one forward pass."""
        outputs, acts = self.trace(x)
        return self.scores(outputs), acts

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Class scores; ``train`` turns dropout on (it needs a "dropout" rng)."""
        return self.scores(self.outputs(x, train))

    def squared_network(self, x: jax.Array, activations: list[jax.Array]) -> jax.Array:
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
        u = jnp.square(rescale(x, self.input_scaling))
        for i, (stage, act) in enumerate(zip(self._stages(), activations)):
            a = self._apply_stage(i, stage, u, squared=True, reference=activations[i - 1] if i else None)
            gain = jnp.square(self.squash.derivative_from_output(act))
            u = jax.lax.stop_gradient(jnp.square(act)) + jax.lax.stop_gradient(gain) * (a - jax.lax.stop_gradient(a))
        return self.output(u) if self.head == "softmax" else u


def layer_table(params: Params, c3_table: tuple[tuple[int, ...], ...] | None = C3_TABLE) -> list[dict[str, Any]]:
    """Per trainable layer: name, output shape, trainable parameters, connections.

    Counts follow the paper: C3 kernel entries that ``c3_table`` disconnects are not
    parameters; a connection is one multiply-add (or, in S2/S4, one input to a window
    sum, plus the bias when the subsampling is trainable).
    """
    shapes = {"C1": (28, 28, 6), "S2": (14, 14, 6), "C3": (10, 10, 16), "S4": (5, 5, 16), "C5": (1, 1, 120), "F6": (84,)}
    squashed_head = "output" in params and "F6" not in params  # C5 feeds the output units directly
    rows = []
    for name in STAGES[:5] if squashed_head else STAGES:
        n = count_parameters({name: params[name]}, c3_table) if name in params else 0
        positions = int(np.prod(shapes[name][:-1])) if len(shapes[name]) > 1 else 1
        if name.startswith("S"):
            connections = positions * shapes[name][-1] * (5 if n else 4)
        else:
            connections = positions * n
        rows.append({"layer": name, "output": shapes[name], "parameters": n, "connections": connections})
    if "output" in params:
        n = count_parameters(params["output"])
        kind = "squashed" if squashed_head else "softmax"
        rows.append({"layer": f"output ({kind})", "output": (10,), "parameters": n, "connections": n})
    else:
        rows.append({"layer": "output (RBF)", "output": (10,), "parameters": 0, "connections": 840})
    return rows


def count_parameters(params: Params, c3_table: tuple[tuple[int, ...], ...] | None = C3_TABLE) -> int:
    """Trainable parameters, not counting C3 kernel entries that ``c3_table`` disconnects
    (pass None for a dense C3)."""
    return sum(_connected(path, leaf, c3_table) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0])


def _connected(path: tuple[Any, ...], leaf: Any, c3_table: tuple[tuple[int, ...], ...] | None) -> int:
    """The entries of one parameter array that are parameters: all of them, but for a C3
    kernel only those ``c3_table`` connects."""
    keys = [getattr(k, "key", None) for k in path]
    if c3_table is not None and "C3" in keys and keys[-1] in ("kernel", "pointwise"):
        mask = MaskedConv(features=16, table=c3_table).mask(leaf.shape[-2])
        return int(mask.sum()) * int(np.prod(leaf.shape[:-2]))
    return int(np.prod(leaf.shape))


COUNTING_RULE = ("multiply-adds are the paper's connections: one per weight and per bias (an input fixed at 1) "
                 "a unit uses; C3 only over the 60 map pairs of its table; S2, S4: 4 inputs x the coefficient + the bias; "
                 "RBF: 84 squared differences a class; squashing not counted")
"""How ``recognition_cost`` counts, in one line (eval.py --summary prints it)."""


class Cost(NamedTuple):
    """The cost of one recognition, the paper's Figs. 11 and 12 (section III-C):
    ``multiply_adds`` (the paper's connections, ``COUNTING_RULE``), the trainable
    ``parameters``, their memory ``parameter_bytes``, and ``held_bytes``, the memory of
    the parameter arrays as the model holds them (the C3 kernel whole, its disconnected
    entries held at zero). The RBF centres are constants and counted in neither."""

    multiply_adds: int
    parameters: int
    parameter_bytes: int
    held_bytes: int


def recognition_cost(params: Params, c3_table: tuple[tuple[int, ...], ...] | None = C3_TABLE) -> Cost:
    """The ``Cost`` of one recognition by the model of ``params`` (arrays or shapes)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return Cost(
        multiply_adds=sum(r["connections"] for r in layer_table(params, c3_table)),
        parameters=count_parameters(params, c3_table),
        parameter_bytes=sum(_connected(path, leaf, c3_table) * np.dtype(leaf.dtype).itemsize for path, leaf in leaves),
        held_bytes=sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for _, leaf in leaves),
    )


def init_params(model: LeNet5, key: jax.Array) -> Params:
    """Fresh parameters drawn with the paper's initialisation."""
    return model.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]
