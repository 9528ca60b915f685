"""Pasting fixed-size mask predictions into the image (Detectron's "expand and resize").

The mask head predicts an ``M x M`` probability map (M = 28) over each detection's box. To put
it back in the image, torchvision's ``paste_masks_in_image`` (and the original Detectron) pads
the map by one zero pixel on each side, expands the box by ``(M + 2) / M`` about its centre so
that the padded map still covers the same area, truncates the expanded box to integer pixels,
bilinearly resizes the padded map (``align_corners=False``) to the integer box's size, and copies
it into the image, clipping at the image border. The padding lets the resized mask fade to zero
at the box edge instead of being cut off there.

Here the resize is evaluated only on the part of the box inside the image (two gathers per axis),
so huge or mostly-outside boxes cost no more than their visible part.
"""

from __future__ import annotations

import numpy as np

_PADDING = 1


def _linear_resize_taps(
    in_size: int, out_size: int, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Taps of a linear ``align_corners=False`` resize for output positions ``start..stop-1``.

    Follows PyTorch's CPU ``F.interpolate(mode="bilinear")`` arithmetic in float32: output index
    ``d`` samples the source at ``max(in/out * (d + 0.5) - 0.5, 0)``, reading indices
    ``i0 = floor(src)`` (at most ``in - 1``) and ``i1 = min(i0 + 1, in - 1)``.

    Returns:
      ``(i0, i1, w0, w1)``: int64 indices and float32 weights, each of shape ``[stop - start]``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(start, stop, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    return i0, i1, np.float32(1.0) - w1, w1


def expand_boxes_to_pixels(boxes: np.ndarray, mask_size: int) -> np.ndarray:
    """Integer pixel boxes that the zero-padded ``(M + 2) x (M + 2)`` masks are resized into.

    Args:
      boxes: ``[D, 4]`` float32 ``(x1, y1, x2, y2)`` in image pixels.
      mask_size: ``M``, the side of the predicted (unpadded) masks.

    Returns:
      ``[D, 4]`` int64 ``(x1, y1, x2, y2)``: each box scaled by ``(M + 2) / M`` about its centre
      in float32 and truncated toward zero, as torchvision's ``expand_boxes(...).to(torch.int64)``.
      The pasted region is columns ``x1..x2`` and rows ``y1..y2``, both inclusive.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scale = np.float32((mask_size + 2 * _PADDING) / mask_size)
    half = np.float32(0.5)
    w_half = (boxes[:, 2] - boxes[:, 0]) * half * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * half * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * half
    y_c = (boxes[:, 3] + boxes[:, 1]) * half
    expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return np.trunc(expanded).astype(np.int64)


def paste_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> np.ndarray:
    """Pastes per-box mask probabilities into the image and binarises them.

    Args:
      masks: ``[D, M, M]`` float probabilities, each covering its box (pixel ``(i, j)`` of the map
        covers the point ``(x1 + (j + 0.5) * w / M, y1 + (i + 0.5) * h / M)``).
      boxes: ``[D, 4]`` float ``(x1, y1, x2, y2)`` in the target image's pixels; may extend past
        the image (clipped when pasting) or be smaller than a pixel.
      image_size: ``(height, width)`` of the target image.
      threshold: a pixel is foreground where the resized probability is strictly greater than
        this (as the original Detectron and torchvision's COCO evaluation).

    Returns:
      ``[D, H, W]`` bool masks, equal to thresholding torchvision's
      ``paste_masks_in_image(masks[:, None], boxes, image_size, padding=1)``. The array is a
      transposed view of a ``[D, W, H]`` buffer, so ``out.transpose(1, 2, 0)`` is Fortran-ordered
      as ``pycocotools.mask.encode`` wants it.

    Raises:
      ValueError: on mismatched or malformed shapes, non-finite boxes or a non-positive image size.
    """
    masks = np.asarray(masks, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or masks.shape[1] == 0:
        raise ValueError(f"masks must have shape [D, M, M] with M > 0, got {masks.shape}")
    if boxes.shape != (masks.shape[0], 4):
        raise ValueError(f"boxes must have shape [D, 4] = {(masks.shape[0], 4)}, got {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError("boxes must be finite")
    height, width = (int(s) for s in image_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be a positive (height, width), got {image_size}")

    num, mask_size = masks.shape[0], masks.shape[1]
    padded = np.pad(masks, ((0, 0), (_PADDING, _PADDING), (_PADDING, _PADDING)))
    padded_size = mask_size + 2 * _PADDING
    pixel_boxes = expand_boxes_to_pixels(boxes, mask_size)

    buffer = np.zeros((num, width, height), dtype=bool)
    out = buffer.transpose(0, 2, 1)
    for d in range(num):
        bx1, by1, bx2, by2 = (int(v) for v in pixel_boxes[d])
        box_w, box_h = max(bx2 - bx1 + 1, 1), max(by2 - by1 + 1, 1)
        x0, x1 = max(bx1, 0), min(bx2 + 1, width)
        y0, y1 = max(by1, 0), min(by2 + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        cx0, cx1, wx0, wx1 = _linear_resize_taps(padded_size, box_w, x0 - bx1, x1 - bx1)
        ry0, ry1, wy0, wy1 = _linear_resize_taps(padded_size, box_h, y0 - by1, y1 - by1)
        columns = padded[d][:, cx0] * wx0 + padded[d][:, cx1] * wx1  # [M + 2, x1 - x0]
        region = columns[ry0] * wy0[:, None] + columns[ry1] * wy1[:, None]  # [y1 - y0, x1 - x0]
        out[d, y0:y1, x0:x1] = region > threshold
    return out
