"""RLE decoding and mask sampling in TF (mrcnn_jax/data/masks.py) against pycocotools and numpy."""

import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils
from references import bilinear_sample, mask_runs, visible_extent

from mrcnn_jax.data import masks


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(7, 9), (37, 53), (64, 48)]
    out = [rng.random(size) < p for size in sizes for p in (0.02, 0.5, 0.97)]
    out += [np.zeros((5, 6), bool), np.ones((5, 6), bool), np.eye(6, 5, dtype=bool)]
    first = np.zeros((4, 4), bool)
    first[0, 0] = True
    last = np.zeros((4, 4), bool)
    last[-1, -1] = True
    big = np.zeros((480, 640), bool)  # long runs: multi-character and negative delta codes
    big[10:470, 3:600] = True
    big[200:201, 100:120] = False
    return [*out, first, last, big]


@pytest.mark.parametrize("index", range(15))
def test_rle_counts_matches_pycocotoolsmask_runs(index):
    mask = _masks()[index]
    rle = masks.encode_mask(mask)
    assert np.array_equal(masks.decode_mask(rle, *mask.shape), mask)
    counts = masks.rle_counts(tf.constant([rle]))
    np.testing.assert_array_equal(counts[0].numpy(), mask_runs(mask))


def test_rle_counts_batch_of_different_lengths_and_empty_batch():
    ms = [m for m in _masks() if m.shape == (37, 53)]
    counts = masks.rle_counts(tf.constant([masks.encode_mask(m) for m in ms]))
    assert counts.shape[0] == len(ms)
    for row, m in zip(counts, ms):
        np.testing.assert_array_equal(row.numpy(), mask_runs(m))
    assert masks.rle_counts(tf.zeros([0], tf.string)).shape[0] == 0


def test_rle_counts_reads_rles_made_by_pycocotools_from_polygons():
    rle = mask_utils.merge(mask_utils.frPyObjects([[3, 4, 90, 10, 50, 70, 8, 60]], 80, 100))
    counts = masks.rle_counts(tf.constant([rle["counts"]]))[0].numpy()
    np.testing.assert_array_equal(counts, mask_runs(mask_utils.decode(rle)))


def test_sample_masks_matches_numpy_bilinear_on_random_and_edge_points():
    rng = np.random.default_rng(1)
    ms = [m for m in _masks() if m.shape == (37, 53)]
    n, p = len(ms), 500
    x = rng.uniform(-3, 56, (n, p)).astype(np.float32)
    y = rng.uniform(-3, 40, (n, p)).astype(np.float32)
    # pixel centres (exact pixel values), pixel corners, the image border and far outside
    x[:, :4] = [0.5, 52.5, 0.0, -100.0]
    y[:, :4] = [0.5, 36.5, 37.0, 5.0]
    counts = masks.rle_counts(tf.constant([masks.encode_mask(m) for m in ms]))
    values = masks.sample_masks(counts, 37, 53, tf.constant(x), tf.constant(y)).numpy()
    for k, m in enumerate(ms):
        np.testing.assert_allclose(values[k], bilinear_sample(m, x[k], y[k]), atol=1e-6)
        assert values[k, 0] == m[0, 0] and values[k, 1] == m[36, 52] and values[k, 3] == 0


def test_sample_masks_with_no_masks():
    counts = masks.rle_counts(tf.zeros([0], tf.string))
    values = masks.sample_masks(counts, 4, 5, tf.zeros([0, 7]), tf.zeros([0, 7]))
    assert values.shape == (0, 7)


@pytest.mark.parametrize("index", range(15))
def test_visible_extents_match_numpy_on_random_and_edge_windows(index):
    """Windows inside, across and outside the mask, fractional, zero-size, larger than it and a
    rounding error away from pixel edges (snapped onto them)."""
    mask = _masks()[index]
    h, w = mask.shape
    rng = np.random.default_rng(index)
    windows = [
        (0, 0, w, h),
        (-5.5, -3.25, w + 7.0, h + 2.5),
        (0.5, 0.75, w - 0.25, h - 0.5),
        (w / 2, h / 2, w / 2, h),  # zero width
        (w + 1.0, 0, w + 9.0, h),  # outside
        (w - 0.3, h - 0.6, w + 4.0, h + 4.0),  # the last pixel's corner only
        (0.9996, 0.0004, w - 1.0004, h - 0.9997),  # edges float rounding away from pixel edges
    ]
    for _ in range(20):
        x = np.sort(rng.uniform(-2, w + 2, 2))
        y = np.sort(rng.uniform(-2, h + 2, 2))
        windows.append((x[0], y[0], x[1], y[1]))
    counts = masks.rle_counts(tf.constant([masks.encode_mask(mask)] * len(windows)))
    for k, window in enumerate(windows):
        window = np.float32(window)
        boxes, nonempty = masks.visible_extents(counts[k : k + 1], h, tf.constant(window))
        expected = visible_extent(mask, window)
        assert bool(nonempty[0]) == bool(mask.any())
        x1, y1, x2, y2 = boxes[0].numpy()
        assert (x2 > x1 and y2 > y1) == (expected is not None), (window, expected)
        if expected is None:
            assert not boxes.numpy().any()
        else:
            np.testing.assert_allclose(boxes[0].numpy(), expected, atol=1e-5, err_msg=str(window))


def test_visible_extents_of_no_masks():
    boxes, nonempty = masks.visible_extents(
        masks.rle_counts(tf.zeros([0], tf.string)), 4, tf.constant([0.0, 0.0, 4.0, 4.0])
    )
    assert boxes.shape == (0, 4) and nonempty.shape == (0,)
