"""Rejection performance, the paper's Fig. 10 measure (section III-C): the share of test
patterns that must be rejected, the least confident first, to bring the error on the
patterns kept down to 0.5%.

The confidence of a pattern is the margin between its best and second-best score, the
margin ``predict.rank_scores`` gives (for the RBF head the difference of the two smallest
penalties, which the paper uses for LeNet-5; for the softmax and squashed heads the
difference of the two largest probabilities or outputs).

Ties: a rejection rule is a threshold on the margin, so patterns with the same margin are
rejected together or kept together. The rejected counts ``k`` are therefore those at which
the margins, sorted, change value (and 0 and n); the answer does not depend on the order
of the test set. With every margin distinct this is exactly "reject the k least confident".
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.evaluation import in_batches
from lenet_jax.inputs import preprocess
from lenet_jax.predict import rank_scores

TARGET_ERROR = 0.005
"""The paper's Fig. 10 compares classifiers at 0.5% error on the patterns kept."""

MARGINS = {"rbf": "the two smallest RBF penalties", "softmax": "the two largest probabilities", "squashed": "the two largest outputs"}
"""Per head, the two scores whose difference is the margin (``predict.rank_scores``)."""


class RejectionCurve(NamedTuple):
    """Error on the patterns kept against the share rejected, one point per threshold of
    the margin: ``rejected[i]`` patterns rejected (of n), ``share[i] = rejected[i] / n``,
    ``error[i]`` the errors among the ``n - rejected[i]`` kept over their number (0 when
    nothing is kept: nothing kept, nothing wrong)."""

    rejected: np.ndarray
    share: np.ndarray
    error: np.ndarray


class Rejection(NamedTuple):
    """The smallest share of patterns whose rejection brings the error on the rest to
    ``target`` or below: ``rejected`` of ``n`` (``share``), leaving ``error`` on the kept
    ones; ``error_before`` is the error with nothing rejected; ``curve`` the whole curve."""

    target: float
    n: int
    rejected: int
    share: float
    error: float
    error_before: float
    curve: RejectionCurve

    def to_dict(self) -> dict[str, Any]:
        """The figures without the curve (for JSON)."""
        return {"target_error": self.target, "rejected_share": self.share, "rejected": self.rejected, "n": self.n,
                "error_on_kept": self.error, "error_before": self.error_before}


def rejection_curve(margins: Any, predictions: Any, labels: Any) -> RejectionCurve:
    """The error on the kept patterns for every threshold of the margin (section III-C, Fig. 10):
    the patterns of smallest margin rejected first, equal margins together."""
    margins, wrong = _checked(margins, predictions, labels)
    n = len(margins)
    order = np.argsort(margins, kind="stable")
    m = margins[order]
    rejected_wrong = np.concatenate([[0], np.cumsum(wrong[order])])  # errors among the k least confident, k = 0..n
    boundary = np.concatenate([[True], m[1:] != m[:-1], [True]])  # k = 0, n, and k where the sorted margins change
    k = np.nonzero(boundary)[0]
    kept = n - k
    errors_kept = rejected_wrong[-1] - rejected_wrong[k]
    error = np.divide(errors_kept, kept, out=np.zeros(len(k)), where=kept > 0)
    return RejectionCurve(k, k / n, error)


def rejection(margins: Any, predictions: Any, labels: Any, target: float = TARGET_ERROR) -> Rejection:
    """The smallest share of the patterns, rejected least confident (smallest margin) first
    and equal margins together, that leaves an error of at most ``target`` on the rest
    (section III-C, Fig. 10); 0 when the error is already at most ``target``, 1 when only
    rejecting everything does."""
    if not 0 <= target < 1:
        raise ValueError(f"the target error must be in [0, 1), got {target}")
    curve = rejection_curve(margins, predictions, labels)
    i = int(np.argmax(curve.error <= target))  # the first threshold that reaches it; the last (all rejected) always does
    return Rejection(float(target), len(np.asarray(labels)), int(curve.rejected[i]), float(curve.share[i]), float(curve.error[i]),
                     float(curve.error[0]), curve)


def _checked(margins: Any, predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    margins, predictions, labels = (np.asarray(a) for a in (margins, predictions, labels))
    if margins.ndim != 1 or margins.shape != predictions.shape or margins.shape != labels.shape:
        raise ValueError(f"margins, predictions and labels must be 1-d and of one length, got shapes "
                         f"{margins.shape}, {predictions.shape}, {labels.shape}")
    if len(margins) == 0:
        raise ValueError("no patterns: the rejection of an empty set is undefined")
    if not np.all(np.isfinite(margins)):
        raise ValueError("the margins must be finite numbers")
    return margins.astype(np.float64), predictions != labels


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def score_set(params: Any, apply_fn: Callable, images: jax.Array, batch_size: int = 1000) -> jax.Array:
    """The network's scores (N, 10) for uint8 ``images`` (28x28, or padded 32x32), in
    batches under one compiled ``lax.map`` (as ``evaluation.evaluate_arrays``)."""
    batches = in_batches(images, batch_size)
    scores = jax.lax.map(lambda x: apply_fn({"params": params}, preprocess(x)), batches)
    return scores.reshape((-1,) + scores.shape[2:])[: images.shape[0]]


def model_rejection(
    params: Any, apply_fn: Callable, head: str, images: Any, labels: Any, target: float = TARGET_ERROR, batch_size: int = 1000
) -> Rejection:
    """``rejection`` of a model over a set: its scores computed in compiled batches, the
    classes and margins ranked as ``eval.py --image`` reports them (``predict.rank_scores``)."""
    labels = np.asarray(labels)
    return scores_rejection(np.asarray(score_set(params, apply_fn, jnp.asarray(images), min(batch_size, len(labels)))), head, labels, target)


def scores_rejection(scores: np.ndarray, head: str, labels: Any, target: float = TARGET_ERROR) -> Rejection:
    """``rejection`` of a set whose (N, 10) class scores are already computed (as
    ``evaluation.evaluate_arrays`` returns them), ranked as ``model_rejection`` ranks them."""
    classes, _, margins, _ = rank_scores(np.asarray(scores), head)
    return rejection(margins, classes, np.asarray(labels), target)
