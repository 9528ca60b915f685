"""Region Proposal Network: the shared head, per-image proposal generation, anchor targets and loss.

As torchvision's `rpn.py` (`RPNHead`, `filter_proposals`, `assign_targets_to_anchors`,
`compute_loss`): everything the RPN stage needs lives here; `MaskRCNN` composes it.
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mrcnn_jax.modeling.resnet import Conv, mask_outside
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import nms as nms_ops
from mrcnn_jax.ops import targets as target_ops


class RPNHead(nn.Module):
    """`num_convs` 3×3 convs + ReLU shared by all levels (`conv`, `conv2`, ...; torchvision v1
    has one, v2 two), then 1×1 objectness and box-delta convs.

    For each level `[B, H_l, W_l, C]` it returns objectness logits `[B, H_l·W_l·A]` and deltas
    `[B, H_l·W_l·A, 4]` (float32, computed in float32 from the `dtype` features) in the anchors'
    order (row, column, anchor), as torchvision. With
    `valid_size [B, 2]` and the levels' `strides`, each conv's input is zeroed outside the
    images' valid extents (`ops/extent.py`), so a second conv never reads the first's padding.
    """

    num_anchors: int
    dtype: jnp.dtype = jnp.float32
    num_convs: int = 1

    @nn.compact
    def __call__(
        self,
        features: Sequence[jnp.ndarray],
        valid_size: jnp.ndarray | None = None,
        strides: Sequence[int] | None = None,
    ) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
        dim = features[0].shape[-1]
        init = nn.initializers.normal(0.01)
        shared = [
            Conv(
                dim,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=init,
                dtype=self.dtype,
                name="conv" if i == 0 else f"conv{i + 1}",
            )
            for i in range(self.num_convs)
        ]
        # The 1×1 predictors compute in float32 whatever `dtype` (bf16 outputs would quantise the
        # deltas by up to ~1 px on large anchors and tie most of the top-k scores).
        cls = Conv(self.num_anchors, (1, 1), kernel_init=init, dtype=jnp.float32, name="objectness")
        reg = Conv(self.num_anchors * 4, (1, 1), kernel_init=init, dtype=jnp.float32, name="deltas")
        logits, deltas = [], []
        strides = strides or [1] * len(features)
        for x, stride in zip(features, strides):
            b = x.shape[0]
            h = x
            for layer in shared:
                h = nn.relu(layer(mask_outside(h, valid_size, stride)))
            logits.append(cls(h).reshape(b, -1))
            deltas.append(reg(h).reshape(b, -1, 4))
        return logits, deltas


class Proposals(NamedTuple):
    """Fixed-size proposals of one image (or a batch, with a leading B)."""

    boxes: jnp.ndarray  # [P, 4] float32 (x1, y1, x2, y2), clipped to the image.
    scores: jnp.ndarray  # [P] float32 objectness logits, decreasing; -inf on padding.
    valid: jnp.ndarray  # [P] bool.


def generate_proposals(
    logits: Sequence[jnp.ndarray],
    deltas: Sequence[jnp.ndarray],
    anchors: Sequence[jnp.ndarray],
    image_size: jnp.ndarray,
    anchor_valid: Sequence[jnp.ndarray] | None = None,
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float,
    min_size: float,
) -> Proposals:
    """torchvision's `RegionProposalNetwork.filter_proposals` for ONE image, static shapes.

    Per level: the `pre_nms_topk` highest objectness logits of the existing anchors, their
    anchors decoded with weights (1, 1, 1, 1) and clipped to `image_size`; boxes smaller than
    `min_size` are dropped; NMS at `nms_threshold` runs independently per level; the
    `post_nms_topk` best survivors over all levels are returned sorted by score, padded with
    `valid=False`. Scores are the logits (torchvision ranks NMS and the final merge by their
    sigmoid): the same sets, but where float32 sigmoids tie (logits above ~10) the order of the
    tied proposals may differ from torchvision's.

    Args:
      logits: per level `[N_l]` objectness logits. deltas: per level `[N_l, 4]`.
      anchors: per level `[N_l, 4]` anchors (x1, y1, x2, y2) in input pixels.
      image_size: `[2]` (height, width) of the image content (proposals are clipped to it).
      anchor_valid: per level `[N_l]` bool, the anchors that exist (inside the image's valid
        extent, `anchors.LevelAnchors.valid`); None: all.
    """
    if anchor_valid is None:
        anchor_valid = [None] * len(logits)
    all_boxes, all_scores, all_levels = [], [], []
    for level, (lvl_logits, lvl_deltas, lvl_anchors, lvl_valid) in enumerate(
        zip(logits, deltas, anchors, anchor_valid)
    ):
        if lvl_valid is not None:
            lvl_logits = jnp.where(lvl_valid, lvl_logits, -jnp.inf)
        k = min(pre_nms_topk, lvl_logits.shape[0])
        scores, idx = jax.lax.top_k(lvl_logits, k)
        boxes = box_ops.decode_boxes(lvl_deltas[idx], jnp.asarray(lvl_anchors)[idx])
        all_boxes.append(box_ops.clip_boxes(boxes, image_size))
        all_scores.append(scores)
        all_levels.append(jnp.full((k,), level, jnp.int32))
    boxes = jax.lax.stop_gradient(jnp.concatenate(all_boxes))
    scores = jax.lax.stop_gradient(jnp.concatenate(all_scores))
    levels = jnp.concatenate(all_levels)
    valid = box_ops.min_size_mask(boxes, min_size) & jnp.isfinite(scores)
    keep, keep_valid = nms_ops.batched_nms(
        boxes, scores, levels, nms_threshold, post_nms_topk, valid=valid
    )
    return Proposals(
        boxes=jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        scores=jnp.where(keep_valid, scores[keep], -jnp.inf),
        valid=keep_valid,
    )


def _rpn_loss_sums_one_image(
    key, logits, deltas, anchors, anchor_valid, anchor_ids, gt_boxes, gt_valid, rpn_config
):
    c = rpn_config
    labels, gt_index = target_ops.label_anchors(
        anchors, gt_boxes, gt_valid, c["fg_iou"], c["bg_iou"], anchor_valid
    )
    sample = target_ops.sample_balanced(
        key,
        labels == 1,
        labels == 0,
        c["batch_size_per_image"],
        c["positive_fraction"],
        anchor_ids,
    )
    idx = sample.indices
    bce = optax.sigmoid_binary_cross_entropy(logits[idx], sample.is_positive.astype(jnp.float32))
    cls_sum = jnp.sum(jnp.where(sample.valid, bce, 0.0))
    positive = sample.is_positive & sample.valid
    matched = jnp.where(positive[:, None], gt_boxes[gt_index[idx]], jnp.array([0.0, 0.0, 1.0, 1.0]))
    ref = jnp.where(positive[:, None], anchors[idx], jnp.array([0.0, 0.0, 1.0, 1.0]))
    box_targets = box_ops.encode_boxes(matched, ref)
    box_err = box_ops.smooth_l1(deltas[idx] - box_targets, c["smooth_l1_beta"])
    box_sum = jnp.sum(jnp.where(positive[:, None], box_err, 0.0))
    return cls_sum, box_sum


def rpn_losses(
    keys: jax.Array,
    logits: jnp.ndarray,
    deltas: jnp.ndarray,
    anchors: jnp.ndarray,
    anchor_valid: jnp.ndarray,
    anchor_ids: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    *,
    fg_iou: float,
    bg_iou: float,
    batch_size_per_image: int,
    positive_fraction: float,
    smooth_l1_beta: float,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The RPN's objectness and box losses of B images (torchvision's `RPN.compute_loss`).

    Per image, existing anchors with IoU ≥ `fg_iou` to a valid GT (and each GT's best anchors)
    are positive, those below `bg_iou` negative (`target_ops.label_anchors`);
    `batch_size_per_image` of them are sampled with at most `positive_fraction` positives, the
    draw keyed by the anchors' `anchor_ids` (so it does not depend on the canvas).

    Args:
      keys: `[B]` PRNG keys for the sampling.
      logits: `[B, A]` objectness logits; deltas: `[B, A, 4]`, over all levels' anchors.
      anchors: `[B, A, 4]` (x1, y1, x2, y2) input pixels; anchor_valid: `[B, A]` bool, the
        anchors inside each image's valid extent (the others are never sampled); anchor_ids:
        `[B, A]` int32 layout-independent ids (`anchors.LevelAnchors.index`).
      gt_boxes: `[B, M, 4]`; gt_valid: `[B, M]` bool.

    Returns:
      `(loss_rpn_cls, loss_rpn_box)`: the sigmoid CE summed over sampled anchors and the smooth L1
      of positive anchors' deltas, both divided by `batch_size_per_image · B` (a constant, so the
      `pmean` over replicas is the global batch's loss).
    """
    rpn_config = {
        "fg_iou": fg_iou,
        "bg_iou": bg_iou,
        "batch_size_per_image": batch_size_per_image,
        "positive_fraction": positive_fraction,
        "smooth_l1_beta": smooth_l1_beta,
    }
    per_image = functools.partial(_rpn_loss_sums_one_image, rpn_config=rpn_config)
    cls_sums, box_sums = jax.vmap(per_image)(
        keys, logits, deltas, anchors, anchor_valid, anchor_ids, gt_boxes, gt_valid
    )
    norm = batch_size_per_image * logits.shape[0]
    return jnp.sum(cls_sums) / norm, jnp.sum(box_sums) / norm
