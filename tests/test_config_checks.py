"""Config values refused up front, each error naming the field: `check_model_config` (every rule
of `modeling/checks.py`) and `state.check_train_settings`. Without them these values failed at
the first compile, deep in JAX (`top_k`'s negative k, a division by zero in an initializer), or
not at all (an IoU threshold of 1.5 trained without a word). Every shipped config passes."""

import importlib
import pathlib
import re

import pytest

from configs import coco_r50_fpn_lsj_100ep, default
from mrcnn_jax.modeling import checks
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs import trainer
from mrcnn_jax.train import state as state_lib

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py"))


def _set(config, field: str, value) -> None:
    *parents, leaf = field.split(".")
    for key in parents:
        config = config[key]
    with config.ignore_type():
        config[leaf] = value


@pytest.mark.parametrize("name", [c for c in CONFIGS if c != "__init__"])
def test_every_shipped_config_passes(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    checks.check_model_config(config.model)
    state_lib.check_train_settings(config.train)


BAD_MODEL = [
    ("num_classes", -1), ("backbone_depth", 42), ("norm", "group"), ("freeze_at", 3),
    ("fpn_dim", 0), ("dtype", "bf16"), ("dtype", "float16"), ("aspect_ratios", ()),
    ("aspect_ratios", (0.5, -1.0)), ("rpn.num_convs", -1), ("rpn.pre_nms_topk_train", 0),
    ("rpn.pre_nms_topk_test", -1), ("rpn.post_nms_topk_train", 0), ("rpn.nms_threshold", 1.5),
    ("rpn.nms_threshold", -0.1), ("rpn.min_size", -1.0), ("rpn.fg_iou", 1.5), ("rpn.fg_iou", 0.0),
    ("rpn.bg_iou", -0.1), ("rpn.batch_size_per_image", 0), ("rpn.positive_fraction", 0.0),
    ("rpn.positive_fraction", 1.5), ("rpn.smooth_l1_beta", -1.0),
    ("roi_heads.batch_size_per_image", -1), ("roi_heads.positive_fraction", 1.5),
    ("roi_heads.fg_iou", 1.5), ("roi_heads.mask_rois_per_image", -1),
    ("roi_heads.mask_head_chunk", -1), ("roi_heads.box_head_convs", -1),
    ("roi_heads.box_head_conv_dim", 0), ("roi_heads.box_head_fcs", -1),
    ("roi_heads.box_head_dim", 0), ("roi_heads.mask_head_convs", -1),
    ("roi_heads.mask_head_dim", 0), ("roi_heads.box_pooler_size", 0),
    ("roi_heads.mask_pooler_size", 0), ("roi_heads.sampling_ratio", 0),
    ("roi_heads.roi_align_mode", "mean"), ("roi_heads.roi_align_method", "dense"),
    ("roi_heads.box_reg_weights", (10.0, 10.0, 5.0)), ("roi_heads.box_reg_weights", (10, 10, 5, 0)),
    ("roi_heads.smooth_l1_beta", -0.5), ("roi_heads.score_threshold", 1.5),
    ("roi_heads.nms_threshold", float("nan")), ("roi_heads.detections_per_image", 0),
    ("roi_heads.detections_pre_nms_topk", -1), ("size_divisibility", 0),
    ("size_divisibility", -32), ("size_divisibility", 16),
]  # fmt: skip


@pytest.mark.parametrize("field, value", BAD_MODEL)
def test_bad_model_values_name_the_field(field, value):
    config = default.get_config()
    _set(config.model, field, value)
    with pytest.raises(ValueError, match=rf"^config\.model\.{re.escape(field)}=.* must be "):
        checks.check_model_config(config.model)
    with pytest.raises(ValueError, match=rf"config\.model\.{re.escape(field)}="):
        MaskRCNN.from_config(config.model)  # the predictor and exporter build models so


def test_a_model_is_not_built_for_0_classes():
    """`num_classes = 0` in a config means the dataset's count, set by `with_dataset_classes`
    (train.py); built as it is, the model failed at its first call with a division by zero."""
    config = default.get_config()
    config.model.num_classes = 0
    checks.check_model_config(config.model)
    with pytest.raises(ValueError, match=r"num_classes=0: .*trainer\.with_dataset_classes"):
        MaskRCNN.from_config(config.model)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"anchor_sizes": ((32,), (-64,))}, r"anchor_sizes=.* one tuple of positive sizes"),
        ({"anchor_sizes": ()}, r"anchor_sizes=\(\) must be one tuple"),
        (  # 4 levels: it failed in MaskRCNN.setup, after the dataset and the workdir
            {"anchor_sizes": ((32,), (64,), (128,), (256,))},
            r"anchor_sizes=.* per RPN level, 5 tuples \(P2, P3, P4, P5, P6\)",
        ),
        (
            {"anchor_sizes": ((8, 16), (16,), (32,), (64,), (128,))},
            r"must give every RPN level the same number of sizes",
        ),
        ({"rpn.fg_iou": 0.5, "rpn.bg_iou": 0.6}, r"rpn\.bg_iou=0\.6 must not exceed .*fg_iou=0\.5"),
        (
            {"roi_heads.batch_size_per_image": 3},  # 3 × 0.25 rounds down to 0
            r"batch_size_per_image=3 times positive_fraction=0\.25 must keep at least 1",
        ),
    ],
)
def test_joint_model_rules(overrides, message):
    config = default.get_config()
    for field, value in overrides.items():
        _set(config.model, field, value)
    with pytest.raises(ValueError, match=message):
        checks.check_model_config(config.model)


def test_a_training_with_fewer_nms_candidates_than_detections_is_refused():
    """It capped the detections without a word (4 of 20 asked). Training (a new run or a
    resume) and conversion refuse it; a stored config with it still loads (it worked, with
    fewer detections)."""
    config = default.get_config()
    config.model.roi_heads.detections_pre_nms_topk = 5
    config.model.roi_heads.detections_per_image = 20
    checks.check_model_config(config.model)
    message = r"detections_pre_nms_topk=5 must be at least detections_per_image=20"
    with pytest.raises(ValueError, match=message):
        checks.check_new_model_config(config.model)
    with pytest.raises(ValueError, match=message):
        trainer.check_train_config(config, num_devices=1)


BAD_TRAIN = [
    ("batch_size", 0), ("batch_size", 2.5), ("base_lr", 0.0), ("base_lr", -0.01),
    ("warmup_steps", -1), ("warmup_factor", 2.0), ("decay_factor", 10.0), ("decay_factor", 0.0),
    ("momentum", 1.5), ("weight_decay", -1e-4), ("grad_clip_norm", -1.0),
    ("decay_steps", (60_000, -1)), ("adam_betas", (0.9,)), ("adam_betas", (1.5, 0.999)),
    ("schedule", "linear"), ("optimizer", "adam"), ("base_lr", float("inf")),
]  # fmt: skip


@pytest.mark.parametrize("field, value", BAD_TRAIN)
def test_bad_train_values_name_the_field(field, value):
    config = default.get_config()
    _set(config.train, field, value)
    with pytest.raises(ValueError, match=rf"^config\.train\.{field}=.* must be"):
        state_lib.check_train_settings(config.train)
    # The library's entry points check too (a notebook builds the optimizer without train.py).
    with pytest.raises(ValueError, match=rf"^config\.train\.{field}=.* must be"):
        state_lib.create_learning_rate_fn(config.train)
    with pytest.raises(ValueError, match=rf"^config\.train\.{field}=.* must be"):
        state_lib.create_optimizer(config, lambda step: 0.01)


def test_a_schedule_longer_than_the_run_is_allowed_with_warnings():
    """A run may stop before its schedule ends (and resume with more steps): warm-up and decay
    steps beyond num_steps are not errors, but the trainer says what the run never reaches."""
    config = default.get_config()  # warm-up 1000 steps, "step" decays at 60k and 80k of 90k
    assert state_lib.schedule_warnings(config.train) == []
    config.train.num_steps = 70_000
    (decay,) = state_lib.schedule_warnings(config.train)
    assert decay.startswith("config.train.decay_steps (60000, 80000) has (80000,) at or after")
    config.train.num_steps = 20
    state_lib.check_train_settings(config.train)
    warmup, decay = state_lib.schedule_warnings(config.train)
    assert warmup.startswith("config.train.warmup_steps=1000 >= num_steps=20: the run ends in")
    assert "has (60000, 80000) at or after num_steps=20" in decay
    config.train.schedule = "cosine"  # decays to 0 at num_steps: decay_steps are not used
    assert state_lib.schedule_warnings(config.train) == [warmup]


def test_the_lsj_recipe_warns_when_shortened_without_its_decay_steps():
    config = coco_r50_fpn_lsj_100ep.get_config()
    assert state_lib.schedule_warnings(config.train) == []
    config.train.num_steps = 2000
    (decay,) = state_lib.schedule_warnings(config.train)
    assert "at or after num_steps=2000: the learning rate is not multiplied by 0.1" in decay
