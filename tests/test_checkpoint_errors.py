"""Checkpoint step folders that are not complete checkpoints (an interrupted copy) or whose files
are damaged (corrupt array data, a config that is not JSON), and resuming per-device BatchNorm
statistics (`model.norm="batch"`) on another number of images per device.

The checkpoints are written by `checkpoint.save` from zero variables of a tiny shapes config;
the trainer tests replace its compiled parts (the train step counts steps, the evaluation
returns zeros) and its input pipeline, so that they exercise the resume itself in seconds.
"""

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from collections.abc import Callable

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import synthetic_batch

import mrcnn_jax
from mrcnn_jax import interrupts
from mrcnn_jax.data import get_builder, pipeline
from mrcnn_jax.evaluation import IOU_TYPES, STAT_NAMES
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs import evaluator, trainer
from mrcnn_jax.programs import predictor as predictor_lib
from mrcnn_jax.programs.predictor import locate_checkpoint
from mrcnn_jax.train import checkpoint as ckpt_lib
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train import step as step_lib
from mrcnn_jax.train import storage_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 4  # of the complete checkpoint
BATCH = 8  # one image per CPU device (conftest: 8 devices)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def run_config(data_dir: str, **overrides):
    """`tiny_config` (`model.norm="batch"`, as configs/shapes_r18.py) on an 8/8-image shapes
    set, batch 8, 6 steps, checkpoints every 2: a resume at step 4 saves step 6."""
    return tiny_config(
        **{
            "data.data_dir": data_dir,
            "data.shapes_num_train": 8,
            "data.shapes_num_val": 8,
            "train.batch_size": BATCH,
            "eval.batch_size": BATCH,
            "train.num_steps": 6,
            "train.checkpoint_every": 2,
            "train.log_every": 1,
            **overrides,
        }
    )


def write_checkpoint(workdir, config, step: int = STEP, random_small: bool = False) -> None:
    """Checkpoint `step` of zero variables in `workdir`, as the trainer writes it; with
    `random_small` the variables of up to 4096 numbers are random instead (~200 KB of array data
    in OCDBT data files: zeros compress into the b-tree itself)."""
    model = MaskRCNN.from_config(config.model)
    variables = state_lib.zero_variables(model, tuple(config.data.image_size))
    if random_small:
        rng = np.random.default_rng(0)

        def fill(path, x):  # BatchNorm variances positive, as a checkpoint's must be
            if x.size > 4096:
                return x
            values = rng.standard_normal(x.shape).astype(x.dtype)
            return np.abs(values) if path[-1].key == "var" else values

        variables = jax.tree_util.tree_map_with_path(fill, variables)
    state, _ = state_lib.train_state_from_variables(config, model, variables)
    manager = ckpt_lib.create_manager(workdir)
    ckpt_lib.save(manager, state.replace(step=step), config)
    manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def saved(data_dir, tmp_path_factory):
    """(workdir with the complete checkpoint `STEP`, its config with the dataset's classes)."""
    config = run_config(data_dir)
    config = trainer.with_dataset_classes(config, get_builder(config.data))
    workdir = tmp_path_factory.mktemp("saved")
    write_checkpoint(workdir, config)
    return workdir, config


def copy_workdir(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "workdir")


def make_incomplete(workdir, how: str, step: int = 6):
    """A folder `checkpoints/<step>` as an interrupted copy leaves it: `empty` (mkdir), or a copy
    of checkpoint `STEP` without its `state/` item or without the state's OCDBT manifest."""
    folder = workdir / "checkpoints" / str(step)
    if how == "empty":
        folder.mkdir()
    else:
        shutil.copytree(workdir / "checkpoints" / str(STEP), folder)
        if how == "no_state":
            shutil.rmtree(folder / "state")
        else:
            (folder / "state" / "manifest.ocdbt").unlink()
    return folder


LACKS = {
    "empty": "_CHECKPOINT_METADATA, config/metadata, state/_METADATA",
    "no_state": "state/_METADATA",
    "no_manifest": "state/manifest.ocdbt",
}


def warnings_naming(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_read_only_manager_warns_of_nothing(saved, caplog):
    """eval.py, predict.py and export.py printed orbax's "Given directory is read only=…" and
    "read_only=True, setting save_interval_steps=0" warnings, twice each, on every run."""
    with caplog.at_level(logging.INFO, logger="absl"):
        ckpt_lib.create_manager(saved[0], read_only=True).close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    filters = logging.getLogger("absl").filters
    assert not any(isinstance(f, ckpt_lib._ReadOnlyNotice) for f in filters)  # only while made


# ------------------------------------------------------------------- incomplete step folders


@pytest.mark.parametrize("how", sorted(LACKS))
def test_the_latest_incomplete_folder_is_skipped_and_refused_when_named(
    how, saved, tmp_path, caplog
):
    """load_checkpoint / locate_checkpoint used to stop with orbax's bare KeyError ('Item
    "config" was not found in the checkpoint. Available items: []') naming no path."""
    workdir = copy_workdir(saved, tmp_path)
    folder = make_incomplete(workdir, how)
    with caplog.at_level("WARNING"):
        assert locate_checkpoint(workdir / "checkpoints") == (workdir, STEP)
        assert mrcnn_jax.load_checkpoint(workdir).step == STEP
    warning = warnings_naming(caplog, f"Skipping checkpoint folder {folder}: not a complete")[0]
    assert f"(it lacks {LACKS[how]};" in warning

    message = rf"{re.escape(str(folder))} is incomplete \(it lacks {re.escape(LACKS[how])};"
    message += rf".* complete checkpoints in .* are steps \[{STEP}\]"
    for path, step in ((workdir, 6), (folder, None)):
        with pytest.raises(FileNotFoundError, match=message):
            mrcnn_jax.load_checkpoint(path, step)


def test_without_a_complete_checkpoint_the_incomplete_folders_are_named(saved, tmp_path):
    workdir = copy_workdir(saved, tmp_path)
    folder = make_incomplete(workdir, "no_state")
    shutil.rmtree(workdir / "checkpoints" / str(STEP))
    with pytest.raises(
        FileNotFoundError,
        match=rf"no complete checkpoint in .*: checkpoint folder {re.escape(str(folder))} is "
        r"incomplete \(it lacks state/_METADATA",
    ):
        mrcnn_jax.load_checkpoint(workdir)


def run_script(name: str, workdir, tmp_path) -> subprocess.CompletedProcess:
    """scripts/eval.py, predict.py or export.py on `workdir`, with the other arguments each
    needs (predict.py: an existing file it does not read before the checkpoint loads)."""
    extra = {
        "eval.py": [],
        "predict.py": [__file__],
        "export.py": [f"--out={tmp_path / 'exported'}"],
    }[name]
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", name), f"--workdir={workdir}", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["eval.py", "predict.py", "export.py"])
def test_scripts_refuse_an_incomplete_checkpoint_with_a_usage_error(name, saved, tmp_path):
    """Named explicitly (`checkpoints/6`): exit status 1, the folder and what it lacks, no
    traceback (was orbax's KeyError traceback)."""
    workdir = copy_workdir(saved, tmp_path)
    folder = make_incomplete(workdir, "empty")
    result = run_script(name, folder, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"{folder} is incomplete (it lacks _CHECKPOINT_METADATA" in result.stderr
    assert f"are steps [{STEP}]" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# ------------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def saved_data(saved, tmp_path_factory):
    """(workdir with checkpoint `STEP` holding random arrays in OCDBT data files, its config)."""
    workdir = tmp_path_factory.mktemp("saved_data")
    write_checkpoint(workdir, saved[1], random_small=True)
    return workdir, saved[1]


def damage_data(workdir, how: str):
    """Damages checkpoint `STEP`'s state as a bad copy or disk would: its OCDBT data files (the
    arrays, in one file or, written under load, ~10) each `truncated` to 16 bytes, `deleted` or
    `overwritten` with 0xff (inside a chunk, changed bytes go unnoticed where they leave it
    decodable: the chunks carry no checksum), or a byte of its b-tree (`state/d/`, which has
    checksums) `flipped`. Every data file, as a file may hold data for only some arrays, or only
    b-tree nodes that the merged b-tree no longer reads. Returns the step folder."""
    folder = workdir / "checkpoints" / str(STEP)
    if how == "flipped":
        path = max((folder / "state" / "d").iterdir(), key=os.path.getsize)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return folder
    paths = sorted((folder / "state").glob("ocdbt.process_*/d/*"))
    assert paths, f"no OCDBT data files in {folder / 'state'}"
    for path in paths:
        if how == "truncated":
            path.write_bytes(path.read_bytes()[:16])
        elif how == "deleted":
            path.unlink()
        else:
            path.write_bytes(b"\xff" * path.stat().st_size)
    return folder


def add_other_step(workdir, step: int = 2):
    """A complete copy of checkpoint `STEP` as checkpoint `step`, for the errors to suggest."""
    shutil.copytree(workdir / "checkpoints" / str(STEP), workdir / "checkpoints" / str(step))


@pytest.mark.parametrize("how", ["truncated", "deleted", "overwritten", "flipped"])
def test_corrupt_array_data_is_refused_naming_the_step_folder(how, saved_data, tmp_path):
    """load_checkpoint used to stop with orbax's bare `Exception: Encountered error while reading
    array index ...` and a ~2 KB TensorStore spec (the b-tree: TensorStore's ValueError, spec
    included), the trainer's restore too."""
    workdir = copy_workdir(saved_data, tmp_path)
    add_other_step(workdir)
    folder = damage_data(workdir, how)
    message = (
        rf"checkpoint folder {re.escape(str(folder))} is corrupt or truncated: its arrays cannot "
        rf"be read \(.*\)\. .*the other complete checkpoints in .* are steps \[2\]\.$"
    )
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=message) as error:
        mrcnn_jax.load_checkpoint(workdir, STEP)
    assert isinstance(error.value, ValueError)  # what the scripts turn into a usage error
    assert "tensorstore_spec" not in str(error.value) and "TensorStore({" not in str(error.value)
    assert len(str(error.value).replace(str(workdir), "")) < 800  # paths aside
    assert mrcnn_jax.load_checkpoint(workdir, 2).step == 2  # the copy is fine

    config = saved_data[1]
    model = MaskRCNN.from_config(config.model)
    variables = state_lib.zero_variables(model, tuple(config.data.image_size))
    state, _ = state_lib.train_state_from_variables(config, model, variables)
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    try:
        with pytest.raises(ckpt_lib.CorruptCheckpointError, match=message):
            ckpt_lib.restore(manager, state, config, step=STEP)
    finally:
        manager.close()


def cut_array_reads(monkeypatch, interrupt: Callable[[], None]) -> None:
    """Makes `CheckpointManager.restore` of the arrays fail as an interrupt during the read
    does: `interrupt()` runs in orbax's code, and orbax reports what it raises as a failed read
    ("Encountered error while reading array index"). The config is read as usual."""
    restore = ckpt_lib.ocp.CheckpointManager.restore

    def interrupted_read(manager, step, args=None, **kwargs):
        if "state" not in args.keys():  # the config: read
            return restore(manager, step, args=args, **kwargs)
        try:
            interrupt()
        except KeyboardInterrupt as error:  # what orbax makes of it, in its event loop
            raise Exception("Encountered error while reading array index") from RuntimeError(
                f"Event loop is closed ({type(error).__name__})"
            )

    monkeypatch.setattr(ckpt_lib.ocp.CheckpointManager, "restore", interrupted_read)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_read_cut_by_an_interrupt_is_the_interrupt_not_a_corrupt_checkpoint(
    signum, saved, monkeypatch
):
    """A Ctrl-C or SIGTERM during the read (eval.py, predict.py, export.py, a resume) reached
    orbax's read as a failed read, reported as a corrupt checkpoint to move away (a helper hit
    it 2-3 times in 7 per script): the scripts' handler counts the interrupts it raises, and
    the read raises the interrupt instead."""
    workdir, _ = saved
    cut_array_reads(monkeypatch, lambda: interrupts.raise_interrupt(signum, None))
    with pytest.raises(interrupts.exception_of(signum).__class__) as raised:
        mrcnn_jax.load_checkpoint(workdir, STEP)
    assert type(raised.value) is type(interrupts.exception_of(signum))
    monkeypatch.undo()
    assert mrcnn_jax.load_checkpoint(workdir, STEP).step == STEP  # and it was fine


def test_a_ctrl_c_cutting_a_notebooks_read_is_the_interrupt(saved, monkeypatch):
    """Under Python's default SIGINT handler (a notebook's kernel), a Ctrl-C cutting the read
    was not counted, and ~5% of interrupted `load_checkpoint`s said "corrupt checkpoint ...
    move it away": `load_checkpoint` takes Ctrl-C as the scripts do while it runs
    (`interrupts.handled_interrupts`), then gives the default handler back."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    cut_array_reads(monkeypatch, lambda: signal.raise_signal(signal.SIGINT))  # a real Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        mrcnn_jax.load_checkpoint(saved[0], STEP)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_checkpoint_a_training_deletes_while_it_is_read_is_read_again_or_named(
    saved, tmp_path, monkeypatch, caplog
):
    """A training keeping its newest checkpoints (`train.keep_checkpoints`) deleted the one that
    load_checkpoint (eval.py, predict.py) was reading: that said "corrupt or truncated ... move
    it away", or orbax's "Checkpoint directory does not exist", about a healthy checkpoint. A
    read that fails while its folder stays complete is not that, newer checkpoints or not."""
    workdir = copy_workdir(saved, tmp_path)
    checkpoints = workdir / "checkpoints"
    restore_raw, moves = ckpt_lib.restore_raw, []

    def training_moves_on(manager, step, **kwargs):  # a newer checkpoint; this one deleted
        if len(moves) < moves_left:
            moves.append(step)
            shutil.copytree(checkpoints / str(step), checkpoints / str(step + 2))
            shutil.rmtree(checkpoints / str(step))
        return restore_raw(manager, step, **kwargs)

    monkeypatch.setattr(ckpt_lib, "restore_raw", training_moves_on)
    monkeypatch.setattr(predictor_lib, "_DELETION_SECONDS", 0.0)
    moves_left = 1
    with caplog.at_level("WARNING"):
        assert mrcnn_jax.load_checkpoint(workdir).step == STEP + 2  # the latest, read again
    assert moves == [STEP]
    assert warnings_naming(caplog, f"{checkpoints}/{STEP} was deleted while it was read")

    deleted = "was deleted while it was read{}: a training running in that workdir keeps only "
    moves_left = 2  # asked for by its step: named
    with pytest.raises(FileNotFoundError, match=deleted.format("")) as error:
        mrcnn_jax.load_checkpoint(workdir, STEP + 2)
    assert str(error.value).startswith(f"checkpoint {checkpoints}/{STEP + 2} ")
    assert moves == [STEP, STEP + 2]

    moves_left = 5  # deleted at every read: three reads, then said
    with pytest.raises(FileNotFoundError, match=deleted.format(", 3 times")):
        mrcnn_jax.load_checkpoint(workdir)
    assert moves == [STEP, STEP + 2, STEP + 4, STEP + 6, STEP + 8]

    def fails_as_a_newer_one_is_written(manager, step, **kwargs):
        shutil.copytree(checkpoints / str(step), checkpoints / str(step + 2))
        raise ValueError("a real read error")

    monkeypatch.setattr(ckpt_lib, "restore_raw", fails_as_a_newer_one_is_written)
    with pytest.raises(ValueError, match=r"^a real read error$"):
        mrcnn_jax.load_checkpoint(workdir)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"data": {x', r"is not valid JSON \(Expecting property name enclosed in double quotes"),
        (b"\xff\xfe{}", r"is not valid JSON \('utf-8' codec can't decode"),
        (b"", r"is not valid JSON \(Expecting value"),
        (b"[1, 2]", r"holds a list, not a config"),
    ],
)
def test_a_config_that_is_not_json_is_refused_naming_the_file(content, problem, saved, tmp_path):
    """load_checkpoint and the scripts used to say only `Expecting property name enclosed in
    double quotes: line 1 column 11`, naming no file."""
    workdir = copy_workdir(saved, tmp_path)
    path = workdir / "checkpoints" / str(STEP) / "config" / "metadata"
    path.write_bytes(content)
    message = (
        rf"checkpoint folder {re.escape(str(path.parent.parent))} is corrupt or truncated: "
        rf"{re.escape(str(path))} {problem}.*holds no other complete checkpoint\.$"
    )
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=message):
        mrcnn_jax.load_checkpoint(workdir)
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    try:
        with pytest.raises(ckpt_lib.CorruptCheckpointError, match=message):
            ckpt_lib.load_config(manager, STEP)
    finally:
        manager.close()


@pytest.mark.parametrize(
    "name, damage",
    [("eval.py", "data"), ("predict.py", "data"), ("export.py", "data"), ("predict.py", "config")],
)
def test_scripts_refuse_a_damaged_checkpoint_with_a_usage_error(name, damage, saved_data, tmp_path):
    """Exit status 1 and the step folder (or file), no traceback: was ~230 lines of asyncio
    tracebacks ending in `RuntimeError: Event loop is closed` (data), or JSON's message naming
    no file (config)."""
    workdir = copy_workdir(saved_data, tmp_path)
    if damage == "data":
        folder = damage_data(workdir, "truncated")
        expected = f"checkpoint folder {folder} is corrupt or truncated: its arrays cannot be read"
    else:
        path = workdir / "checkpoints" / str(STEP) / "config" / "metadata"
        path.write_text('{"data": {x')
        expected = f"{path} is not valid JSON (Expecting property name"
    result = run_script(name, workdir, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    for noise in ("Traceback", "asyncio", "Event loop is closed", "tensorstore_spec"):
        assert noise not in result.stderr, result.stderr[-3000:]


def test_the_storage_filter_installed_in_a_notebook_call_stays_after_it(monkeypatch):
    """A library call on the main thread (`interrupts.handled_interrupts`) puts its own
    unraisable hook back, but keeps the storage-failure filter installed over it during the
    call (it was dropped: reports arriving after the call, or at exit, were printed; a call
    from another thread kept it), its own layer then passing everything on."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    for _ in range(3):  # as load_checkpoint calls it: installed over the block's hook once
        with interrupts.handled_interrupts():
            storage_errors.drop_reports_of_failures()
    layers, hook = [], sys.unraisablehook
    while hook != reported.append:  # a chain of 2 each call longer (a RecursionError)
        layers.append(hook)
        hook = hook.previous
    assert len(layers) == 2 and layers[0].drops_storage_failures
    write = ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at ...')
    for error in (write, KeyboardInterrupt()):
        report = types.SimpleNamespace(exc_value=error, exc_type=type(error), object=None)
        sys.unraisablehook(report)
    assert [r.exc_value for r in reported] == [error]  # the interrupt is no longer redelivered
    with interrupts.handled_interrupts():
        pass
    assert sys.unraisablehook.drops_storage_failures  # a block with nothing installed: the same


def test_reports_of_failed_reads_and_writes_are_dropped_and_nothing_else(monkeypatch):
    """What orbax's other reads or writes of a failed restore or save report later, from
    TensorStore's threads or when collected (at exit in CI: dozens of `Exception ignored in:
    <coroutine object _read_array_index_and_device_put>` and asyncio's "Task exception was never
    retrieved", each with a ~2 KB spec), or in orbax's error logs, is dropped; every other report
    passes unchanged."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    loggers = [logging.getLogger(name) for name in ("asyncio", "absl")]
    for logger in loggers:
        monkeypatch.setattr(logger, "filters", [])
    storage_errors.drop_reports_of_failures()
    storage_errors.drop_reports_of_failures()  # installed once
    assert [len(logger.filters) for logger in loggers] == [1, 1]

    read = ValueError('OUT_OF_RANGE: Error reading "params.x/0" in OCDBT database at ...')
    orbax = Exception("Encountered error while reading array index: (slice(0, 3, 1),). See ...")
    orbax.__cause__ = read
    write = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file "/w/": '
        "Failed to write 10 bytes to file 6: No space left on device [os_error_code='28'] "
        '[tensorstore_spec=\'{"driver":"zarr"}\']'
    )
    closed = RuntimeError("Event loop is closed")
    other = RuntimeError("something else")
    coroutine = object()  # what an unraisable exception is reported in
    unraisable = [
        (orbax, coroutine, False),
        (read, None, False),
        (write, coroutine, False),
        (closed, None, False),
        (closed, coroutine, True),  # not a callback on a closed loop
        (other, None, True),
        (ValueError("Error reading the user's file"), coroutine, True),
        (OSError(28, "No space left on device"), coroutine, True),  # not TensorStore's
    ]
    for error, obj, passes in unraisable:
        report = types.SimpleNamespace(exc_value=error, object=obj)
        sys.unraisablehook(report)
        assert (reported[-1:] == [report]) == passes, (error, obj)

    def record(name, error):
        exc_info = None if error is None else (type(error), error, None)
        return logging.LogRecord(name, logging.ERROR, "", 0, "Task exception", (), exc_info)

    for logger in loggers:
        for error, passes in [(orbax, False), (write, False), (other, True), (None, True)]:
            assert logger.filter(record(logger.name, error)) == passes, (logger.name, error)


def test_the_storage_failure_is_tensorstores_first_line_or_an_os_error():
    """One line, without the ~2 KB spec; over 500 characters, its start (what failed) and end
    (the OS's reason); an `OSError` only where asked for (orbax writes small files itself)."""
    find = storage_errors.storage_failure
    spec = ' [tensorstore_spec=\'{"driver": "zarr", "kvstore": "..."}\']'
    write = ValueError(f"RESOURCE_EXHAUSTED: Error writing: {'x' * 600}: No space left{spec}\nmore")
    wrapped = Exception("Save Finalize thread failed")
    wrapped.__context__ = write
    shortened = find(wrapped)
    assert len(shortened) <= 500
    assert shortened.startswith("RESOURCE_EXHAUSTED: Error writing: xxx")
    assert " ... " in shortened and shortened.endswith("xxx: No space left")
    short = ValueError(f'NOT_FOUND: Error reading "a/0" in OCDBT database at "/w/"{spec}')
    assert find(short) == 'NOT_FOUND: Error reading "a/0" in OCDBT database at "/w/"'
    disk_full = OSError(28, "No space left on device", "/w/config/metadata")
    assert find(disk_full) is None
    assert find(disk_full, os_errors=True) == (
        "[Errno 28] No space left on device: '/w/config/metadata'"
    )
    assert find(ValueError("tree structures differ"), os_errors=True) is None


@pytest.mark.parametrize(
    "directory, free_mib, warns",
    [("local", 300, False), ("local", 223, True), ("local", 0, True), ("gs://b/w", 0, False)],
)
def test_disk_space_warning_when_two_checkpoints_do_not_fit(
    directory, free_mib, warns, tmp_path, monkeypatch
):
    """A state of 112 MiB (all four parts counted) needs 224 MiB: the next checkpoint is written
    beside the previous one. Unknown free space (cloud storage) gives no warning."""
    mib = 2**20
    state = types.SimpleNamespace(
        step=np.zeros((), np.int32),
        params={"w": np.zeros(10 * mib, np.float32)},  # 40 MiB
        batch_stats={"mean": np.zeros(mib // 2, np.float32)},  # 2 MiB
        opt_state=(np.zeros(14 * mib, np.float32), np.zeros(14 * mib // 4, np.float32), 0),
    )  # 40 + 2 + 56 + 14 = 112 MiB, with the step's 4 bytes and a count's 8 (a Python int)
    path = tmp_path / "workdir" / "checkpoints" if directory == "local" else directory
    manager = types.SimpleNamespace(directory=path)
    seen = []

    def disk_usage(where):
        seen.append(where)
        return types.SimpleNamespace(free=free_mib * mib)

    monkeypatch.setattr(ckpt_lib.shutil, "disk_usage", disk_usage)
    warning = ckpt_lib.disk_space_warning(manager, state)
    if not warns:
        assert warning is None
        return
    assert warning == (
        f"{free_mib} MiB free on the disk of {path}, and a checkpoint of this run takes about "
        "112 MiB: writing checkpoints will fail (training then stops, keeping the complete "
        "ones). Free some space or choose another --workdir."
    )
    assert seen == [str(tmp_path)]  # the nearest folder that exists


# ------------------------------------------------------------------- resuming


def fake_compiled_parts(monkeypatch, config) -> None:
    """The trainer's train step only counts steps, its evaluation returns zeros, and its batches
    are one synthetic batch: what a resume restores, sets aside and saves stays real."""

    def make_train_step(config, mesh, learning_rate_fn):
        return lambda state, batch, key: (state.replace(step=state.step + 1), {"loss": 0.0})

    batch = synthetic_batch(config, np.random.default_rng(0), [1] * BATCH)
    monkeypatch.setattr(step_lib, "make_train_step", make_train_step)
    monkeypatch.setattr(  # a generator, as the pipeline's (the trainer closes it)
        pipeline,
        "create_train_dataset",
        lambda *args, **kwargs: (b for b in itertools.repeat(batch)),
    )
    metrics = {f"{t}/{n}": 0.0 for t in IOU_TYPES for n in STAT_NAMES}
    monkeypatch.setattr(evaluator, "evaluate_split", lambda *args, **kwargs: metrics)


def test_resume_sets_an_incomplete_folder_aside_and_saves_its_step(
    saved, tmp_path, monkeypatch, capsys, caplog
):
    """An interrupted copy left `checkpoints/6` beside the complete 4: the run resumes at 4
    (was a KeyError), moves the folder to `6.incomplete` (kept, with a warning) and writes its
    own checkpoint 6 (orbax skips saving a step at or below an existing step folder)."""
    workdir = copy_workdir(saved, tmp_path)
    folder = make_incomplete(workdir, "empty")
    (folder / "a_partial_file").write_text("kept")
    fake_compiled_parts(monkeypatch, saved[1])
    with caplog.at_level("WARNING"):
        trainer.train_and_evaluate(run_config(saved[1].data.data_dir), str(workdir))
    assert re.search(rf"Resumed from \S+ at step {STEP}\n", capsys.readouterr().out)
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    assert ckpt_lib.complete_steps(manager) == manager.all_steps() == [STEP, 6]
    assert int(ckpt_lib.restore_raw(manager, 6)["step"]) == 6
    manager.close()
    aside = workdir / "checkpoints" / "6.incomplete"
    assert (aside / "a_partial_file").read_text() == "kept"
    (warning,) = warnings_naming(caplog, f"moved to {aside}")
    assert f"{folder} is incomplete (it lacks _CHECKPOINT_METADATA" in warning


def test_an_interrupted_run_closes_its_metrics_files_and_input_pipeline(
    saved, tmp_path, monkeypatch
):
    """A notebook keeps the KeyboardInterrupt's traceback, whose frames held `metrics.jsonl`
    and the TensorBoard file open and the tf.data pipeline alive (~1 GB, ~60 threads) until
    the next error: the call closes them however it ends."""
    workdir = copy_workdir(saved, tmp_path)
    fake_compiled_parts(monkeypatch, saved[1])
    make_train_step, create_train_dataset = step_lib.make_train_step, pipeline.create_train_dataset
    closed = []

    def interrupted_at_the_second_step(config, mesh, learning_rate_fn):
        step, calls = make_train_step(config, mesh, learning_rate_fn), itertools.count()

        def interrupted(*args):
            if next(calls):
                raise KeyboardInterrupt
            return step(*args)

        return interrupted

    def batches(*args, **kwargs):
        try:
            yield from create_train_dataset(*args, **kwargs)
        finally:
            closed.append(True)

    monkeypatch.setattr(step_lib, "make_train_step", interrupted_at_the_second_step)
    monkeypatch.setattr(pipeline, "create_train_dataset", batches)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        trainer.train_and_evaluate(run_config(saved[1].data.data_dir), str(workdir))
    assert interrupt.value.__traceback__ is not None  # the frames are alive, as in a notebook
    open_files = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
            open_files.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not [f for f in open_files if f.startswith(str(workdir))], open_files
    assert closed == [True]


def test_resume_refuses_a_workdir_whose_only_checkpoint_is_incomplete(saved, tmp_path, monkeypatch):
    """Not a fresh start over the run the folder came from; nothing is moved."""
    workdir = copy_workdir(saved, tmp_path)
    folder = make_incomplete(workdir, "no_manifest")
    shutil.rmtree(workdir / "checkpoints" / str(STEP))
    fake_compiled_parts(monkeypatch, saved[1])
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(folder))} is incomplete"):
        trainer.train_and_evaluate(run_config(saved[1].data.data_dir), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["6"]


# ------------------------------------------------------------------- images per device


def test_resume_on_other_images_per_device_warns_under_batch_statistics(
    saved, tmp_path, monkeypatch, caplog
):
    """A `model.norm="batch"` checkpoint recorded on 1 device (8 images per device), resumed on
    the 8 CPU devices (1 per device): a warning naming both and suggesting norm="sync"; the run
    goes on. The auditor measured a different loss after such a resume (8 devices -> 1)."""
    _, config = saved
    workdir = tmp_path / "workdir"
    with monkeypatch.context() as fake:  # the checkpoint as one device writes it
        fake.setattr(jax, "device_count", lambda: 1)
        write_checkpoint(workdir, config)
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    assert ckpt_lib.run_metadata(manager, STEP) == {"num_devices": 1, "images_per_device": 8}
    manager.close()
    fake_compiled_parts(monkeypatch, config)
    with caplog.at_level("WARNING"):
        trainer.train_and_evaluate(run_config(config.data.data_dir), str(workdir))
    (warning,) = warnings_naming(caplog, "images per device")
    expected = "8 images per device (1 device), this run has 1 (train.batch_size=8 on 8 devices)"
    assert f"was trained with {expected}" in warning
    assert "Resume on 1 device with train.batch_size=8 to continue it exactly" in warning
    assert "--config.model.norm=sync" in warning
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    "norm, recorded, step, warns",
    [
        ("batch", {"num_devices": 1, "images_per_device": 8}, STEP, True),
        ("batch", {"num_devices": 8, "images_per_device": 1}, STEP, False),  # the same
        ("batch", {}, STEP, False),  # written before the devices were recorded
        ("batch", {"num_devices": 1, "images_per_device": 8}, 0, False),  # nothing trained
        ("sync", {"num_devices": 1, "images_per_device": 8}, STEP, False),
        ("frozen", {"num_devices": 1, "images_per_device": 8}, STEP, False),
    ],
)
def test_images_per_device_warning(norm, recorded, step, warns, saved, tmp_path):
    """Only per-device statistics (`model.norm="batch"`, also in the FPN and heads) depend on
    the images per device; a checkpoint without the record (older) still loads."""
    workdir = copy_workdir(saved, tmp_path)
    folder = workdir / "checkpoints" / str(STEP)
    metadata = json.loads((folder / ckpt_lib.STEP_METADATA).read_text())
    metadata["custom_metadata"] = recorded
    (folder / ckpt_lib.STEP_METADATA).write_text(json.dumps(metadata))
    config = run_config(saved[1].data.data_dir, **{"model.norm": norm})
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    warning = ckpt_lib.images_per_device_warning(manager, step, config, num_devices=8)
    manager.close()
    assert (warning is not None) == warns, warning
    if warns:
        assert "8 images per device (1 device), this run has 1" in warning
    assert mrcnn_jax.load_checkpoint(workdir).step == STEP


def test_save_records_the_devices(saved):
    manager = ckpt_lib.create_manager(saved[0], read_only=True)
    recorded = ckpt_lib.run_metadata(manager, STEP)
    manager.close()
    assert recorded == {"num_devices": 8, "images_per_device": 1}


def test_sigterm_checkpoints_the_step_it_interrupts_and_a_rerun_resumes(
    saved, tmp_path, monkeypatch
):
    """SIGTERM during step 5 (a preempted VM): the step finishes, checkpoint 5 is written (not on
    the every-2 schedule) and `Preempted` names it; before, the process died and the run lost
    the step since checkpoint 4. The handler is the previous one again afterwards, and running
    again resumes at 5 and finishes at 6."""
    workdir = copy_workdir(saved, tmp_path)
    fake_compiled_parts(monkeypatch, saved[1])

    def make_train_step(config, mesh, learning_rate_fn):
        def train_step(state, batch, key):
            if int(state.step) == STEP:  # step 5 runs
                os.kill(os.getpid(), signal.SIGTERM)
            return state.replace(step=state.step + 1), {"loss": 0.0}

        return train_step

    monkeypatch.setattr(step_lib, "make_train_step", make_train_step)
    before = signal.getsignal(signal.SIGTERM)
    config = run_config(saved[1].data.data_dir)
    with pytest.raises(trainer.Preempted, match=r"stopped at step 5 on SIGTERM .*checkpoint"):
        trainer.train_and_evaluate(config, str(workdir))
    assert signal.getsignal(signal.SIGTERM) == before
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    assert manager.all_steps() == [STEP, STEP + 1]
    assert int(ckpt_lib.restore_raw(manager, STEP + 1)["step"]) == STEP + 1
    manager.close()
    fake_compiled_parts(monkeypatch, saved[1])
    trainer.train_and_evaluate(config, str(workdir))
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    assert manager.all_steps() == [STEP, STEP + 1, 6]
    manager.close()


def test_has_complete_checkpoint_reads_the_files_alone(saved, tmp_path):
    """What train.py and the metrics writer say is kept when a run stops is read from the files
    (an orbax manager's creation is a collective: with a process gone, it failed again inside
    the one-line exit, a traceback instead)."""
    workdir, _ = saved
    assert ckpt_lib.has_complete_checkpoint(workdir)
    assert not ckpt_lib.has_complete_checkpoint(tmp_path / "absent")
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # an interrupted copy
    (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir()  # a killed save
    assert not ckpt_lib.has_complete_checkpoint(tmp_path)


def test_the_complete_steps_are_read_from_the_files_as_they_are_now(saved, tmp_path):
    """A manager's own list of steps is the one it read when made: a checkpoint written or
    deleted since by another process (a training beside eval.py, say) was left out of, or named
    in, the steps an error called complete. An explicit step whose save is in progress (or was
    cut by a kill) says so."""
    workdir = copy_workdir(saved, tmp_path)
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / str(STEP), checkpoints / "9")  # written by another process
    (checkpoints / "12.orbax-checkpoint-tmp-3").mkdir()  # a save in progress
    assert manager.all_steps() == [STEP]
    assert ckpt_lib.complete_steps(manager) == [STEP, 9]
    assert ckpt_lib.choose_step(manager, 9) == 9
    with pytest.raises(FileNotFoundError) as refused:
        ckpt_lib.choose_step(manager, 12)
    assert str(refused.value) == (
        f"no complete checkpoint 12 in {checkpoints} (found steps [{STEP}, 9]): it is being "
        "written, or a kill cut its save (folder 12.orbax-checkpoint-tmp-3)"
    )
    shutil.rmtree(checkpoints / str(STEP))  # deleted by a training's clean-up
    assert ckpt_lib.complete_steps(manager) == [9]
    with pytest.raises(
        FileNotFoundError, match=rf"no complete checkpoint {STEP} .*\(found steps \[9\]\)$"
    ):
        ckpt_lib.choose_step(manager, STEP)
    manager.close()
    assert ckpt_lib.complete_steps_in(tmp_path / "absent") == []
