"""Instance masks stored as COCO compressed RLE, and their decoding inside tf.data.

Storage format (both builders): each instance mask is the image-sized binary mask encoded as the
`counts` string of pycocotools' compressed RLE (column-major run lengths, first run = background,
each length written in pycocotools' 5-bit variable-length, delta-coded text). It is exactly what
pycocotools evaluation consumes, so a split converts to a COCO ground-truth json without
re-encoding, and it is the smallest option measured (docs/measurements.md; TFDS cannot store a
ragged list per object, and a PNG per instance is ~3× larger).

Read speed: the input pipeline never materialises the full-image masks. ``rle_counts`` decodes
the strings to run lengths with vectorised TF ops (no py_function, no GIL), and
``sample_masks`` looks up the pixels around the requested points with a binary search over the
run ends, so a 28×28 GT-box crop costs O(28² log runs) per instance instead of O(H·W).
"""

import numpy as np
import tensorflow as tf
from pycocotools import mask as mask_utils


def encode_mask(mask: np.ndarray) -> bytes:
    """Encodes one binary mask as pycocotools compressed-RLE counts.

    Args:
        mask: [H, W] bool or integer array, nonzero = object.

    Returns:
        The RLE `counts` bytes (the mask's height and width are stored beside it, not in it).
    """
    fortran = np.asfortranarray(np.asarray(mask) != 0, dtype=np.uint8)
    return mask_utils.encode(fortran)["counts"]


def decode_mask(rle: bytes, height: int, width: int) -> np.ndarray:
    """Decodes RLE counts (as from ``encode_mask``) to a [height, width] uint8 {0,1} mask."""
    return mask_utils.decode({"size": [int(height), int(width)], "counts": rle})


SNAP = 1e-3  # Pixels (`visible_extents`): far above float32 rounding of window edges.


def rle_counts(rles: tf.Tensor) -> tf.RaggedTensor:
    """Decodes compressed-RLE strings to run lengths, as pycocotools' ``rleFrString``, in TF ops.

    Each character c carries 5 payload bits (c - 48) & 0x1f, least significant group first; bit
    0x20 says that more characters follow, and bit 0x10 of the last character is the sign. From
    the fourth run on, the stored value is the difference to the run two places earlier.

    Args:
        rles: [N] tf.string, compressed-RLE counts strings.

    Returns:
        [N, (R_n)] int64 ragged run lengths, column-major, first run = background.
    """
    chars = tf.strings.unicode_decode(rles, "UTF-8")  # ASCII '0'..'o' only.
    value = tf.cast(chars.flat_values, tf.int64) - 48
    ends_token = tf.equal(tf.bitwise.bitwise_and(value, 0x20), 0)
    token = tf.cumsum(tf.cast(ends_token, tf.int64), exclusive=True)
    num_tokens = tf.reduce_sum(tf.cast(ends_token, tf.int64))
    char_index = tf.range(tf.size(value, out_type=tf.int64))
    token_start = tf.math.unsorted_segment_min(char_index, token, num_tokens)
    shift = 5 * (char_index - tf.gather(token_start, token))
    payload = tf.bitwise.left_shift(tf.bitwise.bitwise_and(value, 0x1F), shift)
    negative = ends_token & tf.not_equal(tf.bitwise.bitwise_and(value, 0x10), 0)
    sign = tf.where(
        negative, -tf.bitwise.left_shift(tf.ones_like(shift), shift + 5), tf.zeros_like(shift)
    )
    deltas = tf.math.unsorted_segment_sum(payload + sign, token, num_tokens)

    runs_per_row = tf.reduce_sum(tf.cast(chars.with_flat_values(ends_token), tf.int64), axis=1)
    dense = tf.RaggedTensor.from_row_lengths(deltas, runs_per_row).to_tensor()
    position = tf.range(tf.shape(dense, out_type=tf.int64)[1])[tf.newaxis, :]
    zero = tf.zeros_like(dense)
    chained = tf.where(position > 0, dense, zero)  # run m > 2 adds run m - 2: per-parity cumsums
    odd = tf.equal(position % 2, 1)
    odd_sums = tf.cumsum(tf.where(odd, chained, zero), axis=1)
    even_sums = tf.cumsum(tf.where(odd, zero, chained), axis=1)
    counts = tf.where(position == 0, dense, tf.where(odd, odd_sums, even_sums))
    return tf.RaggedTensor.from_tensor(counts, lengths=runs_per_row)


def sample_masks(
    counts: tf.RaggedTensor, height: tf.Tensor, width: tf.Tensor, x: tf.Tensor, y: tf.Tensor
) -> tf.Tensor:
    """Bilinearly samples run-length masks at continuous image points.

    Pixel (row r, column c) covers [c, c+1) × [r, r+1) with its centre at (c + 0.5, r + 0.5), so
    a point (x, y) interpolates the four pixels whose centres surround it; the mask is 0 outside
    the image (as RoIAlign's zero padding).

    Args:
        counts: [N, (R_n)] int64 run lengths (``rle_counts``); each row must sum to height*width.
        height, width: scalar int sizes of the masks.
        x, y: [N, P] float32 image coordinates of the points sampled for each mask.

    Returns:
        [N, P] float32 interpolated mask values in [0, 1].
    """
    height = tf.cast(height, tf.int64)
    width = tf.cast(width, tf.int64)
    u = tf.cast(x, tf.float64) - 0.5
    v = tf.cast(y, tf.float64) - 0.5
    u0, v0 = tf.floor(u), tf.floor(v)
    fu, fv = u - u0, v - v0
    num_points = tf.shape(x, out_type=tf.int64)[1]
    row = tf.range(tf.shape(x, out_type=tf.int64)[0])[:, tf.newaxis, tf.newaxis]
    cols = tf.cast(tf.stack([u0, u0 + 1.0, u0, u0 + 1.0], axis=-1), tf.int64)  # [N, P, 4]
    rows = tf.cast(tf.stack([v0, v0, v0 + 1.0, v0 + 1.0], axis=-1), tf.int64)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    pixel = tf.clip_by_value(cols, 0, width - 1) * height + tf.clip_by_value(rows, 0, height - 1)
    # All masks' run ends in one sorted vector: row n's runs end within (n·H·W, (n+1)·H·W].
    ends = tf.cumsum(counts.flat_values)
    query = tf.reshape(pixel + row * height * width, [-1])
    run = tf.searchsorted(ends, query, side="right", out_type=tf.int64)
    run = (
        tf.reshape(run, tf.shape(pixel, out_type=tf.int64))
        - counts.row_starts()[:, tf.newaxis, tf.newaxis]
    )
    on = tf.cast(inside & tf.equal(run % 2, 1), tf.float64)
    weights = tf.stack([(1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv], axis=-1)
    values = tf.reduce_sum(on * weights, axis=-1)
    return tf.cast(tf.reshape(values, [-1, num_points]), tf.float32)


def visible_extents(
    counts: tf.RaggedTensor, height: tf.Tensor, window: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Bounding boxes of the run-length masks' parts inside a window, pixels as unit squares.

    Pixel (row r, column c) is the square [c, c+1) × [r, r+1); a mask's visible part is the union
    of its pixels' squares intersected with `window`. A window edge within ``SNAP`` of a pixel
    boundary is moved onto it first, so float rounding of the edge does not decide whether a pixel
    the window merely touches is in. Each run of mask pixels covers at most three
    rectangles (the rest of its first column, whole columns, the start of its last column), so the
    cost is O(runs), with no full-image mask.

    Args:
        counts: [N, (R_n)] int64 run lengths (``rle_counts``) of masks `height` rows high.
        height: scalar int, the masks' height.
        window: [4] float32 (x1, y1, x2, y2) in the masks' pixels.

    Returns:
        boxes: [N, 4] float32 (x1, y1, x2, y2), the tight box of each mask's visible part, of
            positive area; zeros where no mask pixel overlaps the (snapped) window with positive
            area.
        nonempty: [N] bool, the mask has a pixel at all.
    """
    height = tf.cast(height, tf.int64)
    runs = counts.to_tensor()  # [N, R], zero-length padding runs
    stops = tf.cumsum(runs, axis=1)  # one past each run's last pixel, column-major
    starts = stops - runs
    position = tf.range(tf.shape(runs, out_type=tf.int64)[1])[tf.newaxis, :]
    on = tf.equal(position % 2, 1) & (runs > 0)
    first_col, first_row = starts // height, starts % height
    last_col, last_row = (stops - 1) // height, (stops - 1) % height
    spans_columns = last_col > first_col
    # Rectangles [col_lo, col_hi] × [row_lo, row_hi] (inclusive): first column, whole columns, last.
    col_lo = tf.stack([first_col, first_col + 1, last_col], axis=-1)
    col_hi = tf.stack([first_col, last_col - 1, last_col], axis=-1)
    zeros = tf.zeros_like(first_row)
    row_lo = tf.stack([first_row, zeros, zeros], axis=-1)
    row_hi = tf.stack(
        [tf.where(spans_columns, height - 1, last_row), zeros + height - 1, last_row], axis=-1
    )
    present = tf.stack([on, on & (last_col - first_col >= 2), on & spans_columns], axis=-1)

    def as_float(x):
        return tf.cast(x, tf.float32)

    nearest = tf.round(window)
    window = tf.where(tf.abs(window - nearest) < SNAP, nearest, window)
    x1 = tf.maximum(as_float(col_lo), window[0])
    y1 = tf.maximum(as_float(row_lo), window[1])
    x2 = tf.minimum(as_float(col_hi + 1), window[2])
    y2 = tf.minimum(as_float(row_hi + 1), window[3])
    hit = present & (x1 < x2) & (y1 < y2)  # [N, R, 3]
    inf = tf.constant(np.inf, tf.float32)
    visible = tf.reduce_any(hit, axis=[1, 2])
    boxes = tf.stack(
        [
            tf.reduce_min(tf.where(hit, x1, inf), axis=[1, 2]),
            tf.reduce_min(tf.where(hit, y1, inf), axis=[1, 2]),
            tf.reduce_max(tf.where(hit, x2, -inf), axis=[1, 2]),
            tf.reduce_max(tf.where(hit, y2, -inf), axis=[1, 2]),
        ],
        axis=-1,
    )
    boxes = tf.where(visible[:, tf.newaxis], boxes, tf.zeros_like(boxes))
    return boxes, tf.reduce_any(on, axis=1)
