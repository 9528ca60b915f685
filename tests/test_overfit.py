"""Overfitting two shapes images: the whole model can learn boxes, classes and masks (slow)."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from references import box_crop
from test_train_step import make_trainer

from mrcnn_jax import sharding
from mrcnn_jax.data import shapes
from mrcnn_jax.evaluation.masks import paste_masks
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.ops.boxes import pairwise_iou
from mrcnn_jax.programs import evaluator


def shapes_batch(config, indices) -> tuple[dict, list]:
    """A train batch of shapes train images `indices` (128² images, no resizing needed)."""
    m, s = config.data.max_instances, config.data.mask_size
    mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
    images, objects = zip(*(shapes.generate_image(0, "train", i, (128, 128)) for i in indices))
    b = len(indices)
    batch = {
        "image": ((np.stack(images) - mean) / std).astype(np.float32),
        "image_size": np.full((b, 2), 128, np.int32),
        "gt_boxes": np.zeros((b, m, 4), np.float32),
        "gt_classes": np.full((b, m), -1, np.int32),
        "gt_valid": np.zeros((b, m), bool),
        "gt_masks": np.zeros((b, m, s, s), np.uint8),
    }
    for i, image_objects in enumerate(objects):
        for j, (label, mask) in enumerate(image_objects):
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            batch["gt_boxes"][i, j] = box
            batch["gt_classes"][i, j] = label
            batch["gt_valid"][i, j] = True
            batch["gt_masks"][i, j] = box_crop(mask, box, s, 1.0) >= 0.5
    return batch, objects


@pytest.mark.slow
def test_overfit_two_images():
    config = tiny_config(
        **{
            "data.image_size": (128, 128),
            "data.max_instances": 8,
            "data.mask_size": 56,
            "model.fpn_dim": 64,
            "model.roi_heads.batch_size_per_image": 64,
            "model.roi_heads.box_head_dim": 256,
            "model.roi_heads.mask_head_dim": 64,
            "train.batch_size": 2,
            "train.num_steps": 300,
            "train.warmup_steps": 20,
            "train.base_lr": 0.01,
            "train.grad_clip_norm": 10.0,
        }
    )
    batch, objects = shapes_batch(config, [0, 1])
    assert all(1 <= len(o) <= 3 for o in objects)
    state, train_step, mesh = make_trainer(config, jax.devices()[:1])
    sharded = sharding.shard_batch(batch, mesh)
    losses = []
    for step in range(config.train.num_steps):
        state, metrics = train_step(state, sharded, jax.random.key(step))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) <= np.mean(losses[:3]) / 10, (losses[:3], losses[-10:])

    model = MaskRCNN.from_config(config.model, axis_name=sharding.AXIS)
    predict = evaluator.make_predict_step(model, mesh)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = jax.device_get(predict(variables, {k: sharded[k] for k in ("image", "image_size")}))
    for i, image_objects in enumerate(objects):
        order = np.argsort(-np.where(out["valid"][i], out["scores"][i], -1))
        for j, (label, mask) in enumerate(image_objects):
            gt_box = batch["gt_boxes"][i, j]
            ious = np.asarray(pairwise_iou(gt_box[None], out["boxes"][i][order]))[0]
            top = order[np.flatnonzero((ious >= 0.5) & out["valid"][i][order])[0]]
            assert out["classes"][i, top] == label
            box_iou = float(pairwise_iou(gt_box[None], out["boxes"][i, top][None])[0, 0])
            assert box_iou >= 0.8, (i, j, box_iou)
            pasted = paste_masks(
                out["masks"][i, top][None], out["boxes"][i, top][None], mask.shape
            )[0]
            mask_iou = (pasted & mask).sum() / (pasted | mask).sum()
            assert mask_iou >= 0.8, (i, j, mask_iou)
