"""Evaluation: mask pasting, COCO metrics and drawing (numpy + pycocotools, no jax, no data/)."""

from mrcnn_jax.evaluation.coco_eval import (
    IOU_TYPES,
    STAT_NAMES,
    CocoEvaluator,
    detections_to_coco,
    evaluate_coco,
    load_coco_gt,
)
from mrcnn_jax.evaluation.masks import PASTE_METHODS, expand_boxes_to_pixels, paste_masks

__all__ = [
    "IOU_TYPES",
    "PASTE_METHODS",
    "STAT_NAMES",
    "CocoEvaluator",
    "detections_to_coco",
    "evaluate_coco",
    "expand_boxes_to_pixels",
    "load_coco_gt",
    "paste_masks",
]
