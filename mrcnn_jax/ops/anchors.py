"""FPN anchors, computed once in numpy so they are static constants of the jitted program.

Numerically identical to torchvision's `AnchorGenerator` (float32 throughout, the same rounding
and the same order), so torchvision RPN weights apply unchanged.
"""

from collections.abc import Sequence

import numpy as np

DEFAULT_SIZES = ((32,), (64,), (128,), (256,), (512,))
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """Zero-centred anchors of one level: `[len(aspect_ratios) * len(sizes), 4]` float32.

    Aspect ratio is height / width; an anchor of size `s` and ratio `r` is `s / sqrt(r)` wide and
    `s * sqrt(r)` high. Rows are ratio-major, size-minor, and the half-extents are rounded to
    integers (half to even), exactly as torchvision's `AnchorGenerator.generate_anchors`.
    """
    scales = np.asarray(sizes, dtype=np.float32)
    h_ratios = np.sqrt(np.asarray(aspect_ratios, dtype=np.float32))
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def _per_level_ratios(
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]], num_levels: int
) -> list[Sequence[float]]:
    """One aspect-ratio list per level: a flat list is shared by every level."""
    if len(aspect_ratios) and all(isinstance(r, Sequence) for r in aspect_ratios):
        if len(aspect_ratios) != num_levels:
            raise ValueError(
                f"aspect_ratios has {len(aspect_ratios)} per-level lists for {num_levels} levels"
            )
        per_level = list(aspect_ratios)
    else:
        per_level = [aspect_ratios] * num_levels
    for ratios in per_level:
        if len(ratios) == 0 or not all(float(r) > 0 for r in ratios):
            raise ValueError(f"aspect_ratios must be non-empty and positive, got {ratios!r}")
    return per_level


def generate_anchors(
    image_shape: Sequence[int],
    feature_shapes: Sequence[Sequence[int]],
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
) -> list[np.ndarray]:
    """Anchors of every FPN level, in torchvision `AnchorGenerator` order.

    Args:
        image_shape: `(H, W)` of the padded input image.
        feature_shapes: `[(H_l, W_l), ...]` of each level's feature map (e.g. P2..P6).
        sizes: per level, the anchor sizes (sqrt of the area in pixels), e.g. `((32,), ...)`.
        aspect_ratios: height / width ratios, one list shared by all levels or one per level.

    Returns:
        One float32 `np.ndarray [H_l * W_l * A_l, 4]` (x1, y1, x2, y2) per level, with
        `A_l = len(aspect_ratios_l) * len(sizes[l])`. Row `(i * W_l + j) * A_l + a` is cell anchor
        `a` (see `cell_anchors`) shifted by `(j * stride_x, i * stride_y)` where
        `stride = image // feature` per axis, as torchvision (a level whose size does not divide
        the image, e.g. P6 13x21 of 800x1344, gets strides 61 and 64).
    """
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be a positive (H, W), got {image_shape!r}")
    if len(sizes) != len(feature_shapes):
        raise ValueError(
            f"sizes has {len(sizes)} levels but feature_shapes has {len(feature_shapes)}"
        )
    anchors = []
    for shape, level_sizes, ratios in zip(
        feature_shapes, sizes, _per_level_ratios(aspect_ratios, len(sizes))
    ):
        if len(shape) != 2 or min(shape) < 1 or any(f > i for f, i in zip(shape, image_shape)):
            raise ValueError(
                f"feature_shapes entry {shape!r} must be a positive (H_l, W_l) no larger than "
                f"image_shape {image_shape!r}"
            )
        if len(level_sizes) == 0 or not all(float(s) > 0 for s in level_sizes):
            raise ValueError(f"sizes must be non-empty and positive per level, got {level_sizes!r}")
        stride_y, stride_x = (i // f for i, f in zip(image_shape, shape))
        shift_y, shift_x = np.meshgrid(
            np.arange(shape[0]) * stride_y, np.arange(shape[1]) * stride_x, indexing="ij"
        )
        shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4)
        level = shifts.astype(np.float32) + cell_anchors(level_sizes, ratios)[None]
        anchors.append(level.reshape(-1, 4))
    return anchors
