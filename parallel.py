"""Where a run's arrays live: joining the hosts, the ("data", "fsdp") mesh, and the shardings of
the state and of each batch.

The default mesh (--fsdp=1) replicates parameters and optimizer state on every device and splits
the global batch over all devices of all hosts; --fsdp=N shards the state over N devices. Each
process loads only its rows and builds the global batch from them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array


AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Join the other processes of a multi-host run; must come before any other JAX call."""
    if coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):  # a multi-host TPU slice
        jax.distributed.initialize()


def make_mesh(fsdp: int, devices: Sequence | None = None) -> Mesh:
    """The ("data", "fsdp") mesh over `devices` (default all of them; budget.py passes a TPU or
    GPU topology's to compile for it)."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"--fsdp={fsdp} must divide the number of devices, {len(devices)}")
    return Mesh(np.array(devices).reshape(-1, fsdp), AXES)


def leaf_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Replicated, or (fsdp > 1) split over "fsdp" along the largest axis it divides."""
    fsdp = mesh.shape["fsdp"]
    axes = [i for i in np.argsort(shape)[::-1] if shape[i] % fsdp == 0 and shape[i] >= fsdp]
    if fsdp == 1 or not axes:
        return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[axes[0]] = "fsdp"
    return NamedSharding(mesh, P(*spec))


def shardings(tree) -> object:
    return jax.tree.map(lambda x: x.sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[grad_accum, micro, ...]: every micro-batch split over all devices."""
    return NamedSharding(mesh, P(None, AXES))


def global_batch(local: dict[str, np.ndarray], grad_accum: int, mesh: Mesh) -> dict[str, Array]:
    """Assemble the global [grad_accum, micro, ...] arrays from each process's rows (data.py's
    row layout: this process's part of each micro-batch, in micro-batch order)."""
    sharding = batch_sharding(mesh)
    out = {}
    for name, rows in local.items():
        rows = rows.reshape(grad_accum, -1, *rows.shape[1:])
        shape = (grad_accum, rows.shape[1] * jax.process_count(), *rows.shape[2:])
        out[name] = jax.make_array_from_process_local_data(sharding, rows, shape)
    return out


def stop_votes(requested: bool, mesh: Mesh) -> Array:
    local = np.full(len(jax.local_devices()), requested)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXES)), local, (mesh.size,))
