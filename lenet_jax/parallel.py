"""Data parallelism: one mesh axis, "data", over every device of every process.

Parameters and optimiser state are replicated; each update's batch is split along "data"
by a sharding constraint inside the compiled update, and XLA inserts the gradient
all-reduce. The same jitted update runs on one device, on several, or on several hosts.

On several hosts (a TPU pod slice, GPU machines) each process runs the same program:
``initialize_distributed`` joins them into one JAX cluster, every process holds the
(small) dataset on its own devices, and each device gathers only its own rows of every
batch inside the compiled update.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lenet_jax.errors import ConfigError, first_line

AXIS = "data"

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
"""Set (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) to launch several processes by hand."""


def cluster_environment(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process launcher these variables describe, or None for a single process:
    a coordinator address given by hand, SLURM or Open MPI with more than one task, or
    the workers of a multi-host Cloud TPU slice."""
    if environ.get(COORDINATOR_ENV):
        return "manual"
    if int(environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", "1")) or 1) > 1:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    if "," in environ.get("TPU_WORKER_HOSTNAMES", ""):
        return "tpu"
    return None


def initialize_distributed(requested: bool = False, environ: Mapping[str, str] = os.environ) -> bool:
    """Join the JAX cluster when ``requested`` (``--distributed``) or when the environment
    describes one; must run before any other JAX call. Returns whether it did. A cluster
    described by halves, or one JAX cannot join, is a ConfigError naming why."""
    kind = cluster_environment(environ)
    if not requested and kind is None:
        return False
    kwargs: dict[str, Any] = {}
    if kind == "manual":
        for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if env not in environ:
                raise ConfigError(f"{COORDINATOR_ENV} is set but {env} is not: set both JAX_NUM_PROCESSES and JAX_PROCESS_ID")
            try:
                kwargs[key] = int(environ[env])
            except ValueError:
                raise ConfigError(f"{env}={environ[env]!r} is not a whole number") from None
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"could not join the JAX cluster ({kind or 'auto-detected'}): {first_line(e, type(e).__name__)}") from None
    return True


def is_primary() -> bool:
    """Whether this process writes logs, metrics and files (process 0)."""
    return jax.process_index() == 0


def data_mesh(n_devices: int = 0) -> Mesh:
    """A 1-d mesh over the first ``n_devices`` devices of the cluster (0: all of them);
    ConfigError for more devices than there are."""
    devices = jax.devices()
    if n_devices < 0 or n_devices > len(devices):
        raise ConfigError(f"--devices {n_devices}: there are {len(devices)} {devices[0].platform} device(s)")
    return Mesh(np.asarray(devices[: n_devices or len(devices)]), (AXIS,))


def choose_devices(batch_size: int, requested: int = 0) -> int:
    """How many devices a run uses: batch size 1 runs on one; otherwise ``requested``
    (0: all devices), which must divide the global batch. Several processes use all.
    A request that cannot be met is a ConfigError naming the option."""
    available = jax.device_count()
    processes = jax.process_count()
    if processes > 1:
        if batch_size == 1:
            raise ConfigError("batch size 1 (the paper's mode) runs on one device: launch it as a single process")
        if requested not in (0, available):
            raise ConfigError(f"--devices {requested}: a run over {processes} processes uses all {available} devices (give 0)")
    n = 1 if batch_size == 1 and requested == 0 else (requested or available)
    if n > available:
        raise ConfigError(f"--devices {n}: there are {available} device(s)")
    if batch_size % n:
        raise ConfigError(
            f"the global batch {batch_size} does not divide evenly over {n} devices; "
            f"use a multiple of {n} for --batch-size, or set --devices"
        )
    return n


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` (host or single-device values, equal on every process) as
    an array replicated over ``mesh``, on one host or many."""
    sharding = replicated(mesh)

    def put(leaf: Any) -> jax.Array:
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def split_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Constrain the leading (batch) axis of ``x`` to be split over the mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(AXIS)))
