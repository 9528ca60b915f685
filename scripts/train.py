r"""Trains (and finally evaluates) Mask R-CNN; resumes automatically from the workdir.

  python scripts/train.py --config=configs/shapes_r18.py --workdir=/tmp/shapes
  python scripts/train.py --config=configs/shapes_r18.py --config.train.num_steps=100 ...

On several hosts (TPU pods, multi-node GPU) run the same command on every host: JAX's
distributed runtime is initialised from the environment and each host feeds its own shard.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard logs.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    None,
    "Call jax.distributed.initialize() (default: when a cluster environment is detected).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax  # after absl parsed the flags, so XLA_FLAGS etc. set on the command line apply

    from mrcnn_jax.programs import trainer

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    multihost = _MULTIHOST.value
    if multihost is None:
        multihost = any(
            v in os.environ
            for v in (
                "JAX_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES",
                "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE",
            )
        )
    if multihost:
        jax.distributed.initialize()
    logging.info(
        "JAX process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    metrics = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if jax.process_index() == 0:
        print(trainer.final_summary(metrics), flush=True)


if __name__ == "__main__":
    app.run(main)
