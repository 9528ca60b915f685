r"""Evaluates a training checkpoint with COCO metrics (bbox and segm) on a split.

  python scripts/eval.py --workdir=/tmp/mrcnn_shapes
  python scripts/eval.py --workdir=/tmp/mrcnn_shapes --checkpoint_step=2000 --split=train

--workdir is a training workdir (its latest checkpoint is evaluated), its `checkpoints/` folder
or one `checkpoints/<step>` folder. The model, its variables and the config (dataset included)
come from the checkpoint; so does the image limit of the training's evaluations,
`config.eval.max_images` (said when it applies; --max_images overrides it, 0: the whole split).
Prints the 12 COCO numbers per IoU type and writes
`<workdir>/eval_<step>.json` (the metrics) and `<workdir>/detections_<step>.json` (the
detections, COCO results format), `<workdir>` being the training workdir also when --workdir
names a checkpoint folder in it; with a --split other than the config's val split, the file
names end in `_<split>` (each run of characters other than letters, digits, `.` and `-` becomes
one `_`: `--split='validation[:16]'` gives `eval_<step>_validation_16_.json`).
--out_dir writes them elsewhere (a read-only workdir: checked before the model loads). A file that
cannot be written after all (a full disk) ends the run with `error: cannot write <file>:
<reason>`, exit status 1, and no partial file; so does a Ctrl-C (`interrupted (Ctrl-C)`, exit
status 130, nothing written) or SIGTERM (`terminated (SIGTERM)`, 143). Each file appears whole
or not at all (a killed run leaves the earlier one), the detections after the scoring. Each
detection has a `bbox` and a `segmentation`: to reproduce the segm numbers with pycocotools,
drop the `bbox`es before `COCO.loadRes` (as this script and Detectron2 do: the size ranges then
use the masks' areas, not the boxes'). The dataset's categories must be the model's: a
dataset rebuilt from an edited annotation file (a category added, its ids changed) is a usage
error naming the categories the model lacks (categories that no annotation uses only warn:
they are not scored). A --workdir without a complete checkpoint (or
without the --checkpoint_step one) is a usage error; so is a --checkpoint_step (or checkpoint
folder) that is not a complete checkpoint, e.g. after an interrupted copy (the message names
what it lacks), while the latest one is looked for among the complete ones only (a later
incomplete folder is skipped with a warning).

--json=FILE --images=FOLDER evaluates a COCO-format annotation file instead, all its images
(e.g. a held-out test set; built like configs/coco_format.py's splits, into the config's data
dir): its category ids must be the model's, and a json none of whose names is the model's for
the same id is refused (its ids mean other classes), and so is one naming the model's classes
under other ids (another export of the same labels). The files are named
`eval_<step>_<json name>.json` and record the json's path; results there of another json of
the same name (or of a split of that name) are not overwritten: a usage error asks for another
--out_dir.

On several hosts run the same command on every host, as scripts/train.py (the same
--multihost, --coordinator_address, --num_processes, --process_id flags; README "Multi-host"):
each host evaluates its shard of the split, the predictions are gathered, and process 0 writes
the files. Processes that would evaluate another checkpoint or split, or write elsewhere, stop
first with one usage error naming the process and the flag's values. A process interrupted or
failing alone ends within 10 s, and the others at their next exchange with it, naming it
(`error: process 1 of this run stopped without the others (SIGTERM) ...`; nothing written).
"""

import json
import re
import sys
from typing import TYPE_CHECKING

from absl import app, flags, logging

from mrcnn_jax.evaluation import IOU_TYPES, STAT_NAMES, output
from mrcnn_jax.programs import launch

if TYPE_CHECKING:
    from etils import epath

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir holding checkpoints/ (or its checkpoints/ or checkpoints/<step> folder); "
    "the results are written into the workdir unless --out_dir is given.",
)
_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to evaluate (default: the latest)."
)
_SPLIT = flags.DEFINE_string(
    "split",
    None,
    "TFDS split to evaluate, e.g. 'validation[:50]' (default: config.data.val_split).",
)
_JSON = flags.DEFINE_string(
    "json",
    None,
    "A COCO-format annotation json to evaluate instead of the config's dataset (e.g. a held-out "
    "test set; with --images, its image folder), all its images unless --max_images: its "
    "category ids must be the model's, with the same names (case, _ and spaces aside) for at "
    "least one, and none of the model's names under another id. The result files end in "
    "_<json name> and record its path (another json's results of that name are not "
    "overwritten).",
)
_IMAGES = flags.DEFINE_string("images", None, "The image folder of --json's file_names.")
_MAX_IMAGES = flags.DEFINE_integer(
    "max_images",
    None,
    "Evaluate only the first N images of the split, in the order of the built dataset (TFDS's, "
    "not a json's: eval_<step>.json lists their image_ids); 0: all of them (default: the "
    "checkpoint's config.eval.max_images, the limit of the training's evaluations, which is "
    "said when it applies; with --json: all).",
    lower_bound=0,
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir",
    None,
    "Folder for eval_<step>.json and detections_<step>.json (default: the training workdir); "
    "created if missing.",
)
launch.define_flags()
flags.adopt_module_key_flags(launch)  # --help lists them too
launch.mark_paths_required(["workdir"])


def metrics_table(metrics: dict[str, float]) -> str:
    """The `{"bbox/AP": ...}` metrics as a table: one row per IoU type, one column per number."""
    rows = [" " * 5 + "".join(f"{name:>7}" for name in STAT_NAMES)]
    for iou_type in IOU_TYPES:
        rows.append(
            f"{iou_type:<5}" + "".join(f"{metrics[f'{iou_type}/{n}']:7.3f}" for n in STAT_NAMES)
        )
    return "\n".join(rows)


def with_json_split(data, json_path: str, images: str):
    """`data` (a checkpoint's `config.data`) reading the COCO-format `json_path` and `images`
    as its val split, a `coco_format` dataset of that split alone."""
    from mrcnn_jax import paths

    data = data.copy_and_resolve_references()
    data.dataset = "coco_format"
    data.train_json = data.train_images = ""
    data.val_json, data.val_images = paths.absolute(json_path), paths.absolute(images)
    data.val_split = "validation"
    return data


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_JSON.value) != bool(_IMAGES.value):
        raise app.UsageError("--json and --images go together: the json and its image folder")
    if _JSON.value and _SPLIT.value:
        raise app.UsageError(
            f"--split={_SPLIT.value} picks a split of the config's dataset: with --json the json "
            "is what is evaluated"
        )
    import jax  # after absl parsed the flags, so XLA_FLAGS etc. set on the command line apply
    from etils import epath

    from mrcnn_jax import paths, sharding
    from mrcnn_jax.data import coco_json, get_builder, pipeline
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from mrcnn_jax.programs import evaluator, processes
    from mrcnn_jax.programs import predictor as predictor_lib

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    launch.initialize()
    # before the checkpoint loads: a URL etils cannot open, or whose storage does not answer
    launch.path_flag(_WORKDIR.value, "--workdir")
    json_path, images_path, out_path = (
        launch.path_flag(holder.value, f"--{holder.name}") if holder.value else ""
        for holder in (_JSON, _IMAGES, _OUT_DIR)
    )
    try:  # before each process looks for a checkpoint that process 0 may not have named
        processes.check_processes_agree(
            {
                "workdir": str(epath.Path(paths.absolute(_WORKDIR.value))),  # no storage call
                "checkpoint_step": "latest" if _STEP.value is None else _STEP.value,
            }
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    try:  # a checkpoint folder names its workdir, where the results go
        workdir, located = predictor_lib.locate_checkpoint(_WORKDIR.value, _STEP.value)
        found = str(located)
    except (ValueError, FileNotFoundError) as error:  # name what to fix
        found = f"error: {error}"
    # The latest when no step is named, also after a training deleted the located one; with
    # several processes, process 0's (a training may write one between their reads), and one
    # process that found none (e.g. a local disk per host) stops them all.
    everyone = processes.gather_texts(found) if jax.process_count() > 1 else [found]
    failed = [(i, text) for i, text in enumerate(everyone) if text.startswith("error: ")]
    if failed:
        i, text = failed[0]
        raise app.UsageError(
            text[len("error: ") :] + (f" (process {i})" if len(everyone) > 1 else "")
        )
    step = _STEP.value if len(everyone) == 1 else int(everyone[0])
    out_dir = epath.Path(out_path) if out_path else workdir
    out_flag = "--out_dir" if _OUT_DIR.value else "the workdir; --out_dir writes elsewhere"
    if jax.process_index() == 0 and out_dir.exists():  # one it cannot write (a read-only
        launch.make_output_folder(out_dir, out_flag)  # workdir): before the model loads
    try:
        predictor = predictor_lib.load_checkpoint(_WORKDIR.value, step)
    except (ValueError, FileNotFoundError) as error:  # name what to fix
        raise app.UsageError(str(error)) from error
    config = predictor.config
    if _JSON.value:  # all its images unless --max_images: the training's limit is not its
        config.data = with_json_split(config.data, json_path, images_path)
        config.eval.max_images = 0
    if _MAX_IMAGES.value is not None:
        config.eval.max_images = _MAX_IMAGES.value
    split = _SPLIT.value or config.data.val_split
    try:  # several processes given other flags would wait for each other forever
        processes.check_processes_agree(
            {
                "checkpoint": str(workdir / "checkpoints" / str(predictor.step)),
                "split": split,
                "json": config.data.val_json if _JSON.value else "",
                "max_images": config.eval.max_images,
                "out_dir": str(out_dir),
            }
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    evaluated = ("json", config.data.val_json) if _JSON.value else ("split", split)
    suffix = str(predictor.step)
    if _JSON.value:
        suffix += "_" + re.sub(r"[^\w.-]+", "_", epath.Path(_JSON.value).stem)
    elif split != config.data.val_split:
        suffix += "_" + re.sub(r"[^\w.-]+", "_", split)
    with launch.errors_in_one_line(ValueError, OSError):  # the data's files, named
        builder = get_builder(config.data, pipeline.split_names(split))  # only those it reads
    if error := pipeline.split_error(builder, split):
        raise app.UsageError(f"--split={split!r} {error}")
    scored = pipeline.eval_split(config, builder, split)
    num_images = builder.info.splits[scored].num_examples
    in_split = builder.info.splits[split].num_examples
    images = f"{num_images} images"
    if num_images < in_split:
        flag = "--max_images" if _MAX_IMAGES.value else "the checkpoint's config.eval.max_images"
        images = f"the first {num_images} of its {in_split} images ({flag}; --max_images=0: all)"

    def annotated_ids() -> set[int]:  # only asked for when the model lacks a category
        annotations = coco_json.coco_ground_truth(builder, split)["annotations"]
        return {a["category_id"] for a in annotations}

    try:  # another json's ids must name the model's classes
        evaluator.check_dataset_classes(
            config, builder, strict_names=bool(_JSON.value), annotated_ids=annotated_ids
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    results_path, metrics_path = (out_dir / f"{n}_{suffix}.json" for n in ("detections", "eval"))
    if other := _results_of_other_data(metrics_path, evaluated):
        raise app.UsageError(
            f"{metrics_path} holds the results of {other}, not of {' '.join(evaluated)}: "
            "give another --out_dir to keep both"
        )
    if jax.process_index() == 0:  # made after the other checks: none is left by a refusal
        launch.make_output_folder(out_dir, out_flag)
    mesh = sharding.create_mesh()
    lost = "Nothing was written: run the same command on every host again."
    try:  # a ValueError (e.g. no detection of the ground truth's categories): one line
        with launch.errors_in_one_line(ValueError), processes.exit_at_once_if_a_peer_is_lost(lost):
            metrics = evaluator.evaluate_split(
                evaluator.make_predict_step(MaskRCNN.from_config(config.model), mesh),
                sharding.replicate(predictor.variables, mesh),
                config,
                mesh,
                builder,
                split=split,
                results_path=str(results_path),
            )
        if jax.process_index() == 0:
            summary = {"step": predictor.step, evaluated[0]: evaluated[1], "num_images": num_images}
            if num_images < in_split:  # which: the first of the built dataset, not of a json
                ground_truth = coco_json.coco_ground_truth(builder, scored)
                summary["image_ids"] = [image["id"] for image in ground_truth["images"]]
            summary.update(metrics)
            output.write_file(metrics_path, lambda f: json.dump(summary, f, indent=2))
    except OSError as error:  # e.g. a full disk: the file and why, no trace
        if error.filename not in (str(results_path), str(metrics_path)):
            raise
        sys.exit(f"error: cannot write {error.filename}: {error.strerror}")
    if jax.process_index() == 0:
        print(f"checkpoint step {predictor.step}, {' '.join(evaluated)}, {images}:")
        print(metrics_table(metrics), flush=True)


def _results_of_other_data(metrics_path: "epath.Path", evaluated: tuple[str, str]) -> str:
    """What an earlier `eval_<step>_<name>.json` at `metrics_path` evaluated ("json <path>" or
    "split <name>") when it is not `evaluated` (two jsons of one file name, a json named like a
    split); "" when there is no such file, it is of the same data, or unreadable."""
    try:
        summary = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        return ""
    earlier = next(((k, summary[k]) for k in ("json", "split") if k in summary), None)
    if earlier is None or earlier == evaluated:
        return ""
    return f"{earlier[0]} {earlier[1]}"


if __name__ == "__main__":
    launch.set_up_process()
    launch.run(main)
