"""Evaluation: a model's loss, errors, predictions and confusion matrix over a set of
uint8 images on the device, computed in batches under one compiled ``lax.map``."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.inputs import preprocess
from lenet_jax.losses import Objective


@functools.partial(jax.jit, static_argnames=("apply_fn", "objective", "batch_size"))
def evaluate_arrays(
    params: Any, apply_fn: Callable, images: jax.Array, labels: jax.Array, objective: Objective, batch_size: int = 1000
) -> dict[str, jax.Array]:
    """Summed loss, error count, predictions and the class scores over uint8 ``images``
    (28x28, or padded 32x32), in batches."""
    n = images.shape[0]
    imgs, labs = in_batches(images, batch_size), in_batches(labels, batch_size)

    def one(args):
        x, y = args
        scores = apply_fn({"params": params}, preprocess(x))
        return objective.per_sample(scores, y), objective.predict(scores), scores

    losses, preds, scores = jax.lax.map(one, (imgs, labs))
    losses, preds, scores = losses.reshape(-1)[:n], preds.reshape(-1)[:n], scores.reshape((-1,) + scores.shape[2:])[:n]
    return {"loss": jnp.sum(losses), "errors": jnp.sum(preds != labels), "predictions": preds, "scores": scores}


def in_batches(values: jax.Array, batch_size: int) -> jax.Array:
    """``values`` (N, ...) zero-padded to whole batches and reshaped to (batches, batch_size, ...)."""
    n = values.shape[0]
    nb = -(-n // batch_size)
    padded = jnp.pad(values, ((0, nb * batch_size - n),) + ((0, 0),) * (values.ndim - 1))
    return padded.reshape((nb, batch_size) + values.shape[1:])


def evaluate(params: Any, apply_fn: Callable, images: Any, labels: Any, objective: Objective, batch_size: int = 1000) -> dict[str, Any]:
    """Mean loss, error rate, error count, predictions and confusion matrix (rows: true)."""
    out = evaluate_arrays(params, apply_fn, jnp.asarray(images), jnp.asarray(labels), objective, min(batch_size, len(labels)))
    return summarize_evaluation(out, labels)


def summarize_evaluation(out: dict[str, Any], labels: Any) -> dict[str, Any]:
    """The host-side report of ``evaluate_arrays``' output."""
    preds = np.asarray(out["predictions"])
    labels = np.asarray(labels)
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (labels, preds), 1)
    n = len(labels)
    return {
        "loss": float(out["loss"]) / n,
        "error": int(out["errors"]) / n,
        "errors": int(out["errors"]),
        "n": n,
        "predictions": preds,
        "confusion": confusion,
    }
