"""RoIAlign (Mask R-CNN, He et al. 2017, §3) for one FPN level and across FPN levels.

Semantics are Detectron2/torchvision's `roi_align` exactly. Per RoI and axis (shown for y; x alike),
in the coordinates of the feature map (`spatial_scale` times image pixels):

- `start = y1 * spatial_scale - offset`, `end = y2 * spatial_scale - offset`, with `offset = 0.5`
  when `aligned` and 0 otherwise; `height = end - start`, forced to at least 1 when not `aligned`;
- the RoI is split into `S` bins of `height / S`; each bin holds `sampling_ratio` evenly spaced
  samples at `start + p * bin + (i + 0.5) * bin / sampling_ratio`;
- a sample at `y < -1` or `y > H` contributes 0; otherwise `y` is clamped to `[0, H - 1]` (samples
  in `[-1, 0]` read row 0, samples at/after the last row read the last row) and bilinearly
  interpolated between rows `floor(y)` and `floor(y) + 1`. `H` is the map's valid extent: the
  whole map, or the image's extent inside a padded canvas (`ops/extent.py`), so that a canvas
  computes what torchvision computes on the image padded to its extent;
- `mode="avg"` averages the `sampling_ratio²` samples of a bin (zeros included), `mode="max"` takes
  their maximum (zeros of out-of-map samples included).

With `aligned=False` feature pixel `(i, j)` is sampled at the image point `(x, y) = (j, i) /
spatial_scale`; with `aligned=True` at `(j + 0.5, i + 0.5) / spatial_scale` (pixel centres).
Interpolation runs in float32 (bf16/f16 features are upcast; float64 stays float64) and the
result is cast back to the features' dtype. Gradients flow to the features (and, through the
interpolation weights, to the boxes; callers pass `stop_gradient`ed proposals as the paper does).

Two strategies (`method=`), equal up to float rounding:
- `"gather"` (default): per bin, one row gather per bilinear tap (4 * sampling_ratio² of them)
  from a flattened concatenation of all levels, so each box reads only its own level; the
  backward pass is a scatter-add, chunked over boxes to bound its memory. Work and memory
  traffic are `O(R * S² * sampling_ratio² * C)`, independent of the map size. The default
  because it is the fast one off TPU: on the project's 2-core CPU (2 x 512 RoIs, 256 channels,
  7x7 and 14x14, 128² and 1024² inputs) it takes 0.24-0.47x torchvision's `MultiScaleRoIAlign`
  time forward and 0.26-0.29x forward+backward, while "einsum" takes 2-15x torchvision's time
  (`scripts/benchmark.py roi_align`). Its VJP is a
  `jax.custom_vjp`, so it supports reverse mode (`grad`, `vjp`) but not `jvp`.
- `"einsum"`: interpolation as matmuls with per-box one-hot interpolation matrices,
  `out = Wy @ F @ Wx^T` with `Wy [S, H]`, `Wx [S, W]` (in `mode="avg"` the samples of a bin are
  averaged into the matrices first). Only dense dots, no gathers or scatters: the choice for
  TPU, whose MXUs do the dots and where gathers/scatters are slow. Work is
  `O(R * S * H_l * W_l * C)` summed over all levels (every box pays for every level; its
  weights are zero off its own), so it scales with the map size. Uses the default matmul
  precision (`jax_default_matmul_precision`: reduced on TPU and on GPUs with TF32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.boxes import box_area
from mrcnn_jax.ops.extent import feature_extent

Mode = Literal["avg", "max"]
Method = Literal["gather", "einsum"]

MODES = ("avg", "max")
_SCATTER_CHUNK_ELEMENTS = 2**22  # updates per scatter-add in the gather VJP (16 MiB of float32)
METHODS = ("gather", "einsum")


def assign_fpn_levels(
    boxes: jax.Array,
    min_level: int,
    max_level: int,
    canonical_box_size: float = 224,
    canonical_level: int = 4,
) -> jax.Array:
    """FPN level of each box, torchvision's `LevelMapper` rule (FPN paper eq. 1).

    `level = floor(canonical_level + log2(sqrt(area) / canonical_box_size) + 1e-6)` clipped to
    `[min_level, max_level]`; the epsilon is added after the log (Detectron2 puts it inside).
    Boxes with a negative area count as area 0 (they go to `min_level`), as do NaN boxes. Under
    `jit` XLA computes the division as a product with 1/canonical_box_size and log2 through log,
    so a box whose side lies within ~1e-7 (relative) of a level boundary (56, 112, 224, 448 px)
    may get the level next to torchvision's.

    Args:
      boxes: `[..., 4]` float `(x1, y1, x2, y2)` in input-image pixels.
      min_level, max_level: the available FPN levels (inclusive).
      canonical_box_size: box side that maps to `canonical_level`.
      canonical_level: level of a `canonical_box_size²` box.

    Returns:
      `[...]` int32 absolute levels in `[min_level, max_level]`.
    """
    if max_level < min_level:
        raise ValueError(f"max_level ({max_level}) must be >= min_level ({min_level}).")
    if canonical_box_size <= 0:
        raise ValueError(f"canonical_box_size must be positive, got {canonical_box_size}.")
    size = jnp.sqrt(jnp.maximum(box_area(boxes), 0))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_box_size) + 1e-6)
    level = jnp.where(jnp.isnan(level), min_level, level)
    return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int = 2,
    aligned: bool = False,
    mode: Mode = "avg",
    method: Method = "gather",
    extent: jax.Array | None = None,
) -> jax.Array:
    """RoIAlign of `R` boxes on one feature map of one image.

    Args:
      features: `[H, W, C]` feature map (any float dtype).
      boxes: `[R, 4]` float `(x1, y1, x2, y2)` in input-image pixels; any values are accepted
        (boxes partly or wholly outside the map, empty or inverted boxes behave as in torchvision).
      output_size: `S` or `(S_h, S_w)`, bins per RoI.
      spatial_scale: feature-map pixels per image pixel (e.g. `1/4` for P2).
      sampling_ratio: static samples per bin along each axis, > 0.
      aligned: shift boxes by -0.5 feature pixel (Detectron2 `ROIAlignV2`) and allow boxes
        smaller than one feature pixel; False is the legacy rule (torchvision's Mask R-CNN v1).
      mode: `"avg"` (torchvision) or `"max"` over the bilinear samples of each bin.
      method: `"gather"` or `"einsum"`, see the module docstring.
      extent: `[2]` int (height, width) of the valid part of the map (feature pixels; beyond
        `[H, W]` taken as `[H, W]`); samples are clamped and dropped at it. None: the whole map.

    Returns:
      `[R, S_h, S_w, C]` pooled features, dtype of `features`. Differentiable w.r.t. `features`.
    """
    bins = _check_static_args(output_size, sampling_ratio, mode, method)
    if features.ndim != 3:
        raise ValueError(f"features must be [H, W, C], got shape {features.shape}.")
    _check_boxes(boxes, ndim=2)
    level = jnp.zeros(boxes.shape[:1], jnp.int32)
    if extent is not None:  # the gather method reads no row past the map
        extent = jnp.minimum(jnp.asarray(extent, jnp.int32), jnp.asarray(features.shape[:2]))
    extents = None if extent is None else extent[None]
    return _roi_align_levels(
        [features],
        [spatial_scale],
        boxes,
        level,
        bins,
        sampling_ratio,
        aligned,
        mode,
        method,
        extents,
    )


def multilevel_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    *,
    min_level: int = 2,
    sampling_ratio: int = 2,
    aligned: bool = False,
    mode: Mode = "avg",
    canonical_box_size: float = 224,
    canonical_level: int = 4,
    method: Method = "gather",
    valid_size: jax.Array | None = None,
) -> jax.Array:
    """RoIAlign of each box on its FPN level (`assign_fpn_levels`), batched over images.

    Equals torchvision's `MultiScaleRoIAlign` (which has `aligned=False`) for the same levels.

    Args:
      features: levels `min_level, min_level + 1, ...`, each `[B, H_l, W_l, C]` with the same B, C
        and dtype; level `l` has spatial scale `1 / 2**l`.
      boxes: `[B, R, 4]` float `(x1, y1, x2, y2)` in input-image pixels; padding rows may hold
        anything (all zeros is usual) and are pooled like any box.
      output_size, sampling_ratio, aligned, mode, method: as in `roi_align`.
      min_level: level of `features[0]`.
      canonical_box_size, canonical_level: the level rule's constants.
      valid_size: `[B, 2]` int (height, width) valid extent of each image in input pixels
        (`extent.valid_size`); level `l` is clamped at `ceil(valid_size / 2**l)`. None: the maps.

    Returns:
      `[B, R, S_h, S_w, C]` pooled features, dtype of the features.
    """
    bins = _check_static_args(output_size, sampling_ratio, mode, method)
    features = list(features)
    if not features:
        raise ValueError("features must hold at least one level.")
    if any(f.ndim != 4 for f in features):
        raise ValueError(f"features must be [B, H_l, W_l, C], got {[f.shape for f in features]}.")
    if len({(f.shape[0], f.shape[3], f.dtype) for f in features}) != 1:
        raise ValueError(
            "features must share batch size, channels and dtype, got "
            f"{[(f.shape, str(f.dtype)) for f in features]}."
        )
    _check_boxes(boxes, ndim=3)
    if boxes.shape[0] != features[0].shape[0]:
        raise ValueError(
            f"boxes batch {boxes.shape[0]} differs from features batch {features[0].shape[0]}."
        )
    max_level = min_level + len(features) - 1
    scales = [2.0**-level for level in range(min_level, max_level + 1)]

    if valid_size is None:
        valid_size = jnp.tile(
            jnp.asarray(features[0].shape[1:3], jnp.int32) << min_level, (boxes.shape[0], 1)
        )

    def one_image(levels: list[jax.Array], image_boxes: jax.Array, image_valid: jax.Array):
        level = (
            assign_fpn_levels(
                image_boxes, min_level, max_level, canonical_box_size, canonical_level
            )
            - min_level
        )
        extents = jnp.stack(
            [
                jnp.minimum(feature_extent(image_valid, 2**lvl), jnp.asarray(f.shape[:2]))
                for lvl, f in enumerate(levels, start=min_level)
            ]
        )
        return _roi_align_levels(
            levels, scales, image_boxes, level, bins, sampling_ratio, aligned, mode, method, extents
        )

    return jax.vmap(one_image)(features, boxes, jnp.asarray(valid_size, jnp.int32))


def _check_static_args(
    output_size: int | tuple[int, int], sampling_ratio: int, mode: str, method: str
) -> tuple[int, int]:
    """Validates the static arguments; returns `output_size` as `(S_h, S_w)`."""
    bins = (output_size, output_size) if np.ndim(output_size) == 0 else tuple(output_size)
    if len(bins) != 2 or any(int(b) != b or b <= 0 for b in bins):
        raise ValueError(f"output_size must be a positive int or pair of them, got {output_size}.")
    if int(sampling_ratio) != sampling_ratio or sampling_ratio <= 0:
        raise ValueError(
            f"sampling_ratio must be a positive int (adaptive sampling is not static-shape), "
            f"got {sampling_ratio}."
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    return int(bins[0]), int(bins[1])


def _check_boxes(boxes: jax.Array, ndim: int) -> None:
    """Raises ValueError unless `boxes` has `ndim` dimensions, the last of size 4."""
    if boxes.ndim != ndim or boxes.shape[-1] != 4:
        expected = "[R, 4]" if ndim == 2 else "[B, R, 4]"
        raise ValueError(f"boxes must be {expected}, got shape {boxes.shape}.")


def _roi_align_levels(
    levels: list[jax.Array],
    scales: list[float],
    boxes: jax.Array,
    level: jax.Array,
    bins: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    mode: str,
    method: str,
    extents: jax.Array | None,
) -> jax.Array:
    """RoIAlign of box `r` on `levels[level[r]]` (`[H_l, W_l, C]`, spatial scale `scales[l]`),
    clamped at `extents [L, 2]` (valid height, width of each level; None: the whole maps).

    Returns `[R, S_h, S_w, C]` in the dtype of the levels."""
    dtype = jnp.promote_types(levels[0].dtype, jnp.float32)
    boxes = boxes.astype(dtype)
    scale = jnp.asarray(scales, dtype)[level]
    heights = np.array([f.shape[0] for f in levels])
    widths = np.array([f.shape[1] for f in levels])
    if extents is None:
        extents = jnp.asarray(np.stack([heights, widths], axis=1))
    ys = _axis_samples(
        boxes[:, 1], boxes[:, 3], scale, extents[level, 0], bins[0], sampling_ratio, aligned
    )
    xs = _axis_samples(
        boxes[:, 0], boxes[:, 2], scale, extents[level, 1], bins[1], sampling_ratio, aligned
    )
    if method == "gather":
        flat = jnp.concatenate([f.reshape(-1, f.shape[-1]) for f in levels])
        offsets = np.cumsum(heights * widths) - heights * widths
        out = _pool_gather(
            flat, jnp.asarray(offsets)[level], jnp.asarray(widths)[level], ys, xs, mode
        )
    else:
        out = sum(
            _pool_einsum(feature.astype(dtype), ys, xs, level == k, mode)
            for k, feature in enumerate(levels)
        )
    return out.astype(levels[0].dtype)


def _axis_samples(
    start: jax.Array,
    end: jax.Array,
    scale: jax.Array,
    size: jax.Array,
    bins: int,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[jax.Array, jax.Array]:
    """Bilinear taps of the samples along one axis (torchvision's rules, see module docstring).

    Args:
      start, end: `[R]` box edges along the axis in image pixels.
      scale: `[R]` spatial scale of each box's level.
      size: `[R]` int extent (H or W) of each box's level.
      bins, sampling_ratio: static bins per RoI and samples per bin.

    Returns:
      `index [R, bins, sampling_ratio, 2]` int32 (low, high) pixel in `[0, size - 1]` and
      `weight [R, bins, sampling_ratio, 2]` interpolation weights, 0 for out-of-map samples.
    """
    offset = 0.5 if aligned else 0.0
    roi_start = start * scale - offset
    roi_size = end * scale - offset - roi_start
    if not aligned:
        roi_size = jnp.maximum(roi_size, 1.0)
    bin_size = roi_size / bins
    bin_index = jnp.arange(bins, dtype=start.dtype)[:, None]
    sample_index = jnp.arange(sampling_ratio, dtype=start.dtype) + 0.5
    bin_size, roi_start = bin_size[:, None, None], roi_start[:, None, None]
    pos = roi_start + bin_index * bin_size + sample_index * bin_size / sampling_ratio
    extent = size.astype(pos.dtype)[:, None, None]
    # An extent of 0 (an eval batch's padding rows) has no sample: every tap is pixel 0, weight 0.
    inside = (pos >= -1) & (pos <= extent) & (extent > 0)
    pos = jnp.where(inside, jnp.clip(pos, 0, extent - 1), 0)
    low = jnp.floor(pos)
    frac = pos - low
    low = low.astype(jnp.int32)
    high = jnp.minimum(low + 1, jnp.maximum(size[:, None, None] - 1, 0))
    index = jnp.stack([low, high], axis=-1)
    weight = jnp.stack([1 - frac, frac], axis=-1) * inside[..., None]
    return index, weight


def _pool_gather(
    flat: jax.Array,
    offset: jax.Array,
    row_stride: jax.Array,
    ys: tuple[jax.Array, jax.Array],
    xs: tuple[jax.Array, jax.Array],
    mode: str,
) -> jax.Array:
    """Pools from `flat [N, C]` (levels flattened row-major, box `r`'s level starting at row
    `offset[r]` with `row_stride[r]` columns) by gathering the 2x2 taps of every sample."""
    (y_index, y_weight), (x_index, x_weight) = ys, xs
    per_box = (slice(None), None, None, None)
    row_start = offset[per_box] + y_index * row_stride[per_box]
    # [R, S_h, sr, 2] (y) and [R, S_w, sr, 2] (x) -> [R, S_h, S_w, sr_y, sr_x, 2_y, 2_x]
    as_y = (slice(None), slice(None), None, slice(None), None, slice(None), None)
    as_x = (slice(None), None, slice(None), None, slice(None), None, slice(None))
    index = row_start[as_y] + x_index[as_x]
    weight = y_weight[as_y] * x_weight[as_x]
    bins, num_samples = index.shape[:3], y_index.shape[2] * x_index.shape[2]
    if mode == "avg":  # one weighted sum over all taps of a bin
        taps = (*bins, num_samples * 4)
        return _weighted_gather(flat, index.reshape(taps), weight.reshape(taps) / num_samples)
    taps = (*bins, num_samples, 4)
    return jnp.max(_weighted_gather(flat, index.reshape(taps), weight.reshape(taps)), axis=3)


@jax.custom_vjp
def _weighted_gather(flat: jax.Array, index: jax.Array, weight: jax.Array) -> jax.Array:
    """`sum_t weight[..., t] * flat[index[..., t]]`: `flat [N, C]`, `index, weight [R, ..., T]`
    -> `[R, ..., C]` in the dtype of `weight`. Indices must lie in `[0, N)`.

    One row gather per tap, summed elementwise: XLA fuses that into one loop, ~10x faster on CPU
    than gathering all taps at once and reducing. The VJP scatter-adds chunks of boxes in a scan,
    which bounds its memory (autodiff materialises every tap's update at once: GBs for 14x14)
    and is ~3x faster on CPU."""
    return sum(
        _take_rows(flat, index[..., t]).astype(weight.dtype) * weight[..., t, None]
        for t in range(index.shape[-1])
    )


def _weighted_gather_fwd(
    flat: jax.Array, index: jax.Array, weight: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return _weighted_gather(flat, index, weight), (flat, index, weight)


def _weighted_gather_bwd(
    residuals: tuple[jax.Array, jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, None, jax.Array]:
    flat, index, weight = residuals
    channels = flat.shape[-1]
    boxes_per_chunk = max(1, _SCATTER_CHUNK_ELEMENTS // (math.prod(index.shape[1:]) * channels))
    num_chunks = -(-index.shape[0] // boxes_per_chunk)

    def chunked(x: jax.Array) -> jax.Array:
        """`[R, ...]` -> `[num_chunks, boxes_per_chunk, ...]`, zero padded (zero weight)."""
        x = jnp.pad(x, [(0, num_chunks * boxes_per_chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(num_chunks, boxes_per_chunk, *x.shape[1:])

    def scatter_chunk(
        grad_flat: jax.Array, chunk: tuple[jax.Array, jax.Array, jax.Array]
    ) -> tuple[jax.Array, None]:
        chunk_index, chunk_weight, chunk_grad = chunk
        updates = chunk_weight[..., None] * chunk_grad[..., None, :]
        grad_flat = grad_flat.at[chunk_index.reshape(-1)].add(
            updates.reshape(-1, channels), mode="promise_in_bounds"
        )
        return grad_flat, None

    grad_flat, _ = jax.lax.scan(
        scatter_chunk,
        jnp.zeros(flat.shape, grad.dtype),
        (chunked(index), chunked(weight), chunked(grad)),
    )
    grad_weight = jnp.stack(
        [
            jnp.sum(_take_rows(flat, index[..., t]).astype(grad.dtype) * grad, axis=-1)
            for t in range(index.shape[-1])
        ],
        axis=-1,
    )
    return grad_flat.astype(flat.dtype), None, grad_weight


_weighted_gather.defvjp(_weighted_gather_fwd, _weighted_gather_bwd)


def _take_rows(flat: jax.Array, index: jax.Array) -> jax.Array:
    """`flat [N, C]`, in-bounds `index [...]` -> `flat[index]` `[..., C]`."""
    return flat.at[index].get(mode="promise_in_bounds")


def _pool_einsum(
    feature: jax.Array,
    ys: tuple[jax.Array, jax.Array],
    xs: tuple[jax.Array, jax.Array],
    on_level: jax.Array,
    mode: str,
) -> jax.Array:
    """Pools from `feature [H, W, C]` as `Wy @ F @ Wx^T`; boxes with `on_level` False get 0."""
    height, width = feature.shape[:2]
    wy = _interpolation_matrix(*ys, height) * on_level[:, None, None, None]
    wx = _interpolation_matrix(*xs, width)
    num_boxes, bins_h, sampling_ratio = wy.shape[:3]
    bins_w = wx.shape[1]
    if mode == "avg":
        # Averaging over the samples of a bin commutes with the (linear) interpolation.
        wy, wx = wy.mean(2), wx.mean(2)
    else:
        wy = wy.reshape(num_boxes, bins_h * sampling_ratio, height)
        wx = wx.reshape(num_boxes, bins_w * sampling_ratio, width)
    # Contract one axis at a time: R*S*H*W*C multiply-adds (a 3-operand einsum may form the
    # [R, S, S, H, W] outer product of the weights first, S times the work).
    rows = jnp.einsum("rph,hwc->rpwc", wy, feature)
    out = jnp.einsum("rpwc,rqw->rpqc", rows, wx)
    if mode == "avg":
        return out
    samples = out.reshape(
        num_boxes, bins_h, sampling_ratio, bins_w, sampling_ratio, feature.shape[2]
    )
    return jnp.max(samples, axis=(2, 4))


def _interpolation_matrix(index: jax.Array, weight: jax.Array, size: int) -> jax.Array:
    """`[R, bins, sr, 2]` taps -> `[R, bins, sr, size]` rows of 1-D interpolation weights.

    Taps at or past `size` (boxes of larger levels) get all-zero one-hot rows."""
    one_hot = jax.nn.one_hot(index, size, dtype=weight.dtype)
    return jnp.einsum("rbsk,rbskh->rbsh", weight, one_hot)
