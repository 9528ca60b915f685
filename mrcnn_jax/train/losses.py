"""The Mask R-CNN training loss: the sum of each stage's losses (Detectron2 normalisation).

Each stage owns its targets and loss (`modeling/rpn.py: rpn_losses`, `modeling/roi_heads.py:
fast_rcnn_loss, mask_loss`); this module only composes them from `MaskRCNN`'s training outputs.
Each term is written so that `lax.pmean` over the data axis of the per-replica value equals the
loss of the global batch.
"""

import jax
import jax.numpy as jnp
import ml_collections

from mrcnn_jax.modeling.mask_rcnn import TrainOutputs
from mrcnn_jax.modeling.roi_heads import fast_rcnn_loss, mask_loss
from mrcnn_jax.modeling.rpn import rpn_losses


def mask_rcnn_losses(
    outputs: TrainOutputs,
    batch: dict,
    rpn_keys: jax.Array,
    config: ml_collections.ConfigDict,
    axis_name: str | None = None,
) -> dict[str, jnp.ndarray]:
    """The five Mask R-CNN losses of a (per-replica) batch, and their sum `loss`.

    Args:
      outputs: the model's training outputs for B images.
      batch: `gt_boxes [B, M, 4]`, `gt_valid [B, M]` (for the RPN targets).
      rpn_keys: `[B]` PRNG keys for the RPN anchor sampling.
      config: `config.model`.
      axis_name: the data-parallel axis, or None outside shard_map/pmap.

    Returns:
      `loss_rpn_cls`, `loss_rpn_box` (`rpn_losses`), `loss_cls`, `loss_box_reg`
      (`fast_rcnn_loss`), `loss_mask` (`mask_loss`) and `loss`.
    """
    rpn, roi = config.rpn, config.roi_heads
    loss_rpn_cls, loss_rpn_box = rpn_losses(
        rpn_keys,
        outputs.rpn_logits,
        outputs.rpn_deltas,
        outputs.anchors,
        outputs.anchor_valid,
        outputs.anchor_ids,
        batch["gt_boxes"],
        batch["gt_valid"],
        fg_iou=rpn.fg_iou,
        bg_iou=rpn.bg_iou,
        batch_size_per_image=rpn.batch_size_per_image,
        positive_fraction=rpn.positive_fraction,
        smooth_l1_beta=rpn.smooth_l1_beta,
    )
    loss_cls, loss_box_reg = fast_rcnn_loss(
        outputs.class_logits,
        outputs.box_deltas,
        outputs.roi_classes,
        outputs.roi_box_targets,
        outputs.roi_valid,
        batch_size_per_image=roi.batch_size_per_image,
        smooth_l1_beta=roi.smooth_l1_beta,
    )
    losses = {
        "loss_rpn_cls": loss_rpn_cls,
        "loss_rpn_box": loss_rpn_box,
        "loss_cls": loss_cls,
        "loss_box_reg": loss_box_reg,
        "loss_mask": mask_loss(
            outputs.mask_logits, outputs.mask_targets, outputs.mask_valid, axis_name
        ),
    }
    losses["loss"] = sum(losses.values())
    return losses
