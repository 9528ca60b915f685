"""Box arithmetic: area, pairwise IoU, Faster R-CNN box coding, clipping and size filtering.

All boxes are `(x1, y1, x2, y2)` in input-image pixels (float32), with `x1 <= x2` and `y1 <= y2`;
width is `x2 - x1` (no `+ 1`), as in torchvision and Detectron2. Every function is pure jnp,
jittable and vmappable, and broadcasts over leading dimensions.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Largest `dw`, `dh` fed to `exp` when decoding: a box grows at most 1000/16 times per side.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)

BoxWeights = tuple[float, float, float, float]


def box_area(boxes: jax.Array) -> jax.Array:
    """Area `(x2 - x1) * (y2 - y1)` of boxes `[..., 4]` (x1, y1, x2, y2) -> `[...]`."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """`numerator / denominator` where `denominator > 0`, else 0; finite values and gradients.

    The denominator is replaced by 1 before dividing where it is not positive, so neither the
    value nor the gradient of the discarded branch can be NaN or inf.
    """
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def pairwise_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
    """Intersection over union of every pair of boxes.

    Args:
        boxes1: `[..., N, 4]` float (x1, y1, x2, y2).
        boxes2: `[..., M, 4]` float (x1, y1, x2, y2); leading dims broadcast with `boxes1`'s.

    Returns:
        `[..., N, M]` IoU in [0, 1], in the boxes' dtype. Pairs whose union is 0 (e.g. two
        zero-area boxes) get 0, never NaN, and the gradient is finite everywhere. Same formula
        as torchvision's `box_iou` (`inter / (area1 + area2 - inter)`); values agree to float32
        rounding (under jit XLA may fuse the multiply-subtract into one FMA, a last-bit
        difference). Computed in at least float32: float16 areas overflow past 255² pixels.
    """
    given = jnp.result_type(boxes1, boxes2)
    wide = jnp.promote_types(given, jnp.float32)  # float16, bfloat16 and integers: float32
    dtype = given if jnp.issubdtype(given, jnp.floating) else wide
    boxes1, boxes2 = jnp.asarray(boxes1, wide), jnp.asarray(boxes2, wide)
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = jnp.maximum(bottom_right - top_left, 0)
    intersection = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - intersection
    return safe_divide(intersection, union).astype(dtype)


def _check_weights(weights: Sequence[float]) -> BoxWeights:
    """Validates the four positive box-coding weights `(wx, wy, ww, wh)`."""
    if len(weights) != 4 or not all(float(w) > 0 for w in weights):
        raise ValueError(f"weights must be four positive numbers (wx, wy, ww, wh), got {weights!r}")
    wx, wy, ww, wh = (float(w) for w in weights)
    return wx, wy, ww, wh


def _centre_size(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(centre x, centre y, width, height) of `[..., 4]` boxes, torchvision's way (x1 + 0.5 w)."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(
    boxes: jax.Array, reference: jax.Array, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> jax.Array:
    """Faster R-CNN regression targets of `boxes` relative to `reference` boxes.

    `dx = wx * (cx - ref_cx) / ref_w`, `dy = wy * (cy - ref_cy) / ref_h`,
    `dw = ww * log(w / ref_w)`, `dh = wh * log(h / ref_h)`: torchvision's
    `BoxCoder(weights).encode_single(reference_boxes=boxes, proposals=reference)` exactly (mind the
    swapped names: torchvision's "reference boxes" are the ground truth being encoded).

    Args:
        boxes: `[..., 4]` float (x1, y1, x2, y2), the boxes to encode (e.g. matched ground truth).
        reference: `[..., 4]` float (x1, y1, x2, y2), the anchors/proposals; broadcasts with
            `boxes`.
        weights: `(wx, wy, ww, wh)` positive scales, (1, 1, 1, 1) for the RPN and
            (10, 10, 5, 5) for the box head.

    Returns:
        `[..., 4]` deltas `(dx, dy, dw, dh)`. As in torchvision they are not finite where a
        reference or a box has zero width/height (e.g. padding ground truth): select the valid
        rows with `jnp.where` rather than multiplying by a 0 weight.
    """
    wx, wy, ww, wh = _check_weights(weights)
    ref_cx, ref_cy, ref_w, ref_h = _centre_size(reference)
    cx, cy, w, h = _centre_size(boxes)
    dx = wx * (cx - ref_cx) / ref_w
    dy = wy * (cy - ref_cy) / ref_h
    dw = ww * jnp.log(w / ref_w)
    dh = wh * jnp.log(h / ref_h)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    deltas: jax.Array,
    reference: jax.Array,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    scale_clamp: float = BBOX_XFORM_CLIP,
) -> jax.Array:
    """Applies Faster R-CNN deltas to reference boxes (inverse of `encode_boxes`).

    torchvision's `BoxCoder(weights, bbox_xform_clip=scale_clamp).decode_single` exactly: the
    deltas are divided by the weights, `dw` and `dh` are clamped from above at `scale_clamp`
    (default `log(1000 / 16)`) before `exp`, and the result is not clipped to the image.

    Args:
        deltas: `[..., 4]` float `(dx, dy, dw, dh)`.
        reference: `[..., 4]` float (x1, y1, x2, y2) anchors/proposals; broadcasts with `deltas`
            (e.g. `[R, K, 4]` class-specific deltas with `[R, 1, 4]` proposals).
        weights: `(wx, wy, ww, wh)` positive scales, as given to `encode_boxes`.
        scale_clamp: upper bound of `dw / ww` and `dh / wh`.

    Returns:
        `[..., 4]` decoded boxes (x1, y1, x2, y2) in the dtype of `deltas`.
    """
    wx, wy, ww, wh = _check_weights(weights)
    ref_cx, ref_cy, ref_w, ref_h = _centre_size(reference.astype(deltas.dtype))
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, scale_clamp)
    dh = jnp.minimum(deltas[..., 3] / wh, scale_clamp)
    cx = dx * ref_w + ref_cx
    cy = dy * ref_h + ref_cy
    half_w = 0.5 * (jnp.exp(dw) * ref_w)
    half_h = 0.5 * (jnp.exp(dh) * ref_h)
    return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def clip_boxes(boxes: jax.Array, image_size: jax.Array | Sequence[int]) -> jax.Array:
    """Clamps boxes `[..., 4]` (x1, y1, x2, y2) into the image: x to [0, width], y to [0, height].

    Args:
        boxes: `[..., 4]` float boxes.
        image_size: `[2]` (height, width), a static pair or a (traced) int/float array, e.g. one
            image's `image_size` row inside a vmap.

    Returns:
        `[..., 4]` clipped boxes, same dtype (torchvision's `clip_boxes_to_image`).
    """
    size = jnp.asarray(image_size)
    if size.shape != (2,):
        raise ValueError(f"image_size must be (height, width), got shape {size.shape}")
    height, width = size[0].astype(boxes.dtype), size[1].astype(boxes.dtype)
    x = jnp.clip(boxes[..., 0::2], 0, width)
    y = jnp.clip(boxes[..., 1::2], 0, height)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def min_size_mask(boxes: jax.Array, min_size: float) -> jax.Array:
    """bool `[...]`: True where both sides of boxes `[..., 4]` are at least `min_size` pixels.

    The mask form of torchvision's `remove_small_boxes` (`w >= min_size and h >= min_size`).
    """
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return (widths >= min_size) & (heights >= min_size)


def smooth_l1(x: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise smooth-L1 of box-delta errors (Huber / beta); `beta = 0` is plain L1, as
    Detectron2."""
    ax = jnp.abs(x)
    if beta < 1e-5:
        return ax
    return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)
