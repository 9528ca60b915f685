"""`train_and_evaluate(config, workdir)`: the training program behind scripts/train.py.

It composes the dataset (`data`), the model, the sharded train step (`train`), checkpoints and
periodic evaluation (`programs.evaluator`), as flax's `examples/imagenet/train.py`.

Resumable: the latest complete checkpoint in `<workdir>/checkpoints` is restored (state, step)
and the input pipeline restarts at that step, so no example is skipped or repeated; the step's
PRNG key is `fold_in(key(seed), step)`, so a resumed run draws what an uninterrupted one would.
Step folders that are not complete checkpoints (an interrupted copy) are renamed
`<step>.incomplete`, with a warning, and their steps saved again. With `model.norm="batch"`
(per-device BatchNorm statistics) a resume with other images per device than the checkpoint
recorded trains another function: it warns, naming both (`checkpoint.images_per_device_warning`).
Without a checkpoint the model starts from its seeded initialisation with the backbone that
`model.backbone_weights` names (torchvision ImageNet weights, `convert.imagenet`); a frozen
backbone without such weights is refused (`check_backbone_init`). The final state is always
checkpointed, so `train.num_steps = 0` writes (and evaluates) the initial checkpoint, step 0.
Logs go to a tqdm bar, `<workdir>/metrics.jsonl` and TensorBoard event files (process 0).
SIGTERM (a preempted TPU VM or spot instance, a scheduler's stop) ends training after the step
being run, which is checkpointed first, with `Preempted` (scripts/train.py exits with 143); during
an evaluation (one process) it ends before the next eval batch, the step checkpointed as well.

With `data.canvas_groups` the batches come in one shape per group (the step's group is drawn
from the seed and the step, so a resumed run gets the same canvas at each step): the jitted
step compiles once per canvas, the first time a step of that group comes, and never again
(the model's answer does not depend on the canvas, CONTRACTS.md). Evaluation keeps
`data.image_size`.
"""

import contextlib
import fcntl
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from mrcnn_jax import interrupts, jax_settings, paths, sharding
from mrcnn_jax.convert import imagenet
from mrcnn_jax.convert import torchvision as torchvision_convert
from mrcnn_jax.data import canvas_groups, get_builder, pipeline, schema, with_absolute_paths
from mrcnn_jax.evaluation.masks import PASTE_METHODS
from mrcnn_jax.modeling.checks import check_new_model_config
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs import evaluator, predictor, processes
from mrcnn_jax.train import checkpoint as ckpt_lib
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train import step as step_lib
from mrcnn_jax.train import storage_errors, transfer


class MetricsWriteError(OSError):
    """Writing the training metrics (`metrics.jsonl`, TensorBoard events) failed: a full disk, a
    quota, a vanished folder. The message says where and why; the checkpoints are kept."""


class MetricWriter:
    """Writes scalars to `metrics.jsonl` and TensorBoard in the workdir (process 0 only).

    A run starting at `start_step` (the checkpoint it resumed, or 0) first drops from
    `metrics.jsonl` the rows of later steps (logged by a run that stopped before checkpointing
    them: they are trained and logged again) and, with `eval_again`, the eval rows at
    `start_step`, so that every step has one row, as in an uninterrupted run. TensorBoard's
    event files are kept as written; a restart marker tells TensorBoard to show none of their
    points after `start_step` (`_mark_restart`).
    """

    def __init__(self, workdir: epath.Path, start_step: int = 0, eval_again: bool = False):
        self._workdir = workdir
        self._active = jax.process_index() == 0
        if self._active:
            path = workdir / "metrics.jsonl"
            paths.check_not_a_link_to_a_file(path)
            # not a link to a device: /dev/full reads endless zeros (epath's is_file says yes)
            if os.path.isfile(path) or (paths.is_url(path) and path.exists()):
                self._guarded(lambda: _drop_rows_after(path, start_step, eval_again))
            self._jsonl = self._guarded(lambda: path.open("a"))
            self._guarded(lambda: _mark_restart(workdir / "tensorboard", start_step + 1))
            self._tb = tf.summary.create_file_writer(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """Appends `scalars` at `step`; raises `MetricsWriteError` if they cannot be written."""
        if self._active:
            self._guarded(lambda: self._write(step, scalars))

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        with self._tb.as_default(step=step):
            for name, value in scalars.items():
                tf.summary.scalar(name, value)
        self._tb.flush()

    def _guarded(self, write: Callable[[], Any]) -> Any:
        """Runs `write`, raising `MetricsWriteError` if the files cannot be written; its value."""
        try:
            return write()
        except (OSError, tf.errors.OpError) as error:
            if isinstance(error, OSError) and error.strerror:
                reason = error.strerror
            else:
                reason = storage_errors.tensorflow_error_text(error)
            mend = "Mend that (free some space if the disk is full) and run the same command again"
            kept = (
                f"the complete checkpoints are kept. {mend}: a training run resumes from the latest"
                if ckpt_lib.has_complete_checkpoint(self._workdir)  # process 0 alone: no orbax
                else f"no checkpoint was written yet. {mend}: it starts from step 0"
            )
            raise MetricsWriteError(
                f"writing the training metrics to {self._workdir} failed ({reason}); {kept}."
            ) from error

    def logged_eval(self, step: int) -> bool:
        """Whether `metrics.jsonl` holds an eval row of `step`, on every process (process 0
        reads it; a collective with several processes)."""
        found = False
        if self._active:
            try:
                lines = (self._workdir / "metrics.jsonl").read_text().splitlines()
            except OSError:  # not read: evaluated again, rather than the others left waiting
                lines = []
            found = (step, True) in map(_step_and_kind, lines)
        return bool(multihost_utils.broadcast_one_to_all(np.int32(found)))

    def close(self) -> None:
        """Closes the files; raises `MetricsWriteError` if what they hold cannot be written."""
        if self._active:
            self._guarded(lambda: (self._jsonl.close(), self._tb.close()))


@contextlib.contextmanager
def _closed_after(resource: Any) -> Iterator[Any]:
    """`resource`, closed after the block; where the block raised, an error of the close (a
    full disk's again, for the buffered row of a failed metrics write) does not replace it."""
    try:
        yield resource
    except BaseException:
        with contextlib.suppress(Exception):
            resource.close()
        raise
    resource.close()


def _step_and_kind(line: str) -> tuple[int, bool] | None:
    """(step, whether an eval row) of a `metrics.jsonl` line; None for a line not of ours."""
    try:
        row = json.loads(line)
        return int(row["step"]), any(key.startswith("eval/") for key in row)
    except (ValueError, TypeError, KeyError):
        return None


def _drop_rows_after(path: epath.Path, step: int, eval_rows_at_step: bool) -> None:
    """Rewrites the jsonl file `path` without its rows of steps after `step`, without its eval
    rows at `step` if `eval_rows_at_step`, and without a torn last line (no newline)."""
    lines = path.read_text().splitlines(keepends=True)
    after = at_step = torn = 0
    kept = []
    for line in lines:
        parsed = _step_and_kind(line)
        if not line.endswith("\n"):  # the last line, cut by a crash
            torn += 1
        elif parsed is not None and parsed[0] > step:
            after += 1
        elif eval_rows_at_step and parsed == (step, True):
            at_step += 1
        else:
            kept.append(line)  # includes lines not of ours
    if len(kept) < len(lines):
        partial = path.parent / f"{path.name}.tmp"
        partial.write_text("".join(kept))
        partial.replace(path)  # at once: the old rows or the new, never half
        dropped = []
        if after:
            dropped.append(
                f"{after} row{'s' * (after != 1)} logged after step {step}, where this run "
                "starts (their steps are logged again)"
            )
        if at_step:
            dropped.append(f"the eval row{'s' * (at_step != 1)} of step {step} (evaluated again)")
        if torn:
            dropped.append("a last line cut short by a crash")
        _say(f"{path.name}: dropped {' and '.join(dropped)}")


def _mark_restart(folder: epath.Path, step: int) -> None:
    """Writes into the TensorBoard folder `folder` an event file holding TensorBoard's restart
    marker at `step` (`SessionLog.START`): its Python reader (`--load_fast=false`,
    `plugin_event_accumulator.EventAccumulator`; the older `event_accumulator`'s purges no
    tensors, as `tf.summary` points are) then drops the points of earlier files at `step` and
    after, which a run that stopped logged before checkpointing them (logged again by this
    run; its Rust reader replaces a series' points when their steps repeat). The reader takes
    the first marker it sees as the start of the first run, not as a restart: each file holds
    it twice, so that the first resume of a workdir written without markers purges too.
    TensorBoard reads a folder's files in name order: the file's time is a second before that
    of the `tf.summary` file written next, so its name comes between the earlier runs' files
    and this run's, the runs' starts being more than a second apart (JAX's start alone takes
    longer)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now) - 1:010d}.{socket.gethostname()}.{os.getpid()}.start"
    start = tf.compat.v1.Event(
        wall_time=now, step=step, session_log=tf.compat.v1.SessionLog(status="START")
    )
    with tf.io.TFRecordWriter(str(folder / name)) as records:
        records.write(
            tf.compat.v1.Event(wall_time=now, file_version="brain.Event:2").SerializeToString()
        )
        for _ in range(2):
            records.write(start.SerializeToString())


def _say(message: str) -> None:
    """A progress message on process 0 that does not break the tqdm bar."""
    if jax.process_index() == 0:
        tqdm.write(message)


def with_dataset_classes(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder
) -> ml_collections.ConfigDict:
    """A copy of `config` with the dataset's `data.class_names` and `data.label_to_category_id`
    where the config leaves them empty; checks `model.num_classes` and that given names and ids
    have one entry per class of the dataset (ids distinct).

    `model.num_classes = 0` means "as many as the dataset has" and is set to that number.
    """
    names = schema.class_names(builder.info)
    if config.model.num_classes not in (0, len(names)):
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes} but dataset "
            f"{builder.info.full_name} has {len(names)} classes: set --config.model.num_classes="
            f"{len(names)}"
        )
    for name in ("class_names", "label_to_category_id"):
        given = tuple(config.data[name])
        if given and len(given) != len(names):
            raise ValueError(
                f"config.data.{name} has {len(given)} entries but dataset "
                f"{builder.info.full_name} has {len(names)} classes ({names[:5]}...); "
                "leave it empty to take the dataset's"
            )
    ids = tuple(config.data.label_to_category_id)
    if len(set(ids)) != len(ids):
        raise ValueError(f"config.data.label_to_category_id={ids} repeats a category id")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.num_classes = len(names)
    config.data.class_names = tuple(config.data.class_names) or tuple(names)
    if not config.data.label_to_category_id:
        config.data.label_to_category_id = tuple(schema.label_to_category_id(builder.info).tolist())
    return config


def _check_finite(step: int, metrics: dict[str, float], saved_step: int | None) -> None:
    """Raises FloatingPointError if a metric of `step` is NaN or infinite, saying what is kept
    (`saved_step`: the latest checkpoint written, None if none) and what to change."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        kept = (
            f"checkpoint {saved_step} is the last one written, with finite metrics; resume from "
            "it with"
            if saved_step is not None
            else "no checkpoint was written; start again with"
        )
        raise FloatingPointError(
            f"non-finite training metrics at step {step}: {bad}. The state is not saved: "
            f"{kept} a lower train.base_lr (or gradient clipping, train.grad_clip_norm > 0)"
        )


def check_fresh_start(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses to start a run from step 0 in `workdir` (it has no complete checkpoint) where
    that would replace or drop what is there: a `config.json` that is not a training run's
    (the run writes its own), a `metrics.jsonl` whose rows are not a training run's (a fresh
    run drops the rows after step 0), or a run's `metrics.jsonl` that logs training past its
    second checkpoint's step (`train.checkpoint_every` of its stored config; a first save that
    failed, e.g. on a full disk, stops the run at the second): its checkpoints are gone (a disk
    or link to `checkpoints/` not mounted, a deletion), and a fresh run would train over the
    record of them.

    Raises:
      ValueError: naming the file, and how to go on.
    """
    workdir = epath.Path(paths.absolute(workdir))
    config_file, metrics_file = workdir / "config.json", workdir / "metrics.jsonl"
    if config_file.exists() and not _is_workdir(workdir):
        raise ValueError(
            f"{config_file} is not a training run's config (a run writes its own there): train "
            "in a new or empty --workdir"
        )
    if not metrics_file.exists():  # (a bucket's storage raises its own error on a read)
        return
    lines = metrics_file.read_text().splitlines(keepends=True)
    try:  # a last line without its newline was cut by a crash
        rows = [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]
    except ValueError:
        rows = [None]
    if not all(_is_metrics_row(row) for row in rows):
        raise ValueError(
            f"{metrics_file} is not a training run's metrics (a run starting at step 0 drops "
            "the rows after it): train in a new or empty --workdir"
        )
    try:
        every = int(json.loads(config_file.read_text())["train"]["checkpoint_every"])
    except (OSError, ValueError, KeyError, TypeError):
        every = config.train.checkpoint_every
    last = max((row["step"] for row in rows if "train/loss" in row), default=0)
    if last > 2 * every:  # a first save that failed (a full disk) surfaces at the second
        raise ValueError(
            f"{metrics_file} logs training to step {last} (checkpoints every {every} steps), "
            f"but {ckpt_lib.checkpoint_dir(workdir)} holds no complete checkpoint: is its disk "
            "or link not mounted, or were they deleted? Restore them to resume; to start "
            "afresh, move metrics.jsonl away or train in a new --workdir"
        )


def _is_metrics_row(row: Any) -> bool:
    """Whether a parsed `metrics.jsonl` line is a row the trainer writes: `step` and train/ or
    eval/ scalars."""
    return (
        isinstance(row, dict)
        and isinstance(row.get("step"), int)
        and all(key == "step" or key.startswith(("train/", "eval/")) for key in row)
    )


def check_backbone_init(model: ml_collections.ConfigDict) -> None:
    """Refuses to train a frozen backbone from random weights.

    Frozen BatchNorm (`model.norm == "frozen"`) keeps its initial statistics and affine forever,
    and `model.freeze_at > 0` never trains the stem (and res2): from a random initialisation
    that silently cripples the model. Either needs `model.backbone_weights` or
    `model.init_from`, unless `model.allow_random_frozen_backbone` opts in. Only for a run
    without a checkpoint: a restored (e.g. converted) checkpoint brings its own backbone.

    A `model.backbone_weights` path is checked to be a file, and `model.init_from` to hold a
    complete checkpoint, here, before the dataset is built.

    Raises:
      ValueError: saying which fields to set; both `backbone_weights` and `init_from` set.
      FileNotFoundError: `model.backbone_weights` names no file (nor a release), or
        `model.init_from` no checkpoint.
    """
    if model.backbone_weights and model.init_from:
        raise ValueError(
            f"config.model.init_from={model.init_from!r} brings the backbone too: leave "
            f"config.model.backbone_weights={model.backbone_weights!r} empty"
        )
    if model.backbone_weights and not imagenet.is_release_name(model.backbone_weights):
        imagenet.check_backbone_file(model.backbone_weights, model.backbone_depth)
    if str(model.init_from).endswith((".pth", ".pt")):
        raise ValueError(
            f"config.model.init_from={model.init_from!r} is a PyTorch file, not a checkpoint: "
            "an ImageNet ResNet goes into config.model.backbone_weights; torchvision's Mask "
            f"R-CNN weights convert into a checkpoint with scripts/convert_torchvision.py "
            f"--state_dict={model.init_from} --out=DIR, and init_from names DIR"
        )
    if model.init_from:
        try:
            predictor.locate_checkpoint(model.init_from)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"config.model.init_from: {error}") from error
    frozen = []
    if model.norm == "frozen":
        frozen.append('model.norm="frozen" (fixed BatchNorm statistics)')
    if model.freeze_at > 0:
        layers = "stem and res2" if model.freeze_at >= 2 else "stem"
        frozen.append(f"model.freeze_at={model.freeze_at} (untrained {layers})")
    trained = model.backbone_weights or model.init_from
    if frozen and not trained and not model.allow_random_frozen_backbone:
        raise ValueError(
            f"{' and '.join(frozen)} freeze backbone layers, but model.backbone_weights and "
            "model.init_from are empty, so they would keep their random initialisation. Start "
            "from ImageNet weights: --config.model.backbone_weights=IMAGENET1K_V1 (torchvision's, "
            f"downloaded) or the path of a torchvision ResNet-{model.backbone_depth} .pth; or "
            "from a trained model: --config.model.init_from=WORKDIR (e.g. torchvision's COCO "
            "weights converted by scripts/convert_torchvision.py); or train from "
            "scratch: --config.model.norm=batch --config.model.freeze_at=0; or accept a random "
            "frozen backbone: --config.model.allow_random_frozen_backbone=True"
        )


def check_train_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Refuses, before any work, a config that would only fail later (after compiling the step,
    or after training), deep in JAX, or not at all: the data settings (`pipeline.check_data`),
    the model's (`checks.check_new_model_config`), the optimizer and schedule
    (`state.check_train_settings`), `model.roi_heads.mask_paste`, `seed` (below 2**32) and
    `eval.max_images` (0 or more), and the step counts:

    `train.log_every` and `train.checkpoint_every` are positive numbers of steps;
    `train.num_steps`, `train.eval_every` (0: only at the end) and `train.keep_checkpoints`
    (0: all) are 0 or more; `eval.batch_size` is positive (`evaluator.eval_batch_size`) and
    `train.batch_size` a multiple of `num_devices` (default: all devices, as the mesh of
    `train_and_evaluate`).

    Raises:
      ValueError: naming the field and its value.
    """
    pipeline.check_data(config)
    check_new_model_config(config.model)
    state_lib.check_train_settings(config.train)
    num_devices = jax.device_count() if num_devices is None else num_devices
    evaluator.eval_batch_size(config, num_devices)
    if config.train.batch_size % num_devices:
        raise ValueError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by the "
            f"{num_devices} devices: use a multiple of {num_devices}"
        )
    if config.model.roi_heads.mask_paste not in PASTE_METHODS:
        raise ValueError(
            f"config.model.roi_heads.mask_paste={config.model.roi_heads.mask_paste!r} must be "
            f"one of {PASTE_METHODS}"
        )
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**32:
        raise ValueError(  # `jax.random.key` keeps its low 32 bits: 2**32 would be seed 0's model
            f"config.seed={config.seed!r} must be an integer in [0, 2**32 - 1]"
        )
    if not isinstance(config.eval.max_images, int) or config.eval.max_images < 0:
        raise ValueError(
            f"config.eval.max_images={config.eval.max_images!r} must be an integer >= 0"
        )
    t = config.train
    for name in ("log_every", "checkpoint_every"):
        if t[name] < 1:
            raise ValueError(f"config.train.{name}={t[name]!r} must be a positive number of steps")
    for name, zero in (
        ("num_steps", "no training"),
        ("eval_every", "only at the end"),
        ("keep_checkpoints", "all"),
    ):
        if t[name] < 0:
            raise ValueError(f"config.train.{name}={t[name]!r} must be 0 or more (0: {zero})")


def check_splits(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder) -> None:
    """Raises ValueError, naming the field and the dataset's splits, unless `data.train_split`
    and `data.val_split` are splits of `builder` (TFDS syntax: `validation[:100]` too) that
    select images, the latter also as evaluated (its first `eval.max_images` images)."""
    for name in ("train_split", "val_split"):
        split = config.data[name]
        if name == "val_split" and not pipeline.split_error(builder, split):
            split = pipeline.eval_split(config, builder, split)  # its first eval.max_images
        if error := pipeline.split_error(builder, split):
            raise ValueError(f"config.data.{name}={config.data[name]!r} {error}")


def initial_variables(config: ml_collections.ConfigDict, model: MaskRCNN) -> dict:
    """The seeded initialisation of `params` and `batch_stats`, with the backbone of
    `config.model.backbone_weights` when it names any, or every variable of the
    `config.model.init_from` checkpoint (`init_from_checkpoint`)."""
    variables = state_lib.init_variables(
        model, jax.random.key(config.seed), tuple(config.data.image_size)
    )
    if config.model.backbone_weights:
        variables = imagenet.with_backbone(variables, imagenet.backbone_variables(config.model))
        _say(f"Backbone initialised from {config.model.backbone_weights}")
    if config.model.init_from:
        variables = init_from_checkpoint(config, variables)
    return variables


def init_from_checkpoint(config: ml_collections.ConfigDict, variables: dict) -> dict:
    """`variables` (this config's initial ones) replaced by those of the checkpoint
    `config.model.init_from` (`transfer.transfer_variables`): the class predictors mapped by
    class name (`config.data.class_names`, set from the dataset), classes the checkpoint lacks
    left as initialised. Says which classes were taken, and warns about `config.model` fields
    that differ from the checkpoint's (its weights were trained with those).

    Raises:
      ValueError: the checkpoint's architecture is not this config's (a variable missing or of
        another shape), naming the variables and the differing config fields; or it cannot be
        read (`predictor.read_checkpoint`).
    """
    model = config.model
    source_config, source, step = predictor.read_checkpoint(model.init_from)
    names, source_names = list(config.data.class_names), list(source_config.data.class_names)
    num_classes = (model.num_classes, source_config.model.num_classes)
    sources = transfer.class_sources(names, source_names, *num_classes)
    saved = json.loads(source_config.to_json())
    differences = [
        line
        for line in ckpt_lib.config_mismatches(saved, config)
        if not line.startswith(("model.num_classes:", "data.image_size:"))
    ]
    where = f"config.model.init_from={model.init_from!r} (step {step})"
    try:
        variables = transfer.transfer_variables(variables, source, sources)
    except ValueError as error:
        differ = f"its model config differs: {'; '.join(differences)}. " if differences else ""
        hint = "its model fields"
        if source_config.model.roi_heads.mask_paste == "torchvision":  # torchvision's, converted
            release = torchvision_convert.release_of_config(source_config.model)
            hint += f" (on COCO-format data: configs/coco_format_torchvision.py:{release})"
        raise ValueError(
            f"{where} has another architecture than this config's (only the classes may "
            f"differ): {differ}{error}. Train with {hint}"
        ) from error
    names = names or [str(j) for j in range(model.num_classes)]
    taken = [name for name, source_class in zip(names, sources) if source_class is not None]
    new = [name for name, source_class in zip(names, sources) if source_class is None]
    _say(
        f"Initialised from {where}: every variable; the class predictors of "
        f"{len(taken)} of {len(names)} classes{_listed(taken)}"
        + (f", fresh for{_listed(new)}" if new else "")
    )
    if differences and jax.process_index() == 0:
        logging.warning(
            "config.model differs from that of %s, whose weights were trained with it: %s",
            model.init_from,
            "; ".join(differences),
        )
    return variables


def _listed(names: list[str], most: int = 8) -> str:
    """' (a, b, c)', at most `most` names and how many more; '' for none."""
    if not names:
        return ""
    more = f", {len(names) - most} more" if len(names) > most else ""
    return f" ({', '.join(names[:most])}{more})"


def resume_warnings(stored: dict, config: ml_collections.ConfigDict, step: int) -> list[str]:
    """What a run resumed at `step` does differently from the run that wrote the checkpoint
    (its config `stored`), though the checkpoint fits: another learning rate at `step` (a
    schedule follows `config.train`: e.g. a larger `num_steps` stretches a cosine decay back
    up), other canvas groups or weights (each group's images resume where the new draw would
    have left them), or other classes (another dataset with as many: the labels change
    meaning); or a `model.init_from` other than the run's own, which a resume does not use.
    None of these but the last at step 0: converted or initial weights start any run
    (fine-tuning)."""
    warnings = []
    stored_from = stored.get("model", {}).get("init_from", "")
    if config.model.init_from and config.model.init_from != stored_from:
        started = f", itself started from {stored_from!r}" if stored_from else ""
        warnings.append(
            f"config.model.init_from={config.model.init_from!r} is not used: the run resumes "
            f"from its own checkpoint (step {step}{started}); a new fine-tuning needs a new "
            "workdir"
        )
    if step == 0:
        return warnings
    stored_train = stored.get("train", {})
    try:
        schedule = state_lib.create_learning_rate_fn(ml_collections.ConfigDict(stored_train))
        before = float(schedule(step))
    except (AttributeError, KeyError, ValueError):  # a config of an older release: not compared
        before = None
    now = float(state_lib.create_learning_rate_fn(config.train)(step))
    if before is not None and not math.isclose(before, now, rel_tol=1e-6, abs_tol=1e-12):
        train = json.loads(config.train.to_json_best_effort())  # tuples as the stored lists
        changed = [
            f"train.{name} {stored_train[name]!r} -> {value!r}"
            for name, value in sorted(train.items())
            if name in stored_train and stored_train[name] != value
        ]
        warnings.append(
            f"the learning rate at step {step} is {now:.3g} under this config's schedule, "
            f"{before:.3g} under the checkpoint's ({', '.join(changed)}): it follows the "
            "config given now"
        )
    stored_data = stored.get("data", {})
    was, now = _canvas_draw(stored_data), _canvas_draw(config.data)
    if was != now:
        warnings.append(
            f"data.canvas_groups / canvas_group_weights {was} -> {now}: each group's images "
            f"resume where these would have left them at step {step}, not where the "
            "checkpoint's run did, so some are repeated or skipped this epoch"
        )
    names = tuple(stored_data.get("class_names") or ())
    if names and tuple(config.data.class_names) != names:
        warnings.append(
            f"the checkpoint was trained on the classes {list(names)}, this run trains on "
            f"{list(config.data.class_names)} ({config.data.dataset}): the labels change meaning"
        )
    return warnings


def _canvas_draw(data) -> tuple:
    """(canvases, their probabilities rounded) of a config's `data` (a ConfigDict or the JSON
    dict stored with a checkpoint): what the per-step draw of canvas groups follows."""
    groups = canvas_groups.groups_of(data)
    if not groups:
        return ()
    return groups, tuple(round(float(w), 6) for w in canvas_groups.weights_of(data))


@interrupts.handled_interrupts()
@jax_settings.with_defaults
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it has checkpoints), evaluates, returns metrics.

    `workdir` is a local folder (`~` expanded, relative to the current folder) or a URL
    (`gs://...`); so are the data's paths, stored absolute in the checkpoints' config.

    Returns the final evaluation metrics (COCO bbox/segm numbers on `config.data.val_split`).

    Ctrl-C (KeyboardInterrupt) stops it as it stops scripts/train.py, also from a notebook:
    one during a compile or an import is raised once that ends (`interrupts.handled_interrupts`:
    under Python's default handler the compile went on in the background and crashed the exit).

    Raises:
      ValueError: a config that does not fit (`check_train_config`, `check_splits`), or a
        checkpoint folder that is a link which it would delete (`check_linked_checkpoints`);
        without a checkpoint to resume, a frozen backbone without weights
        (`check_backbone_init`) or a folder whose files it would replace or drop
        (`check_fresh_start`); a checkpoint of another architecture; processes of one run
        given different configs or workdirs, or a workdir they do not share
        (`processes.check_processes_agree`).
      FileNotFoundError: `<workdir>/checkpoints` holds step folders but none is a complete
        checkpoint (`checkpoint.resume_step`, naming them and what they lack).
      Preempted: SIGTERM arrived (one process), or JAX's preemption service reported it (several
        processes): the steps being run (at most two) are finished and checkpointed first.
      checkpoint.CheckpointWriteError: a checkpoint could not be written (e.g. the disk is
        full); the complete ones are kept, and the same call resumes from the latest.
      MetricsWriteError: the metrics could not be written (e.g. the disk is full); likewise.
      WorkdirInUseError: another training run is using `workdir` (`_workdir_lock`).
    """
    mesh = sharding.create_mesh()
    check_train_config(config, mesh.size)
    config = with_absolute_paths(config)  # as stored with the checkpoints, for eval.py
    workdir = epath.Path(paths.absolute(workdir))
    check_workdir_outside_checkpoints(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    processes.check_processes_agree(  # several processes: before they wait for each other
        agreement_settings(config, workdir), workdir
    )
    check_linked_checkpoints(workdir, config)  # after: a workdir not shared, one process
    if not ckpt_lib.has_complete_checkpoint(workdir):  # before the lock file makes it a workdir
        check_fresh_start(workdir, config)
    with _workdir_lock(workdir):
        manager = ckpt_lib.create_manager(
            workdir, max_to_keep=config.train.keep_checkpoints or None, clean_up=True
        )
        try:  # the writer and the input pipeline closed also on an error or Ctrl-C: a
            # notebook keeps the traceback, whose frames held their files open, ~1 GB and
            # ~60 threads until the next error
            with _stop_on_sigterm() as stop, contextlib.ExitStack() as resources:
                return _train_and_evaluate(config, workdir, manager, mesh, stop, resources)
        finally:  # also on an error or Ctrl-C: a checkpoint being written is completed, not lost
            ckpt_lib.finish_writes(manager)
            manager.close()


def check_workdir_outside_checkpoints(workdir: epath.PathLike) -> None:
    """Refuses a workdir that is, or lies in, the `checkpoints/` folder of another run's workdir
    (`W/checkpoints`, `W/checkpoints/10`, a path that eval.py, predict.py and `load_checkpoint`
    take for W's checkpoints), at any depth and also through a symbolic link: a run there
    started afresh, its checkpoints then hid W's from those readers, and W's clean-up of old
    checkpoints deleted its files. A workdir holds `.train.lock` or the trainer's
    `config.json` (`_is_workdir`).

    Raises:
      ValueError: naming the run's workdir.
    """
    workdir = epath.Path(paths.absolute(workdir))
    spellings = [workdir]
    if not paths.is_url(str(workdir)):  # a link to W/checkpoints (or below) is inside it too
        spellings.append(epath.Path(os.path.realpath(workdir)))
    for spelling in spellings:
        for folder in [spelling, *spelling.parents]:
            run = folder.parent
            if folder.name == ckpt_lib.checkpoint_dir(run).name and _is_workdir(run):
                raise ValueError(
                    f"the workdir {workdir} is inside the checkpoints folder of the training run "
                    f"in {run}: train in --workdir={run} to resume that run, or in a folder of "
                    "its own"
                )


def check_linked_checkpoints(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses, with `train.keep_checkpoints` > 0, a workdir whose `checkpoints/<step>` folder is
    a symbolic link: the run's clean-up of older checkpoints would delete it, which orbax
    refuses for a link, so the run ended at that save with a traceback and an error asking to
    free disk space (and so again on every resume).

    Raises:
      ValueError: naming the link and the ways on.
    """
    keep, folder = config.train.keep_checkpoints, ckpt_lib.checkpoint_dir(workdir)
    if not keep or paths.is_url(str(folder)) or not folder.is_dir():
        return
    linked = sorted(p for p in folder.iterdir() if p.name.isdigit() and os.path.islink(p))
    if linked:
        raise ValueError(
            f"{linked[0]} is a symbolic link (to {os.readlink(linked[0])}): with "
            f"config.train.keep_checkpoints={keep} the run deletes older checkpoints, which orbax "
            "cannot do for a link: put a copy in its place (cp -rL), or keep every checkpoint "
            "(--config.train.keep_checkpoints=0); to start from another run's weights, train "
            "in a new workdir with --config.model.init_from=<that workdir>"
        )


def _is_workdir(folder: epath.Path) -> bool:
    """Whether `folder` is a training run's workdir: it holds the lock file, or the config
    the trainer writes (`config.json` with `model` and `train`), not any `config.json`."""
    if (folder / LOCK_FILE).exists():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "train"} <= config.keys()


def agreement_settings(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike
) -> dict[str, Any]:
    """What the processes of one training must agree on (`processes.check_processes_agree`):
    the config with its data paths absolute and the absolute workdir, as every process's own
    folder and `~` make them (the same on hosts that share the files)."""
    config = with_absolute_paths(config)
    return {
        "config": json.loads(config.to_json_best_effort()),
        "workdir": str(epath.Path(paths.absolute(workdir))),
    }


class WorkdirInUseError(RuntimeError):
    """Another training run holds the workdir's lock: two runs in one workdir would write each
    other's checkpoints and interleave their metrics."""


LOCK_FILE = ".train.lock"


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path) -> Iterator[None]:
    """Holds an exclusive lock on `<workdir>/.train.lock` (`flock`, released by the system when
    the process ends, however it ends) during the block; process 0 of a local workdir only
    (cloud storage has no locks). The file stays, naming the last holder. With several
    processes, process 0's refusal or error is every process's (a collective): the others
    ended in JAX's C++ abort when process 0 left alone with it.

    Raises:
      WorkdirInUseError: another process holds it, naming that process.
      OSError: the lock file cannot be opened or locked (a link to a file, no permission, a
        file system without locks), on every process.
    """
    with contextlib.ExitStack() as stack:
        held, failure = None, None
        if jax.process_index() == 0 and not paths.is_url(str(workdir)):
            path = workdir / LOCK_FILE
            try:
                paths.check_not_a_link_to_a_file(path)
                held = stack.enter_context(open(path, "a+"))
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held.seek(0)
                    holder = held.read().strip() or "another process"
                    failure = WorkdirInUseError(
                        f"{workdir} is in use by another training run ({holder}; lock file "
                        f"{path}): wait for it to end, or train in another --workdir"
                    )
            except OSError as error:  # a link, no permission, no locks (NFS): said by all
                failure = error
        if jax.process_count() > 1:
            told = processes.broadcast_text(
                "" if failure is None else f"{type(failure) is WorkdirInUseError:d}{failure}"
            )
            if told and failure is None:  # not process 0: its error, as one of the same kind
                kind = WorkdirInUseError if told[0] == "1" else OSError
                failure = kind(told[1:])
        if failure is not None:
            raise failure
        if held is not None:
            held.seek(0)
            held.truncate()
            held.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n")
            held.flush()
            stack.callback(fcntl.flock, held, fcntl.LOCK_UN)
        yield


class Preempted(Exception):
    """Training stopped at `step` on SIGTERM (a preempted VM, a scheduler) or, with several
    processes, a Ctrl-C (`cause` names it): the state there is checkpointed, and the same
    command resumes from it."""

    def __init__(self, step: int, directory: epath.PathLike, cause: str = "SIGTERM (preemption)"):
        super().__init__(
            f"stopped at step {step} on {cause} with checkpoint {directory}/{step} saved; run "
            "the same command to resume from it"
        )
        self.step = step


class _Stop(threading.Event):
    """Set by SIGTERM (one process); `cause` names what stops the run, for `Preempted`."""

    cause = "SIGTERM (preemption)"


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[_Stop]:
    """An event that SIGTERM sets during the block, for one process run from the main thread.

    With several processes JAX's preemption service takes SIGTERM and the checkpoint manager
    reports it at a step that every process reaches (`reached_preemption`); a Python handler
    would replace the service's own. There the first Ctrl-C (SIGINT) of a process is handed to
    that service as SIGTERM, so that all processes stop together, checkpointed, instead of this
    one alone leaving the others waiting in a collective forever; a second Ctrl-C interrupts
    this process at once (KeyboardInterrupt; scripts/train.py then ends it within
    `processes.STOP_WAIT_S`, without waiting for the others in JAX's exit). The previous
    handler is restored after the block.
    """
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    if jax.process_count() > 1:
        stop.cause = "SIGTERM or Ctrl-C of one of the processes"

        def on_interrupt(signum, frame) -> None:
            again = previous if callable(previous) else signal.default_int_handler
            signal.signal(signal.SIGINT, again)  # a second Ctrl-C raises
            stop.cause = "Ctrl-C (SIGINT) of this process"
            print(
                "interrupted: every process stops at the next step they all reach, with a "
                "checkpoint (Ctrl-C again stops this process alone, within "
                f"{processes.STOP_WAIT_S:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service

        handled, handler = signal.SIGINT, on_interrupt
    else:
        handled, handler = signal.SIGTERM, lambda signum, frame: stop.set()
    previous = signal.signal(handled, handler)
    try:
        yield stop
    finally:
        signal.signal(handled, previous)


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: epath.Path,
    manager: ocp.CheckpointManager,
    mesh: Mesh,
    stop: _Stop,
    resources: contextlib.ExitStack,
) -> dict[str, float]:
    resume_step = ckpt_lib.resume_step(manager)  # the latest complete checkpoint
    resuming = resume_step is not None
    if not resuming:
        check_backbone_init(config.model)
    builder = get_builder(config.data)
    check_splits(config, builder)
    config = with_dataset_classes(config, builder)
    evaluator.check_dataset_classes(config, builder)  # before training, not at its first eval
    model = MaskRCNN.from_config(config.model, axis_name=sharding.AXIS)
    if resuming:  # the restore overwrites every variable: no init, no backbone weights read
        variables = state_lib.zero_variables(model, tuple(config.data.image_size))
    else:
        variables = initial_variables(config, model)
    state, learning_rate_fn = state_lib.train_state_from_variables(config, model, variables)
    if resuming:
        state = ckpt_lib.restore(manager, state, config, step=resume_step)
        ckpt_lib.set_aside_incomplete(manager)  # so that their steps are saved again
        _say(f"Resumed from {manager.directory} at step {int(state.step)}")
        warnings = [ckpt_lib.images_per_device_warning(manager, resume_step, config, mesh.size)]
        stored = ckpt_lib.load_config(manager, resume_step)
        warnings += resume_warnings(stored, config, resume_step)
        for warning in filter(None, warnings):
            if jax.process_index() == 0:
                logging.warning(warning)
        for field in ("init_from", "backbone_weights"):  # what the run started from, on record
            config.model[field] = stored.get("model", {}).get(field, "")
    if resuming and resume_step >= config.train.num_steps:
        _say(
            f"Checkpoint step {resume_step} >= config.train.num_steps={config.train.num_steps}: "
            "nothing to train (a larger num_steps trains on); evaluating it"
        )
    elif jax.process_index() == 0:  # after the restore: a rejected config must not replace it
        paths.check_not_a_link_to_a_file(workdir / "config.json")
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if jax.process_index() == 0:
        warnings = [ckpt_lib.disk_space_warning(manager, state)]
        if int(state.step) < config.train.num_steps:
            warnings += state_lib.schedule_warnings(config.train)
        for warning in filter(None, warnings):
            logging.warning(warning)
    state = sharding.replicate(state, mesh)
    start_step = int(jax.device_get(state.step))
    devices = ckpt_lib.count_of(mesh.size, "device")
    _say(f"Model: {state_lib.count_params(state.params):,} parameters on {devices}")

    train_step = step_lib.make_train_step(config, mesh, learning_rate_fn)
    predict_step = evaluator.make_predict_step(model, mesh)
    batches = pipeline.create_train_dataset(config, builder=builder, start_step=start_step)
    resources.enter_context(_closed_after(batches))  # its tf.data iterators and threads
    if start_step and start_step < config.train.num_steps:
        _say(
            f"Data: reading past the {start_step * config.train.batch_size:,} records of steps "
            f"0-{start_step - 1} (not decoded; a large split after many epochs takes minutes)"
        )
    writer = MetricWriter(workdir, start_step, eval_again=start_step >= config.train.num_steps)
    resources.enter_context(_closed_after(writer))
    base_key = jax.random.key(config.seed)
    t = config.train

    def stop_at(step: int) -> NoReturn:
        """SIGTERM or a preemption: checkpoints `step` unless done, and stops training."""
        if saved_step != step:
            ckpt_lib.save(manager, state, config)
        ckpt_lib.finish_writes(manager)
        raise Preempted(step, manager.directory, stop.cause)

    def run_eval(step: int) -> dict[str, float]:
        try:
            metrics = evaluator.evaluate_split(
                predict_step, evaluator.variables_of(state), config, mesh, builder, stop=stop
            )
        except evaluator.EvaluationStopped:
            stop_at(step)
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        _say(f"step {step} eval: {evaluator.metrics_summary(metrics)}")
        return metrics

    bar = tqdm(
        total=t.num_steps,
        initial=start_step,
        desc="train",
        disable=jax.process_index() != 0 or start_step >= t.num_steps,  # nothing to train
        dynamic_ncols=True,
    )
    # steps_per_second measures training: a window's steps over its time, without the steps
    # that compile (the first one; one per canvas group) and the checkpoints and evaluations;
    # input_wait, the fraction of that time spent waiting for the next batch.
    window_start, window_steps, waited = time.time(), 0, 0.0
    eval_metrics = {}
    saved_step = start_step if resuming else None
    canvases = set()  # of the batches so far: a new one compiles the step (once per group)
    running = None  # the metrics of the step dispatched before this one
    # A run stopped (SIGTERM, Ctrl-C, a crash) after checkpointing an eval_every step but before
    # its evaluation was logged resumes there: that evaluation comes first, as it would have.
    due = t.eval_every and 0 < start_step < t.num_steps and start_step % t.eval_every == 0
    with bar:  # closed also on an error, before its message
        if resuming and due and not writer.logged_eval(start_step):
            eval_metrics = run_eval(start_step)
        for step in range(start_step, t.num_steps):
            asked = time.time()
            batch = next(batches)
            fetched = time.time() - asked
            canvas = batch["image"].shape[1:3]
            compiles = canvas not in canvases
            if compiles and config.data.canvas_groups:
                size = f"{canvas[0]}x{canvas[1]}"
                _say(f"step {step}: compiling the train step for the {size} canvas")
            canvases.add(canvas)
            batch = sharding.shard_batch(batch, mesh)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step))
            # At most two steps in flight (JAX queued dozens): one running, one queued behind
            # it. A SIGTERM then checkpoints within about a step's time, the bar is at most a
            # step ahead of the steps run, and the host holds no more batches than that.
            jax.block_until_ready(running)
            running = metrics
            done = step + 1
            if compiles:
                jax.block_until_ready(metrics)
                window_start, window_steps, waited = time.time(), 0, 0.0
            else:
                window_steps += 1
                waited += fetched
            if done % t.log_every == 0 or done % t.checkpoint_every == 0 or done == t.num_steps:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                _check_finite(done, scalars, saved_step)
                now = time.time()
                postfix = {"loss": f"{scalars['loss']:.3f}"}
                if window_steps:  # none in a window of only the compiling step
                    window = max(now - window_start, 1e-9)
                    sps = scalars["steps_per_second"] = window_steps / window
                    scalars["input_wait"] = min(waited / window, 1.0)
                    postfix["sps"] = f"{sps:.2f}"
                window_start, window_steps, waited = now, 0, 0.0
                writer.write(done, {f"train/{k}": v for k, v in scalars.items()})
                bar.set_postfix(postfix)
            bar.update(1)
            checkpoint = done % t.checkpoint_every == 0 or done == t.num_steps
            evaluate = t.eval_every and done % t.eval_every == 0 and done != t.num_steps
            if checkpoint or evaluate:  # their time is left out of the window, not the steps'
                jax.block_until_ready(state)
                paused = time.time()
            if checkpoint:
                ckpt_lib.save(manager, state, config)
                saved_step = done
            if stop.is_set() or manager.reached_preemption(done):
                stop_at(done)
            if evaluate:
                eval_metrics = run_eval(done)
            if checkpoint or evaluate:
                window_start += time.time() - paused
    final_step = int(jax.device_get(state.step))
    if saved_step != final_step:  # num_steps = 0 on a fresh workdir: checkpoint the initial state
        ckpt_lib.save(manager, state, config)
        saved_step = final_step
    ckpt_lib.finish_writes(manager)
    if final_step > start_step or not eval_metrics:
        eval_metrics = run_eval(final_step)
    return eval_metrics


def final_summary(metrics: dict[str, float]) -> str:
    """Printable final line."""
    return (
        "final eval: "
        + evaluator.metrics_summary(metrics)
        + " "
        + json.dumps(
            {k: round(v, 4) for k, v in metrics.items() if k.endswith(("/AP", "/AP50", "/AP75"))}
        )
    )
