"""Pasting fixed-size mask predictions into the image, by either reference's convention.

The mask head predicts an ``M x M`` probability map (M = 28) over each detection's box; pixel
``(i, j)`` of the map covers the point ``(x1 + (j + 0.5) * w / M, y1 + (i + 0.5) * h / M)``.
``paste_masks(..., method=...)`` puts it back in the image in one of two ways:

- ``"detectron2"`` (Detectron2's ``paste_masks_in_image`` / ``_do_paste_mask``): every image
  pixel centre ``(x + 0.5, y + 0.5)`` is mapped into the float box and the map is sampled there
  bilinearly (``F.grid_sample``, ``align_corners=False``, zeros outside the map), then
  thresholded with ``>= 0.5``. The map's cells sit exactly where the mask head's targets put
  them, so it is the paste of models trained with ``aligned=True`` RoIAlign.
- ``"torchvision"`` (torchvision's ``paste_masks_in_image``, the original Detectron's "expand and
  resize"): the map is padded by one zero pixel on each side, the box expanded by ``(M + 2) / M``
  about its centre so that the padded map still covers the same area, the expanded box
  truncated to integer pixels, the padded map bilinearly resized (``align_corners=False``) to
  the integer box's size and copied into the image, then thresholded with ``> 0.5``. Up to a
  pixel of misplacement from the truncation; the paste torchvision's COCO numbers
  (``aligned=False`` models) are measured with.

Both are evaluated only on the part of each box inside the image (gathers per axis), so huge or
mostly-outside boxes cost no more than their visible part.
"""

from __future__ import annotations

import numpy as np

_PADDING = 1
PASTE_METHODS = ("detectron2", "torchvision")


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


def _check_inputs(masks, boxes, image_size) -> tuple[np.ndarray, np.ndarray, int, int]:
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
    return masks, boxes, height, width


def _empty_masks(num: int, height: int, width: int) -> np.ndarray:
    """``[num, height, width]`` False, a transposed view of a ``[num, width, height]`` buffer
    (so that ``out.transpose(1, 2, 0)`` is Fortran-ordered, as ``pycocotools`` wants it)."""
    return np.zeros((num, width, height), dtype=bool).transpose(0, 2, 1)


def _paste_torchvision(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float
) -> np.ndarray:
    """torchvision's legacy paste (module docstring), binarised with ``> threshold``."""
    num, mask_size = masks.shape[0], masks.shape[1]
    padded = np.pad(masks, ((0, 0), (_PADDING, _PADDING), (_PADDING, _PADDING)))
    padded_size = mask_size + 2 * _PADDING
    pixel_boxes = expand_boxes_to_pixels(boxes, mask_size)
    out = _empty_masks(num, height, width)
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


def _grid_sample_taps(
    start: int, stop: int, lo: np.float32, hi: np.float32, mask_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear taps of ``F.grid_sample(align_corners=False)`` along one axis for the image
    pixels ``start..stop-1`` of a box spanning ``lo..hi`` over a map of ``mask_size`` cells.

    Detectron2's grid: ``g = (p + 0.5 - lo) / (hi - lo) * 2 - 1``; PyTorch's CPU kernel then
    samples the map at ``c = (g + 1) * (M / 2) - 0.5`` from cells ``floor(c)`` (weight
    ``1 - (c - floor(c))``) and ``floor(c) + 1``, reading zero outside ``0..M-1``. All float32;
    a zero-size box gives non-finite coordinates, hence NaN weights (never foreground), as
    PyTorch does.

    Returns:
      ``(i0, i1, w0, w1)``: int64 indices into the map zero-padded by one cell on each side (so
      ``0`` and ``M + 1`` read zero) and float32 weights, each of shape ``[stop - start]``.
    """
    one, two, half = np.float32(1.0), np.float32(2.0), np.float32(0.5)
    centres = np.arange(start, stop, dtype=np.float32) + half
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        grid = (centres - lo) / (hi - lo) * two - one
        coord = (grid + one) * np.float32(mask_size / 2) - half
        floor = np.floor(coord)
        w1 = coord - floor
    w0 = one - w1
    # Indices outside -1..M are clipped onto the zero padding; non-finite ones (NaN weights)
    # point anywhere valid.
    floor = np.where(np.isfinite(floor), floor, np.float32(-1.0))
    i0 = np.clip(floor, -1, mask_size).astype(np.int64) + 1
    i1 = np.clip(floor + one, -1, mask_size).astype(np.int64) + 1
    return i0, i1, w0, w1


def _paste_detectron2(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, threshold: float
) -> np.ndarray:
    """Detectron2's paste (module docstring), binarised with ``>= threshold``.

    Each box is evaluated on the pixels Detectron2's CPU path computes (``skip_empty``): columns
    ``max(floor(x1) - 1, 0) .. min(ceil(x2) + 1, W) - 1`` and the same for rows; the rest of the
    image is background. The four taps are weighted and summed in PyTorch's CPU order,
    ``nw * v_nw + ne * v_ne + sw * v_sw + se * v_se`` with ``nw = s * e`` etc.
    """
    num, mask_size = masks.shape[0], masks.shape[1]
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    out = _empty_masks(num, height, width)
    for d in range(num):
        bx1, by1, bx2, by2 = (np.float32(v) for v in boxes[d])
        x0, x1 = max(int(np.floor(bx1)) - 1, 0), min(int(np.ceil(bx2)) + 1, width)
        y0, y1 = max(int(np.floor(by1)) - 1, 0), min(int(np.ceil(by2)) + 1, height)
        if x1 <= x0 or y1 <= y0:
            continue
        cx0, cx1, e, w = _grid_sample_taps(x0, x1, bx1, bx2, mask_size)  # west/east taps
        ry0, ry1, s, n = _grid_sample_taps(y0, y1, by1, by2, mask_size)  # north/south taps
        north, south = padded[d][ry0], padded[d][ry1]  # [y1 - y0, M + 2]
        s, n = s[:, None], n[:, None]
        with np.errstate(invalid="ignore"):
            region = (
                north[:, cx0] * (s * e)
                + north[:, cx1] * (s * w)
                + south[:, cx0] * (n * e)
                + south[:, cx1] * (n * w)
            )
            out[d, y0:y1, x0:x1] = region >= threshold
    return out


def paste_masks(
    masks: np.ndarray,
    boxes: np.ndarray,
    image_size: tuple[int, int],
    threshold: float = 0.5,
    *,
    method: str = "torchvision",
) -> np.ndarray:
    """Pastes per-box mask probabilities into the image and binarises them.

    Args:
      masks: ``[D, M, M]`` float probabilities, each covering its box (pixel ``(i, j)`` of the map
        covers the point ``(x1 + (j + 0.5) * w / M, y1 + (i + 0.5) * h / M)``).
      boxes: ``[D, 4]`` float ``(x1, y1, x2, y2)`` in the target image's pixels; may extend past
        the image (clipped when pasting) or be smaller than a pixel.
      image_size: ``(height, width)`` of the target image.
      threshold: the binarisation threshold: a pixel is foreground where the pasted probability
        is ``>= threshold`` ("detectron2") or ``> threshold`` ("torchvision", as the original
        Detectron).
      method: one of ``PASTE_METHODS`` (see the module docstring); the config field
        ``model.roi_heads.mask_paste`` chooses it. "torchvision" (the default here) equals
        thresholding torchvision's ``paste_masks_in_image(masks[:, None], boxes, image_size,
        padding=1)``; "detectron2" equals Detectron2's ``paste_masks_in_image(masks, boxes,
        image_size, threshold)`` on CPU.

    Returns:
      ``[D, H, W]`` bool masks. The array is a transposed view of a ``[D, W, H]`` buffer, so
      ``out.transpose(1, 2, 0)`` is Fortran-ordered as ``pycocotools.mask.encode`` wants it.

    Raises:
      ValueError: on an unknown method, mismatched or malformed shapes, non-finite boxes or a
        non-positive image size.
    """
    if method not in PASTE_METHODS:
        raise ValueError(f"method must be one of {PASTE_METHODS}, got {method!r}")
    masks, boxes, height, width = _check_inputs(masks, boxes, image_size)
    paste = _paste_detectron2 if method == "detectron2" else _paste_torchvision
    return paste(masks, boxes, height, width, threshold)
