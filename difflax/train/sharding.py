"""Data-parallel placement over a ``jax.sharding.Mesh`` with one ``"data"`` axis.

The same code serves one device, all devices of a host, and every device of a
multi-process job (after ``jax.distributed.initialize``): the state is replicated, each
process contributes its local slice of the global batch, and ``jit`` inserts the
gradient all-reduce.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DATA_AXIS", "batch_sharding", "make_mesh", "replicated", "shard_batch"]

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(batch, mesh: Mesh):
    """Assemble global arrays from this process's local slice of the batch."""
    sharding = batch_sharding(mesh)
    size = mesh.devices.size // jax.process_count()

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % size:
            raise ValueError(f"the per-process batch {x.shape[0]} must be divisible by the local device count {size}.")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)
