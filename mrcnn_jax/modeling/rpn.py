"""Region Proposal Network: the shared head and per-image proposal generation."""

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import nms as nms_ops


class RPNHead(nn.Module):
    """`num_convs` 3×3 convs + ReLU shared by all levels (`conv`, `conv2`, ...; torchvision v1
    has one, v2 two), then 1×1 objectness and box-delta convs.

    For each level `[B, H_l, W_l, C]` it returns objectness logits `[B, H_l·W_l·A]` and deltas
    `[B, H_l·W_l·A, 4]` in the anchors' order (row, column, anchor), as torchvision.
    """

    num_anchors: int
    dtype: jnp.dtype = jnp.float32
    num_convs: int = 1

    @nn.compact
    def __call__(
        self, features: Sequence[jnp.ndarray]
    ) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
        dim = features[0].shape[-1]
        init = nn.initializers.normal(0.01)
        shared = [
            nn.Conv(
                dim,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=init,
                dtype=self.dtype,
                name="conv" if i == 0 else f"conv{i + 1}",
            )
            for i in range(self.num_convs)
        ]
        cls = nn.Conv(
            self.num_anchors, (1, 1), kernel_init=init, dtype=self.dtype, name="objectness"
        )
        reg = nn.Conv(
            self.num_anchors * 4, (1, 1), kernel_init=init, dtype=self.dtype, name="deltas"
        )
        logits, deltas = [], []
        for x in features:
            b = x.shape[0]
            h = x
            for layer in shared:
                h = nn.relu(layer(h))
            logits.append(cls(h).reshape(b, -1).astype(jnp.float32))
            deltas.append(reg(h).reshape(b, -1, 4).astype(jnp.float32))
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
    *,
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float,
    min_size: float,
) -> Proposals:
    """torchvision's `RegionProposalNetwork.filter_proposals` for ONE image, static shapes.

    Per level: the `pre_nms_topk` highest objectness logits, their anchors decoded with weights
    (1, 1, 1, 1) and clipped to `image_size`; boxes smaller than `min_size` are dropped; NMS at
    `nms_threshold` runs independently per level; the `post_nms_topk` best survivors over all
    levels are returned sorted by score, padded with `valid=False`.

    Args:
      logits: per level `[N_l]` objectness logits. deltas: per level `[N_l, 4]`.
      anchors: per level `[N_l, 4]` anchors (x1, y1, x2, y2) in input pixels.
      image_size: `[2]` (height, width) of the image content (proposals are clipped to it).
    """
    all_boxes, all_scores, all_levels = [], [], []
    for level, (lvl_logits, lvl_deltas, lvl_anchors) in enumerate(zip(logits, deltas, anchors)):
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
