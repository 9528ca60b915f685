"""Training targets for one image: anchor/RoI matching, balanced sampling, mask targets.

All functions are written for a single image with fixed shapes and are `jax.vmap`ped over the
batch by the caller. Boxes are `(x1, y1, x2, y2)` float32 in input-image pixels; ground truth is
padded to `M` rows with a validity mask `gt_valid [M]`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mrcnn_jax.ops import boxes as box_ops


class Matches(NamedTuple):
    """Result of matching N candidate boxes to M ground-truth boxes."""

    gt_index: jnp.ndarray  # [N] int32: the best GT of each candidate (0 when there is no valid GT).
    iou: jnp.ndarray  # [N] float32: IoU with that GT; -1 when there is no valid GT.


def match_boxes(boxes: jnp.ndarray, gt_boxes: jnp.ndarray, gt_valid: jnp.ndarray) -> Matches:
    """Matches each of `boxes [N, 4]` to the valid GT of `gt_boxes [M, 4]` with the highest IoU."""
    iou = box_ops.pairwise_iou(gt_boxes, boxes)  # [M, N]
    iou = jnp.where(gt_valid[:, None], iou, -1.0)
    return Matches(gt_index=jnp.argmax(iou, axis=0).astype(jnp.int32), iou=jnp.max(iou, axis=0))


def label_anchors(
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    fg_iou: float,
    bg_iou: float,
    anchor_valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """RPN anchor labels, torchvision's `Matcher(allow_low_quality_matches=True)`.

    Args:
      anchors: [A, 4] anchors.
      gt_boxes: [M, 4] ground truth; gt_valid: [M] bool.
      fg_iou: IoU at/above which an anchor is positive; bg_iou: max IoU below which it is negative.
      anchor_valid: [A] bool, anchors that exist (inside the image's valid extent); the others are
        ignored (-1) and take no part in the low-quality matches. None: all exist.

    Returns:
      labels [A] int32 (1 positive, 0 negative, -1 ignored) and the matched GT index [A] int32.
      An anchor whose IoU with some valid GT equals that GT's best (non-zero) IoU is positive too.
      With no valid GT every existing anchor is negative.
    """
    iou = box_ops.pairwise_iou(gt_boxes, anchors)  # [M, A]
    iou = jnp.where(gt_valid[:, None], iou, -1.0)
    if anchor_valid is not None:
        iou = jnp.where(anchor_valid[None, :], iou, -1.0)
    max_iou = jnp.max(iou, axis=0)
    gt_index = jnp.argmax(iou, axis=0).astype(jnp.int32)
    labels = jnp.where(max_iou >= fg_iou, 1, jnp.where(max_iou < bg_iou, 0, -1))
    best_per_gt = jnp.max(iou, axis=1, keepdims=True)  # [M, 1]
    low_quality = jnp.any((iou == best_per_gt) & (best_per_gt > 0) & gt_valid[:, None], axis=0)
    labels = jnp.where(low_quality, 1, labels)
    if anchor_valid is not None:
        labels = jnp.where(anchor_valid, labels, -1)
    return labels.astype(jnp.int32), gt_index


def _random_priority(key: jax.Array, ids: jnp.ndarray) -> jnp.ndarray:
    """`[N]` int32 pseudo-random priorities in [0, 2^31), a function of (key, id) only.

    Hashing each candidate's id (murmur3's finaliser) instead of drawing by position makes a
    sample independent of where the candidates sit in a padded array: the same candidates with
    the same ids are drawn in any layout.
    """
    x = ids.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jax.random.bits(key, (), jnp.uint32)
    x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
    x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
    return ((x ^ (x >> 16)) >> 1).astype(jnp.int32)


def _take_random(
    key: jax.Array, candidates: jnp.ndarray, k: int, ids: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Picks up to `k` random indices where `candidates [N]` is True, by `_random_priority(ids)`.

    Returns `(indices [k] int32, count)`: the first `count = min(k, sum(candidates))` indices are
    distinct random candidates, the rest are padding. `k` may exceed `N` (the tail is then 0s).
    """
    top = min(k, candidates.shape[0])
    priority = jnp.where(candidates, _random_priority(key, ids), -1)
    _, indices = jax.lax.top_k(priority, top)
    indices = jnp.pad(indices.astype(jnp.int32), (0, k - top))
    count = jnp.minimum(jnp.sum(candidates), k)
    return indices, count


class Sample(NamedTuple):
    """A fixed-size balanced sample: positives first, then negatives, then padding."""

    indices: jnp.ndarray  # [S] int32 into the candidate array.
    is_positive: jnp.ndarray  # [S] bool.
    valid: jnp.ndarray  # [S] bool: a real sample (positive or negative), not padding.
    num_positive: jnp.ndarray  # [] int32.


def sample_balanced(
    key: jax.Array,
    positive: jnp.ndarray,
    negative: jnp.ndarray,
    batch_size: int,
    positive_fraction: float,
    ids: jnp.ndarray | None = None,
) -> Sample:
    """Detectron2/torchvision `BalancedPositiveNegativeSampler` with a static output size.

    Draws `p = min(#positive, int(batch_size * positive_fraction))` positives and
    `min(#negative, batch_size - p)` negatives uniformly at random without replacement from the
    boolean masks `positive [N]`, `negative [N]` (disjoint). Slot `i < p` holds a positive, slots
    `p <= i < p + n` negatives; `S = batch_size`. The draw depends on `key` and each candidate's
    `ids [N]` int32 (default: its position), not on where it sits: give layout-independent ids
    (e.g. `anchors.LevelAnchors.index`) to draw the same sample from any padded layout.
    """
    key_pos, key_neg = jax.random.split(key)
    ids = jnp.arange(positive.shape[0], dtype=jnp.int32) if ids is None else ids
    max_positive = int(batch_size * positive_fraction)
    pos_idx, num_pos = _take_random(key_pos, positive, max_positive, ids)
    neg_idx, num_neg_available = _take_random(key_neg, negative, batch_size, ids)
    num_neg = jnp.minimum(num_neg_available, batch_size - num_pos)
    slot = jnp.arange(batch_size)
    is_positive = slot < num_pos
    pos_idx = jnp.pad(pos_idx, (0, batch_size - max_positive))
    neg_slot = jnp.clip(slot - num_pos, 0, batch_size - 1)
    indices = jnp.where(is_positive, pos_idx, neg_idx[neg_slot])
    valid = slot < num_pos + num_neg
    return Sample(indices, is_positive, valid, num_pos.astype(jnp.int32))


def bilinear_weights(coords: jnp.ndarray, size: int) -> jnp.ndarray:
    """Linear-interpolation weights of sample positions on a grid of `size` pixel centres.

    `coords [K]` are continuous pixel coordinates (pixel `i` covers `[i, i + 1)`, centre
    `i + 0.5`). Returns `[K, size]` with at most two non-zero weights per row. Inside `[0, size]`
    positions beyond the outer pixel centres take the edge pixel; outside it every weight is 0.
    """
    pos = jnp.clip(coords - 0.5, 0.0, size - 1.0)
    grid = jnp.arange(size, dtype=coords.dtype)
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pos[:, None] - grid[None, :]))
    inside = (coords >= 0.0) & (coords <= size)
    return jnp.where(inside[:, None], weights, 0.0)


def mask_targets(
    gt_masks: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    rois: jnp.ndarray,
    output_size: int,
    sampling_ratio: int = 2,
) -> jnp.ndarray:
    """Resamples each RoI's matched GT mask into the RoI at `output_size²`.

    Args:
      gt_masks: [R, S, S] float32 in [0, 1], the matched GT mask of each RoI, cropped to
        `gt_boxes` (pixel (i, j) covers the image point `(x1 + (j+.5) w / S, y1 + (i+.5) h / S)`).
      gt_boxes: [R, 4] the boxes the crops cover. rois: [R, 4] the RoIs.
      output_size: side of the target grid (28). sampling_ratio: bilinear samples per bin side,
        averaged, as RoIAlign.

    Returns:
      [R, output_size, output_size] float32 soft targets in [0, 1]; zero outside the GT box.
    """
    s = gt_masks.shape[-1]
    offsets = (jnp.arange(output_size * sampling_ratio) + 0.5) / (output_size * sampling_ratio)

    def axis_weights(roi_lo, roi_hi, gt_lo, gt_hi):
        points = roi_lo + offsets * (roi_hi - roi_lo)  # [O * r] image coordinates
        in_crop = (points - gt_lo) / jnp.maximum(gt_hi - gt_lo, 1e-6) * s
        w = bilinear_weights(in_crop, s)  # [O * r, S]
        return w.reshape(output_size, sampling_ratio, s).mean(axis=1)

    wy = jax.vmap(axis_weights)(rois[:, 1], rois[:, 3], gt_boxes[:, 1], gt_boxes[:, 3])
    wx = jax.vmap(axis_weights)(rois[:, 0], rois[:, 2], gt_boxes[:, 0], gt_boxes[:, 2])
    return jnp.einsum("roy,ryx,rpx->rop", wy, gt_masks, wx)
