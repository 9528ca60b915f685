"""End to end: `train_and_evaluate`, resuming, checkpoints, and scripts/{train,eval,predict}.py.

One tiny shapes run (8 devices, 4 steps, checkpoints at 2 and 4) is trained once per module and
shared. A persistent XLA compilation cache in a temporary directory lets the later runs (and the
scripts run as subprocesses with the same 8 CPU devices) reuse its compiled programs.
"""

import asyncio
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from conftest import tiny_config
from etils import epath
from orbax.checkpoint._src.path import temporary_paths

import mrcnn_jax
from configs import default as default_config
from configs import shapes_r18
from mrcnn_jax import interrupts
from mrcnn_jax.convert import imagenet
from mrcnn_jax.data import shapes
from mrcnn_jax.evaluation import IOU_TYPES, STAT_NAMES, coco_eval
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs import trainer
from mrcnn_jax.train import checkpoint as ckpt_lib
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train import storage_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_KEYS = {f"{t}/{n}" for t in IOU_TYPES for n in STAT_NAMES}
NUM_STEPS = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def run_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
    """`tiny_config` on a 16/8-image shapes set with the main job's optimizer (AdamW): batch 8
    (one image per CPU device), 4 steps, checkpoints every 2."""
    main_job = shapes_r18.get_config().train
    return tiny_config(
        **{
            "train.optimizer": main_job.optimizer,
            "train.base_lr": main_job.base_lr,
            "data.data_dir": data_dir,
            "data.shapes_num_train": 16,
            "data.shapes_num_val": 8,
            "train.batch_size": 8,
            "eval.batch_size": 8,
            "train.num_steps": NUM_STEPS,
            "train.checkpoint_every": 2,
            "train.log_every": 1,
            **overrides,
        }
    )


INPUT_DELAY_S = 2.0  # the `trained` run waits so long for step 3's batch (input_wait)


@pytest.fixture(scope="module")
def trained(compile_cache, data_dir, tmp_path_factory):
    """(workdir, config, returned metrics) of one uninterrupted run; step 3's batch comes
    `INPUT_DELAY_S` late, as from a slow input pipeline."""
    workdir = tmp_path_factory.mktemp("run")
    config = run_config(data_dir)
    create = trainer.pipeline.create_train_dataset

    def late_third_batch(*args, **kwargs):
        for number, batch in enumerate(create(*args, **kwargs), 1):
            if number == 3:
                time.sleep(INPUT_DELAY_S)
            yield batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer.pipeline, "create_train_dataset", late_third_batch)
        metrics = trainer.train_and_evaluate(config, str(workdir))
    return workdir, config, metrics


def copy_workdir(trained, tmp_path):
    """A copy of the trained workdir that a test may change."""
    return shutil.copytree(trained[0], tmp_path / "workdir")


TIMINGS = {"train/steps_per_second", "train/input_wait"}


def timeless(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without their timings."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def final_state(workdir) -> dict:
    """The arrays of the latest checkpoint in `workdir` (numpy)."""
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    state = ckpt_lib.restore_raw(manager, manager.latest_step())
    manager.close()
    return state


def leaves(tree) -> dict:
    """`{path string: leaf}` of a pytree."""
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(actual, expected):
    actual, expected = leaves(actual), leaves(expected)
    assert actual.keys() == expected.keys()
    for path, value in actual.items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def script_call(name: str, args: list[str], cache) -> dict:
    """`subprocess` arguments running scripts/<name> with this process's environment (so the
    same 8 CPU devices) plus the XLA cache."""
    return {
        "args": [sys.executable, os.path.join(REPO, "scripts", name), *args],
        "env": {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)},
        "cwd": REPO,
    }


def script(name: str, *args: str, cache, check: bool = True) -> subprocess.CompletedProcess:
    """Runs scripts/<name> to completion, capturing its output; `check` raises on failure."""
    result = subprocess.run(
        **script_call(name, list(args), cache), capture_output=True, text=True, timeout=600
    )
    if check and result.returncode:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return result


def config_flags(config: ml_collections.ConfigDict) -> list[str]:
    """`--config.…` flags turning configs/shapes_r18.py into `config`."""

    def flatten(prefix: str, node) -> dict:
        if not isinstance(node, dict):
            return {prefix: node}
        return {
            k: v
            for name, child in node.items()
            for k, v in flatten(f"{prefix}.{name}", child).items()
        }

    default = flatten("config", shapes_r18.get_config().to_dict())
    wanted = flatten("config", config.to_dict())
    assert set(default) == set(wanted)
    return [
        f"--{k}={v if isinstance(v, str) else repr(v)}"
        for k, v in sorted(wanted.items())
        if v != default[k]
    ]


# ------------------------------------------------------------------- train_and_evaluate


def test_train_and_evaluate_writes_logs_checkpoints_and_metrics(trained):
    workdir, _, metrics = trained
    assert set(metrics) == METRIC_KEYS
    assert all(np.isfinite(v) for v in metrics.values())

    assert [int(p.name) for p in sorted((workdir / "checkpoints").iterdir())] == [2, 4]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["data"]["class_names"] == list(shapes.CLASS_NAMES)
    assert saved["train"]["num_steps"] == NUM_STEPS

    records = read_jsonl(workdir / "metrics.jsonl")
    train_records = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, NUM_STEPS + 1))
    train_keys = {
        "step", "train/loss", "train/loss_rpn_cls", "train/loss_rpn_box", "train/loss_cls",
        "train/loss_box_reg", "train/loss_mask", "train/num_proposals", "train/num_fg_rois",
        "train/num_mask_rois", "train/grad_norm", "train/learning_rate", *TIMINGS,
    }  # fmt: skip
    for record in train_records:  # the timings leave out the first step (it compiles)
        keys = train_keys - TIMINGS if record["step"] == 1 else train_keys
        assert set(record) == keys
        assert all(np.isfinite(v) for v in record.values())
    # Step 3 waited INPUT_DELAY_S for its batch: input_wait / steps_per_second is the wait per
    # step. The others' batches were ready (prefetched during the compile and that wait).
    waits = {r["step"]: r["train/input_wait"] for r in train_records[1:]}
    per_step = {
        r["step"]: r["train/input_wait"] / r["train/steps_per_second"] for r in train_records[1:]
    }
    assert per_step[3] >= INPUT_DELAY_S and waits[3] <= 1, (waits, per_step)
    assert waits[2] < 0.5 and waits[4] < 0.5, (waits, per_step)
    (eval_record,) = [r for r in records if "eval/bbox/AP" in r]
    assert eval_record == {"step": NUM_STEPS, **{f"eval/{k}": v for k, v in metrics.items()}}

    marker, events = sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert marker.name.endswith(".start")  # `SessionLog.START`, for TensorBoard's readers
    tags = {
        value.tag
        for event in tf.compat.v1.train.summary_iterator(str(events))
        for value in event.summary.value
    }
    assert {"train/loss", "train/learning_rate", "eval/bbox/AP", "eval/segm/AP"} <= tags


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(
    trained, tmp_path, capsys, monkeypatch
):
    """Resuming at step 2 (the run's final checkpoint removed) ends where the run ended, without
    running the model's init (the restore overwrites every variable), and metrics.jsonl has
    the uninterrupted run's rows: those the stopped run logged after step 2 are dropped, not
    repeated. Run again, the finished run trains nothing, says so, and evaluates again in the
    place of its eval row. An `init_from` (or `backbone_weights`) given to the resume, which it
    does not use, is not recorded as the run's (config.json and the checkpoints named it)."""
    _, config, metrics = trained
    workdir = copy_workdir(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "train/loss"')  # torn by a crash
    left = workdir / "checkpoints" / "3.orbax-checkpoint-tmp"  # a write a kill -9 interrupted
    left.mkdir()
    (left / "_CHECKPOINT_METADATA").write_text("{}")

    want = timeless(read_jsonl(trained[0] / "metrics.jsonl"))
    assert [r["step"] for r in want] == [1, 2, 3, 4, 4]  # the last: the eval

    def no_init(*args, **kwargs):
        raise AssertionError("a resumed run initialised the model's variables")

    monkeypatch.setattr(state_lib, "init_variables", no_init)
    elsewhere = {"model.init_from": "/runs/other", "model.backbone_weights": "IMAGENET1K_V1"}
    resumed_metrics = trainer.train_and_evaluate(
        run_config(config.data.data_dir, **elsewhere), str(workdir)
    )
    out = capsys.readouterr().out
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    for stored in (
        json.loads((workdir / "config.json").read_text()),
        ckpt_lib.load_config(manager, NUM_STEPS),
    ):
        assert (stored["model"]["init_from"], stored["model"]["backbone_weights"]) == ("", "")
    manager.close()
    assert re.search(r"Resumed from \S+ at step 2\n", out)
    assert "Data: reading past the 16 records of steps 0-1 (not decoded" in out
    assert (
        "metrics.jsonl: dropped 3 rows logged after step 2, where this run starts (their steps "
        "are logged again) and a last line cut short by a crash"
    ) in out
    assert_trees_equal(final_state(workdir), final_state(trained[0]))
    assert resumed_metrics == metrics
    assert timeless(read_jsonl(workdir / "metrics.jsonl")) == want
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]

    config_json = (workdir / "config.json").read_text()
    other_lr = run_config(config.data.data_dir, **{"train.base_lr": 0.5})
    assert trainer.train_and_evaluate(other_lr, str(workdir)) == metrics
    out = capsys.readouterr().out
    assert "Checkpoint step 4 >= config.train.num_steps=4: nothing to train" in out
    assert "metrics.jsonl: dropped the eval row of step 4 (evaluated again)" in out
    assert timeless(read_jsonl(workdir / "metrics.jsonl")) == want
    assert (workdir / "config.json").read_text() == config_json  # not the lr it did not use


@pytest.mark.slow  # a whole run from step 0 (MetricWriter's drop is unit-tested)
def test_a_fresh_start_after_a_run_without_checkpoints_logs_each_step_once(trained, tmp_path):
    """A run stopped before its first checkpoint left its rows in metrics.jsonl: the same
    command, started again at step 0, appended the same steps again (rows were dropped only
    when a checkpoint was resumed)."""
    _, config, _ = trained
    workdir = copy_workdir(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints")
    trainer.train_and_evaluate(config, str(workdir))
    want = timeless(read_jsonl(trained[0] / "metrics.jsonl"))
    assert timeless(read_jsonl(workdir / "metrics.jsonl")) == want


def test_sigterm_during_the_evaluation_stops_it_and_a_rerun_evaluates(
    trained, tmp_path, monkeypatch
):
    """SIGTERM during the final evaluation (a preemption's grace period is shorter than a COCO
    evaluation): it stops before the next batch with `Preempted` (was: the evaluation ran on and
    the run exited 0); running again evaluates the checkpoint, with the uninterrupted metrics."""
    _, config, metrics = trained
    workdir = copy_workdir(trained, tmp_path)
    add_batch = coco_eval.CocoEvaluator.add_batch
    batches = []

    def add_batch_then_sigterm(self, *args, **kwargs):
        batches.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler sets its stop event
        return add_batch(self, *args, **kwargs)

    monkeypatch.setattr(coco_eval.CocoEvaluator, "add_batch", add_batch_then_sigterm)
    with pytest.raises(trainer.Preempted, match=rf"stopped at step {NUM_STEPS} on SIGTERM"):
        trainer.train_and_evaluate(config, str(workdir))
    assert len(batches) == 1  # the only eval batch: stopped before the scoring
    monkeypatch.setattr(coco_eval.CocoEvaluator, "add_batch", add_batch)
    assert trainer.train_and_evaluate(config, str(workdir)) == metrics


def test_resume_warns_of_another_learning_rate_or_other_classes(data_dir):
    """Changes that a checkpoint fits but that make the resumed run differ: a schedule giving
    another learning rate at the resumed step (a cosine run extended: high again), another
    dataset's classes, an init_from the resume does not use. Nothing at step 0 (fine-tuning
    converted weights) or without changes."""
    config = run_config(data_dir, **{"train.num_steps": 400})
    config.data.class_names = ("circle", "square", "triangle")
    stored = json.loads(config.to_json_best_effort())
    assert trainer.resume_warnings(stored, config, 400) == []
    longer = config.copy_and_resolve_references()
    longer.train.num_steps, longer.train.base_lr = 800, config.train.base_lr / 2
    schedule = state_lib.create_learning_rate_fn
    now, before = (float(schedule(c.train)(400)) for c in (longer, config))
    assert now > 100 * before  # the cosine decayed to ~0 at 400; stretched, about half way
    assert trainer.resume_warnings(stored, longer, 400) == [
        f"the learning rate at step 400 is {now:.3g} under this config's schedule, "
        f"{before:.3g} under the checkpoint's (train.base_lr {config.train.base_lr!r} -> "
        f"{longer.train.base_lr!r}, train.num_steps 400 -> 800): it follows the config given now"
    ]
    other = config.copy_and_resolve_references()
    other.data.class_names = ("red", "green", "blue")
    assert trainer.resume_warnings(stored, other, 400) == [
        "the checkpoint was trained on the classes ['circle', 'square', 'triangle'], this run "
        "trains on ['red', 'green', 'blue'] (shapes): the labels change meaning"
    ]
    assert trainer.resume_warnings(stored, longer, 0) == []
    del stored["train"]["warmup_steps"]  # a config of an older release: its schedule unknown
    assert trainer.resume_warnings(stored, longer, 400) == []
    # init_from names another source than the run's: not used, said (the same: nothing).
    elsewhere = config.copy_and_resolve_references()
    elsewhere.model.init_from = "/runs/coco"
    warning = (
        "config.model.init_from='/runs/coco' is not used: the run resumes from its own "
        "checkpoint (step 400{}); a new fine-tuning needs a new workdir"
    )
    assert trainer.resume_warnings(stored, elsewhere, 400) == [warning.format("")]
    stored["model"]["init_from"] = "/runs/tv"
    assert trainer.resume_warnings(stored, elsewhere, 0) == [
        warning.replace("400", "0").format(", itself started from '/runs/tv'")
    ]
    elsewhere.model.init_from = "/runs/tv"
    assert trainer.resume_warnings(stored, elsewhere, 400) == []


def test_resume_warns_of_other_canvas_group_weights(data_dir):
    """Each canvas group's stream resumes at the position the weights give for the step: other
    weights (e.g. set from `canvas_group_counts` after the start) repeat or skip images, said;
    the same probabilities written otherwise ((2, 2) for ()) are no change."""
    config = run_config(data_dir, **{"data.canvas_groups": ((128, 192), (192, 128))})
    stored = json.loads(config.to_json_best_effort())
    same = config.copy_and_resolve_references()
    same.data.canvas_group_weights = (2.0, 2.0)
    assert trainer.resume_warnings(stored, same, 400) == []
    other = config.copy_and_resolve_references()
    other.data.canvas_group_weights = (0.8, 0.2)
    assert trainer.resume_warnings(stored, other, 400) == [
        "data.canvas_groups / canvas_group_weights (((128, 192), (192, 128)), (0.5, 0.5)) -> "
        "(((128, 192), (192, 128)), (0.8, 0.2)): each group's images resume where these would "
        "have left them at step 400, not where the checkpoint's run did, so some are repeated "
        "or skipped this epoch"
    ]
    assert trainer.resume_warnings(stored, other, 0) == []
    single = config.copy_and_resolve_references()
    single.data.canvas_groups = ()
    assert "-> ()" in trainer.resume_warnings(stored, single, 400)[0]


def test_resume_rejects_an_incompatible_config(trained, data_dir, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    config_json = (workdir / "config.json").read_text()
    changed = run_config(data_dir, **{"model.roi_heads.fg_iou": 0.6, "train.num_steps": 6})
    with pytest.raises(
        ValueError, match=r"model\.roi_heads\.fg_iou: checkpoint 0\.5 vs config 0\.6"
    ) as refused:
        trainer.train_and_evaluate(changed, str(workdir))
    # The way forward for weights trained or converted elsewhere: start from them.
    assert str(refused.value).endswith(f"new --workdir with --config.model.init_from={workdir}")
    assert (workdir / "config.json").read_text() == config_json
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


BAD_CONFIGS = {
    "train.log_every": (0, r"config\.train\.log_every=0 must be a positive number of steps"),
    "train.checkpoint_every": (0, r"config\.train\.checkpoint_every=0 must be a positive"),
    "train.num_steps": (-5, r"config\.train\.num_steps=-5 must be 0 or more"),
    "train.keep_checkpoints": (-1, r"config\.train\.keep_checkpoints=-1 must be 0 or more"),
    "eval.batch_size": (0, r"config\.eval\.batch_size=0 must be at least 1"),
    "train.batch_size": (3, r"config\.train\.batch_size=3 is not divisible by the 8 devices"),
    "data.max_instances": (0, r"config\.data\.max_instances=0 must be at least 1"),
    "data.mean": ((0.5,) * 4, r"config\.data\.mean=\(0\.5, 0\.5, 0\.5, 0\.5\) must have 3"),
    "data.std": ((1.0, 0.0, 1.0), r"config\.data\.std=\(1\.0, 0\.0, 1\.0\) must be positive"),
    "data.mask_size": (0, r"config\.data\.mask_size=0 must be at least 1"),
    "data.shuffle_buffer": (0, r"config\.data\.shuffle_buffer=0 must be at least 1"),
    "data.scale_jitter": ((0.0, 0.0), r"config\.data\.scale_jitter=\(0\.0, 0\.0\) must be \(low"),
    "data.image_size": ((128,), r"config\.data\.image_size=\(128,\) must be two positive"),
    "data.val_split": ("val", r"config\.data\.val_split='val' is not a split of shapes"),
    "data.train_split": ("train[:10", r"config\.data\.train_split='train\[:10' does not select"),
    "model.rpn.fg_iou": (1.5, r"config\.model\.rpn\.fg_iou=1\.5 must be in \(0, 1\]"),
    "model.roi_heads.mask_paste": ("foo", r"config\.model\.roi_heads\.mask_paste='foo' must"),
    "train.base_lr": (-0.01, r"config\.train\.base_lr=-0\.01 must be positive"),
    "seed": (2**32, r"config\.seed=4294967296 must be an integer in \[0, 2\*\*32 - 1\]"),
    "eval.max_images": (-1, r"config\.eval\.max_images=-1 must be an integer >= 0"),
    "data.shapes_num_train": (0, r"config\.data\.shapes_num_train=0 must be at least 1"),
    "data.class_names": (("a", "b"), r"config\.data\.class_names has 2 entries but dataset"),
    "data.label_to_category_id": ((1, 1, 2), r"label_to_category_id=\(1, 1, 2\) repeats"),
    "model.anchor_sizes": (
        ((8, 16), (16,), (32,), (64,), (128,)),
        r"must give every RPN level the same number of sizes",
    ),
}


@pytest.mark.parametrize("field", sorted(BAD_CONFIGS))
def test_a_config_that_does_not_fit_is_refused_before_training(field, data_dir, tmp_path):
    """Values that used to fail only after compiling or after training (a modulo by zero, an
    unknown eval split), or deep in TF/JAX: one error naming the field, and no checkpoint."""
    value, message = BAD_CONFIGS[field]
    config = run_config(data_dir, **{field: value})
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("*"))


@pytest.mark.parametrize(
    "field, spec", [("val_split", "validation[:0]"), ("train_split", "train[5:5]")]
)
def test_a_split_that_selects_no_image_is_refused_before_training(field, spec, data_dir, tmp_path):
    """An empty slice parses: it was found after training (val) or at the first batch (train),
    in TFDS's words ("Instruction [] corresponds to no data!"), naming no field."""
    config = run_config(data_dir, **{f"data.{field}": spec})
    message = rf"^config\.data\.{field}='{re.escape(spec)}' selects no image of shapes"
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert not list((tmp_path / "checkpoints").glob("*"))


@pytest.mark.slow  # two training runs (51 s in the default run)
def test_a_run_stopped_before_an_eval_step_was_evaluated_evaluates_it_on_resume(
    trained, tmp_path, capsys
):
    """Stopped (SIGTERM, Ctrl-C, kill -9) after checkpointing an `eval_every` step but before its
    evaluation was logged, a run resumed there evaluates that step first (the checkpoint's
    state: the metrics of checkpoint 2 evaluated alone): the curve keeps the point, which it
    lost before. Once logged, a later resume there does not evaluate it again."""
    _, config, _ = trained
    config = run_config(config.data.data_dir, **{"train.eval_every": 2})
    workdir = copy_workdir(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    at_2 = shutil.copytree(workdir, tmp_path / "at_2")
    want = trainer.train_and_evaluate(
        run_config(config.data.data_dir, **{"train.num_steps": 2}), str(at_2)
    )

    def eval_rows():
        return {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if "eval/segm/AP" in r}

    assert list(eval_rows()) == [4]  # the final one, dropped at the resume
    trainer.train_and_evaluate(config, str(workdir))
    assert "step 2 eval: " in capsys.readouterr().out
    assert list(eval_rows()) == [2, 4]
    assert {k: v for k, v in eval_rows()[2].items() if k != "step"} == {
        f"eval/{k}": v for k, v in want.items()
    }
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    trainer.train_and_evaluate(config, str(workdir))
    assert "step 2 eval: " not in capsys.readouterr().out
    assert list(eval_rows()) == [2, 4]


@pytest.mark.slow  # a training run of its own (88 s in the default run)
def test_at_most_two_steps_are_in_flight(compile_cache, data_dir, tmp_path, monkeypatch):
    """JAX dispatches a step and returns; the loop waited only at log, checkpoint and eval steps,
    so up to 32 steps queued (11-12 measured on the COCO-format recipe): a SIGTERM then waited
    for all of them before its checkpoint, past a preemption's grace period. Counted at each
    dispatch: the steps whose metrics are not ready, the new one included. The tiny model's
    step is faster than the loop's host work, so each step's metrics wait for some busy work
    (~0.2-1 s here), as a real step is slower than its input."""
    make_train_step = trainer.step_lib.make_train_step
    in_flight = []

    @jax.jit
    def busy(metrics):
        work = jax.lax.fori_loop(
            0, 300, lambda _, x: jax.numpy.tanh(x * 1.01), jax.numpy.ones(2**19)
        )
        return jax.tree.map(lambda m: m + (0 * work[0]).astype(m.dtype), metrics)

    def counting_make_train_step(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)
        dispatched = []

        def counted(*step_args):
            state, metrics = train_step(*step_args)
            metrics = busy(metrics)
            dispatched.append(metrics["loss"])
            in_flight.append(sum(not loss.is_ready() for loss in dispatched))
            return state, metrics

        return counted

    monkeypatch.setattr(trainer.step_lib, "make_train_step", counting_make_train_step)
    config = run_config(data_dir, **{"train.log_every": 4, "train.checkpoint_every": 4})
    trainer.train_and_evaluate(config, str(tmp_path / "workdir"))
    assert len(in_flight) == NUM_STEPS and max(in_flight) <= 2, in_flight


def test_a_ctrl_c_during_a_save_comes_after_it_and_a_second_at_once():
    """`checkpoint._interrupts_after_the_block`: the first SIGINT is held until the block ends
    (a save begun whole), a second one raises at once (a save waiting long on an earlier
    write); Python's handler is back after either."""
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with ckpt_lib._interrupts_after_the_block():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the first")
    assert steps == ["after the first"]
    with pytest.raises(KeyboardInterrupt):
        with ckpt_lib._interrupts_after_the_block():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the second")
    assert steps == ["after the first"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    previous = signal.signal(signal.SIGTERM, interrupts.raise_interrupt)  # as `launch.run` does
    try:  # SIGTERM, raised as Terminated (the scripts but train.py), is held alike
        with pytest.raises(interrupts.Terminated):
            with ckpt_lib._interrupts_after_the_block():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("after SIGTERM")
        assert steps == ["after the first", "after SIGTERM"]
        assert signal.getsignal(signal.SIGTERM) is interrupts.raise_interrupt
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_train_and_evaluate_takes_ctrl_c_as_train_py_also_from_a_notebook(
    data_dir, tmp_path, monkeypatch
):
    """Called under Python's default SIGINT handler (a notebook), the run has the scripts' one
    (`interrupts.handled_interrupts`: a Ctrl-C in a compile is raised after it; under the
    default handler the compile went on in the background and the exit crashed, -11), and the
    default is back after it."""
    handlers = []

    def run(*args):
        handlers.append(signal.getsignal(signal.SIGINT))
        return {}

    monkeypatch.setattr(trainer, "_train_and_evaluate", run)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    trainer.train_and_evaluate(run_config(data_dir), str(tmp_path / "workdir"))
    assert handlers == [interrupts.raise_interrupt]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_linked_checkpoint_folder_that_the_clean_up_would_delete_is_refused(data_dir, tmp_path):
    """With `train.keep_checkpoints` a `checkpoints/<step>` link is refused before any work:
    orbax cannot delete a link, so the run ended at the save that deleted it with a traceback
    and "Free some space" (again on every resume). Kept with keep_checkpoints=0."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    workdir = tmp_path / "workdir"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "2").symlink_to(elsewhere)
    config = run_config(data_dir, **{"train.keep_checkpoints": 1})
    message = (
        f"{workdir}/checkpoints/2 is a symbolic link (to {elsewhere}): with "
        "config.train.keep_checkpoints=1 the run deletes older checkpoints, which orbax cannot "
        "do for a link: put a copy in its place (cp -rL), or keep every checkpoint"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir)) == ["checkpoints"]
    config.train.keep_checkpoints = 0
    trainer.check_linked_checkpoints(workdir, config)  # nothing is deleted: taken


def test_only_the_trainers_manager_removes_temporary_folders(tmp_path, monkeypatch):
    """A manager made to read, or to write converted weights (`save_variables`), leaves the
    temporary folders in `checkpoints/` alone: one may be a training run's save in progress.
    The trainer's removes them before it returns, not in a thread that an error before the
    first save would leave running at exit (a traceback after the error line)."""
    left = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp"
    left.mkdir(parents=True)
    for read_only in (True, False):
        ckpt_lib.create_manager(tmp_path, read_only=read_only).close()
        assert left.is_dir()
    cleanup = temporary_paths.cleanup_temporary_paths

    async def slow_cleanup(*args, **kwargs):  # the thread's work, made to take a while
        await asyncio.sleep(1.0)
        return await cleanup(*args, **kwargs)

    monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
    manager = ckpt_lib.create_manager(tmp_path, clean_up=True)
    assert not left.exists()
    manager.close()


def test_an_interrupt_right_after_a_save_keeps_it_and_keep_0_keeps_all(
    trained, data_dir, tmp_path, monkeypatch
):
    """Ctrl-C as orbax begins a save on the main thread: the KeyboardInterrupt comes once the
    save has begun, and the checkpoint, then written asynchronously, is completed before the
    run stops (the interrupt had left `6.orbax-checkpoint-tmp` and no checkpoint 6).
    `train.keep_checkpoints=0` keeps every checkpoint."""
    workdir = copy_workdir(trained, tmp_path)
    overrides = {"train.num_steps": 6, "train.checkpoint_every": 1, "train.keep_checkpoints": 0}
    save = ocp.CheckpointManager.save

    def interrupted_save(manager, step, *args, **kwargs):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # Python runs its handler at once, in here
        return save(manager, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(run_config(data_dir, **overrides), str(workdir))
    names = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert names == ["2", "4", "5", "6"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_resume_with_another_optimizer_is_refused_past_step_zero(trained, data_dir, tmp_path):
    """An AdamW run's checkpoint does not continue under SGD (its state has no momentum to
    resume): a clear error naming both, the checkpoints kept."""
    workdir = copy_workdir(trained, tmp_path)
    assert trained[1].train.optimizer == "adamw"
    changed = run_config(data_dir, **{"train.optimizer": "sgd", "train.num_steps": 6})
    with pytest.raises(ValueError) as error:
        trainer.train_and_evaluate(changed, str(workdir))
    message = str(error.value)
    assert f"checkpoints/{NUM_STEPS} was trained with train.optimizer='adamw'" in message
    assert "the config asks for 'sgd'" in message
    assert "--config.train.optimizer=adamw" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_a_step_zero_checkpoint_restores_under_any_optimizer(data_dir, tmp_path):
    """Converted weights (`save_variables`, step 0, written with the recipe's SGD) fine-tune
    with AdamW: params and BN statistics restored, the optimizer state AdamW's initial one.
    Checkpoints written before `train.optimizer` existed count as SGD."""
    sgd = run_config(data_dir, **{"train.optimizer": "sgd"})
    model = MaskRCNN.from_config(sgd.model)
    variables = state_lib.init_variables(model, jax.random.key(1), sgd.data.image_size)
    ckpt_lib.save_variables(tmp_path, sgd, variables)
    adamw = run_config(data_dir)
    fresh, _ = state_lib.train_state_from_variables(
        adamw, model, state_lib.init_variables(model, jax.random.key(2), sgd.data.image_size)
    )
    manager = ckpt_lib.create_manager(tmp_path)
    restored = ckpt_lib.restore(manager, fresh, adamw)
    manager.close()
    assert_trees_equal(restored.params, variables["params"])
    assert_trees_equal(restored.batch_stats, variables["batch_stats"])
    assert_trees_equal(restored.opt_state, fresh.tx.init(restored.params))
    saved = json.loads(sgd.to_json())
    del saved["train"]["optimizer"]
    assert ckpt_lib.with_added_fields(saved)["train"]["optimizer"] == "sgd"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("saved_clip, clip", [(0.0, 10.0), (10.0, 0.0)])
def test_resume_turns_gradient_clipping_on_or_off(optimizer, saved_clip, clip, data_dir, tmp_path):
    """What the non-finite loss error advises (set train.grad_clip_norm and resume): the clipping
    stage holds no arrays, and the optimizer state carries over whole, in the new chain."""
    configs = [
        run_config(data_dir, **{"train.optimizer": optimizer, "train.grad_clip_norm": norm})
        for norm in (saved_clip, clip)
    ]
    model = MaskRCNN.from_config(configs[0].model)
    variables = state_lib.zero_variables(model, configs[0].data.image_size)
    saved, _ = state_lib.train_state_from_variables(configs[0], model, variables)
    rng = np.random.default_rng(0)
    opt_state = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(x.dtype), saved.opt_state
    )
    saved = saved.replace(step=5, opt_state=opt_state)
    manager = ckpt_lib.create_manager(tmp_path)
    ckpt_lib.save(manager, saved, configs[0])
    manager.wait_until_finished()
    fresh, _ = state_lib.train_state_from_variables(configs[1], model, variables)
    restored = ckpt_lib.restore(manager, fresh, configs[1])
    manager.close()
    structure = jax.tree_util.tree_structure
    assert structure(saved.opt_state) != structure(fresh.opt_state)
    assert structure(restored.opt_state) == structure(fresh.opt_state)
    assert int(restored.step) == 5
    for got, want in zip(*map(jax.tree_util.tree_leaves, (restored.opt_state, opt_state))):
        np.testing.assert_array_equal(got, want)


def test_a_frozen_backbone_without_weights_is_refused(data_dir, tmp_path):
    """Frozen BN or frozen stages from a random init stop training before any work, with the
    fields to set; the opt-in and backbone weights both lift the check."""
    for overrides, says in (
        ({"model.norm": "frozen"}, 'model.norm="frozen"'),
        ({"model.freeze_at": 1}, "model.freeze_at=1 (untrained stem)"),
    ):
        config = run_config(data_dir, **overrides)
        with pytest.raises(ValueError) as error:
            trainer.train_and_evaluate(config, str(tmp_path / "run"))
        message = str(error.value)
        assert message.startswith(says)
        for advice in (
            "--config.model.backbone_weights=IMAGENET1K_V1",
            "torchvision ResNet-18 .pth",
            "--config.model.norm=batch --config.model.freeze_at=0",
            "--config.model.allow_random_frozen_backbone=True",
        ):
            assert advice in message
        opted_in = run_config(data_dir, **overrides, **{"model.allow_random_frozen_backbone": True})
        trainer.check_backbone_init(opted_in.model)
        weights = tmp_path / "x.pth"
        weights.write_bytes(b"")  # only its existence is checked here
        with_weights = run_config(data_dir, **overrides, **{"model.backbone_weights": str(weights)})
        trainer.check_backbone_init(with_weights.model)
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    trainer.check_backbone_init(run_config(data_dir).model)  # batch norm, nothing frozen
    # A mistyped weights path: refused before the dataset is built (COCO's takes an hour).
    missing = run_config(str(tmp_path / "tfds"), **{"model.backbone_weights": "resnet18.ph"})
    with pytest.raises(FileNotFoundError, match=r"model\.backbone_weights='resnet18\.ph' is no"):
        trainer.train_and_evaluate(missing, str(tmp_path / "run"))
    assert not (tmp_path / "tfds").exists()


@pytest.mark.parametrize(
    "name, paste",
    [
        ("coco_r50_fpn_1x", "detectron2"),
        ("coco_r50_fpn_tpu", "detectron2"),
        ("torchvision_r50_fpn_v1", "torchvision"),
        ("torchvision_r50_fpn_v2", "torchvision"),
        ("shapes_r18", "detectron2"),
        ("coco_format", "detectron2"),
    ],
)
def test_shipped_configs_freeze_only_pretrained_backbones(name, paste):
    """Every recipe that freezes backbone layers names ImageNet weights (default.py, the bare
    field reference, does not); the mask paste follows each recipe's RoIAlign convention."""
    config = importlib.import_module(f"configs.{name}").get_config()
    trainer.check_backbone_init(config.model)
    if config.model.norm == "frozen" or config.model.freeze_at > 0:
        assert config.model.backbone_weights == "IMAGENET1K_V1"
    assert config.model.roi_heads.mask_paste == paste
    assert config.model.roi_heads.aligned == (paste == "detectron2")


def test_resume_ignores_backbone_init_mask_paste_and_mask_head_chunk(data_dir):
    """Checkpoints written before these fields existed, or with other values, still restore."""
    config = run_config(data_dir)
    saved = json.loads(config.to_json())
    del saved["model"]["backbone_weights"], saved["model"]["allow_random_frozen_backbone"]
    del saved["model"]["roi_heads"]["mask_head_chunk"]
    saved["model"]["roi_heads"]["mask_paste"] = "torchvision"
    assert ckpt_lib.config_mismatches(saved, config) == []
    saved["model"]["fpn_dim"] = 8
    assert ckpt_lib.config_mismatches(saved, config) == ["model.fpn_dim: checkpoint 8 vs config 16"]


def test_the_default_config_alone_is_refused_for_want_of_weights():
    with pytest.raises(ValueError, match=r"model\.backbone_weights and model\.init_from are empty"):
        trainer.check_backbone_init(default_config.get_config().model)


def test_zero_steps_write_and_evaluate_the_initial_checkpoint(
    compile_cache, data_dir, tmp_path, capsys, monkeypatch
):
    """`num_steps = 0` with ImageNet backbone weights: checkpoint 0 holds the imported backbone
    and the seeded init of everything else, and is evaluated. Resuming it needs no weights.

    Every path is relative to the current folder (as the README's `--workdir=runs/mydata`) or
    starts with `~`: the checkpoint is written (orbax refuses relative paths), `~` is expanded
    (a shell leaves `--workdir=~/...` as it is), and the config stored with the checkpoint names
    the data absolutely, so that eval.py finds it from any folder."""
    torch = pytest.importorskip("torch")
    torchvision_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(torchvision_models.resnet18(weights=None).state_dict(), "resnet18.pth")
    frozen = {"train.num_steps": 0, "model.norm": "frozen", "model.freeze_at": 2}
    relative_data = os.path.relpath(data_dir)
    config = run_config(relative_data, **frozen, **{"model.backbone_weights": "~/resnet18.pth"})
    metrics = trainer.train_and_evaluate(config, "run")
    workdir = tmp_path / "run"
    assert "Backbone initialised from ~/resnet18.pth" in capsys.readouterr().out
    assert set(metrics) == METRIC_KEYS
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["0"]
    (record,) = read_jsonl(workdir / "metrics.jsonl")
    assert record == {"step": 0, **{f"eval/{k}": v for k, v in metrics.items()}}

    state = final_state(workdir)
    assert int(state["step"]) == 0
    backbone = imagenet.backbone_variables(config.model)
    assert_trees_equal(state["params"]["backbone"], backbone["params"]["backbone"])
    assert_trees_equal(state["batch_stats"]["backbone"], backbone["batch_stats"]["backbone"])
    init = state_lib.init_variables(
        MaskRCNN.from_config(config.model), jax.random.key(config.seed), config.data.image_size
    )
    assert_trees_equal(state["params"]["fpn"], init["params"]["fpn"])

    # A checkpoint to restore: no backbone weights needed (nor compared with the checkpoint's).
    resumed = run_config(relative_data, **frozen)
    assert trainer.train_and_evaluate(resumed, "~/run") == metrics
    assert re.search(r"Resumed from \S+ at step 0\n", capsys.readouterr().out)
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth", "run"]  # no "~"

    stored = json.loads((workdir / "config.json").read_text())
    assert relative_data != data_dir and stored["data"]["data_dir"] == data_dir
    monkeypatch.chdir(workdir)  # a notebook elsewhere, a relative path
    assert mrcnn_jax.load_checkpoint("checkpoints/0").config.data.data_dir == data_dir
    assert mrcnn_jax.load_checkpoint("~/run").step == 0


# ------------------------------------------------------------------- load_checkpoint


def test_readme_notebook_snippet_runs(trained):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Use a checkpoint in a notebook", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert '"/tmp/mrcnn_shapes"' in code
    code = code.replace('"/tmp/mrcnn_shapes"', repr(str(trained[0])))
    image, _ = shapes.generate_image(0, "validation", 0, (128, 128))
    namespace = {"image": image}
    exec(code, namespace)
    result, predictor = namespace["result"], namespace["predictor"]
    assert predictor.step == NUM_STEPS
    n = len(result["scores"])
    assert result["boxes"].shape == (n, 4) and result["classes"].shape == (n,)
    assert result["masks"].shape == (n, 128, 128) and result["masks"].dtype == bool
    assert len(result["class_names"]) == n and np.all(result["scores"] >= 0.5)

    everything = predictor(image, score_threshold=0.0)
    n = len(everything["scores"])
    assert 0 < n <= trained[1].model.roi_heads.detections_per_image
    assert everything["masks"].shape == (n, 128, 128)
    assert np.all((everything["boxes"] >= 0) & (everything["boxes"] <= 128))
    assert set(everything["class_names"]) <= set(shapes.CLASS_NAMES)


def test_load_checkpoint_rejects_params_that_do_not_fit_the_config(trained, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    stored = workdir / "checkpoints" / str(NUM_STEPS) / "config" / "metadata"
    config = json.loads(stored.read_text())
    config["model"]["fpn_dim"] = 8
    stored.write_text(json.dumps(config))
    # The FPN's width changes the shapes of the FPN and of the heads that read it.
    with pytest.raises(ValueError, match=r"/4 params: \[.*\] has shape \(.*\), the config needs"):
        mrcnn_jax.load_checkpoint(workdir)


# The config fields of the first checkpoints (b6b1288's configs/shapes_r18.py, flattened).
FIRST_CHECKPOINT_FIELDS = {
    "seed",
    *(f"data.{name}" for name in (
        "class_names", "data_dir", "dataset", "hflip", "image_size", "manual_dir", "mask_size",
        "max_instances", "mean", "scale_jitter", "shuffle_buffer", "std", "train_split",
        "val_split",
    )),
    "eval.batch_size", "eval.max_images",
    *(f"model.{name}" for name in (
        "anchor_sizes", "aspect_ratios", "backbone_depth", "dtype", "fpn_dim", "freeze_at", "norm",
        "num_classes",
    )),
    *(f"model.roi_heads.{name}" for name in (
        "aligned", "batch_size_per_image", "box_head_dim", "box_pooler_size", "box_reg_weights",
        "detections_per_image", "detections_pre_nms_topk", "fg_iou", "mask_head_dim",
        "mask_pooler_size", "nms_threshold", "positive_fraction", "roi_align_mode",
        "sampling_ratio", "score_threshold", "smooth_l1_beta",
    )),
    *(f"model.rpn.{name}" for name in (
        "batch_size_per_image", "bg_iou", "fg_iou", "min_size", "nms_threshold",
        "positive_fraction", "post_nms_topk_test", "post_nms_topk_train", "pre_nms_topk_test",
        "pre_nms_topk_train", "smooth_l1_beta",
    )),
    *(f"train.{name}" for name in (
        "base_lr", "batch_size", "checkpoint_every", "decay_factor", "decay_steps", "eval_every",
        "grad_clip_norm", "keep_checkpoints", "log_every", "momentum", "num_steps", "schedule",
        "warmup_factor", "warmup_steps", "weight_decay",
    )),
}  # fmt: skip


def test_every_field_added_since_the_first_checkpoints_has_a_value_for_them():
    """A field added to the config without an `ADDED_FIELDS` entry makes every older
    checkpoint "not a config of this project" (17 fields of aa45945..4b35432 were missing)."""
    flat = set()

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        else:
            flat.add(prefix)

    walk("", json.loads(default_config.get_config().to_json()))
    assert FIRST_CHECKPOINT_FIELDS <= flat  # none renamed or removed
    assert flat - FIRST_CHECKPOINT_FIELDS == set(ckpt_lib.ADDED_FIELDS)


def test_a_checkpoint_written_before_fields_were_added_loads_and_resumes(trained, tmp_path):
    """A checkpoint of an older version lacks the config fields added since (`ADDED_FIELDS`):
    load_checkpoint refused it ("not a config of this project (KeyError: ...
    'mask_head_chunk'"), and a resume compared `None` with every value a user could pass. Each
    now reads the value that keeps what it controls as it was before the field existed."""
    workdir = copy_workdir(trained, tmp_path)
    stored = workdir / "checkpoints" / str(NUM_STEPS) / "config" / "metadata"
    old = json.loads(stored.read_text())
    for name in ckpt_lib.ADDED_FIELDS:
        *sections, field = name.split(".")
        node = old
        for section in sections:
            node = node[section]
        del node[field]
    stored.write_text(json.dumps(old))
    image, _ = shapes.generate_image(0, "validation", 0, (128, 128))
    before = mrcnn_jax.load_checkpoint(workdir)
    now = mrcnn_jax.load_checkpoint(trained[0])
    for key in ("boxes", "scores", "classes"):  # the paste (a field added since) aside
        np.testing.assert_array_equal(before(image)[key], now(image)[key])
    assert before.config.model.roi_heads.mask_paste == "torchvision"
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    read = ckpt_lib.load_config(manager, NUM_STEPS)
    manager.close()
    config = trained[1].copy_and_resolve_references()
    for name, value in ckpt_lib.ADDED_FIELDS.items():
        *sections, field = name.split(".")
        node, saved = config, read
        for section in sections:
            node, saved = node[section], saved[section]
        assert saved[field] == value
        node[field] = tuple(value) if isinstance(value, list) else value  # the config's types
    assert ckpt_lib.config_mismatches(read, config) == []
    trainer.check_train_config(config)  # every value one the checks accept


ONE_DEVICE_PREDICT = """
import json, sys
import jax, numpy as np
import mrcnn_jax
from mrcnn_jax.data import shapes
assert jax.device_count() == 1, jax.devices()
predictor = mrcnn_jax.load_checkpoint(sys.argv[1])
out = []
for index in range(2):
    image, _ = shapes.generate_image(0, "validation", index, (128, 128))
    result = predictor(image, score_threshold=0.0)
    out.append({k: np.asarray(result[k]).tolist() for k in ("boxes", "scores", "classes")}
               | {"mask_pixels": np.asarray(result["masks"]).sum(axis=(1, 2)).tolist()})
print("RESULT " + json.dumps(out))
"""


def test_an_eight_device_checkpoint_opens_on_one_device(trained, compile_cache):
    """The run's checkpoint (written on 8 devices) loads in a 1-device process, as in a
    notebook, and predicts what it predicts on 8; scripts/eval.py on 1 device reproduces the
    logged metrics."""
    workdir, _, metrics = trained
    # The flags of this process (the same compiled arithmetic) but for the device count.
    flags = re.sub(r"device_count=\d+", "device_count=1", os.environ["XLA_FLAGS"])
    env = {**os.environ, "XLA_FLAGS": flags}
    result = subprocess.run(
        [sys.executable, "-c", ONE_DEVICE_PREDICT, str(workdir)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    one_device = json.loads(line.removeprefix("RESULT "))
    predictor = mrcnn_jax.load_checkpoint(workdir)
    for index, got in enumerate(one_device):
        image, _ = shapes.generate_image(0, "validation", index, (128, 128))
        want = predictor(image, score_threshold=0.0)
        assert len(want["scores"]) > 0
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3)
        assert got["classes"] == want["classes"].tolist()
        assert got["mask_pixels"] == want["masks"].sum(axis=(1, 2)).tolist()

    eval_run = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "eval.py"), f"--workdir={workdir}"],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO, check=False,
    )  # fmt: skip
    assert eval_run.returncode == 0, eval_run.stderr[-5000:]
    saved = json.loads((workdir / f"eval_{NUM_STEPS}.json").read_text())
    assert (saved.pop("step"), saved.pop("split"), saved.pop("num_images")) == (
        NUM_STEPS, "validation", 8,
    )  # fmt: skip
    assert saved == pytest.approx(metrics, abs=1e-6)


def test_load_checkpoint_errors_name_what_is_missing(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        mrcnn_jax.load_checkpoint(tmp_path)
    missing = re.escape(f"{tmp_path / 'typo'} does not exist (a workdir holding checkpoints/)")
    with pytest.raises(FileNotFoundError, match=f"^{missing}$"):  # not "neither a workdir..."
        mrcnn_jax.load_checkpoint(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint 3 .*\[2, 4\]"):
        mrcnn_jax.load_checkpoint(trained[0], step=3)


# ------------------------------------------------------------------- scripts


def test_eval_script_reproduces_the_logged_metrics(trained, compile_cache):
    workdir, _, metrics = trained
    result = script("eval.py", f"--workdir={workdir}", cache=compile_cache)
    saved = json.loads((workdir / f"eval_{NUM_STEPS}.json").read_text())
    assert saved == {"step": NUM_STEPS, "split": "validation", "num_images": 8, **metrics}
    assert f"checkpoint step {NUM_STEPS}, split validation, 8 images:" in result.stdout
    assert f"bbox {metrics['bbox/AP']:7.3f}" in result.stdout
    assert f"segm {metrics['segm/AP']:7.3f}" in result.stdout
    detections = json.loads((workdir / f"detections_{NUM_STEPS}.json").read_text())
    assert {d["image_id"] for d in detections} <= set(range(1, 9))
    assert {"image_id", "category_id", "score", "bbox", "segmentation"} <= set(detections[0])
    # After 4 steps the AP is 0, so check the detections came from the checkpoint's weights:
    # those of validation image 0 (id 1) are what the predictor finds there.
    image, _ = shapes.generate_image(0, "validation", 0, (128, 128))
    expected = mrcnn_jax.load_checkpoint(workdir)(image, score_threshold=0.0)
    scores = sorted(d["score"] for d in detections if d["image_id"] == 1)
    assert scores and scores == pytest.approx(sorted(expected["scores"]), rel=1e-4, abs=1e-6)


def test_eval_script_on_three_devices_gives_the_eight_device_metrics(
    trained, compile_cache, tmp_path
):
    """The run's eval batch (8) does not split over 3 devices: eval.py rounds it up to 9 (the
    padding rows are skipped) and scores the checkpoint as the 8-device run did."""
    _, _, metrics = trained
    workdir = copy_workdir(trained, tmp_path)
    call = script_call("eval.py", [f"--workdir={workdir}"], compile_cache)
    flags = re.sub(r"device_count=\d+", "device_count=3", call["env"]["XLA_FLAGS"])
    call["env"]["XLA_FLAGS"] = flags
    subprocess.run(**call, check=True, capture_output=True, timeout=600)
    saved = json.loads((workdir / f"eval_{NUM_STEPS}.json").read_text())
    assert saved.pop("step") == NUM_STEPS and saved.pop("split") == "validation"
    assert saved.pop("num_images") == 8
    assert saved == pytest.approx(metrics, abs=1e-6)
    assert json.loads((workdir / f"detections_{NUM_STEPS}.json").read_text())


def test_an_evaluation_stopped_while_scoring_writes_no_detections(trained, tmp_path, monkeypatch):
    """eval.py stopped by Ctrl-C during the COCO scoring (a minute on COCO) left its new
    detections_<step>.json without the eval_<step>.json of the same run (or beside an earlier
    run's): the detections are written once scored."""
    from mrcnn_jax import sharding
    from mrcnn_jax.data import get_builder
    from mrcnn_jax.programs import evaluator

    predictor = mrcnn_jax.load_checkpoint(trained[0])
    config, mesh = predictor.config, sharding.create_mesh()
    arguments = (
        evaluator.make_predict_step(MaskRCNN.from_config(config.model), mesh),
        sharding.replicate(predictor.variables, mesh),
        config,
        mesh,
        get_builder(config.data),
    )
    results = tmp_path / "detections.json"
    score = coco_eval.CocoEvaluator.evaluate

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(coco_eval.CocoEvaluator, "evaluate", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        evaluator.evaluate_split(*arguments, results_path=str(results), progress=False)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(coco_eval.CocoEvaluator, "evaluate", score)
    metrics = evaluator.evaluate_split(*arguments, results_path=str(results), progress=False)
    assert metrics == pytest.approx(trained[2]) and json.loads(results.read_text())


def test_predict_script_draws_and_writes_coco_results(trained, compile_cache, tmp_path):
    paths = []
    for index in range(2):
        path = tmp_path / f"val{index}.png"
        image, _ = shapes.generate_image(0, "validation", index, (128, 128))
        tf.io.write_file(str(path), tf.io.encode_png(image))
        paths.append(str(path))
    out_dir = tmp_path / "out"
    (out_dir / "earlier").mkdir(parents=True)  # an earlier run's drawing, not this run's
    (out_dir / "earlier" / "x.png").write_bytes(b"")
    (out_dir / "val0.png").write_bytes(b"")  # redrawn
    result = script(
        "predict.py",
        f"--workdir={trained[0]}",
        f"--out_dir={out_dir}",
        "--score_threshold=0.0",
        *paths,
        cache=compile_cache,
    )
    assert "detections of checkpoint step 4" in result.stdout
    assert (
        f"note: 1 drawings in {out_dir} are not this run's (e.g. earlier/x.png): an earlier "
        f"run's, not in {out_dir / 'detections.json'}"
    ) in result.stderr, result.stderr[-3000:]
    predictor = mrcnn_jax.load_checkpoint(trained[0])
    detections = json.loads((out_dir / "detections.json").read_text())
    for index, path in enumerate(paths):
        drawn = tf.io.decode_png(tf.io.read_file(str(out_dir / f"val{index}.png"))).numpy()
        original, _ = shapes.generate_image(0, "validation", index, (128, 128))
        assert drawn.shape == original.shape and not np.array_equal(drawn, original)
        expected = predictor(original, score_threshold=0.0)
        mine = [d for d in detections if d["file_name"] == path]
        # float32 noise: the script's batch of 2 on 8 devices vs the predictor's one image
        assert [d["score"] for d in mine] == pytest.approx(
            expected["scores"].tolist(), rel=1e-4, abs=1e-6
        )
        assert [d["class_name"] for d in mine] == expected["class_names"]
        for d, box in zip(mine, expected["boxes"]):
            x1, y1, x2, y2 = box.tolist()
            assert d["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-4)
            assert d["segmentation"]["size"] == [128, 128]


def test_predict_script_names_a_missing_image(trained, compile_cache, tmp_path):
    missing = str(tmp_path / "nowhere.jpg")
    result = script(
        "predict.py", f"--workdir={trained[0]}", missing, cache=compile_cache, check=False
    )
    assert result.returncode != 0
    assert f"image file {missing!r} does not exist" in result.stderr


@pytest.mark.slow
def test_train_script_resumes_after_sigkill(trained, compile_cache, tmp_path):
    """Kill scripts/train.py after its first checkpoint; the rerun resumes and ends where one
    uninterrupted run (the `trained` fixture, same config) ends, bit for bit."""
    workdir = tmp_path / "killed"
    args = ["--config=configs/shapes_r18.py", *config_flags(trained[1]), f"--workdir={workdir}"]
    log = tmp_path / "killed.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            **script_call("train.py", args, compile_cache), stdout=output, stderr=output
        )
    first = workdir / "checkpoints" / "2"
    deadline = time.time() + 600
    while not first.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first.is_dir(), (
        f"train.py ended or timed out before its first checkpoint:\n{log.read_text()[-5000:]}"
    )
    assert process.returncode == -signal.SIGKILL
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    assert manager.latest_step() == 2, "killed after the last checkpoint: nothing to resume"
    manager.close()

    result = script("train.py", *args, cache=compile_cache)
    assert re.search(r"Resumed from \S+ at step 2\n", result.stdout + result.stderr)
    assert "final eval: bbox AP" in result.stdout
    assert_trees_equal(final_state(workdir), final_state(trained[0]))


def train_with_failing_writes(trained, cache, tmp_path) -> tuple:
    """scripts/train.py resuming a copy of the trained workdir at step 2, with writes of files
    past 1 MiB failing (EFBIG, "File too large", as on a full disk, instead of SIGXFSZ): its
    checkpoint 4 cannot be written. Returns (workdir, train.py's arguments, the result)."""
    workdir = copy_workdir(trained, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS))
    args = ["--config=configs/shapes_r18.py", *config_flags(trained[1]), f"--workdir={workdir}"]
    call = script_call("train.py", args, cache)
    limited = ["bash", "-c", 'trap "" XFSZ; ulimit -f 1024; exec "$0" "$@"', *call.pop("args")]
    result = subprocess.run(limited, **call, capture_output=True, text=True, timeout=600)
    return workdir, args, result


@pytest.mark.slow  # a train.py run (~50 s): the default run stays near 15 minutes
def test_a_failed_checkpoint_write_is_one_clear_error(trained, compile_cache, tmp_path):
    """A checkpoint that cannot be written stops train.py with one line naming the folder, the
    OS's reason and the complete checkpoints kept; was ~270 KB of tracebacks from orbax's
    writes, the reason ~2 KB into one of them."""
    workdir, _, result = train_with_failing_writes(trained, compile_cache, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"error: writing a checkpoint to {workdir}/checkpoints failed ")
    assert "File too large" in errors[0]
    assert "the complete checkpoints there, steps [2], are untouched" in errors[0]
    for noise in ("Traceback", "tensorstore_spec", "Exception ignored", "Event loop is closed"):
        assert noise not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr) < 5000, result.stderr[-3000:]


def test_a_restarted_run_logs_each_step_once_in_metrics_and_tensorboard(tmp_path, capsys):
    """Rows and TensorBoard points of steps a stopped run logged after the step a new run starts
    at are logged again by it: `metrics.jsonl` drops them (also where the stopped run had no
    checkpoint: a fresh start at 0 appended to its rows), and TensorBoard's Python reader, told
    by the restart marker, shows each step once (it showed both), also after a run without
    markers (it takes the first marker as the first run's start)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator

    def run(start_step: int, steps: range) -> None:
        writer = trainer.MetricWriter(epath.Path(tmp_path), start_step)
        for step in steps:
            writer.write(step, {"train/loss": float(step + 10 * start_step)})
        writer.close()
        time.sleep(1.1)  # TensorBoard orders the event files by their time, in seconds

    def logged() -> tuple[list, list]:
        rows = [(r["step"], r["train/loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")]
        events = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        points = [
            (e.step, float(tf.make_ndarray(e.tensor_proto))) for e in events.Tensors("train/loss")
        ]
        return rows, points

    # A run of before the markers, stopped before its first checkpoint.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n')
    with tf.summary.create_file_writer(str(tmp_path / "tensorboard")).as_default(step=1):
        tf.summary.scalar("train/loss", 9.0)
    time.sleep(1.1)
    run(0, range(1, 6))  # stopped after step 5, its checkpoint at step 3
    assert "metrics.jsonl: dropped 1 row logged after step 0, where this run starts" in (
        capsys.readouterr().out
    )
    run(3, range(4, 7))
    want = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 34.0), (5, 35.0), (6, 36.0)]
    assert logged() == (want, want)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_metrics_that_cannot_be_written_are_one_clear_error(tmp_path):
    """`metrics.jsonl` on a full disk (here /dev/full: ENOSPC) is a `MetricsWriteError` naming the
    workdir and the reason, which train.py prints as one line (as a failed checkpoint write);
    was a traceback ending in `OSError: [Errno 28] No space left on device`. The trainer's
    close of the writer after an error (`_closed_after`) does not replace that error with its
    own (the row still buffered fails again): was a bare OSError on train.py's line."""
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")
    writer = trainer.MetricWriter(epath.Path(tmp_path))
    message = (
        f"writing the training metrics to {tmp_path} failed (No space left on device); no "
        "checkpoint was written yet. Mend that (free some space if the disk is full) and run "
        "the same command again: it starts from step 0."  # not "the checkpoints are kept"
    )
    with pytest.raises(trainer.MetricsWriteError, match=f"^{re.escape(message)}$"):
        writer.write(2, {"train/loss": 1.0})
    with pytest.raises(KeyboardInterrupt):
        with trainer._closed_after(writer):
            raise KeyboardInterrupt
    assert writer._jsonl.closed  # closed all the same


def test_a_tensorflow_error_is_told_in_its_first_line_without_the_op_prefix():
    """TensorBoard's summary write on a full disk failed with three lines starting
    `{{function_node __wrapped__WriteSummary_device_/job:localhost/...}}`."""
    error = tf.errors.ResourceExhaustedError(
        None,
        None,
        "{{function_node __wrapped__WriteSummary_device_/job:localhost/replica:0/task:0/device:"
        "CPU:0}} /w/tensorboard/events.out; No space left on device [Op:WriteSummary]\n"
        "\t [[{{node WriteSummary}}]]",
    )
    assert storage_errors.tensorflow_error_text(error) == (
        "/w/tensorboard/events.out; No space left on device [Op:WriteSummary]"
    )
    assert storage_errors.tensorflow_error_text(OSError(28, "No space")) == "[Errno 28] No space"


@pytest.mark.parametrize("name", ["metrics.jsonl", trainer.LOCK_FILE])
def test_the_trainer_does_not_write_through_a_link_to_a_file(tmp_path, name):
    """A downloaded workdir holding `metrics.jsonl -> ~/.bashrc` (or the lock file so): the
    file it points to is neither truncated nor appended to."""
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / name).symlink_to(victim)
    with pytest.raises(OSError, match=f"symbolic link to the file {victim}"):
        if name == trainer.LOCK_FILE:
            with trainer._workdir_lock(epath.Path(workdir)):
                pass
        else:
            trainer.MetricWriter(epath.Path(workdir))
    assert victim.read_text() == "mine\n"


@pytest.mark.slow
def test_the_rerun_after_a_failed_checkpoint_write_resumes_exactly(
    trained, compile_cache, tmp_path
):
    """Once the space is back, the same command resumes from the complete checkpoint (orbax
    replaces the partial one) and ends where the uninterrupted run ends, bit for bit."""
    workdir, args, result = train_with_failing_writes(trained, compile_cache, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    result = script("train.py", *args, cache=compile_cache)
    assert re.search(r"Resumed from \S+ at step 2\n", result.stdout + result.stderr)
    assert_trees_equal(final_state(workdir), final_state(trained[0]))


def test_non_finite_metrics_are_refused_saying_what_is_kept():
    finite = {"loss": 1.5, "train/lr": 0.0}
    trainer._check_finite(3, finite, None)
    for saved, kept in (
        (None, "no checkpoint was written; start again with a lower"),
        (2, "checkpoint 2 is the last one written, with finite metrics; resume"),
    ):
        with pytest.raises(FloatingPointError) as error:
            trainer._check_finite(3, {**finite, "loss": float("nan")}, saved)
        message = str(error.value)
        assert "non-finite training metrics at step 3: {'loss': nan}. The state is not" in message
        assert kept in message


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(trained, data_dir, tmp_path):
    workdir = copy_workdir(trained, tmp_path)
    config = run_config(data_dir, **{"train.num_steps": 20, "train.base_lr": 1e9})
    with pytest.raises(FloatingPointError, match=r"non-finite training metrics at step") as error:
        trainer.train_and_evaluate(config, str(workdir))
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert NUM_STEPS < bad_step <= 20
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    assert manager.latest_step() == (bad_step - 1) // 2 * 2  # the last one before the bad step
    assert f"checkpoint {manager.latest_step()} is the last one written" in str(error.value)
    manager.close()
    assert all(np.isfinite(x).all() for x in leaves(final_state(workdir)).values())


def test_a_workdir_inside_another_run_s_checkpoints_is_refused(tmp_path):
    """`--workdir=W/checkpoints` (or `W/checkpoints/10`), the path eval.py and `load_checkpoint`
    take for W's checkpoints, started a fresh run there: its checkpoints then hid W's from those
    readers, and W's clean-up deleted its files; at any depth, and through a symbolic link
    (both were taken). A folder named checkpoints that is not in a workdir, and the workdir
    itself, are taken."""
    run = tmp_path / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "config.json").write_text('{"model": {}, "train": {}}')
    (tmp_path / "link").symlink_to(run / "checkpoints")
    insides = ["checkpoints", "checkpoints/10", "checkpoints/10/x", "checkpoints/a/b/c/d"]
    for inside in [run / p for p in insides] + [tmp_path / "link", tmp_path / "link" / "x"]:
        with pytest.raises(ValueError, match=re.escape(f"training run in {run}: train in")):
            trainer.check_workdir_outside_checkpoints(inside)
    trainer.check_workdir_outside_checkpoints(run)
    trainer.check_workdir_outside_checkpoints(tmp_path / "checkpoints" / "mine")
    project = tmp_path / "project"  # a config.json of something else: not a workdir
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "mine"}')
    trainer.check_workdir_outside_checkpoints(project / "checkpoints" / "run1")
    (run / "config.json").unlink()
    (run / trainer.LOCK_FILE).write_text("")  # a run that has not written its config yet
    with pytest.raises(ValueError, match="inside the checkpoints folder"):
        trainer.check_workdir_outside_checkpoints(run / "checkpoints")


def test_a_fresh_start_refuses_to_replace_or_drop_what_is_not_its_own(tmp_path):
    """A run from step 0 writes config.json and drops metrics.jsonl's rows after step 0: in a
    folder that was not a workdir (a user's own config.json and metrics, say) they were lost;
    in a run's workdir whose checkpoints are gone (their disk not mounted) it trained over the
    record of 400 steps. A run's own rows of a run stopped before its checkpoints, a line cut by
    a crash and unrelated files are taken."""
    config = run_config(str(tmp_path / "data"), **{"train.checkpoint_every": 100})
    mine = tmp_path / "home"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept\n")
    trainer.check_fresh_start(mine, config)
    (mine / "config.json").write_text('{"theme": "dark"}')
    with pytest.raises(ValueError, match=re.escape(f"{mine}/config.json is not a training run's")):
        trainer.check_fresh_start(mine, config)
    (mine / "config.json").unlink()
    (mine / "metrics.jsonl").write_text('{"step": 5, "acc": 0.9}\n')
    with pytest.raises(ValueError, match=re.escape(f"{mine}/metrics.jsonl is not a training")):
        trainer.check_fresh_start(mine, config)

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(config.to_json())

    def logged(last: int, torn: str = "") -> None:
        rows = [{"step": s, "train/loss": 1.0} for s in range(20, last + 1, 20)]
        text = "".join(json.dumps(r) + "\n" for r in [*rows, {"step": last, "eval/segm/AP": 0.5}])
        (run / "metrics.jsonl").write_text(text + torn)

    logged(200, torn='{"step": 220, "trai')  # a full disk at the first save stops at the second
    trainer.check_fresh_start(run, config)
    logged(400)
    other = run_config(str(tmp_path / "data"), **{"train.checkpoint_every": 1000})
    with pytest.raises(ValueError) as refused:  # the stored config's checkpoint_every counts
        trainer.check_fresh_start(run, other)
    assert str(refused.value) == (
        f"{run}/metrics.jsonl logs training to step 400 (checkpoints every 100 steps), but "
        f"{run}/checkpoints holds no complete checkpoint: is its disk or link not mounted, or "
        "were they deleted? Restore them to resume; to start afresh, move metrics.jsonl away or "
        "train in a new --workdir"
    )


def test_train_and_evaluate_refuses_a_folder_that_is_not_a_workdir_before_locking_it(
    data_dir, tmp_path
):
    """The library's own check came after the run's lock file, which made the folder a workdir
    (`_is_workdir`): a user's config.json was then replaced all the same. Checked before the
    lock, nothing is written."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"theme": "dark"}')
    with pytest.raises(ValueError, match=re.escape("config.json is not a training run's config")):
        trainer.train_and_evaluate(run_config(data_dir), str(mine))
    assert sorted(p.name for p in mine.iterdir()) == ["config.json"]
    assert (mine / "config.json").read_text() == '{"theme": "dark"}'
