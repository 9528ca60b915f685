"""Mask R-CNN losses (Detectron2 normalisation), computed from `MaskRCNN` training outputs.

Each loss is written so that `lax.pmean` over the data axis of the per-replica value equals the
loss of the global batch: the RPN and box-head losses divide by constants (the sampling budgets
times the images), the mask loss divides by the foreground count averaged over `axis_name`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mrcnn_jax.modeling.mask_rcnn import TrainOutputs
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import targets as target_ops


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise smooth-L1 (Huber / beta); `beta = 0` is plain L1, as Detectron2."""
    ax = jnp.abs(x)
    if beta < 1e-5:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def _rpn_losses_one_image(key, logits, deltas, anchors, gt_boxes, gt_valid, rpn):
    labels, gt_index = target_ops.label_anchors(anchors, gt_boxes, gt_valid, rpn.fg_iou, rpn.bg_iou)
    sample = target_ops.sample_balanced(
        key, labels == 1, labels == 0, rpn.batch_size_per_image, rpn.positive_fraction
    )
    idx = sample.indices
    bce = optax.sigmoid_binary_cross_entropy(logits[idx], sample.is_positive.astype(jnp.float32))
    cls_sum = jnp.sum(jnp.where(sample.valid, bce, 0.0))
    positive = sample.is_positive & sample.valid
    matched = jnp.where(positive[:, None], gt_boxes[gt_index[idx]], jnp.array([0.0, 0.0, 1.0, 1.0]))
    ref = jnp.where(positive[:, None], anchors[idx], jnp.array([0.0, 0.0, 1.0, 1.0]))
    box_targets = box_ops.encode_boxes(matched, ref)
    box_sum = jnp.sum(
        jnp.where(positive[:, None], smooth_l1(deltas[idx] - box_targets, rpn.smooth_l1_beta), 0.0)
    )
    return cls_sum, box_sum


def mask_rcnn_losses(
    outputs: TrainOutputs,
    batch: dict,
    rpn_keys: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str | None = None,
) -> dict[str, jnp.ndarray]:
    """The five Mask R-CNN losses of a (per-replica) batch.

    Args:
      outputs: the model's training outputs for B images.
      batch: `gt_boxes [B, M, 4]`, `gt_valid [B, M]` (for the RPN targets).
      rpn_keys: `[B]` PRNG keys for the RPN anchor sampling.
      config: `config.model`.
      axis_name: the data-parallel axis, or None outside shard_map/pmap.

    Returns:
      `loss_rpn_cls` (sigmoid CE over sampled anchors), `loss_rpn_box` (smooth L1 over positive
      anchors), both divided by `rpn.batch_size_per_image · B`; `loss_cls` (softmax CE over
      sampled RoIs) and `loss_box_reg` (smooth L1 of the GT class's deltas over foreground RoIs),
      divided by `roi_heads.batch_size_per_image · B`; `loss_mask` (per-pixel sigmoid BCE on the
      GT class, mean over the foreground RoIs of the global batch, scaled so that its pmean is
      that mean); and their sum `loss`.
    """
    rpn, roi = config.rpn, config.roi_heads
    num_images = outputs.rpn_logits.shape[0]

    rpn_cls, rpn_box = jax.vmap(_rpn_losses_one_image, in_axes=(0, 0, 0, None, 0, 0, None))(
        rpn_keys,
        outputs.rpn_logits,
        outputs.rpn_deltas,
        jnp.asarray(outputs.anchors),  # May be a numpy constant, indexed by traced indices.
        batch["gt_boxes"],
        batch["gt_valid"],
        rpn,
    )
    rpn_norm = rpn.batch_size_per_image * num_images

    roi_norm = roi.batch_size_per_image * num_images
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs.class_logits, outputs.roi_classes)
    loss_cls = jnp.sum(jnp.where(outputs.roi_valid, ce, 0.0)) / roi_norm
    fg = outputs.roi_classes > 0
    gt_deltas = jnp.take_along_axis(
        outputs.box_deltas, jnp.maximum(outputs.roi_classes - 1, 0)[..., None, None], axis=2
    )[:, :, 0]
    box_err = smooth_l1(gt_deltas - outputs.roi_box_targets, roi.smooth_l1_beta)
    loss_box = jnp.sum(jnp.where(fg[..., None], box_err, 0.0)) / roi_norm

    pixel_bce = optax.sigmoid_binary_cross_entropy(outputs.mask_logits, outputs.mask_targets)
    mask_sum = jnp.sum(jnp.where(outputs.mask_valid[..., None, None], pixel_bce, 0.0))
    # This replica's share of the global mean, scaled so that pmean over replicas gives it.
    num_fg = jnp.sum(outputs.mask_valid).astype(jnp.float32)
    replicas = 1.0
    if axis_name is not None:
        num_fg = jax.lax.psum(num_fg, axis_name)
        replicas = jax.lax.psum(1.0, axis_name)
    mask_pixels = outputs.mask_logits.shape[-1] * outputs.mask_logits.shape[-2]
    loss_mask = replicas * mask_sum / (jnp.maximum(num_fg, 1.0) * mask_pixels)

    losses = {
        "loss_rpn_cls": jnp.sum(rpn_cls) / rpn_norm,
        "loss_rpn_box": jnp.sum(rpn_box) / rpn_norm,
        "loss_cls": loss_cls,
        "loss_box_reg": loss_box,
        "loss_mask": loss_mask,
    }
    losses["loss"] = sum(losses.values())
    return losses
