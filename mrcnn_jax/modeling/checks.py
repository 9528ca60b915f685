"""`check_model_config`: the `config.model` values the model can be built from, checked up front;
`check_class_fields`: the per-class `config.data` fields against `model.num_classes`.

A bad value otherwise surfaces late (at the first compile, after the dataset is built), deep in
JAX (`top_k`'s "k must be nonnegative", a division by zero in an initializer), or not at all: an
IoU threshold of 1.5 or a score threshold above 1 trains or evaluates without a word. Each error
names the field (`config.model.rpn.fg_iou=1.5`) and the rule it breaks.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from mrcnn_jax.modeling.fpn import RPN_LEVELS
from mrcnn_jax.modeling.resnet import NORM_MODES, STAGE_BLOCKS
from mrcnn_jax.ops import roi_align

DTYPES = ("float32", "bfloat16")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _fraction(low_open: bool, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        return is_number(v) and (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)

    return ok, f"in {'(' if low_open else '['}0, 1{')' if high_open else ']'}"


def _one_of(choices: Sequence[Any]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices), f"one of {tuple(choices)}"


def _positive_numbers(count: int | None = None) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        values = tuple(v) if isinstance(v, (tuple, list)) else ()
        return (
            bool(values)
            and (count is None or len(values) == count)
            and all(is_number(x) and x > 0 for x in values)
        )

    return ok, f"{count or 'one or more'} positive numbers"


_NON_NEGATIVE = ((lambda v: is_number(v) and v >= 0), "a number >= 0")

# field (relative to config.model) -> (test, what it must be).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_classes": _at_least(0),
    "backbone_depth": _one_of(sorted(STAGE_BLOCKS)),
    "norm": _one_of(NORM_MODES),
    "freeze_at": _one_of((0, 1, 2)),
    "fpn_dim": _at_least(1),
    "size_divisibility": (
        lambda v: _is_int(v) and v > 0 and v % 32 == 0,
        "a positive multiple of 32 (the stride of P5)",
    ),
    "dtype": _one_of(DTYPES),
    "aspect_ratios": _positive_numbers(),
    "rpn.num_convs": _at_least(0),
    "rpn.pre_nms_topk_train": _at_least(1),
    "rpn.pre_nms_topk_test": _at_least(1),
    "rpn.post_nms_topk_train": _at_least(1),
    "rpn.post_nms_topk_test": _at_least(1),
    "rpn.nms_threshold": _fraction(low_open=False),
    "rpn.min_size": _NON_NEGATIVE,
    "rpn.fg_iou": _fraction(low_open=True),
    "rpn.bg_iou": _fraction(low_open=False),
    "rpn.batch_size_per_image": _at_least(1),
    "rpn.positive_fraction": _fraction(low_open=True),
    "rpn.smooth_l1_beta": _NON_NEGATIVE,
    "roi_heads.batch_size_per_image": _at_least(1),
    "roi_heads.positive_fraction": _fraction(low_open=True),
    "roi_heads.fg_iou": _fraction(low_open=True),
    "roi_heads.mask_rois_per_image": _at_least(0),
    "roi_heads.mask_head_chunk": _at_least(0),
    "roi_heads.box_head_convs": _at_least(0),
    "roi_heads.box_head_conv_dim": _at_least(1),
    "roi_heads.box_head_fcs": _at_least(0),
    "roi_heads.box_head_dim": _at_least(1),
    "roi_heads.mask_head_convs": _at_least(0),
    "roi_heads.mask_head_dim": _at_least(1),
    "roi_heads.box_pooler_size": _at_least(1),
    "roi_heads.mask_pooler_size": _at_least(1),
    "roi_heads.sampling_ratio": _at_least(1),
    "roi_heads.roi_align_mode": _one_of(roi_align.MODES),
    "roi_heads.roi_align_method": _one_of(roi_align.METHODS),
    "roi_heads.box_reg_weights": _positive_numbers(4),
    "roi_heads.smooth_l1_beta": _NON_NEGATIVE,
    "roi_heads.score_threshold": _fraction(low_open=False),
    "roi_heads.nms_threshold": _fraction(low_open=False),
    "roi_heads.detections_per_image": _at_least(1),
    "roi_heads.detections_pre_nms_topk": _at_least(1),
}


def check_model_config(model: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the field, its value and the rule, unless every `config.model`
    value is one the model can be built and trained from (`configs/default.py` documents each):
    sizes and counts are integers in range, IoU, NMS and score thresholds and sampling fractions
    lie in [0, 1] (fractions and foreground IoUs above 0), the RPN's `bg_iou <= fg_iou`, the RoI
    sampler keeps at least one foreground slot, `anchor_sizes` holds one tuple of positive sizes
    per RPN level (P2-P6), each as long, and the string choices are known."""
    for field, (ok, rule) in _RULES.items():
        value = model
        for key in field.split("."):
            value = value[key]
        if not ok(value):
            raise ValueError(f"config.model.{field}={value!r} must be {rule}")
    sizes = model.anchor_sizes
    if len(sizes) != len(RPN_LEVELS) or not all(_positive_numbers()[0](s) for s in sizes):
        raise ValueError(
            f"config.model.anchor_sizes={sizes!r} must be one tuple of positive sizes per RPN "
            f"level, {len(RPN_LEVELS)} tuples ({', '.join(RPN_LEVELS)})"
        )
    if len({len(level) for level in sizes}) != 1:
        raise ValueError(
            f"config.model.anchor_sizes={sizes!r} must give every RPN level the same number of "
            "sizes: one RPN head, shared by the levels, predicts each level's anchors"
        )
    rpn, roi = model.rpn, model.roi_heads
    if rpn.bg_iou > rpn.fg_iou:
        raise ValueError(
            f"config.model.rpn.bg_iou={rpn.bg_iou} must not exceed config.model.rpn.fg_iou="
            f"{rpn.fg_iou} (anchors between the two are ignored)"
        )
    if int(roi.batch_size_per_image * roi.positive_fraction) < 1:
        raise ValueError(
            f"config.model.roi_heads.batch_size_per_image={roi.batch_size_per_image} times "
            f"positive_fraction={roi.positive_fraction} must keep at least 1 foreground RoI"
        )


def check_new_model_config(model: ml_collections.ConfigDict) -> None:
    """`check_model_config`, and what a model trained or converted anew must also satisfy:
    `roi_heads.detections_pre_nms_topk >= detections_per_image` (the final NMS keeps at most
    the candidates it is given; a stored config with fewer still loads, as it was written)."""
    check_model_config(model)
    roi = model.roi_heads
    if roi.detections_pre_nms_topk < roi.detections_per_image:
        raise ValueError(
            f"config.model.roi_heads.detections_pre_nms_topk={roi.detections_pre_nms_topk} "
            f"must be at least detections_per_image={roi.detections_per_image}: the final NMS "
            "keeps at most the candidates it is given"
        )


def check_class_fields(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless `config.data.class_names` and `config.data.label_to_category_id`
    are empty or hold one entry per class (`config.model.num_classes`), naming the field."""
    for name in ("class_names", "label_to_category_id"):
        given = tuple(config.data[name])
        if given and len(given) != config.model.num_classes:
            raise ValueError(
                f"config.data.{name} has {len(given)} entries but config.model.num_classes="
                f"{config.model.num_classes}: give one per class, e.g. "
                f'--config.data.{name}="(...)", or () for none'
            )
