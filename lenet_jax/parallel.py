"""Data parallelism: one mesh axis, "data", over the local devices.

Parameters and optimiser state are replicated; each step's batch is split along "data"
by a sharding constraint inside the compiled step, and XLA inserts the gradient
all-reduce. The same jitted step runs on one device or many.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def data_mesh(n_devices: int = 0) -> Mesh:
    """A 1-d mesh over the first ``n_devices`` local devices (0: all of them)."""
    devices = jax.local_devices()
    if n_devices < 0 or n_devices > len(devices):
        raise ValueError(f"--devices {n_devices}: this host has {len(devices)} {devices[0].platform} device(s)")
    return Mesh(np.asarray(devices[: n_devices or len(devices)]), (AXIS,))


def choose_devices(batch_size: int, requested: int = 0) -> int:
    """How many devices a run uses: batch size 1 runs on one; otherwise ``requested``
    (0: all local devices), which must divide the global batch."""
    available = len(jax.local_devices())
    n = 1 if batch_size == 1 and requested == 0 else (requested or available)
    if n > available:
        raise ValueError(f"--devices {n}: this host has {available} device(s)")
    if batch_size % n:
        raise ValueError(
            f"the global batch {batch_size} does not divide evenly over {n} devices; "
            f"use a multiple of {n} for --batch-size, or set --devices"
        )
    return n


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def split_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Constrain the leading (batch) axis of ``x`` to be split over the mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(AXIS)))
