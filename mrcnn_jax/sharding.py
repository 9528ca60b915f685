"""Device mesh and data placement shared by every program (training, evaluation, prediction).

One 1-D mesh whose data axis `AXIS` spans every device of every host, process-major: process
`p`'s devices hold rows `[p·b, (p+1)·b)` of each global batch (`b` = global batch / number of
processes), the rows that `mrcnn_jax.data.pipeline` gives that process. Batches are split along
it (`shard_batch`); the train state and model variables are replicated on it (`replicate`).
`initialize_distributed` starts JAX's multi-process runtime (scripts/train.py, scripts/eval.py).
"""

import collections
import errno
import os
import re
import socket
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"

# Environment variables that mark a cluster which `jax.distributed.initialize()` configures itself.
CLUSTER_ENVIRONMENT = (
    "JAX_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


def initialize_distributed(
    multihost: bool | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's distributed runtime when this is one process of several; call it before
    any other JAX call.

    Either all three of `coordinator_address` ("host:port" of process 0, reachable from every
    process), `num_processes` and `process_id` (0 .. num_processes - 1) are given: explicit
    `jax.distributed.initialize(coordinator_address, num_processes, process_id)`; or none, and
    `multihost` decides: True calls `jax.distributed.initialize()` with JAX's cluster
    auto-detection (SLURM, Open MPI, Cloud TPU, ...), False does nothing, None (default) does
    the former when an environment variable of `CLUSTER_ENVIRONMENT` is set. CPU devices of
    several processes communicate over gloo, JAX's default CPU collectives. With several
    processes it then connects all devices (`connect_devices`). With the explicit flags it says
    first, on stderr, that it waits for the processes to connect (JAX waits 5 minutes).

    Raises:
      ValueError: only some of the three are given, they are out of range, or `multihost` is
        False with them; process 0's port is in use on its host (`check_coordinator_port_free`;
        not where `JAX_COORDINATOR_BIND_ADDRESS` names another); the processes have different
        numbers of devices.
    """
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = [name for name in explicit if name not in given]
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together (or none of "
            f"them, for --multihost auto-detection): got {', '.join(f'--{n}' for n in given)} "
            f"without {', '.join(f'--{n}' for n in missing)}"
        )
    if given:
        if multihost is False:
            raise ValueError(
                "--nomultihost contradicts --coordinator_address/--num_processes/--process_id"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})"
            )
        port = coordinator_address.rsplit(":", 1)[1] if ":" in coordinator_address else ""
        if not re.fullmatch("[0-9]{1,5}", port) or not 0 < int(port) < 2**16:
            raise ValueError(
                f"--coordinator_address={coordinator_address!r} must be host:port of process 0 "
                "(a port from 1 to 65535)"
            )
        if process_id == 0 and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
            check_coordinator_port_free(coordinator_address)  # the port JAX binds
        print(  # it waits silently for all processes (5 minutes), then aborts in C++
            f"Process {process_id} of {num_processes}: waiting for every process to connect to "
            f"the coordinator at {coordinator_address} (up to 5 minutes)",
            file=sys.stderr,
            flush=True,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    else:
        if multihost is None:
            multihost = any(name in os.environ for name in CLUSTER_ENVIRONMENT)
        if not multihost:
            return
        jax.distributed.initialize()
    if jax.process_count() > 1:
        connect_devices()


def check_coordinator_port_free(coordinator_address: str) -> None:
    """Raises ValueError where the port of `coordinator_address` ("host:port") is taken on this
    host, where process 0 serves JAX's coordination service (on every interface, as JAX
    binds it). gRPC shares a port between servers, so a second process 0 (the same command
    started twice, a run launched twice on one address) served beside the first: the processes
    of two runs then joined each other's, and the spare process 0 waited 5 minutes, then
    aborted in C++.

    Raises:
      ValueError: a socket listens on that port (any address), naming the flag and the port.
    """
    port = int(coordinator_address.rsplit(":", 1)[1])
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAITs
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both stacks
                probe.bind((host, port))
            return
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise ValueError(
                    f"--coordinator_address={coordinator_address}: port {port} is in use on "
                    "this host, where process 0 serves the run: by another run's process 0, "
                    "this run's started twice (one --process_id=0 per run), or another "
                    "program. Give each run a free port"
                ) from None
            # Another failure (no IPv6 here): the next family, else JAX's own error.


def connect_devices() -> None:
    """Runs one all-reduce over the mesh of `create_mesh()`, which connects its devices.

    Called by `initialize_distributed` while the processes are still in step (initialisation
    is a barrier). The communicators of a device group are made on its first collective and
    then kept for later programs; on CPU (gloo) every process must reach that first collective
    within 30 s of the others, which the first train step, reached after a compilation whose
    time differs between processes (a persistent-cache hit on one, not another), need not.
    Later collectives wait up to 30 minutes.

    Raises:
      ValueError: the processes have different numbers of devices (`check_equal_slices`).
      RuntimeError: the all-reduce did not count every device.
    """
    check_equal_slices(jax.devices())
    mesh = create_mesh()
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P(AXIS)), np.ones(jax.local_device_count(), np.int32)
    )
    count = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(x, AXIS), mesh=mesh, in_specs=P(AXIS), out_specs=P())
    )(ones)
    count = int(np.asarray(count.addressable_data(0))[0])
    if count != jax.device_count():
        raise RuntimeError(f"an all-reduce over {jax.device_count()} devices counted {count}")


def check_equal_slices(devices: Sequence[jax.Device]) -> None:
    """Every process must hold as many of `devices` (all hosts') as the others: each feeds an
    equal slice of every global batch (jax.make_array_from_process_local_data failed with
    "Unable to compute global_shape due to non-uniform sharding").

    Raises:
      ValueError: naming each process's device count.
    """
    counts = collections.Counter(d.process_index for d in devices)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
        raise ValueError(
            f"every process must have the same number of devices ({listed}): see each host's "
            "JAX_PLATFORMS, CUDA_VISIBLE_DEVICES or XLA_FLAGS' "
            "--xla_force_host_platform_device_count"
        )


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with data axis `AXIS` over `devices` (default: all devices of all hosts),
    ordered by process (stably: a process's devices keep their order), so that each process's
    devices are one contiguous block of the batch axis."""
    devices = jax.devices() if devices is None else devices
    devices = sorted(devices, key=lambda d: d.process_index)
    return Mesh(np.asarray(devices), (AXIS,))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Turns this host's numpy batch into global arrays split along the batch axis.

    On one host `batch` is the global batch; on several hosts each passes its local part, rows
    `[p·b, (p+1)·b)` of the global batch for process `p`, as `mrcnn_jax.data.pipeline` yields it.
    """
    sharding = NamedSharding(mesh, P(AXIS))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (e.g. the train state) on every device of `mesh`, replicated.

    Do this once before the first step: the step's outputs are replicated on the mesh, and an
    input placed differently would make the second call recompile. With several processes each
    passes its own copy (the same values everywhere, e.g. restored from the same checkpoint):
    arrays on this process's devices go through host memory, as JAX moves no data between
    hosts in `device_put`.

    The result may share buffers with `tree` (on one device it is `tree`'s own arrays): the
    train step donates its state, so after the first step `tree`'s arrays are deleted. Keep a
    copy (`jax.tree_util.tree_map(jnp.copy, tree)`, or host `jax.device_get(tree)`) to start
    from the same state again.
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() > 1:
        tree = jax.tree_util.tree_map(_host_copy, tree)
    return jax.device_put(tree, sharding)


def _host_copy(x):
    """A numpy copy of an array on this process's devices; anything else as it is."""
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return np.asarray(x)
    return x
