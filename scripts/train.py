r"""Trains (and finally evaluates) Mask R-CNN; resumes automatically from the workdir.

  python scripts/train.py --config=configs/shapes_r18.py --workdir=/tmp/shapes
  python scripts/train.py --config=configs/shapes_r18.py --config.train.num_steps=100 ...
  # Only write (and evaluate) the initial checkpoint 0, e.g. the ImageNet-initialised model:
  python scripts/train.py --config=configs/coco_r50_fpn_1x.py --config.train.num_steps=0 ...

On several hosts (TPU pods, multi-node GPU) run the same command on every host: JAX's
distributed runtime is initialised from the cluster environment (SLURM, Open MPI, Cloud TPU;
--multihost forces or, negated, disables it), or from --coordinator_address, --num_processes
and --process_id, given together (README "Multi-host"). Every host reads the same global
sequence of batches and decodes its slice of each, so a run gives the same losses, and resumes,
on any number of hosts.

  python scripts/train.py ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=0

SIGTERM (a preempted VM, a scheduler) stops training after the current step, checkpoints it
and exits with status 143; running the same command resumes from there.

Config overrides are flags (`--config.train.num_steps=100`); an argument that is not a flag
(e.g. `config.train.num_steps=100`, its `--` missing) is a usage error, as are a --workdir that
is a regular file or cannot be created or written (a file in its path, read-only) or lies in
another run's checkpoints/ folder, a --config file that cannot be opened, and a config that
does not fit (e.g. an image size that is not a multiple of model.size_divisibility), each named
before any work.
Later errors that name what to fix end the run with one line, `error: ...` (exit status 1;
`--verbosity=0` adds the traceback): a config that does not fit the data or the checkpoint
being resumed, data or backbone weights that cannot be read, a damaged checkpoint, a full disk,
a non-finite loss (naming the last checkpoint written), and a --workdir that another train.py is
training in (each run locks a local workdir; a gs:// one has no lock). Ctrl-C
(exit status 130) keeps every complete checkpoint; with several processes, the first Ctrl-C of
one stops them all at a step they all reach, checkpointed (exit status 143), and a second one
stops that process alone, within 10 s. If a process dies (kill -9, out of memory) or stops
alone, the others end at their next collective with one line saying so (exit status 1), not
JAX's traceback and, a minute later, its abort; every complete checkpoint is kept. A process
that reaches no collective within JAX's heartbeat timeout (100 s) of a peer's death (one
compiling a canvas's first step) still ends with JAX's abort (exit status 134).
Relative paths (--workdir, the data's files) are taken from the current folder and a `~` in
them is expanded (a shell leaves `--workdir=~/x` as it is); the config stored with the
checkpoints names the data's absolutely, so eval.py runs from any folder.
"""

import os
import signal
import sys

from absl import app, flags, logging

from mrcnn_jax.programs import launch  # absl and flags only: JAX is imported after parsing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

_CONFIG = launch.define_config_flag("config", "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl, TensorBoard logs.")
launch.define_flags()
flags.adopt_module_key_flags(launch)  # --help lists them too
flags.mark_flag_as_required("config")
launch.mark_paths_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from etils import epath

    config = launch.config_of(_CONFIG)
    workdir = epath.Path(launch.path_flag(_WORKDIR.value, "--workdir"))
    if workdir.exists() and not workdir.is_dir():  # checked before the trainer creates it
        raise app.UsageError(f"--workdir={_WORKDIR.value} is a file, not a folder")
    import jax  # after absl parsed the flags, so XLA_FLAGS etc. set on the command line apply

    from mrcnn_jax.convert import imagenet

    if imagenet.is_release_name(config.model.backbone_weights):
        try:  # before TensorFlow (the trainer's): imported after it, torchvision segfaults
            imagenet.import_torchvision()
        except ImportError:  # no torch: the trainer says so if it needs the weights (a resume
            pass  # does not)
    from mrcnn_jax.programs import trainer

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    launch.initialize()
    from mrcnn_jax.programs import processes
    from mrcnn_jax.train.checkpoint import checkpoint_dir, has_complete_checkpoint

    try:  # before the checks below, which one process alone may fail (its peers would wait)
        processes.check_processes_agree(trainer.agreement_settings(config, workdir))
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    # A config that does not fit is one line naming the field, before any work; after the
    # distributed set-up, as the checks ask JAX for the devices.
    try:
        trainer.check_workdir_outside_checkpoints(workdir)
        trainer.check_train_config(config)
        trainer.check_linked_checkpoints(workdir, config)
        if not has_complete_checkpoint(workdir):  # a fresh run: its weights' sources too
            trainer.check_fresh_start(workdir, config)
            trainer.check_backbone_init(config.model)
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from error
    launch.make_output_folder(workdir, "--workdir")  # e.g. below a file, or read-only
    logging.info(
        "JAX process %d/%d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )

    def kept(where: str) -> str:  # read when the run stops: a fresh run may have none yet
        if has_complete_checkpoint(workdir):  # no collective: a process may be gone
            return (
                f"The complete checkpoints in {checkpoint_dir(workdir)} are kept: run the same "
                f"command{where} to resume from the latest."
            )
        return (
            f"No checkpoint in {checkpoint_dir(workdir)} was complete yet: the same command"
            f"{where} starts again from step 0."
        )

    try:  # Errors naming what to fix, in one line: a config that does not fit the data or the
        # checkpoint, data or weights files that cannot be used, a damaged checkpoint, a full
        # disk (what is kept), a diverging loss, a workdir another run is training in.
        with (
            launch.errors_in_one_line(  # ImportError: a missing extra (torch), named
                ValueError, OSError, ImportError, FloatingPointError, trainer.WorkdirInUseError
            ),
            processes.exit_at_once_if_a_peer_is_lost(lambda: kept(" on every host")),
        ):
            metrics = trainer.train_and_evaluate(config, _WORKDIR.value)
    except trainer.Preempted as preempted:
        print(preempted, flush=True)
        sys.exit(128 + signal.SIGTERM)  # as if SIGTERM had ended it, once the checkpoint is safe
    except KeyboardInterrupt:  # a checkpoint being written was completed (train_and_evaluate)
        print(f"interrupted (Ctrl-C). {kept('')}", file=sys.stderr)
        processes.end_unless_all_stop("Ctrl-C", 128 + signal.SIGINT)
        sys.exit(128 + signal.SIGINT)
    if jax.process_index() == 0:
        print(trainer.final_summary(metrics), flush=True)


if __name__ == "__main__":
    launch.set_up_process()
    launch.run(main, sigterm=False, flags_parser=launch.parse_flags)  # the trainer's SIGTERM
