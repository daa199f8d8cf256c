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
from jax.experimental import mesh_utils
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
    GPU topology's to compile for it), laid out by mesh_utils along the chips' interconnect, so
    that "fsdp"'s collectives run between neighbours. Devices of several TPU slices (multislice)
    get a hybrid mesh: "data" spans the slices over the data-center network, "fsdp" stays inside
    a slice."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"--fsdp={fsdp} must divide the number of devices, {len(devices)}")
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        per_slice = len(devices) // slices
        if per_slice % fsdp:
            raise ValueError(f"--fsdp={fsdp} must divide the {per_slice} devices of one slice "
                             f"({slices} slices): the state is not sharded across slices")
        grid = mesh_utils.create_hybrid_device_mesh((per_slice // fsdp, fsdp), (slices, 1), devices)
    else:
        grid = mesh_utils.create_device_mesh((len(devices) // fsdp, fsdp), devices)
    return Mesh(grid, AXES)


def check_batch(batch_size: int, grad_accum: int, devices: int) -> None:
    """Raise, in one line naming the flags that fix it, unless each micro-batch of
    `batch_size / grad_accum` rows splits evenly over `devices` (batch_sharding's "data" x "fsdp":
    every device takes the same number of rows). Checked before anything compiles: otherwise the
    first step fails with a raw sharding error after the whole setup."""
    micro = batch_size // grad_accum
    if micro % devices == 0:
        return
    fixes = [f"--grad_accum={a}" for a in range(grad_accum - 1, 0, -1)
             if batch_size % a == 0 and (batch_size // a) % devices == 0][:1]
    rows = devices * grad_accum * -(-micro // devices)  # the next batch that splits with this --grad_accum
    fixes.append(f"--batch_size={rows} --grad_accum={grad_accum}")
    raise ValueError(f"--batch_size={batch_size} --grad_accum={grad_accum} makes micro-batches of {micro} rows, "
                     f"which do not split over {devices} devices: use {' or '.join(fixes)}")


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
