"""Loss functions (section II-C and appendix B) and the curvature of each at the network's output.

``Objective`` bundles the head (RBF or softmax), the criterion (MAP, MSE, cross-entropy)
and the MAP constant j. Every function is per sample: the caller takes the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from lenet_jax import precision as prec
from lenet_jax.bitmaps import RBF_CENTRES
from lenet_jax.errors import ConfigError

LOSSES = ("map", "mse", "xent", "edist")

DEFAULT_J = 20.0
"""The MAP criterion's constant j (not given in the paper; this project's choice, see README)."""


def map_loss(penalties: jax.Array, labels: jax.Array, j: float = DEFAULT_J) -> jax.Array:
    """E = y_correct + log(exp(-j) + sum_i exp(-y_i)) per sample (appendix B, eq. 9),
    the log-sum-exp taken stably so that huge penalties stay finite."""
    y_correct = jnp.take_along_axis(penalties, labels[..., None], axis=-1)[..., 0]
    rubbish = jnp.full(penalties.shape[:-1] + (1,), -j, penalties.dtype)
    return y_correct + jax.nn.logsumexp(jnp.concatenate([-penalties, rubbish], axis=-1), axis=-1)


def mse_loss(penalties: jax.Array, labels: jax.Array) -> jax.Array:
    """E = y_correct per sample (section II-C): pulls F6 towards the right bitmap only."""
    return jnp.take_along_axis(penalties, labels[..., None], axis=-1)[..., 0]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """-log softmax(logits)[label] per sample, for the modern softmax head."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]


def target_codes(labels: jax.Array, n: int = 10, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The +-1 code of each label: +1 for its class, -1 for the others (the Lush demo's
    ``targets`` table, ``lenet5.lsh`` lines 88-97)."""
    return 2.0 * jax.nn.one_hot(labels, n, dtype=dtype) - 1.0


def edist_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """E = 0.5 sum_k (y_k - t_k)^2 per sample, t the +-1 code of the label: the half
    squared Euclidean distance of Lush's ``edist-cost`` (``gb-modules.lsh`` 894-961)."""
    return 0.5 * jnp.sum(jnp.square(outputs - target_codes(labels, outputs.shape[-1], outputs.dtype)), axis=-1)


def _softmax_factor(p: jax.Array) -> jax.Array:
    """Rows sqrt(p_k) (e_k - p): their Gram matrix is diag(p) - p p^T (softmax Hessian)."""
    eye = jnp.eye(p.shape[-1], dtype=p.dtype)
    return jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])


@dataclass(frozen=True)
class Objective:
    """What is minimised: ``head`` in {"rbf", "softmax", "squashed"}, ``loss`` "map" or
    "mse" for the RBF head, "xent" for the softmax head, "edist" for the squashed head,
    and the MAP constant ``j``; ``precision`` is the policy of the products in its output
    curvature. This is the one place where a head and a loss are checked to go together."""

    head: str = "rbf"
    loss: str = "map"
    j: float = DEFAULT_J
    precision: str = "float32"
    rbf_curvature: str = "gauss_newton"
    """The RBF head's output curvature for SDLM: its Gauss-Newton value (the default), or the
    constant 2 per F6 output of the correct class's penalty alone (``"constant"``)."""

    def __post_init__(self) -> None:
        allowed = {"rbf": ("map", "mse"), "softmax": ("xent",), "squashed": ("edist",)}
        if self.head not in allowed:
            raise ConfigError(f"unknown head {self.head!r}; choose from {', '.join(allowed)}")
        if self.loss not in allowed[self.head]:
            raise ConfigError(f"the {self.head} head takes loss {' or '.join(allowed[self.head])}, not {self.loss!r}")
        if self.loss == "map" and not self.j > 0:
            raise ConfigError(f"the MAP constant j must be positive, got {self.j}")
        if self.rbf_curvature not in ("gauss_newton", "constant"):
            raise ConfigError(f"unknown RBF curvature {self.rbf_curvature!r}; choose from gauss_newton, constant")
        if self.rbf_curvature == "constant" and self.head != "rbf":
            raise ConfigError(f"--rbf-curvature constant is the RBF head's; the {self.head} head has no RBF layer")

    def per_sample(self, scores: jax.Array, labels: jax.Array) -> jax.Array:
        """The loss of each sample from its scores (RBF penalties or logits)."""
        if self.loss == "map":
            return map_loss(scores, labels, self.j)
        if self.loss == "mse":
            return mse_loss(scores, labels)
        if self.loss == "edist":
            return edist_loss(scores, labels)
        return softmax_cross_entropy(scores, labels)

    def predict(self, scores: jax.Array) -> jax.Array:
        """The predicted class: smallest penalty (RBF), largest logit (softmax) or largest
        squashed output (squashed: the nearest +-1 code, all codes being equally long)."""
        return jnp.argmin(scores, -1) if self.head == "rbf" else jnp.argmax(scores, -1)

    def curvature_factor(self, outputs: jax.Array, label: jax.Array) -> jax.Array:
        """A matrix C (K x D) with C^T C the Gauss-Newton curvature of one sample's loss
        w.r.t. the network output (F6 for RBF, logits for softmax), always PSD.

        RBF: the y_correct term has exact curvature 2 per F6 output (rows sqrt(2) e_j).
        The MAP log-sum-exp term contributes its Gauss-Newton part J^T H J, J the
        Jacobian of the 10 penalties w.r.t. F6 and H the Hessian of the log-sum-exp
        w.r.t. the penalties (PSD: a softmax over the 10 classes and the j slot); its
        negative part, sum_i dE/dy_i d2y_i/dx^2, is dropped.
        Softmax: the exact Hessian of cross-entropy w.r.t. the logits.
        Squashed: the exact Hessian of 0.5 |y - t|^2 w.r.t. the outputs, the identity
        (what Lush's ``edist-cost`` bbprop passes down: 1 per output).
        With ``rbf_curvature="constant"`` the RBF head passes down the constant 2 per F6
        output of the correct class's penalty alone, whatever the outputs.
        """
        if self.head == "softmax":
            return _softmax_factor(jax.nn.softmax(outputs))
        if self.head == "squashed":
            return jnp.eye(outputs.shape[-1], dtype=outputs.dtype)
        dim = outputs.shape[-1]
        quadratic = jnp.sqrt(2.0) * jnp.eye(dim, dtype=outputs.dtype)
        if self.loss == "mse" or self.rbf_curvature == "constant":
            return quadratic
        centres = jnp.asarray(RBF_CENTRES, outputs.dtype)
        diff = outputs[None, :] - centres
        penalties = jnp.sum(diff * diff, -1)
        p = jax.nn.softmax(jnp.concatenate([-penalties, jnp.array([-self.j], outputs.dtype)]))
        factor = _softmax_factor(p)[:, :10]
        jac = 2.0 * diff
        return jnp.concatenate([quadratic, prec.matmul(factor, jac, self.precision)], axis=0)
