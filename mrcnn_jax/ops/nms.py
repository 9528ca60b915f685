"""Greedy non-maximum suppression with a fixed output size, jittable and vmappable.

Exact for any IoU threshold: the result equals a plain greedy NMS (torchvision's `nms`) on the
same inputs. Boxes are visited in decreasing score; a box is kept unless a kept box of the same
group overlaps it with IoU strictly greater than the threshold.

Algorithm: one stable sort by score, then a `lax.while_loop` with one iteration per *kept* box.
Each iteration keeps the first still-alive box in score order and kills every alive box it
suppresses, computing one `[N]` row of IoUs on the fly. The loop stops as soon as `max_output`
boxes are kept or none is alive, so it costs `O(kept * N)` time and `O(N)` memory (no `N x N`
IoU matrix); a tiled variant visits all N^2/2 pairs and was slower (docs/measurements.md).
"""

import operator

import jax
import jax.numpy as jnp
from jax import lax

from mrcnn_jax.ops.boxes import pairwise_iou


def _check_args(
    boxes: jax.Array,
    scores: jax.Array,
    groups: jax.Array | None,
    valid: jax.Array | None,
    max_output: int,
) -> int:
    """Validates the static shapes and `max_output`; returns `max_output` as an int."""
    try:
        max_output = operator.index(max_output)
    except TypeError:
        raise ValueError(f"max_output must be a static int, got {max_output!r}") from None
    if max_output < 1:
        raise ValueError(f"max_output must be >= 1, got {max_output}")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {boxes.shape}")
    n = boxes.shape[0]
    for name, array in (("scores", scores), ("groups", groups), ("valid", valid)):
        if array is not None and array.shape != (n,):
            raise ValueError(f"{name} must be [N] = [{n}] like boxes, got shape {array.shape}")
    return max_output


def _greedy_nms(
    boxes: jax.Array,
    scores: jax.Array,
    groups: jax.Array | None,
    iou_threshold: float | jax.Array,
    max_output: int,
    valid: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS within groups (all boxes in one group when `groups` is None)."""
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)  # numpy too: indexed when traced
    groups = None if groups is None else jnp.asarray(groups)
    max_output = _check_args(boxes, scores, groups, valid, max_output)
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)

    candidate = ~jnp.isnan(scores) & (scores > -jnp.inf)
    if valid is not None:
        candidate &= valid.astype(bool)
    # Stable ascending sort of -score with non-candidates last: ties keep the lower index first.
    sort_key = jnp.where(candidate, -scores, jnp.inf)
    iota = jnp.arange(n, dtype=jnp.int32)
    _, order = lax.sort((sort_key, iota), num_keys=1, is_stable=True)
    sorted_boxes = boxes[order]
    sorted_groups = None if groups is None else groups[order]
    alive = candidate[order]

    def suppressed_by(current: jax.Array) -> jax.Array:
        """bool [N] (sorted order): boxes that the kept sorted box `current` suppresses."""
        iou = pairwise_iou(sorted_boxes[current][None], sorted_boxes)[0]
        overlaps = iou > iou_threshold
        if sorted_groups is not None:
            overlaps &= sorted_groups == sorted_groups[current]
        return overlaps | (iota == current)

    def keep_next(state):
        count, current, alive, kept = state
        kept = kept.at[count].set(order[current])
        alive &= ~suppressed_by(current)
        return count + 1, jnp.argmax(alive).astype(jnp.int32), alive, kept

    def not_done(state):
        count, current, alive, _ = state
        return (count < max_output) & alive[current]

    init = (
        jnp.int32(0),
        jnp.argmax(alive).astype(jnp.int32),
        alive,
        jnp.zeros((max_output,), jnp.int32),
    )
    count, _, _, kept = lax.while_loop(not_done, keep_next, init)
    return kept, jnp.arange(max_output) < count


def nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: float | jax.Array,
    max_output: int,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS with a fixed number of outputs.

    Args:
        boxes: `[N, 4]` float (x1, y1, x2, y2).
        scores: `[N]` float. Boxes with a NaN or -inf score are never selected.
        iou_threshold: a box is suppressed by a kept box when their IoU is strictly greater than
            this (torchvision semantics); any value, Python float or traced scalar.
        max_output: static number of output slots; at most this many boxes are kept.
        valid: optional `[N]` bool; boxes with False are never selected and suppress nothing.

    Returns:
        `indices [max_output] int32` into the N boxes, in decreasing score order, and
        `valid [max_output] bool`. Unused slots have index 0 and valid False. Equal scores are
        visited in increasing index order (a stable sort), so ties are deterministic.
    """
    return _greedy_nms(boxes, scores, None, iou_threshold, max_output, valid)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    groups: jax.Array,
    iou_threshold: float | jax.Array,
    max_output: int,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS independently within each group (class or FPN level), fixed output size.

    Exactly equal to running `nms` on each group separately and merging the kept boxes in
    decreasing score order (torchvision's `batched_nms`), truncated to `max_output`. Boxes of
    different groups never suppress each other; IoUs use the original coordinates (no
    coordinate-offset trick, so no rounding from shifted boxes).

    Args:
        boxes: `[N, 4]` float (x1, y1, x2, y2).
        scores: `[N]` float; NaN or -inf never selected.
        groups: `[N]` int group id of each box (any values).
        iou_threshold: suppression when IoU > threshold, as in `nms`.
        max_output: static number of output slots.
        valid: optional `[N]` bool; False rows are never selected.

    Returns:
        `indices [max_output] int32` and `valid [max_output] bool`, as `nms`.
    """
    return _greedy_nms(boxes, scores, groups, iou_threshold, max_output, valid)
