"""Whether values are finite: one test for the compiled updates (traced), the loaders and
the checkpoints (host arrays)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every floating-point leaf of ``tree`` (jax or numpy arrays,
    traced or not) is finite, as a boolean array (``bool()`` of it on the host). Leaves
    of other types (integers, PRNG keys) hold nothing to be non-finite."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(_dtype(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _dtype(leaf: Any) -> Any:
    dtype = getattr(leaf, "dtype", None)
    return jnp.result_type(leaf) if dtype is None else dtype
