"""Device mesh and data placement shared by every program (training, evaluation, prediction).

One 1-D mesh whose data axis `AXIS` spans every device of every host. Batches are split along
it (`shard_batch`); the train state and model variables are replicated on it (`replicate`).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"


def create_mesh(devices=None) -> Mesh:
    """A 1-D mesh with data axis `AXIS` over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Turns this host's numpy batch into global arrays split along the batch axis.

    On one host `batch` is the global batch; on several hosts each passes its local part (in
    process order), as `mrcnn_jax.data.pipeline` yields it.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def replicate(tree, mesh: Mesh):
    """Places a pytree (e.g. the train state) on every device of `mesh`, replicated.

    Do this once before the first step: the step's outputs are replicated on the mesh, and an
    input placed differently would make the second call recompile.
    """
    return jax.device_put(tree, NamedSharding(mesh, P()))
