"""FPN anchors of one image, over the image's valid extent inside the static canvas.

Numerically identical to torchvision's `AnchorGenerator` on the image padded to its valid extent
(float32 throughout, the same rounding, strides and order), so torchvision RPN weights apply
unchanged and the canvas size never changes which anchors exist. The cell anchors are numpy
constants; the shifts follow the (traced) extent, so this is jittable and vmappable.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.extent import feature_extent

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


class LevelAnchors(NamedTuple):
    """The anchors of one FPN level on the canvas grid `[H_l * W_l * A]` (row, column, anchor)."""

    boxes: jnp.ndarray  # [N_l, 4] float32 (x1, y1, x2, y2) input pixels.
    valid: jnp.ndarray  # [N_l] bool: the cell lies in the image's extent (torchvision has it).
    index: jnp.ndarray  # [N_l] int32: its position in torchvision's anchors of the image.


def generate_anchors(
    valid_size: jnp.ndarray,
    feature_shapes: Sequence[Sequence[int]],
    feature_strides: Sequence[int],
    sizes: Sequence[Sequence[float]] = DEFAULT_SIZES,
    aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_ASPECT_RATIOS,
) -> list[LevelAnchors]:
    """Anchors of every FPN level of one image, torchvision `AnchorGenerator` order and values.

    torchvision, on the image padded to `valid_size = (H, W)`, has a grid of
    `n_l = ceil((H, W) / feature_stride_l)` cells at level l and shifts them by
    `stride = (H, W) // n_l` per axis (P6 of 800×1344: 13×21 cells, strides 61 and 64). Here the
    grid is the canvas's `feature_shapes[l]` (at least `n_l`); cells beyond `n_l` are not valid.

    Args:
        valid_size: `[2]` int (H, W) valid extent of the image (`extent.valid_size`).
        feature_shapes: `[(H_l, W_l), ...]` canvas feature-map sizes (static).
        feature_strides: nominal stride of each level, e.g. `(4, 8, 16, 32, 64)` for P2..P6.
        sizes: per level, the anchor sizes (sqrt of the area in pixels), e.g. `((32,), ...)`.
        aspect_ratios: height / width ratios, one list shared by all levels or one per level.

    Returns:
        One `LevelAnchors` per level; row `(i * W_l + j) * A_l + a` is cell anchor `a` (see
        `cell_anchors`) shifted by `(j * stride_x, i * stride_y)`, `A_l = len(ratios_l) *
        len(sizes[l])`. `index` numbers the valid anchors of all levels consecutively in that
        order (torchvision's concatenation), so it does not depend on the canvas.
    """
    if len(sizes) != len(feature_shapes) or len(feature_strides) != len(feature_shapes):
        raise ValueError(
            f"sizes ({len(sizes)}), feature_shapes ({len(feature_shapes)}) and feature_strides "
            f"({len(feature_strides)}) need one entry per level"
        )
    valid_size = jnp.asarray(valid_size, jnp.int32)
    anchors, offset = [], jnp.zeros((), jnp.int32)
    for shape, stride, level_sizes, ratios in zip(
        feature_shapes, feature_strides, sizes, _per_level_ratios(aspect_ratios, len(sizes))
    ):
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"feature_shapes entry {shape!r} must be a positive (H_l, W_l)")
        if len(level_sizes) == 0 or not all(float(s) > 0 for s in level_sizes):
            raise ValueError(f"sizes must be non-empty and positive per level, got {level_sizes!r}")
        cells = cell_anchors(level_sizes, ratios)
        grid = feature_extent(valid_size, stride)  # torchvision's feature-map size
        step = valid_size // grid
        rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
        rows, cols = rows.reshape(-1, 1), cols.reshape(-1, 1)
        shift_x = (cols * step[1]).astype(jnp.float32)
        shift_y = (rows * step[0]).astype(jnp.float32)
        shifts = jnp.stack([shift_x, shift_y, shift_x, shift_y], axis=-1)  # [H_l*W_l, 1, 4]
        boxes = (shifts + cells[None]).reshape(-1, 4)
        num = len(cells)
        inside = (rows < grid[0]) & (cols < grid[1])  # [H_l*W_l, 1]
        cell_index = (rows * grid[1] + cols) * num + np.arange(num)
        anchors.append(
            LevelAnchors(
                boxes=boxes,
                valid=jnp.broadcast_to(inside, cell_index.shape).reshape(-1),
                index=(offset + cell_index).reshape(-1).astype(jnp.int32),
            )
        )
        offset = offset + grid[0] * grid[1] * num
    return anchors
