"""Command-line flags that start JAX's distributed runtime, shared by scripts/train.py and eval.py.

`define_flags()` registers `--multihost`, `--coordinator_address`, `--num_processes` and
`--process_id`; `initialize()` (after absl parsed them, before any other JAX call) passes them to
`mrcnn_jax.sharding.initialize_distributed`, turning its ValueErrors into usage errors.
"""

from absl import app, flags

_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags() -> None:
    """Registers the distributed-runtime flags (once per process)."""
    _FLAGS["multihost"] = flags.DEFINE_bool(
        "multihost",
        None,
        "Call jax.distributed.initialize() (default: when a cluster environment is detected).",
    )
    _FLAGS["coordinator_address"] = flags.DEFINE_string(
        "coordinator_address",
        None,
        "host:port of process 0's coordinator (with --num_processes and --process_id).",
    )
    _FLAGS["num_processes"] = flags.DEFINE_integer(
        "num_processes", None, "Number of processes (with --coordinator_address and --process_id)."
    )
    _FLAGS["process_id"] = flags.DEFINE_integer(
        "process_id", None, "This process's index, 0..num_processes-1 (with the other two)."
    )


def initialize() -> None:
    """Starts the distributed runtime as the flags say (imports JAX: call it after parsing)."""
    from mrcnn_jax import sharding

    try:
        sharding.initialize_distributed(**{name: holder.value for name, holder in _FLAGS.items()})
    except ValueError as error:
        raise app.UsageError(str(error)) from error
