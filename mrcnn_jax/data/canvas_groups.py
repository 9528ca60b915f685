"""Canvas groups: aspect-ratio grouping with static shapes (``config.data.canvas_groups``).

One square canvas holds every orientation of COCO's resize (shorter side 800, longer ≤ 1333:
1344²), so a 640×480 photo trains with 53 % of its canvas padding. With canvas groups, e.g.
``((832, 1344), (1344, 832))``, each training image belongs to the FIRST group whose canvas holds
its resized size (un-jittered, at the largest training shorter side, rounded up to
``model.size_divisibility``): landscape and square images to the wide canvas, portrait ones to the
tall one. Every global batch is one group, drawn per step from ``config.seed`` and the step only
(``step_groups``) with probabilities ``data.canvas_group_weights``, so the train step is one
program per canvas, each compiled once. Evaluation keeps ``data.image_size``.

This module holds the parts that need no dataset: the config checks (``check``), the per-step
draw, and reading an image's size from its encoded header (JPEG SOF, PNG IHDR) without decoding
it. ``pipeline`` composes one record stream per group from them.
"""

from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from mrcnn_jax.image_headers import JPEG_SIGNATURE, PNG_SIGNATURE

_EXAMPLE = "e.g. ((832, 1344), (1344, 832)) (landscape, portrait)"
# SplitMix64 (Steele et al., 2014): the increment and the two multipliers of its finaliser.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def groups_of(data: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
    """``data.canvas_groups`` as (height, width) int pairs; () when off (or absent)."""
    return tuple(tuple(int(s) for s in g) for g in data.get("canvas_groups", ()))


def weights_of(data: ml_collections.ConfigDict) -> np.ndarray:
    """[G] float64 probabilities of the groups: ``data.canvas_group_weights`` normalised, equal
    when it is ()."""
    weights = tuple(data.get("canvas_group_weights", ()))
    num_groups = len(groups_of(data))
    weights = np.asarray(weights or (1.0,) * num_groups, np.float64)
    return weights / weights.sum()


def largest_train_short_side(data: ml_collections.ConfigDict) -> int:
    """The shorter side that assigns images to groups: the largest training draw
    (``train_short_sides``, else ``resize_short_side``); a smaller draw fits the same canvas."""
    return max(tuple(data.train_short_sides) or (data.resize_short_side,))


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least `value`."""
    return -(-value // multiple) * multiple


def is_int(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _holds(canvas: Sequence[int], size: Sequence[int]) -> bool:
    return canvas[0] >= size[0] and canvas[1] >= size[1]


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless ``data.canvas_groups`` / ``canvas_group_weights`` are usable.

    Off (``canvas_groups = ()``) needs nothing. Else: every group is (height, width), positive
    multiples of ``model.size_divisibility``; ``resize_short_side > 0`` (the resize must not
    depend on the canvas); the largest resized image of each orientation (shorter side the
    largest training side, longer side ``resize_max_long_side``, rounded up) fits some group;
    every group can receive an image (no earlier group holds all it could); the weights are ()
    or one non-negative number per group with a positive sum. ``check_canvas`` (which also checks
    ``image_size`` and the divisibility) calls it.
    """
    data, divisibility = config.data, config.model.size_divisibility
    raw = tuple(data.get("canvas_groups", ()))
    if not raw:
        return
    if not all(
        isinstance(g, (tuple, list)) and len(g) == 2 and all(is_int(s) and s > 0 for s in g)
        for g in raw
    ):
        raise ValueError(
            f"config.data.canvas_groups={raw!r} must be (height, width) canvases of positive "
            f"integers, {_EXAMPLE}, or () for the one canvas config.data.image_size"
        )
    groups = groups_of(data)
    for i, group in enumerate(groups):
        if group[0] % divisibility or group[1] % divisibility:
            fixed = tuple(round_up(s, divisibility) for s in group)
            raise ValueError(
                f"config.data.canvas_groups[{i}]={group} is not a multiple of "
                f"config.model.size_divisibility={divisibility}: use {fixed}"
            )
    if data.resize_short_side <= 0:
        raise ValueError(
            f"config.data.canvas_groups needs config.data.resize_short_side > 0 (got "
            f"{data.resize_short_side}: 'fit the canvas' resizes each image to its canvas, so "
            f"no group can be chosen before resizing); set resize_short_side and "
            f"resize_max_long_side, or canvas_groups=()"
        )
    short, long = largest_train_short_side(data), data.resize_max_long_side
    short = min(short, long)  # the cap bounds the shorter side too (check_canvas: long > 0)
    bound_short, bound_long = round_up(short, divisibility), round_up(long, divisibility)
    which = "config.data.resize_short_side"
    if data.train_short_sides:
        which = "the largest of config.data.train_short_sides"
    for name, bound in (
        ("landscape", (bound_short, bound_long)),
        ("portrait", (bound_long, bound_short)),
    ):
        if not any(_holds(g, bound) for g in groups):
            raise ValueError(
                f"config.data.canvas_groups={groups} holds no {name} image resized with shorter "
                f"side {short} ({which}) and config.data.resize_max_long_side={long}: they reach "
                f"{bound} once rounded up to config.model.size_divisibility={divisibility}; add a "
                f"canvas of at least {bound}"
            )
    for i, group in enumerate(groups):  # reachable: one of its largest sizes escapes the others
        tops = [
            (min(group[0], a), min(group[1], b))
            for a, b in ((bound_short, bound_long), (bound_long, bound_short))
        ]
        earlier = groups[:i]
        if all(any(_holds(e, top) for e in earlier) for top in tops):
            raise ValueError(
                f"config.data.canvas_groups[{i}]={group} would never get an image: each image "
                f"goes to the first group holding it, and the earlier groups {earlier} hold "
                f"every image it could; remove it or put it first (--config.data."
                f"canvas_groups=() trains on one canvas, data.image_size)"
            )
    weights = tuple(data.get("canvas_group_weights", ()))
    if weights and (
        len(weights) != len(groups)
        or not all(isinstance(w, (int, float, np.number)) and np.isfinite(w) for w in weights)
        or min(weights) < 0
        or sum(weights) <= 0
    ):
        raise ValueError(
            f"config.data.canvas_group_weights={weights!r} must be () (equal) or "
            f"{len(groups)} non-negative numbers, one per canvas group, with a positive sum "
            f"(e.g. the fraction of the training images in each group)"
        )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def step_groups(config: ml_collections.ConfigDict, steps: npt.ArrayLike) -> np.ndarray:
    """The canvas group of each global step in ``steps`` (int array) -> [len] int64.

    Stateless: step ``s`` draws ``u = (SplitMix64 output s of a key from config.seed) / 2**64``
    in [0, 1) and takes the group whose interval of the cumulative weights holds ``u``, so every
    process, and a run resumed at any step, draws the same sequence.
    """
    steps = np.atleast_1d(np.asarray(steps, np.int64))
    if (steps < 0).any():
        raise ValueError(f"steps must be >= 0, got {steps.min()}")
    key = np.random.SeedSequence([config.seed, 1]).generate_state(1, np.uint64)[0]
    bits = _splitmix64(key + (steps.astype(np.uint64) + np.uint64(1)) * _GAMMA)
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
    bounds = np.cumsum(weights_of(config.data))
    return np.minimum(np.searchsorted(bounds, uniform, side="right"), len(bounds) - 1)


def steps_per_group(config: ml_collections.ConfigDict, num_steps: int) -> np.ndarray:
    """[G] int64: how many of the steps 0..num_steps-1 each group draws."""
    groups = step_groups(config, np.arange(num_steps)) if num_steps else np.zeros([0], np.int64)
    return np.bincount(groups, minlength=len(groups_of(config.data)))


def _decoded_size(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) [2] int32 of any image ``tf.io.decode_image`` reads, by decoding it."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.shape(image)[:2]


def _png_size(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) [2] int32 from a PNG's IHDR chunk (always first: width, height as
    big-endian uint32 at bytes 16..24)."""
    header = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int64)
    values = tf.reduce_sum(
        tf.reshape(header, [2, 4]) * tf.constant([2**24, 2**16, 2**8, 1], tf.int64), axis=1
    )
    return tf.cast(tf.stack([values[1], values[0]]), tf.int32)


def encoded_image_size(encoded: tf.Tensor) -> tf.Tensor:
    """(height, width) [2] int32 of an encoded image, the size ``tf.io.decode_image`` gives.

    JPEG (``tf.io.extract_jpeg_shape``, the frame header) and PNG (the IHDR chunk) are read
    without decoding; any other format (BMP, GIF, ...) is decoded, the cost of a full decode.
    """
    return tf.case(
        [
            (
                tf.equal(tf.strings.substr(encoded, 0, 3), JPEG_SIGNATURE),
                lambda: tf.io.extract_jpeg_shape(encoded)[:2],
            ),
            (tf.equal(tf.strings.substr(encoded, 0, 8), PNG_SIGNATURE), lambda: _png_size(encoded)),
        ],
        default=lambda: _decoded_size(encoded),
    )


def first_holding(
    resized: tf.Tensor, groups: Sequence[tuple[int, int]], divisibility: int
) -> tf.Tensor:
    """Index (int32 scalar) of the first canvas of ``groups`` holding an image of ``resized``
    (h, w) [2] int32 rounded up to ``divisibility``; -1 if none (``check`` rules that out)."""
    rounded = (resized + divisibility - 1) // divisibility * divisibility
    holds = tf.reduce_all(tf.constant(groups, tf.int32) >= rounded[tf.newaxis], axis=1)
    return tf.cond(
        tf.reduce_any(holds),
        lambda: tf.cast(tf.argmax(tf.cast(holds, tf.int32)), tf.int32),
        lambda: tf.constant(-1, tf.int32),
    )
