"""tf.data input pipeline: TFDS examples -> fixed-shape numpy batches (docs/CONTRACTS.md "Batches").

Per example (train): decode; random horizontal flip; resize keeping the aspect ratio (see
below), times a random factor from ``scale_jitter`` (a too large result is randomly cropped to
``image_size``); pick at most ``max_instances`` objects; normalise with ``mean``/``std``; zero-pad
bottom/right. Boxes follow the image and are clipped to the content; the box of an object the crop
cuts becomes that of its mask's part inside the crop (``_fit_boxes_to_crop``, Detectron2's LSJ
``recompute_boxes``), so no box covers background the crop left in. Each kept mask is bilinearly
sampled at the centres of an S×S grid over its final box and thresholded at 0.5, straight from the
stored run lengths (``masks.py``). Eval: the same without flip, jitter or crop, plus image id and
original size.

Resize (torchvision's ``GeneralizedRCNNTransform`` arithmetic): ``scale = min(short /
min(h, w), resize_max_long_side / max(h, w))`` with ``resize_short_side > 0``, else the largest
scale fitting ``image_size``; ``short`` is ``resize_short_side``, or in training one of
``train_short_sides`` drawn uniformly per example when that is set (multi-scale training,
Detectron2's ``ResizeShortestEdge(sample_style="choice")``, torchvision's random ``min_size``);
the resized size is ``max(floor(size * scale), 1)`` per side, both in float64 as torchvision's
Python floats and ``F.interpolate(scale_factor=scale, recompute_scale_factor=True)``. The image
is resampled bilinearly (half-pixel centres; no antialiasing unless ``resize_antialias``, which
widens the filter when shrinking as PIL's bilinear resize, Detectron2's) to that size, so each
axis is scaled by its own ratio ``resized / original`` (float32, torchvision's
``resize_boxes``), which boxes and masks use.

The config is checked before any data is read (``check_canvas``): ``image_size`` is a multiple
of ``model.size_divisibility`` (a multiple of 32) and, with ``resize_short_side > 0``, holds the
largest un-jittered resized image rounded up to it.

Objects: crowd regions and boxes of zero area (or pushed out of the crop, or whose mask the crop
leaves out) stay in the ground
truth with ``gt_valid`` False (and zero masks); images without objects give all-padding ground
truth, except in training with ``skip_empty_train_images`` (Detectron2's
``FILTER_EMPTY_ANNOTATIONS``, torchvision's ``_coco_remove_images_without_annotations``): images
without a non-crowd object are dropped from the record stream before it is numbered, so the
global order stays a function of the seed. An object with a positive-area box but an empty mask
stays valid (the box trains) with an all-zero mask target. If an image has more than
``max_instances`` objects, the kept ones are the first in the order (trainable before crowd
or zero-area, then annotation order), trainable judged on the final boxes, after the random
crop (an object the crop leaves out does not take a visible one's place); the kept rows are in
the file's order (trainable there first, then annotation order), and the first image of a run
with more trainable objects than fit logs a warning.

Data order (train): the sequence of GLOBAL batches (``train.batch_size`` examples each) is a
function of ``config.seed`` and the step only, whatever the number of processes: every process
reads the same undecoded record stream of the whole split (file order and shuffle buffer seeded
from ``config.seed`` alone), numbers its records 0, 1, 2, ... (position ``i`` is row ``i mod
batch_size`` of global batch ``i // batch_size``) and keeps only its slice of each global batch,
rows ``[p·b, (p+1)·b)`` with ``b = batch_size / process_count``, before the decoding map; the
augmentation of the example at position ``i`` is drawn from a stateless seed folded with ``i``.
So 1×8, 2×4 and 8×1 processes × devices train on the same global batches, and ``start_step=N``
skips ``N · batch_size`` undecoded records (exactly, on any number of processes): a run resumes
on another number of hosts without repeating or skipping an example. One process gives the
order it gave before this scheme (its seeds are those of the former process 0).

Canvas groups (train, ``data.canvas_groups``, e.g. ``((832, 1344), (1344, 832))``; ``()`` =
off, the scheme above with the one canvas ``image_size``): aspect-ratio grouping with static
shapes (``canvas_groups.py``). Each training image belongs to the first group whose canvas holds
its resized size, un-jittered at the largest training shorter side and rounded up to
``model.size_divisibility`` (landscape and square images to a wide canvas, portrait ones to a
tall one); the size is read from the encoded header, without decoding (JPEG frame header, PNG
IHDR; any other format is decoded once more just for its size). Every global batch is ONE
group: step ``s`` draws its group from ``config.seed`` and ``s`` only
(``canvas_groups.step_groups``, probabilities ``data.canvas_group_weights``). Each group has its
own record stream, built as the single stream above (its own file-order, shuffle and
augmentation seeds, from ``[seed, 2, group]``) from the records of that group, filtered BEFORE
numbering; batch ``s`` is the next batch of its group's stream, cropped and padded to the
group's canvas. ``start_step=N`` skips, in each group's stream, ``(steps of that group among
0..N-1) · batch_size`` undecoded records, counted exactly from the draws, so a resumed or
multi-host run sees the same batches. The weights decide how often each stream is read: equal
to the fraction of the training images in each group (``canvas_group_counts`` counts them from
the headers), every image trains equally often; an over-weighted group's images repeat more
often than the others'. The model's answer does not depend on the canvas
(CONTRACTS.md), and the jitted train step compiles once per group. Eval keeps ``image_size``.

Cost: decoding, augmentation and mask cropping (nearly all the work) stay split over the
processes, but every process reads and parses the undecoded records of the whole split (the
image bytes are not decoded): ``process_count`` times the reading of per-process file shards.
For COCO (~160 kB a record), training on 1000 images/s in all, each host reads ~160 MB/s.
With canvas groups every process reads the split once per group (each stream filters its own
records: reading and header parsing, no decoding) and each group keeps its own shuffle buffer of
``shuffle_buffer`` undecoded records. Where that is too much, store the split as ArrayRecord
and read it by index (``builder.as_data_source()`` with a Grain index sampler seeded from
``config.seed``): each process then fetches only the records of its own rows. A resume at
step ``N`` reads (and drops undecoded) the ``N · batch_size`` records trained before it, every
process all of them: ~5,000 records/s measured from page cache here, so ~5 minutes at the end
of a 90k-step COCO run at batch 16 and ~40 at the end of a 100-epoch LSJ run; with canvas groups
each group's stream reads the split to find its own records, about as many records again per
group.

Eval: each process reads its own ``tfds.split_for_jax_process`` shard (every image exactly once
over the processes) padded to the same number of batches; the evaluator gathers them.

Throughput on the 2-core development CPU (shared with other jobs), batch 8: ~570 images/s for
shapes at 128²; ~70 images/s for COCO-like 640×480 JPEGs at 512² and ~19 at 1024² (100
instances, 28² masks, scale jitter).
"""

import functools
import itertools
import re
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from mrcnn_jax.data import canvas_groups, get_builder, masks, schema
from mrcnn_jax.data.canvas_groups import is_int, round_up

Batch = dict[str, np.ndarray]
_RAW_IMAGE = {"image": tfds.decode.SkipDecoding()}
_TRAIN_KEYS = ("image", "image_size", "gt_boxes", "gt_classes", "gt_valid", "gt_masks")


def _decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG bytes -> [H, W, 3] uint8, the stored pixels (no EXIF rotation).

    JPEGs with libjpeg's accurate integer DCT, the pixels PIL (torchvision, Detectron2) and
    OpenCV (`visualize.read_image`, scripts/predict.py) decode; TF's default, its fast DCT,
    differs by up to a few grey levels on most pixels.
    """
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False),
    )


def _pixel_boxes(bbox: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """TFDS normalised (ymin, xmin, ymax, xmax) [N, 4] -> (x1, y1, x2, y2) pixels [N, 4] f32."""
    ymin, xmin, ymax, xmax = tf.unstack(bbox, num=4, axis=-1)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    return tf.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=-1)


def _positive_area(boxes: tf.Tensor) -> tf.Tensor:
    """[N, 4] (x1, y1, x2, y2) -> [N] bool."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _select_objects(
    boxes: tf.Tensor, is_crowd: tf.Tensor, max_instances: int
) -> tuple[tf.Tensor, tf.Tensor]:
    """Indices of the objects to keep (trainable first, then file order), and how many trainable
    objects did not fit: ([n <= max_instances] int32, int32 scalar)."""
    trainable = ~is_crowd & _positive_area(boxes)
    order = tf.argsort(tf.cast(~trainable, tf.int32), stable=True)[:max_instances]
    num_trainable = tf.reduce_sum(tf.cast(trainable, tf.int32))
    return order, tf.maximum(num_trainable - max_instances, 0)


@tf.autograph.experimental.do_not_convert
def _has_trainable_object(example: dict) -> tf.Tensor:
    """Whether an (undecoded) example has an object that is not a crowd region."""
    return tf.reduce_any(~example["objects"]["is_crowd"])


def check_data(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the field, unless the data settings fit: `check_canvas`,
    ``data.mean`` three (RGB) values and ``data.std`` three positive ones, ``data.max_instances``,
    ``data.mask_size`` and ``data.shuffle_buffer`` at least 1, ``data.scale_jitter`` a
    (low, high) pair with 0 < low <= high, ``data.hflip`` and ``data.resize_antialias`` bools."""
    check_canvas(config)
    data = config.data
    for name in ("mean", "std"):
        values = tuple(data[name])
        if len(values) != 3 or not all(np.isfinite(v) for v in values):
            raise ValueError(f"config.data.{name}={data[name]} must have 3 (RGB) finite values")
    if min(data.std) <= 0:
        raise ValueError(f"config.data.std={data.std} must be positive (pixels are divided by it)")
    for name, what in (
        ("max_instances", "the objects kept per image"),
        ("mask_size", "the side of each stored ground-truth mask"),
        ("shuffle_buffer", "the examples tf.data shuffles among"),
    ):
        if not is_int(data[name]) or data[name] < 1:
            raise ValueError(f"config.data.{name}={data[name]!r} must be at least 1 ({what})")
    if data.dataset == "shapes":
        for name in ("shapes_num_train", "shapes_num_val"):
            if not is_int(data[name]) or data[name] < 1:
                raise ValueError(f"config.data.{name}={data[name]!r} must be at least 1 image")
    for name in ("hflip", "resize_antialias"):
        if not isinstance(data.get(name, False), (bool, np.bool_)):
            raise ValueError(f"config.data.{name}={data[name]!r} must be True or False")
    jitter = tuple(data.scale_jitter)
    if len(jitter) != 2 or not 0 < jitter[0] <= jitter[1] < np.inf:
        raise ValueError(
            f"config.data.scale_jitter={data.scale_jitter} must be (low, high) with "
            "0 < low <= high, the range of the random scale (1.0, 1.0: none)"
        )


def check_canvas(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError unless the canvas ``config.data.image_size`` suits the resize settings.

    ``model.size_divisibility`` must be a positive multiple of 32 and ``image_size`` a positive
    multiple of it. With ``resize_short_side > 0`` the resized image (before jitter) must fit the
    canvas once rounded up to ``size_divisibility``: its longer side reaches
    ``resize_max_long_side`` in either orientation, so both canvas sides must be at least that,
    rounded up (``resize_max_long_side = 0``, no cap, cannot fit any canvas); the same holds for
    every shorter side of ``train_short_sides`` (positive integers, only with
    ``resize_short_side > 0``). Train-time jitter beyond the canvas is cropped. With
    ``canvas_groups``, ``canvas_groups.check`` too (eval keeps ``image_size``, which must still
    hold both orientations).
    """
    data, divisibility = config.data, config.model.size_divisibility
    if not is_int(divisibility) or divisibility <= 0 or divisibility % 32:
        suggestion = max(round_up(divisibility, 32), 32) if is_int(divisibility) else 32
        raise ValueError(
            f"config.model.size_divisibility={divisibility!r} is not a positive multiple of 32 "
            f"(the stride of P5): use {suggestion}"
        )
    image_size = tuple(data.image_size)
    if len(image_size) != 2 or not all(is_int(s) and s > 0 for s in image_size):
        raise ValueError(
            f"config.data.image_size={data.image_size!r} must be two positive integers "
            f"(height, width), multiples of config.model.size_divisibility={divisibility}"
        )
    image_size = tuple(int(s) for s in image_size)
    if any(s % divisibility for s in image_size):
        fixed = tuple(round_up(s, divisibility) for s in image_size)
        raise ValueError(
            f"config.data.image_size={image_size} is not a multiple of "
            f"config.model.size_divisibility={divisibility}: use {fixed}"
        )
    short, long = data.resize_short_side, data.resize_max_long_side
    for name, value in (("resize_short_side", short), ("resize_max_long_side", long)):
        if value < 0:
            raise ValueError(f"config.data.{name}={value} is negative: use 0 or more")
    sides = tuple(data.train_short_sides)
    if sides and (short <= 0 or not all(is_int(s) and s > 0 for s in sides)):
        raise ValueError(
            f"config.data.train_short_sides={sides!r} must be positive integers, used with "
            f"config.data.resize_short_side > 0 (the eval shorter side; got {short}): e.g. "
            f"(640, 672, 704, 736, 768, 800) with resize_short_side=800, or () for one side"
        )
    if short <= 0:  # Fit the canvas: the content is at most image_size, a multiple of it.
        canvas_groups.check(config)  # refuses groups: they need resize_short_side > 0
        return
    if long <= 0:
        raise ValueError(
            f"config.data.resize_short_side={short} with config.data.resize_max_long_side=0 (no "
            f"cap) leaves the longer side unbounded, so no canvas holds every resized image: set "
            f"config.data.resize_max_long_side (at most {min(image_size)} for "
            f"config.data.image_size={image_size}), or resize_short_side=0 to fit the canvas"
        )
    needed = round_up(long, divisibility)
    if min(image_size) < needed:
        raise ValueError(
            f"config.data.image_size={image_size} cannot hold every image resized with "
            f"config.data.resize_short_side={short} and config.data.resize_max_long_side={long}: "
            f"the longer side reaches {long} in either orientation, {needed} once rounded up to "
            f"config.model.size_divisibility={divisibility}; use image_size "
            f"{(max(image_size[0], needed), max(image_size[1], needed))} or "
            f"resize_max_long_side <= {min(image_size)}"
        )
    canvas_groups.check(config)


def _base_scale(
    size: tf.Tensor, data: ml_collections.ConfigDict, short_side: tf.Tensor | None = None
) -> tf.Tensor:
    """The un-jittered float64 scale of an image of ``size`` [2] float64 (h, w): with
    ``resize_short_side > 0`` torchvision's ``min(short / min(h, w), max_long / max(h, w))``
    (``short`` = ``short_side`` [] float64 if given, else ``resize_short_side``;
    ``resize_max_long_side``, 0 = no cap, refused by ``check_canvas``), else the largest scale
    that fits ``image_size``."""
    if data.resize_short_side > 0:
        if short_side is None:
            short_side = tf.constant(data.resize_short_side, tf.float64)
        scale = short_side / tf.reduce_min(size)
        if data.resize_max_long_side > 0:
            long_cap = tf.constant(data.resize_max_long_side, tf.float64) / tf.reduce_max(size)
            scale = tf.minimum(scale, long_cap)
        return scale
    return tf.reduce_min(tf.constant(data.image_size, tf.float64) / size)


def _augmentation(
    seed: tf.Tensor,
    height: tf.Tensor,
    width: tf.Tensor,
    data: ml_collections.ConfigDict,
    train: bool,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(flip bool, resized size (h, w) [2] int32, crop offset (y, x) [2] int32).

    The resized size is ``max(floor(size * scale), 1)`` in float64, torchvision's
    ``F.interpolate(scale_factor=scale, recompute_scale_factor=True)`` output size."""
    size = tf.cast(tf.stack([height, width]), tf.float64)
    short_side = None
    if train and data.train_short_sides:  # Detectron2's ResizeShortestEdge, sample_style "choice"
        choices = tf.constant(data.train_short_sides, tf.float64)
        side_seed = tf.random.experimental.stateless_fold_in(seed, 3)  # the split below keeps
        pick = tf.random.stateless_uniform(
            [], side_seed, 0, len(data.train_short_sides), dtype=tf.int32
        )
        short_side = tf.gather(choices, pick)  # its draws: configs without sides are unchanged
    scale = _base_scale(size, data, short_side)
    flip = tf.constant(False)
    if train:
        flip_seed, jitter_seed, crop_seed = tf.unstack(tf.random.split(seed, 3))
        if data.hflip:
            flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        low, high = data.scale_jitter
        jitter = tf.random.stateless_uniform([], jitter_seed, low, high)
        scale *= tf.cast(jitter, tf.float64)
    resized = tf.maximum(tf.cast(tf.floor(size * scale), tf.int32), 1)
    excess = tf.maximum(resized - tf.constant(data.image_size, tf.int32), 0)
    offset = tf.zeros([2], tf.int32)
    if train:
        fraction = tf.random.stateless_uniform([2], crop_seed)
        offset = tf.minimum(tf.cast(fraction * tf.cast(excess + 1, tf.float32), tf.int32), excess)
    return flip, resized, offset


def _ratios(resized: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """Per-axis scale (h, w) [2] float32 of the resampled image: resized / original, in float32
    as torchvision's ``resize_boxes``."""
    return tf.cast(resized, tf.float32) / tf.cast(tf.stack([height, width]), tf.float32)


def _transform_image(
    image: tf.Tensor,
    flip: tf.Tensor,
    resized: tf.Tensor,
    offset: tf.Tensor,
    data: ml_collections.ConfigDict,
) -> tuple[tf.Tensor, tf.Tensor]:
    """[H, W, 3] uint8 -> (normalised, zero-padded [Ht, Wt, 3] f32, content size [2] int32)."""
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    antialias = data.get("resize_antialias", False)  # configs saved before the field: False
    image = tf.image.resize(image, resized, method="bilinear", antialias=antialias)
    target_h, target_w = data.image_size
    image = image[offset[0] : offset[0] + target_h, offset[1] : offset[1] + target_w]
    content = tf.shape(image)[:2]
    image = (image - tf.constant(data.mean, tf.float32)) / tf.constant(data.std, tf.float32)
    image = tf.image.pad_to_bounding_box(image, 0, 0, target_h, target_w)
    return image, content


def _transform_boxes(
    boxes: tf.Tensor,
    flip: tf.Tensor,
    ratios: tf.Tensor,
    offset: tf.Tensor,
    width: tf.Tensor,
    content: tf.Tensor,
) -> tf.Tensor:
    """Original-pixel boxes [n, 4] -> flipped, scaled per axis by ``ratios`` (h, w), shifted by
    -offset, clipped to content."""
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    w = tf.cast(width, tf.float32)
    x1, x2 = tf.where(flip, w - x2, x1), tf.where(flip, w - x1, x2)
    shift = tf.cast(tf.stack([offset[1], offset[0], offset[1], offset[0]]), tf.float32)
    factors = tf.stack([ratios[1], ratios[0], ratios[1], ratios[0]])
    boxes = tf.stack([x1, y1, x2, y2], axis=-1) * factors - shift
    limit = tf.cast(tf.stack([content[1], content[0], content[1], content[0]]), tf.float32)
    return tf.clip_by_value(boxes, 0.0, limit)


def _fit_boxes_to_crop(
    boxes: tf.Tensor,
    counts: tf.RaggedTensor,
    height: tf.Tensor,
    width: tf.Tensor,
    flip: tf.Tensor,
    resized: tf.Tensor,
    ratios: tf.Tensor,
    offset: tf.Tensor,
    content: tf.Tensor,
    image_size: tuple[int, int],
) -> tf.Tensor:
    """Original-pixel boxes [n, 4] -> the same, those of objects the crop cuts fitted to it.

    An object is cut when, along an axis the random crop shortens (resized size > canvas), its
    box reaches outside the crop. Its box becomes the box of its mask's part inside the crop
    (``masks.visible_extents``: mask pixels as unit squares) intersected with its own box, as
    Detectron2's LSJ recipe recomputes boxes from the cropped masks (``recompute_boxes``); if no
    mask pixel is inside, the box collapses to zero area, so the object is not valid. Clipping
    alone would keep a loose box over background (a diagonal object's corner) and objects whose
    visible part is empty. Objects with an empty mask keep their box; uncut objects are
    unchanged.
    """
    start = tf.cast(offset, tf.float32) / ratios  # the crop window (y, x) in (flipped) original
    stop = tf.cast(offset + content, tf.float32) / ratios  # pixels
    w = tf.cast(width, tf.float32)
    x_lo = tf.where(flip, w - stop[1], start[1])
    x_hi = tf.where(flip, w - start[1], stop[1])
    window = tf.stack([x_lo, start[0], x_hi, stop[0]])
    cropped = resized > tf.constant(image_size, tf.int32)  # (h, w)
    x1, y1, x2, y2 = tf.unstack(boxes, num=4, axis=-1)
    cut = (cropped[0] & ((y1 < window[1]) | (y2 > window[3]))) | (
        cropped[1] & ((x1 < window[0]) | (x2 > window[2]))
    )

    def fit() -> tf.Tensor:
        extents, nonempty = masks.visible_extents(counts, height, window)
        low = tf.maximum(boxes[:, :2], extents[:, :2])
        high = tf.maximum(tf.minimum(boxes[:, 2:], extents[:, 2:]), low)
        return tf.where((cut & nonempty)[:, tf.newaxis], tf.concat([low, high], axis=1), boxes)

    return tf.cond(tf.reduce_any(cut), fit, lambda: boxes)  # no runs read when nothing is cut


def _crop_masks(
    counts: tf.RaggedTensor,
    height: tf.Tensor,
    width: tf.Tensor,
    boxes: tf.Tensor,
    flip: tf.Tensor,
    ratios: tf.Tensor,
    offset: tf.Tensor,
    mask_size: int,
) -> tf.Tensor:
    """Run lengths [n, (R)] of H×W masks + final boxes [n, 4] -> [n, S, S] uint8 GT-box crops.

    Output pixel (i, j) is the mask at the final-image point (x1 + (j + 0.5) w / S,
    y1 + (i + 0.5) h / S) (CONTRACTS.md), mapped back through crop offset, per-axis ratios and
    flip to the original mask, sampled bilinearly and thresholded at 0.5.
    """
    x1, y1, x2, y2 = tf.unstack(boxes[:, :, tf.newaxis], num=4, axis=1)
    steps = (tf.range(mask_size, dtype=tf.float32) + 0.5) / mask_size
    xs = x1 + steps * (x2 - x1)  # [n, S] grid centres in the final image
    ys = y1 + steps * (y2 - y1)
    x = tf.tile(xs[:, tf.newaxis, :], [1, mask_size, 1])  # [n, S, S], x varies along columns
    y = tf.tile(ys[:, :, tf.newaxis], [1, 1, mask_size])
    # Final image -> (flipped) original pixels.
    x = (x + tf.cast(offset[1], tf.float32)) / ratios[1]
    y = (y + tf.cast(offset[0], tf.float32)) / ratios[0]
    x = tf.where(flip, tf.cast(width, tf.float32) - x, x)
    n = tf.shape(boxes)[0]
    values = masks.sample_masks(
        counts, height, width, tf.reshape(x, [n, -1]), tf.reshape(y, [n, -1])
    )
    return tf.cast(tf.reshape(values, [n, mask_size, mask_size]) >= 0.5, tf.uint8)


def _pad_rows(x: tf.Tensor, rows: int, value: float | int | bool) -> tf.Tensor:
    """Pads the first axis of ``x`` to ``rows`` with ``value``."""
    padding = [[0, rows - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
    return tf.pad(x, padding, constant_values=value)


def _preprocess(
    example: dict, seed: tf.Tensor, data: ml_collections.ConfigDict, train: bool
) -> dict[str, tf.Tensor]:
    """One TFDS example (image still encoded) -> the per-example dict of a batch."""
    image = _decode_image(example["image"])
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    objects = example["objects"]
    boxes = _pixel_boxes(objects["bbox"], height, width)
    trainable_in_file = ~objects["is_crowd"] & _positive_area(boxes)

    flip, resized, offset = _augmentation(seed, height, width, data, train)
    ratios = _ratios(resized, height, width)
    image, content = _transform_image(image, flip, resized, offset, data)
    counts = masks.rle_counts(objects["mask"])
    boxes = _fit_boxes_to_crop(
        boxes, counts, height, width, flip, resized, ratios, offset, content, data.image_size
    )
    boxes = _transform_boxes(boxes, flip, ratios, offset, width, content)
    # Objects are chosen after the crop, so that those it leaves out do not take the place of
    # visible ones, and kept in the file's order (trainable there first): where all fit, the
    # rows are those of choosing before the crop (their order reaches the RoI sampling).
    keep, num_dropped = _select_objects(boxes, objects["is_crowd"], data.max_instances)
    keep = tf.sort(keep)
    keep = tf.gather(
        keep, tf.argsort(tf.cast(~tf.gather(trainable_in_file, keep), tf.int32), stable=True)
    )
    boxes = tf.gather(boxes, keep)
    counts = tf.gather(counts, keep)
    valid = ~tf.gather(objects["is_crowd"], keep) & _positive_area(boxes)
    crops = _crop_masks(counts, height, width, boxes, flip, ratios, offset, data.mask_size)
    crops *= tf.cast(valid, tf.uint8)[:, tf.newaxis, tf.newaxis]

    m, s = data.max_instances, data.mask_size
    out = {
        "image": tf.ensure_shape(image, (*data.image_size, 3)),
        "image_size": content,
        "gt_boxes": tf.ensure_shape(_pad_rows(boxes, m, 0.0), (m, 4)),
        "gt_classes": tf.ensure_shape(
            _pad_rows(tf.cast(tf.gather(objects["label"], keep), tf.int32), m, -1), (m,)
        ),
        "gt_valid": tf.ensure_shape(_pad_rows(valid, m, False), (m,)),
        "gt_masks": tf.ensure_shape(_pad_rows(crops, m, 0), (m, s, s)),
        "_num_dropped": num_dropped,
        "_image_id": example["image/id"],  # for the warning; popped with _num_dropped
    }
    if not train:
        out["image_id"] = example["image/id"]
        out["orig_size"] = tf.stack([height, width])
    return out


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count) of this process, defaulting to JAX's."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    return index, count


def _local_batch(global_batch: int, field: str, process_count: int) -> int:
    """Per-process batch; the global batch (`config.<field>`) must split evenly over the
    processes."""
    if global_batch % process_count:
        raise ValueError(
            f"config.{field}={global_batch} is not divisible by the {process_count} processes"
        )
    return global_batch // process_count


def _numpy_batches(
    dataset: tf.data.Dataset, warn: Callable[[np.ndarray, np.ndarray], None] | None
) -> Iterator[Batch]:
    """Yields the batches as numpy dicts, calling `warn(num_dropped, image_ids)` ([B] each) on
    those with objects beyond `max_instances` cut (None: nothing said, where nothing uses the
    cut ground truth)."""
    for batch in dataset.as_numpy_iterator():
        dropped, image_ids = batch.pop("_num_dropped"), batch.pop("_image_id")
        if warn is not None and dropped.any():
            warn(dropped, image_ids)
        yield batch


class _CutObjects:
    """A `warn` for `_numpy_batches` (canvas groups' streams share one per training run): logs
    the first time it is called, naming the image with the most objects cut, and collects
    every image cut, which `report` names once the stream ends (the largest count, the
    `max_instances` that keeps all): one warning cannot know the split's largest image."""

    def __init__(self, max_instances: int):
        self.max_instances = max_instances
        self.objects: dict[int, int] = {}  # image id -> its object count, of images cut

    def __call__(self, dropped: np.ndarray, image_ids: np.ndarray) -> None:
        if not self.objects:
            most = int(np.argmax(dropped))
            logging.warning(
                "Image id %d has %d objects more than max_instances=%d; kept the first "
                "(trainable objects first, then annotation order). Raise "
                "config.data.max_instances to keep all (the run's end names the largest "
                "count seen). Warned once.",
                int(image_ids[most]),
                int(dropped[most]),
                self.max_instances,
            )
        for image_id, count in zip(image_ids.tolist(), dropped.tolist()):
            if count:  # the most of its draws: crop and scale jitter change the count
                total = self.max_instances + count
                self.objects[image_id] = max(self.objects.get(image_id, 0), total)

    def report(self) -> None:
        """Logs how many images had objects cut and the largest, if any (then forgets them)."""
        if self.objects:
            largest = max(self.objects, key=self.objects.get)
            logging.warning(
                "max_instances=%d cut objects from %d images read by this process; the "
                "largest, image id %d, has %d: config.data.max_instances=%d keeps all of these.",
                self.max_instances,
                len(self.objects),
                largest,
                self.objects[largest],
                self.objects[largest],
            )
            self.objects.clear()


def _reported(batches: Iterator[Batch], cut: _CutObjects) -> Iterator[Batch]:
    """`batches`, then `cut.report()` however the stream ends (closed, an error)."""
    try:
        yield from batches
    finally:
        cut.report()


def _deterministic(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Applies tf.data options that keep the element order independent of thread timing."""
    options = tf.data.Options()
    options.deterministic = True
    return dataset.with_options(options)


def _group_data(data: ml_collections.ConfigDict, canvas: tuple[int, int]):
    """``data`` with the canvas ``image_size`` of a canvas group (the resize with
    ``resize_short_side > 0`` does not read it; crop and padding do)."""
    data = data.copy_and_resolve_references()
    data.image_size = canvas
    return data


def _canvas_group(example: dict, data: ml_collections.ConfigDict, divisibility: int) -> tf.Tensor:
    """The canvas group (int32 scalar) of an undecoded example: the first of
    ``data.canvas_groups`` holding its un-jittered resized size at the largest training shorter
    side, rounded up to ``divisibility``; the size comes from the encoded header."""
    size = tf.cast(canvas_groups.encoded_image_size(example["image"]), tf.float64)
    short = tf.constant(canvas_groups.largest_train_short_side(data), tf.float64)
    resized = tf.maximum(tf.cast(tf.floor(size * _base_scale(size, data, short)), tf.int32), 1)
    return canvas_groups.first_holding(resized, canvas_groups.groups_of(data), divisibility)


def _train_records(
    config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
    file_seed: int,
    group: int | None,
) -> tf.data.Dataset:
    """The undecoded training records, files in the order of ``file_seed``, without the empty
    images when skipped, and only those of canvas group ``group`` unless it is None."""
    data = config.data
    with schema.tfds_notices_dropped():
        dataset = builder.as_dataset(
            split=data.train_split,
            shuffle_files=True,
            read_config=tfds.ReadConfig(shuffle_seed=file_seed, try_autocache=False),
            decoders=_RAW_IMAGE,
        )
    if data.skip_empty_train_images:
        dataset = dataset.filter(_has_trainable_object)
    if group is not None:
        divisibility = config.model.size_divisibility
        dataset = dataset.filter(
            tf.autograph.experimental.do_not_convert(
                lambda example: tf.equal(_canvas_group(example, data, divisibility), group)
            )
        )
    return dataset


def _train_stream(
    config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
    seeds: tuple[int, int, int],
    skipped: int,
    place: tuple[int, int],
    warn: Callable[[np.ndarray, np.ndarray], None],
    group: int | None = None,
) -> Iterator[Batch]:
    """One numbered record stream: this process's batches of it (module docstring, "Data order").

    ``seeds`` are the (file order, shuffle, augmentation) seeds; the first ``skipped`` records
    are dropped undecoded; ``place`` is (process index, count); ``warn`` is told of objects
    beyond ``max_instances`` (``_CutObjects``); ``group`` picks the records and the
    canvas of one canvas group (None: all records, canvas ``data.image_size``).
    """
    data = config.data
    if group is not None:
        data = _group_data(data, canvas_groups.groups_of(data)[group])
    (index, count), global_batch = place, config.train.batch_size
    batch = _local_batch(global_batch, "train.batch_size", count)
    file_seed, shuffle_seed, augment_seed = seeds
    dataset = _train_records(config, builder, file_seed, group)
    dataset = dataset.shuffle(data.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    dataset = dataset.repeat().skip(skipped).enumerate(start=skipped)

    @tf.autograph.experimental.do_not_convert
    def mine(position: tf.Tensor, example: dict) -> tf.Tensor:
        """Whether ``position`` is in rows [index * batch, (index + 1) * batch) of its batch."""
        del example
        return position % global_batch // batch == index

    if count > 1:  # before the decoding map: each process decodes only its rows
        dataset = dataset.filter(mine)
    base_seed = tf.constant([augment_seed, 0], tf.int64)

    @tf.autograph.experimental.do_not_convert  # plain TF ops; saves the conversion time
    def preprocess(position: tf.Tensor, example: dict) -> dict:
        seed = tf.random.experimental.stateless_fold_in(base_seed, position)  # global position
        out = _preprocess(example, seed, data, train=True)
        return {k: out[k] for k in (*_TRAIN_KEYS, "_num_dropped", "_image_id")}

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return _endless(_numpy_batches(_deterministic(dataset), warn), data, group)


def _seeds(*entropy: int) -> tuple[int, int, int]:
    """(file order, shuffle, augmentation) seeds of a record stream."""
    return tuple(int(s) for s in np.random.SeedSequence(list(entropy)).generate_state(3))


def create_train_dataset(
    config: ml_collections.ConfigDict,
    *,
    builder: tfds.core.DatasetBuilder | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """Endless generator of this process's training batches (CONTRACTS.md "Batches", train
    keys); its `close()` releases the tf.data iterators and their threads, and logs how many
    images had objects beyond ``data.max_instances`` cut, if any (`_CutObjects`).

    Global batch ``s`` (``train.batch_size`` examples) depends only on ``config.seed``, the data
    and ``s``; process ``p`` of ``n`` yields its rows ``[p·b, (p+1)·b)``, ``b = batch_size / n``,
    so the slices of all processes, concatenated in process order, are the global batch whatever
    ``n`` (module docstring, "Data order"). With ``data.canvas_groups`` each batch is padded to
    the canvas of the group that step ``s`` draws (``canvas_groups.step_groups``) and holds
    images of that group only ("Canvas groups").

    Args:
        config: the experiment config (reads ``seed``, ``data`` and ``train.batch_size``, the
            global batch; each process yields batch_size / process_count examples).
        builder: dataset builder; default ``get_builder(config.data)``.
        start_step: number of global batches to skip (resuming at step N), without decoding
            them; the same on every process.
        process_index, process_count: this process's place; default JAX's.

    Yields:
        {"image" [B,H,W,3] f32, "image_size" [B,2] i32, "gt_boxes" [B,M,4] f32 (x1,y1,x2,y2),
        "gt_classes" [B,M] i32 (-1 padding), "gt_valid" [B,M] bool, "gt_masks" [B,M,S,S] u8};
        (H, W) is ``data.image_size``, or the canvas of the step's group.

    Raises:
        ValueError: from ``check_data``; for a ``train.batch_size`` below 1 or not divisible by
            the process count; for a ``model.num_classes`` other than the dataset's (0: the
            dataset's count, ``trainer.with_dataset_classes`` sets it): labels beyond the
            model's classes would make the loss NaN. Before any data is read.
    """
    check_data(config)
    data = config.data
    global_batch = config.train.batch_size
    if not is_int(global_batch) or global_batch < 1:
        raise ValueError(f"config.train.batch_size={global_batch!r} must be at least 1 image")
    builder = builder or get_builder(data)
    num_classes = len(schema.class_names(builder.info))
    if config.model.num_classes not in (0, num_classes):
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes} but dataset "
            f"{builder.info.full_name} has {num_classes} classes: set it to {num_classes} "
            "(trainer.with_dataset_classes(config, builder) sets it and the class names)"
        )
    place = _process(process_index, process_count)
    _local_batch(global_batch, "train.batch_size", place[1])
    groups = canvas_groups.groups_of(data)
    warn = _CutObjects(data.max_instances)
    if not groups:
        # Seeds of config.seed alone, the same on every process. [seed, 0] are the seeds that
        # process 0 used when each process read its own file shard, so one process keeps its
        # order.
        seeds = _seeds(config.seed, 0)
        stream = _train_stream(config, builder, seeds, start_step * global_batch, place, warn)
        return _reported(stream, warn)
    earlier_steps = canvas_groups.steps_per_group(config, start_step)
    streams = [
        _train_stream(
            config, builder, _seeds(config.seed, 2, g), int(n) * global_batch, place, warn, g
        )
        for g, n in enumerate(earlier_steps)
    ]
    return _reported(_grouped_batches(streams, config, start_step), warn)


def _grouped_batches(
    streams: list[Iterator[Batch]], config: ml_collections.ConfigDict, start_step: int
) -> Iterator[Batch]:
    """Batch ``s`` (from ``start_step``) is the next batch of the stream of step s's group."""
    chunk = 1024  # steps whose groups are drawn at once
    for first in itertools.count(start_step, chunk):
        for group in canvas_groups.step_groups(config, np.arange(first, first + chunk)):
            yield next(streams[group])


def canvas_group_counts(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder | None = None
) -> np.ndarray:
    """[G] int64: how many training records fall in each of ``data.canvas_groups``.

    One pass over the undecoded training split (after ``skip_empty_train_images``), reading
    only the image headers (``canvas_groups.encoded_image_size``); its fractions are the
    ``data.canvas_group_weights`` that sample every image equally often.

    Raises:
        ValueError: from ``check_canvas``, or without ``canvas_groups``.
    """
    check_canvas(config)
    groups = canvas_groups.groups_of(config.data)
    if not groups:
        raise ValueError("config.data.canvas_groups is () (off): there are no groups to count")
    builder = builder or get_builder(config.data)
    records = _train_records(config, builder, file_seed=0, group=None)
    divisibility = config.model.size_divisibility
    which = records.map(
        tf.autograph.experimental.do_not_convert(
            lambda example: _canvas_group(example, config.data, divisibility)
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    counts = np.zeros(len(groups), np.int64)
    for block in which.batch(4096).as_numpy_iterator():
        counts += np.bincount(block, minlength=len(groups))
    return counts


def _endless(
    batches: Iterator[Batch], data: ml_collections.ConfigDict, group: int | None = None
) -> Iterator[Batch]:
    """``batches`` (a repeated split, endless unless it holds no example), with a clear error
    in place of a silent end."""
    yield from batches
    where = ""
    if group is not None:
        where = (
            f" in canvas group {group}, {canvas_groups.groups_of(data)[group]} (config.data."
            f"canvas_groups; give it config.data.canvas_group_weights 0 or remove it)"
        )
    raise ValueError(
        f"the training split {data.train_split!r} of {data.dataset!r} has no example"
        + (
            " with a non-crowd object (config.data.skip_empty_train_images=True drops the others)"
            if data.skip_empty_train_images
            else ""
        )
        + where
    )


def eval_num_batches(
    config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
    split: str | None = None,
    process_count: int | None = None,
) -> int:
    """Batches every process yields for ``split`` (the same count on all processes)."""
    count = _process(None, process_count)[1]
    batch = _local_batch(config.eval.batch_size, "eval.batch_size", count)
    per_process = -(-_num_eval_examples(config, builder, split) // count)
    return -(-per_process // batch)


def split_names(spec: str) -> list[str]:
    """The splits a TFDS split spec reads: ["validation", "train"] for "validation[:5%]+train"."""
    return re.findall(r"(?:^|\+)\s*(\w+)", spec)


def split_error(builder: tfds.core.DatasetBuilder, spec: str) -> str | None:
    """Why `builder` cannot read the TFDS split spec `spec`, to follow the spec in a message
    ("is not a split of <dataset> (its splits: ...)", "does not select images of <dataset>
    (<split sizes>): <TFDS's reason>" for a slice out of range or a spec that does not parse,
    or "selects no image of <dataset>" for an empty one, e.g. `validation[:0]`); None when it
    can."""
    splits = builder.info.splits
    try:
        empty = not splits[spec].num_examples
        return f"selects no image of {builder.info.full_name}" if empty else None
    except (KeyError, ValueError) as error:
        reason = str(error).splitlines()[-1] if str(error) else type(error).__name__
    name = builder.info.full_name
    unknown = [split for split in split_names(spec) if split not in splits]
    if unknown:
        return f"is not a split of {name} (its splits: {sorted(splits)})"
    sizes = ", ".join(f"{split}: {splits[split].num_examples}" for split in sorted(splits))
    return f"does not select images of {name} ({sizes} images): {reason}"


def eval_split(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, split: str | None
) -> str:
    """The eval split (default ``config.data.val_split``), limited to its first
    ``config.eval.max_images`` images when that is > 0.

    Any TFDS split spec works: a slice (``validation[10:50]``, ``validation[:50%]``) or a sum
    (``train+validation``) is first made absolute on the builder's split sizes, so the limit
    takes the first images of the whole spec (appending ``[:N]`` to it would not parse, or, for
    a sum, would limit only its last part).
    """
    split = split or config.data.val_split
    limit = config.eval.max_images
    if not limit:
        return split
    parts = []
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits):
        size = builder.info.splits[part.splitname].num_examples  # TFDS may leave None bounds
        indices = range(size)[part.from_ : part.to]
        take = min(len(indices), limit)
        if take > 0:
            parts.append(f"{part.splitname}[{indices.start}:{indices.start + take}]")
        limit -= take
    return "+".join(parts) or split  # an empty spec stays itself


def _num_eval_examples(
    config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder, split: str | None
) -> int:
    return builder.info.splits[eval_split(config, builder, split)].num_examples


def create_eval_dataset(
    config: ml_collections.ConfigDict,
    *,
    builder: tfds.core.DatasetBuilder | None = None,
    split: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[Batch]:
    """One pass over this process's shard of the eval split, in fixed-shape batches.

    Every process yields ``eval_num_batches`` batches of ``config.eval.batch_size /
    process_count`` rows; rows beyond the shard's end are zeros with ``valid`` False.

    Args:
        config: the experiment config; split defaults to ``config.data.val_split``.
        builder, process_index, process_count: as ``create_train_dataset``.

    Yields:
        The train keys (no augmentation; "image_size" is the resized size) plus "image_id" [B]
        int64, "orig_size" [B,2] int32 (height, width of the original image), "valid" [B] bool.
        Boxes go back to the original per axis: x * orig_w / image_w, y * orig_h / image_h.
        The "gt_*" keys hold the first ``data.max_instances`` objects of each image, without
        the training's warning: the COCO evaluation scores every object of the annotations.

    Raises:
        ValueError: from ``check_canvas``; for an ``eval.batch_size`` not divisible by the
            process count. Before any data is read.
    """
    check_canvas(config)
    data = config.data
    builder = builder or get_builder(data)
    index, count = _process(process_index, process_count)
    batch = _local_batch(config.eval.batch_size, "eval.batch_size", count)
    num_batches = eval_num_batches(config, builder, split, count)
    read = functools.partial(builder.as_dataset, shuffle_files=False, decoders=_RAW_IMAGE)
    with schema.tfds_notices_dropped():
        if index < _num_eval_examples(config, builder, split):
            shard = tfds.split_for_jax_process(
                eval_split(config, builder, split), process_index=index, process_count=count
            )
            dataset = read(split=shard)
        else:  # More processes than images: TFDS gives the last ones an empty shard (an error
            # to read), they yield padding only, so that every process joins every batch's gather.
            dataset = read(split=eval_split(config, builder, split)).take(0)
    seed = tf.zeros([2], tf.int64)  # unused without augmentation

    @tf.autograph.experimental.do_not_convert
    def preprocess(example: dict) -> dict:
        return {**_preprocess(example, seed, data, train=False), "valid": tf.constant(True)}

    dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(
        tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), dataset.element_spec)
    )
    dataset = dataset.concatenate(padding.repeat()).take(num_batches * batch)
    dataset = dataset.batch(batch).prefetch(tf.data.AUTOTUNE)
    # The evaluation scores the annotations' own ground truth (coco_json), not gt_*: no warning.
    return _numpy_batches(_deterministic(dataset), None)


def preprocess_image(image: np.ndarray, config: ml_collections.ConfigDict) -> Batch:
    """One decoded image as the eval pipeline prepares it, for inference outside tf.data.

    Args:
        image: [H, W, 3] uint8 RGB.
        config: the experiment config (``data``: image_size, resize, mean, std;
            ``model.size_divisibility`` for ``check_canvas``).

    Returns:
        {"image": [Ht, Wt, 3] f32 normalised and padded, "image_size": [2] i32 resized content
        size}; boxes go back to the image per axis (x * W / image_size[1], y * H / image_size[0]).

    Raises:
        ValueError: from ``check_canvas``.
    """
    check_canvas(config)
    image, content = resize_and_pad_tf(tf.convert_to_tensor(image, tf.uint8), config.data)
    return {"image": image.numpy(), "image_size": content.numpy()}


def resize_and_pad_tf(
    image: tf.Tensor, data: ml_collections.ConfigDict
) -> tuple[tf.Tensor, tf.Tensor]:
    """The eval resize of one image in TensorFlow ops (eager or inside a ``tf.function``).

    Args:
        image: [H, W, 3] uint8 RGB, H and W > 0 (may be dynamic).
        data: ``config.data`` (image_size, resize_short_side, resize_max_long_side, mean, std);
            the caller runs ``check_canvas`` on the whole config.

    Returns:
        (image [Ht, Wt, 3] f32: resized as the module docstring says, normalised, zero-padded
        bottom/right to ``data.image_size``; image_size [2] int32: resized content (h, w)).
    """
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    no_seed = tf.zeros([2], tf.int64)
    flip, resized, offset = _augmentation(no_seed, height, width, data, train=False)
    return _transform_image(image, flip, resized, offset, data)
