"""Orbax checkpoints of the train state plus the config that produced them.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds two items: `state` (params,
batch_stats, opt_state, step) and `config` (the full ConfigDict as JSON). Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a crash mid-save leaves
no checkpoint that `latest_step` would return. A step folder made otherwise, e.g. by a copy
(cp, rsync) that was interrupted, may lack files: `missing_parts` names them, `latest_step`
skips such folders with a warning, `choose_step` refuses one named explicitly, and a resumed
run starts from the latest complete one (`resume_step`) and sets them aside
(`set_aside_incomplete`).

Each checkpoint also records the devices it was trained on (`run_metadata`): with per-device
BatchNorm statistics (`model.norm="batch"`) the images per device are part of the function
trained, and a resume with another number warns (`images_per_device_warning`).

A complete folder whose files are damaged (bytes changed, a data file truncated or deleted, the
config not JSON) is refused with a `CorruptCheckpointError` naming the folder or file (and the
other complete steps), instead of orbax's or TensorStore's error. A checkpoint that cannot be
written (a full disk, a quota) raises a `CheckpointWriteError` saying why, the free space and
which complete checkpoints remain; what orbax's other reads and writes report besides is dropped
(`storage_errors`).
"""

import contextlib
import copy
import gc
import json
import logging as std_logging
import os
import shutil
import signal
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mrcnn_jax import interrupts, paths
from mrcnn_jax.modeling.checks import check_class_fields, check_model_config
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train import storage_errors
from mrcnn_jax.train.state import TrainState

T = TypeVar("T")

# Config sections whose values must match for a checkpoint to be restored into a run.
ARCHITECTURE_KEYS = ("model", "data.image_size")
# Fields inside them that may differ: how a fresh run initialises its weights (a restored
# checkpoint brings its own), how masks are pasted at evaluation and how the mask head's
# training slots are batched (the same function). Checkpoints written before these fields
# existed restore too.
NON_ARCHITECTURE_KEYS = (
    "model.backbone_weights",
    "model.init_from",
    "model.allow_random_frozen_backbone",
    "model.roi_heads.mask_paste",
    "model.roi_heads.mask_head_chunk",
)


# Config fields added after checkpoints were first written (b6b1288), each with the value (as
# JSON) that keeps what it controls as it was before the field existed: `load_config` reads it
# into a stored config that lacks the field, so an older checkpoint loads, evaluates and resumes
# (with today's code otherwise: e.g. computing on each image's extent since 92e1ca6).
ADDED_FIELDS = {
    "data.canvas_group_weights": [],  # c126d47: one canvas
    "data.canvas_groups": [],
    "data.exif_orientation": False,  # stored pixels
    "data.label_to_category_id": [],  # 3ebee39
    "data.resize_antialias": False,  # 5a95b0f
    "data.resize_max_long_side": 0,  # e66b23b: images fit the canvas
    "data.resize_short_side": 0,
    "data.shapes_num_train": 2000,  # 26aaebc: build_shapes' sizes
    "data.shapes_num_val": 200,
    "data.skip_empty_train_images": False,  # 07e7470: every image trained on
    "data.train_images": "",  # fb17d16: COCO-format files
    "data.train_json": "",
    "data.train_short_sides": [],  # 07e7470: one shorter side
    "data.val_images": "",
    "data.val_json": "",
    "model.allow_random_frozen_backbone": False,  # e2668bf: a fresh run's check only
    "model.backbone_weights": "",
    "model.fpn_norm": False,  # aa45945: the heads of before
    "model.init_from": "",  # dd18ba8
    "model.roi_heads.box_head_conv_dim": 256,
    "model.roi_heads.box_head_convs": 0,
    "model.roi_heads.box_head_fcs": 2,
    "model.roi_heads.head_norm": False,
    "model.roi_heads.mask_head_chunk": 0,  # c2c32c5: one pass
    "model.roi_heads.mask_head_convs": 4,  # 4b35432
    "model.roi_heads.mask_paste": "torchvision",  # e2668bf: torchvision's paste
    "model.roi_heads.mask_rois_per_image": 0,  # d0c40d9: every foreground slot
    "model.roi_heads.roi_align_method": "gather",  # 26aaebc
    "model.rpn.num_convs": 1,  # aa45945
    "model.size_divisibility": 32,  # c5b0a41: canvases were multiples of 64
    "train.adam_betas": [0.9, 0.999],  # ebe591f: SGD only
    "train.bias_weight_decay": False,  # 07e7470: kernels only decayed
    "train.optimizer": "sgd",
}

# Orbax's step metadata, in every checkpoint step folder (with the commit time when finished).
STEP_METADATA = "_CHECKPOINT_METADATA"
# What `save` records in its `custom_metadata`.
NUM_DEVICES_KEY = "num_devices"
IMAGES_PER_DEVICE_KEY = "images_per_device"


class CorruptCheckpointError(ValueError):
    """A checkpoint whose files are all there but cannot be read: their bytes were changed, a
    data file was truncated or deleted (e.g. a damaged copy or disk), or the config is not JSON.
    The message names the step folder (or file) and the other complete steps."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed: a full disk, a quota, a read-only or vanished folder. The
    message says what the storage said, the free space where known, and which complete
    checkpoints remain (untouched: orbax renames a checkpoint into place only when written)."""


def _corrupt(manager: ocp.CheckpointManager, step: int, what: str) -> CorruptCheckpointError:
    """The error for checkpoint `step` of `manager` being unreadable (`what`: the problem, naming
    the file where known), listing the other complete steps."""
    steps = [s for s in complete_steps(manager) if s != step]
    others = (
        f"the other complete checkpoints in {manager.directory} are steps {steps}"
        if steps
        else f"{manager.directory} holds no other complete checkpoint"
    )
    return CorruptCheckpointError(
        f"checkpoint folder {step_dir(manager, step)} is corrupt or truncated: {what}. Copy it "
        f"again from where it was written, or move it away; {others}."
    )


def _collect_failed_tasks() -> None:
    """Collects the asyncio tasks and coroutines of a failed restore or save now, rather than at
    some later point or at exit (where their reports are noise, e.g. `ImportError: sys.meta_path
    is None` from orbax's write coroutines)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coroutines never awaited
        gc.collect()


def _free_bytes(directory: epath.Path) -> int | None:
    """The free space on the disk of a local `directory` (or of its nearest existing parent), in
    bytes; None where unknown (e.g. cloud storage)."""
    path = os.fspath(directory)
    if paths.is_url(path):
        return None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.0f} MiB"


def disk_space_warning(manager: ocp.CheckpointManager, state: TrainState) -> str | None:
    """A warning when the disk of `manager`'s folder has room for fewer than two checkpoints of
    `state` (a checkpoint is written beside the previous one, which goes only afterwards, if at
    all), or None; None also where the free space is unknown (e.g. cloud storage)."""
    leaves = jax.tree.leaves(state_tree(state))  # arrays (no copy to the host) and Python scalars
    size = sum(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes for x in leaves)
    free = _free_bytes(manager.directory)
    if free is None or free >= 2 * size:
        return None
    return (
        f"{_mib(free)} free on the disk of {manager.directory}, and a checkpoint of this run takes "
        f"about {_mib(size)}: writing checkpoints will fail (training then stops, keeping the "
        "complete ones). Free some space or choose another --workdir."
    )


@contextlib.contextmanager
def _writing(manager: ocp.CheckpointManager) -> Iterator[None]:
    """Runs a save or a wait for saves of `manager`, turning a failed write into a
    `CheckpointWriteError` (orbax's is a ~2 KB TensorStore spec amid hundreds of lines of
    reports from its other writes, which are dropped)."""
    storage_errors.drop_reports_of_failures()  # before writing: threads report at once
    try:
        yield
        return
    except Exception as error:
        reason = storage_errors.storage_failure(error, os_errors=True)
        if reason is None:
            raise
    _collect_failed_tasks()
    try:
        steps = complete_steps(manager)
        kept = (
            f"the complete checkpoints there, steps {steps}, are untouched"
            if steps
            else "it holds no complete checkpoint yet"
        )
    except OSError:  # it cannot be listed (e.g. its permissions changed): not this error's news
        kept = "its complete checkpoints, if any, are untouched"
    free = _free_bytes(manager.directory)
    free = "" if free is None else f", {_mib(free)} free on its disk"
    raise CheckpointWriteError(
        f"writing a checkpoint to {manager.directory} failed ({reason}){free}; {kept}. Mend "
        "that (free some space if the disk is full, or choose another folder) and run the same "
        "command again: a training run resumes from the latest complete checkpoint."
    )


@contextlib.contextmanager
def _interrupts_after_the_block() -> Iterator[None]:
    """A Ctrl-C (SIGINT) during the block raises its KeyboardInterrupt once the block is done,
    so that a checkpoint save is begun whole: orbax starts it on this thread (a temporary folder,
    the arrays copied to host) before writing in the background, and an interrupt there left the
    temporary folder and lost the checkpoint (or, waited for, hung 5 minutes). So does SIGTERM
    where it raises `interrupts.Terminated` (the scripts but train.py). A second signal raises at
    once. Only where the signal has its raising handler, on the main thread (the first Ctrl-C of
    a multi-process trainer goes to JAX's preemption service instead; a second one comes here)."""
    previous = interrupts.raising_handlers()
    if not previous:
        yield
        return
    received = []

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def on_signal(signum, frame) -> None:
        if received:  # a second signal: at once (the save may wait long on an earlier write)
            restore()
            raise interrupts.exception_of(signum)
        received.append(signum)

    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        restore()
    if received:
        raise interrupts.exception_of(received[0])


def finish_writes(manager: ocp.CheckpointManager) -> None:
    """Blocks until the checkpoints being written by `manager` are complete.

    Raises:
      CheckpointWriteError: writing one failed (e.g. the disk is full), naming the folder.
    """
    with _writing(manager):
        manager.wait_until_finished()


def _read_arrays(manager: ocp.CheckpointManager, step: int, read: Callable[[], T]) -> T:
    """`read()`, which reads the arrays of checkpoint `step` (their metadata or data).

    Data bytes changed inside a chunk are found only where they break its compression: the
    checkpoint's b-tree nodes carry checksums, the arrays' chunks do not.

    Raises:
      KeyboardInterrupt: a Ctrl-C or SIGTERM (`interrupts.Terminated`) cut the read, which orbax
        reports as a failed read ("Encountered error while reading array index"); the scripts'
        handler counts it (`interrupts.raised_since`).
      CorruptCheckpointError: reading failed in TensorStore (a data file truncated, deleted or
        with other bytes), naming the step folder, TensorStore's reason (without its ~2 KB spec)
        and the other complete steps. Not chained to orbax's error: that holds the asyncio tasks
        of the other reads; they are collected here, and what they report is dropped
        (`storage_errors.drop_reports_of_failures`).
      Exception: any other error of `read` (e.g. a tree that does not fit), unchanged.
    """
    storage_errors.drop_reports_of_failures()  # before reading: threads report at once
    raised = interrupts.raised_count()
    try:
        return read()
    except Exception as error:  # orbax wraps TensorStore's error in a bare `Exception`
        if (signum := interrupts.raised_since(raised)) is not None:  # not a damaged checkpoint
            raise interrupts.exception_of(signum) from None
        reason = storage_errors.storage_failure(error)
        if reason is None:
            raise
    _collect_failed_tasks()  # `error` is gone with the except clause
    raise _corrupt(manager, step, f"its arrays cannot be read ({reason})")


def _restore_arrays(manager: ocp.CheckpointManager, step: int, target) -> dict[str, Any]:
    """The `state` item of checkpoint `step` restored into `target` (`StandardRestore`).

    Raises:
      CorruptCheckpointError: reading the arrays failed (`_read_arrays`).
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
    return _read_arrays(manager, step, lambda: manager.restore(step, args=args))["state"]


_INTERRUPTED_SAVE = ".orbax-checkpoint-tmp"  # in the name of a save's folder until it commits


def holds_checkpoints(workdir: epath.PathLike) -> bool:
    """Whether `<workdir>/checkpoints` holds anything but the temporary folders of saves that a
    kill interrupted (`<step>.orbax-checkpoint-tmp*`, which `create_manager(clean_up=True)`
    removes)."""
    folder = checkpoint_dir(workdir)
    return folder.is_dir() and any(_INTERRUPTED_SAVE not in p.name for p in folder.iterdir())


def has_complete_checkpoint(workdir: epath.PathLike) -> bool:
    """Whether `<workdir>/checkpoints` holds a complete checkpoint (`complete_steps_in`), which a
    run there resumes from. No orbax manager, whose creation is a collective of all processes
    (one on process 0 alone, or with a process gone, would wait for them). False where it
    cannot be listed."""
    try:
        return bool(complete_steps_in(checkpoint_dir(workdir)))
    except Exception:  # OSError locally; the storage backend's own errors elsewhere
        return False


def complete_steps_in(directory: epath.PathLike) -> list[int]:
    """The steps (increasing) whose folders in the checkpoints folder `directory` are complete
    checkpoints (`missing_parts`), read from its files now: a manager's own list of steps is
    the one it read when made or last saved, not what another process wrote or deleted since.
    Temporary folders of saves in progress and folders set aside (`<step>.incomplete`) are not
    steps. [] when `directory` does not exist."""
    directory = epath.Path(directory)
    if not directory.exists():
        return []
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and not missing_parts(p)
    )


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    """Where the checkpoints of a workdir live: `<workdir>/checkpoints`, a local workdir made
    absolute (`paths.absolute`: `~` expanded, relative to the current folder), as orbax refuses
    relative paths."""
    return epath.Path(paths.absolute(workdir)) / "checkpoints"


class _ReadOnlyNotice(std_logging.Filter):
    """Drops orbax's warning that a read-only manager's folder "is read only" (the folder is
    not; the manager only reads it): printed by eval.py, predict.py and export.py each time."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.msg != "Given directory is read only=%s"


def create_manager(
    workdir: epath.PathLike,
    max_to_keep: int | None = None,
    read_only: bool = False,
    clean_up: bool = False,
) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `<workdir>/checkpoints`, saving asynchronously, or only reading
    with `read_only`. `clean_up` removes, before this returns, the temporary folders
    (`<step>.orbax-checkpoint-tmp*`) of saves that a crash or a kill interrupted: only for the
    one run writing there (the trainer holds the workdir's lock), and never on cloud storage,
    where orbax takes every folder without its commit file for one (converted or copied
    checkpoints, `<step>.incomplete`)."""
    clean_up = clean_up and not read_only and not paths.is_url(str(workdir))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=0 if read_only else 1,  # orbax warns when it sets 0 itself
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=clean_up,
    )
    notice, absl_logger = _ReadOnlyNotice(), std_logging.getLogger("absl")
    absl_logger.addFilter(notice)
    try:
        manager = ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )
    finally:
        absl_logger.removeFilter(notice)
    # orbax cleans up in a thread that only `save` waits for: a run ending on an error before
    # its first save (a bad dataset) exited under it, with a traceback after the error line.
    await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)  # orbax 0.12
    if clean_up and await_cleanup:
        try:
            await_cleanup()
        except BaseException:
            manager.close()
            raise
    return manager


def state_tree(state: TrainState) -> dict[str, Any]:
    """The array part of a train state (what is written to disk)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def save(
    manager: ocp.CheckpointManager, state: TrainState, config: ml_collections.ConfigDict
) -> None:
    """Saves `state` at its step (asynchronously; call `finish_writes(manager)` to block).

    Records the number of devices (all processes') and the training images per device in the
    step's metadata (`run_metadata`).

    Raises:
      CheckpointWriteError: writing this or the previous checkpoint (which orbax waits for
        first) failed, e.g. the disk is full.
    """
    step = int(jax.device_get(state.step))
    num_devices = jax.device_count()
    per_device = config.train.batch_size / num_devices
    with _interrupts_after_the_block(), _writing(manager):
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_tree(state)),
                config=ocp.args.JsonSave(json.loads(config.to_json())),
            ),
            custom_metadata={
                NUM_DEVICES_KEY: num_devices,
                IMAGES_PER_DEVICE_KEY: int(per_device) if per_device.is_integer() else per_device,
            },
        )


def step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """The folder of checkpoint `step` (which may not exist)."""
    return epath.Path(manager.directory) / str(step)


def missing_parts(folder: epath.PathLike) -> list[str]:
    """What a finished checkpoint has that the step folder `folder` lacks: [] for a complete one.

    Orbax writes a checkpoint in a temporary folder that it renames when finished, so a folder
    with a step's name lacks files only when made otherwise, e.g. by an interrupted copy. A
    finished one holds orbax's step metadata (`_CHECKPOINT_METADATA`), the config item
    (`config/metadata`) and the state item's tree metadata (`state/_METADATA`) and, stored as
    OCDBT (orbax's default), its database manifest (`state/manifest.ocdbt`). The array data
    themselves are not checked.
    """
    folder = epath.Path(folder)
    if not folder.is_dir():
        return ["everything (it is not a folder)"]
    wanted = [STEP_METADATA, "config/metadata", "state/_METADATA"]
    missing = [name for name in wanted if not (folder / name).is_file()]
    if "state/_METADATA" not in missing:
        try:
            use_ocdbt = json.loads((folder / "state" / "_METADATA").read_text()).get("use_ocdbt")
        except (OSError, ValueError, AttributeError):
            return [*missing, "a readable state/_METADATA"]
        if use_ocdbt and not (folder / "state" / "manifest.ocdbt").is_file():
            missing.append("state/manifest.ocdbt")
    return missing


def complete_steps(manager: ocp.CheckpointManager) -> list[int]:
    """The steps (increasing) whose folders in `manager`'s directory are complete checkpoints,
    as its files are now (`complete_steps_in`)."""
    return complete_steps_in(manager.directory)


def _incomplete(manager: ocp.CheckpointManager, step: int, missing: list[str]) -> str:
    return (
        f"checkpoint folder {step_dir(manager, step)} is incomplete (it lacks "
        f"{', '.join(missing)}; an interrupted copy?)"
    )


def _none_complete(manager: ocp.CheckpointManager, purpose: str = "") -> str:
    """Why `manager` has no complete checkpoint (`purpose`, e.g. " to resume"): each step
    folder, and what it lacks."""
    folders = [
        _incomplete(manager, s, missing_parts(step_dir(manager, s))) for s in manager.all_steps()
    ]
    return f"no complete checkpoint{purpose} in {manager.directory}" + (
        ": " + "; ".join(folders) if folders else ""
    )


_SKIPPED: set[tuple[str, tuple[str, ...]]] = set()  # (folder, what it lacks) warned of


def latest_step(manager: ocp.CheckpointManager, warn: bool = True) -> int | None:
    """The latest step whose folder is a complete checkpoint (`missing_parts`), None if none is.

    Later step folders that are not complete checkpoints are skipped, each (`warn`) with a
    warning that names it and what it lacks, once per process (a script locates, then loads).
    """
    for step in sorted(manager.all_steps(), reverse=True):
        missing = missing_parts(step_dir(manager, step))
        if not missing:
            return step
        seen = (str(step_dir(manager, step)), tuple(missing))
        if warn and seen not in _SKIPPED:
            _SKIPPED.add(seen)
            logging.warning(
                "Skipping checkpoint folder %s: not a complete checkpoint (it lacks %s; an "
                "interrupted copy?)",
                step_dir(manager, step),
                ", ".join(missing),
            )
    return None


def choose_step(manager: ocp.CheckpointManager, step: int | None = None) -> int:
    """`step`, or the latest complete step (`latest_step`) when None, checked to be a complete
    checkpoint of `manager`.

    Raises:
      FileNotFoundError: there is no such step (the message names its save in progress, or
        cut by a kill, where its temporary folder exists), or its folder is not a complete
        checkpoint (naming the folder, what it lacks and the complete steps), or `step` is None
        and no step folder is complete.
    """
    if step is None:
        step = latest_step(manager)
        if step is None:
            raise FileNotFoundError(_none_complete(manager))
        return step
    found = complete_steps(manager)
    if step in found:
        return step
    folder = step_dir(manager, step)
    if folder.exists():
        raise FileNotFoundError(
            f"{_incomplete(manager, step, missing_parts(folder))}; the complete checkpoints in "
            f"{manager.directory} are steps {found}"
        )
    saves = sorted(p.name for p in folder.parent.glob(f"{step}{_INTERRUPTED_SAVE}*"))
    raise FileNotFoundError(
        f"no complete checkpoint {step} in {manager.directory} (found steps {found})"
        + (f": it is being written, or a kill cut its save (folder {saves[0]})" if saves else "")
    )


def resume_step(manager: ocp.CheckpointManager) -> int | None:
    """The step a run in `manager`'s directory resumes from: the latest complete checkpoint
    (later incomplete folders are left to `set_aside_incomplete`), None for a fresh run.

    Raises:
      FileNotFoundError: there are step folders but none is a complete checkpoint (naming them
        and what they lack): a fresh start would train over the run they came from.
    """
    step = latest_step(manager, warn=False)
    if step is None and manager.all_steps():
        raise FileNotFoundError(
            _none_complete(manager, " to resume")
            + ". Complete the copy, remove those folders, or train in a new --workdir."
        )
    return step


def set_aside_incomplete(manager: ocp.CheckpointManager) -> list[epath.Path]:
    """Renames every step folder of `manager` that is not a complete checkpoint to
    `<step>.incomplete` (`.incomplete-2`, `-3`... if taken), which orbax ignores, so that a
    resumed run saves its own checkpoints at those steps (orbax would skip the save of a step at
    or below the latest folder, and fail on an existing one). Nothing is deleted; each folder
    moved is logged with a warning. Process 0 renames, the others wait for it. Returns the new
    paths.
    """
    moved = []
    if jax.process_index() == 0:
        for step in manager.all_steps():
            folder = step_dir(manager, step)
            missing = missing_parts(folder)
            if not missing:
                continue
            target, n = folder.with_name(f"{step}.incomplete"), 1
            while target.exists():
                n += 1
                target = folder.with_name(f"{step}.incomplete-{n}")
            folder.rename(target)
            moved.append(target)
            logging.warning("%s: moved to %s", _incomplete(manager, step, missing), target)
    if jax.process_count() > 1:  # every process, whatever it saw: none passes before the renames
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mrcnn_jax: incomplete checkpoints set aside")
    manager.reload()
    return moved


def run_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """What `save` recorded about the run with checkpoint `step`: `num_devices` and
    `images_per_device` (training images per device); `{}` for checkpoints written before it
    recorded them (or by other means)."""
    try:
        metadata = json.loads((step_dir(manager, step) / STEP_METADATA).read_text())
    except (OSError, ValueError):
        return {}
    return (metadata.get("custom_metadata") if isinstance(metadata, dict) else None) or {}


def images_per_device_warning(
    manager: ocp.CheckpointManager,
    step: int,
    config: ml_collections.ConfigDict,
    num_devices: int,
) -> str | None:
    """Why resuming checkpoint `step` with `config` on `num_devices` devices trains another
    function than the run that wrote it, or None.

    With `model.norm="batch"` every BatchNorm layer that uses batch statistics (the backbone's
    and, with `model.fpn_norm` / `model.roi_heads.head_norm`, those of the FPN and heads)
    normalises over the images of one device, so the images per device
    (`train.batch_size / devices`) are part of what is trained. None when they are the same,
    when the norm is "frozen" or "sync" (statistics over the global batch), at step 0 (nothing
    trained yet) or when the checkpoint did not record its devices (written before it did).
    """
    if config.model.norm != "batch" or not step:
        return None
    recorded = run_metadata(manager, step)
    saved_devices = recorded.get(NUM_DEVICES_KEY)
    saved_per_device = recorded.get(IMAGES_PER_DEVICE_KEY)
    per_device = config.train.batch_size / num_devices
    if not saved_devices or saved_per_device is None or saved_per_device == per_device:
        return None
    return (
        f'model.norm="batch" normalises over the images of each device: checkpoint '
        f"{step_dir(manager, step)} was trained with {count_of(saved_per_device, 'image')} per "
        f"device ({count_of(saved_devices, 'device')}), this run has {per_device:g} "
        f"(train.batch_size={config.train.batch_size} on {count_of(num_devices, 'device')}), so "
        "its BatchNorm statistics, and the training, differ from an uninterrupted run. Resume "
        f"on {count_of(saved_devices, 'device')} with train.batch_size="
        f"{saved_per_device * saved_devices:g} to continue it exactly, or use "
        "--config.model.norm=sync (statistics over the whole batch, the same on any number of "
        "devices) in new runs."
    )


def count_of(n: float, noun: str) -> str:
    """`n` and `noun`, plural unless `n` is 1: "1 device", "8 devices", "0.5 images"."""
    return f"{n:g} {noun}{'' if n == 1 else 's'}"


def _lookup(config_dict: dict, dotted: str):
    node = config_dict
    for name in dotted.split("."):
        node = node[name]
    return node


def _flatten(prefix: str, value) -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def config_mismatches(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The `ARCHITECTURE_KEYS` fields (flattened) where `saved` (JSON) and `config` differ,
    except `NON_ARCHITECTURE_KEYS`."""
    current = json.loads(config.to_json())
    problems = []
    for key in ARCHITECTURE_KEYS:
        old = _flatten(key, _lookup(saved, key))
        new = _flatten(key, _lookup(current, key))
        for name in sorted(set(old) | set(new)):
            if name in NON_ARCHITECTURE_KEYS:
                continue
            if old.get(name) != new.get(name):
                problems.append(f"{name}: checkpoint {old.get(name)!r} vs config {new.get(name)!r}")
    return problems


def load_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config (as a JSON dict) stored with checkpoint `step`, with the value of each of
    `ADDED_FIELDS` it lacks (a checkpoint written before the field existed).

    Raises:
      CorruptCheckpointError: the stored config (`<step>/config/metadata`) is not a JSON object
        (e.g. damaged bytes); the message names the file and the other complete steps.
    """
    path = step_dir(manager, step) / "config" / "metadata"
    try:
        restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(manager, step, f"{path} is not valid JSON ({error})") from error
    config = restored["config"]
    if not isinstance(config, dict):
        raise _corrupt(manager, step, f"{path} holds a {type(config).__name__}, not a config")
    return with_added_fields(config)


def with_added_fields(saved: dict) -> dict:
    """`saved` (a stored config as JSON) with `ADDED_FIELDS` it lacks set to their values (in a
    section it lacks too: then it is no config of this project, which the checks say)."""
    saved = copy.deepcopy(saved)
    for name, value in ADDED_FIELDS.items():
        *sections, field = name.split(".")
        node = saved
        for section in sections:
            node = node.setdefault(section, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.setdefault(field, copy.deepcopy(value))
    return saved


def restore(
    manager: ocp.CheckpointManager,
    state: TrainState,
    config: ml_collections.ConfigDict,
    step: int | None = None,
) -> TrainState:
    """Restores checkpoint `step` (default: the latest) into the structure of `state`.

    A checkpoint of another `train.optimizer` restores only at step 0 (converted weights,
    `save_variables`), where every optimizer's state is its initial one: `state` keeps its own.
    Gradient clipping may be turned on or off (`train.grad_clip_norm`, as the non-finite loss
    error advises): its stage holds no arrays, so the optimizer state carries over whole.

    Raises:
      FileNotFoundError: there is no (complete) checkpoint (`choose_step`).
      CorruptCheckpointError: its config or arrays cannot be read (a file damaged, truncated or
        deleted), naming the step folder or file and the other complete steps.
      ValueError: the checkpoint was written with a different architecture (the message lists
        the differing config fields), or trained past step 0 with another optimizer.
    """
    step = choose_step(manager, step)
    saved = load_config(manager, step)
    problems = config_mismatches(saved, config)
    if problems:
        workdir = epath.Path(manager.directory).parent
        raise ValueError(
            f"checkpoint {manager.directory}/{step} was written with another config:\n  "
            + "\n  ".join(problems)
            + f"\nTo resume that run, give it the config it was written with; to start from its "
            f"weights with this config (e.g. converted weights fine-tuned on your data), train "
            f"in a new --workdir with --config.model.init_from={workdir}"
        )
    optimizer = saved["train"]["optimizer"]
    if optimizer != config.train.optimizer:
        if step:
            raise ValueError(
                f"checkpoint {manager.directory}/{step} was trained with train.optimizer="
                f"{optimizer!r}, the config asks for {config.train.optimizer!r}: its optimizer "
                f"state cannot continue under another optimizer. Resume with "
                f"--config.train.optimizer={optimizer}, or train in a new --workdir."
            )
        raw = restore_raw(manager, step)
        return state.replace(
            params=_like(state.params, raw["params"]),
            batch_stats=_like(state.batch_stats, raw.get("batch_stats") or {}),
        )
    saved_clip = float(saved.get("train", {}).get("grad_clip_norm", config.train.grad_clip_norm))
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(state))
    if (saved_clip > 0) != (config.train.grad_clip_norm > 0):
        target["opt_state"] = _opt_state_with_clipping(
            target["opt_state"], state.params, config, saved_clip
        )
    restored = _restore_arrays(manager, step, target)
    leaves = jax.tree_util.tree_leaves(restored["opt_state"])
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.opt_state), leaves)
    return state.replace(**{**restored, "opt_state": opt_state})


def _opt_state_with_clipping(
    target, params, config: ml_collections.ConfigDict, grad_clip_norm: float
):
    """`target`, the optimizer state's arrays (ShapeDtypeStructs), in the tree of the optimizer
    with `train.grad_clip_norm = grad_clip_norm` over `params`: the clipping stage holds no
    arrays, so both trees have the same arrays in the same order."""
    other = ml_collections.ConfigDict(config.to_dict())
    other.train.grad_clip_norm = grad_clip_norm
    tx = state_lib.create_optimizer(other, state_lib.create_learning_rate_fn(other.train))
    saved = jax.eval_shape(tx.init, params)
    leaves = jax.tree_util.tree_leaves(target)
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(saved)]
    if shapes != [(x.shape, x.dtype) for x in leaves]:
        raise ValueError(
            f"the optimizer state under train.grad_clip_norm={grad_clip_norm} does not match "
            "this config's arrays"
        )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(saved), leaves)


def _like(target, values):
    """`values` (numpy) as arrays placed like the leaves of `target`, same tree and shapes."""

    def place(t, v):
        if t.shape != v.shape:
            raise ValueError(f"checkpoint array of shape {v.shape} where {t.shape} is expected")
        return jax.device_put(v.astype(t.dtype), t.sharding)

    return jax.tree_util.tree_map(place, target, values)


def restore_raw(
    manager: ocp.CheckpointManager,
    step: int,
    check_stored: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The state arrays of checkpoint `step` as stored (numpy), on any topology.

    The checkpoint may have been written on any number of devices and processes: the target is
    built from the stored shapes and dtypes and placed on this process's first local device, so
    orbax never tries to rebuild the saved device mesh. For inference: callers validate the tree
    against their model (see `mrcnn_jax.programs.predictor`), its shapes before any data is
    read with `check_stored(metadata)` (a tree of objects with `.shape` and `.dtype`): a
    downloaded checkpoint of a few KB may declare arrays of many GB.

    Raises:
      CorruptCheckpointError: the arrays cannot be read (a data file truncated, deleted or with
        other bytes), naming the step folder and the other complete steps.
      Whatever `check_stored` raises.
    """
    metadata = _read_arrays(manager, step, lambda: manager.item_metadata(step))["state"]
    if check_stored is not None:
        check_stored(metadata)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata
    )
    return jax.device_get(_restore_arrays(manager, step, target))


def save_variables(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, variables: dict
) -> epath.Path:
    """Writes `variables` (`params`, `batch_stats`) as step-0 checkpoint `<workdir>/checkpoints/0/`.

    The train state holds them with a fresh optimizer state and step 0, so `load_checkpoint`,
    the eval/predict scripts and `scripts/train.py --workdir` (fine-tuning) all restore it; used
    for converted weights. Returns the checkpoint directory.

    Raises:
      ValueError: `config.model` is not one the model can be built from
        (`checks.check_model_config`), or `config.data.class_names` or `label_to_category_id`
        has not one entry per class (`checks.check_class_fields`): the predictor would name
        the classes wrongly. (`predictor.check_loadable_config` checks the canvas too.)
      FileExistsError: `workdir` already holds checkpoints (the temporary folder of a save that
        a kill interrupted is not one: `holds_checkpoints`).
      CheckpointWriteError: writing failed (e.g. the disk is full).
      KeyboardInterrupt: a Ctrl-C (or `interrupts.Terminated`) during the save, once the write
        has ended and its step folder is removed: nothing is left (a second one raises at once,
        and may leave the save's temporary folder, which is no checkpoint).
    """
    check_model_config(config.model)
    check_class_fields(config)
    manager = create_manager(workdir)  # a temporary folder may be a training's save: kept
    if manager.latest_step() is not None:
        raise FileExistsError(f"{checkpoint_dir(workdir)} already holds checkpoints")
    state, _ = state_lib.train_state_from_variables(
        config, MaskRCNN.from_config(config.model), variables
    )
    written = False
    try:
        with _interrupts_after_the_block():  # an interrupted wait let orbax's thread write on
            save(manager, state, config)
            finish_writes(manager)
            written = True
    except KeyboardInterrupt:
        if written:  # held until the write ended: undone
            manager.delete(0)
            manager.close()
        raise  # a second signal: at once (the save's temporary folder may stay: no checkpoint)
    manager.close()
    return checkpoint_dir(workdir) / "0"
