r"""Exports a training checkpoint as a TensorFlow SavedModel (preprocessing, model, postprocessing).

  python scripts/export.py --workdir=/tmp/mrcnn_shapes --out=/tmp/mrcnn_shapes_savedmodel

The SavedModel needs only TensorFlow to run: `tf.saved_model.load(OUT).signatures[
"serving_default"](image=uint8 [H, W, 3])` gives the detections in the image's pixels, and
`"serving_batch"` takes padded batches. See `mrcnn_jax/programs/exporter.py` for the signatures,
their outputs and the saved assets. --out must be absent or empty (and a local one is locked
while it is written: a second export into it is refused); a SavedModel that cannot
be written (a full disk) ends the run with `error: writing the SavedModel to <out> failed
(<reason>); ...`, exit status 1, and --out as it was (what was written is removed); so does a
Ctrl-C (exit status 130) or SIGTERM (143).
"""

import os
import sys

from absl import app, flags, logging

from mrcnn_jax.programs import launch

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir holding checkpoints/ (or its checkpoints/ or checkpoints/<step> folder).",
)
_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to export (default: the latest)."
)
_OUT = flags.DEFINE_string("out", None, "The SavedModel directory to create (absent or empty).")
_PLATFORMS = flags.DEFINE_list(
    "platforms",
    ["cpu"],
    "Platforms to compile the model for, comma-separated, of cpu, cuda, rocm, tpu; one "
    "SavedModel holds them all and TensorFlow runs the one of the device it is placed on.",
)
_FULL_MASKS = flags.DEFINE_bool(
    "full_masks",
    False,
    "Also output `full_masks`, bool [N, H, W] masks pasted into the image as the config's "
    "model.roi_heads.mask_paste says (besides the 28x28 probabilities `masks`).",
)
_SCORE_THRESHOLD = flags.DEFINE_float(
    "score_threshold",
    0.5,
    "The signatures return detections scoring at least this (0..1; the model returns none at "
    "or below its config.model.roi_heads.score_threshold, 0.05 by default); the saved "
    "functions `detect`/`detect_batch` take it as an optional input with this default.",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    1,
    "Static batch of the model inside `serving_batch` (batches of any size run in chunks of "
    "it, the last one padded); larger suits accelerators.",
)
launch.mark_paths_required(["workdir", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported after absl parsed the flags, so XLA_FLAGS etc. set on the command line apply.
    from mrcnn_jax.programs import exporter

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:  # before the checkpoint is read, naming the flags
        exporter.check_arguments(
            _PLATFORMS.value, _SCORE_THRESHOLD.value, _BATCH_SIZE.value, prefix="--"
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    out_dir = launch.path_flag(_OUT.value, "--out")
    # Made before the model is read and converted; removed again if the export fails.
    with launch.new_output_folder(out_dir, "--out"):
        try:
            out = exporter.export_saved_model(
                _WORKDIR.value,
                out_dir,
                checkpoint_step=_STEP.value,
                platforms=_PLATFORMS.value,
                full_masks=_FULL_MASKS.value,
                score_threshold=_SCORE_THRESHOLD.value,
                batch_size=_BATCH_SIZE.value,
            )
        except exporter.ExportWriteError as error:  # e.g. a full disk: where, why, nothing left
            sys.exit(f"error: {error}")
        except (ValueError, FileExistsError, FileNotFoundError) as error:  # name what to fix
            raise app.UsageError(str(error)) from error
    size = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(out)
        for name in names
    )
    print(f"SavedModel ({size / 2**20:.1f} MiB, {','.join(_PLATFORMS.value)}) -> {out}", flush=True)


if __name__ == "__main__":
    launch.set_up_process()
    launch.run(main)
