"""RLE decoding and mask sampling in TF (mrcnn_jax/data/masks.py) against pycocotools and numpy."""

import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils

from mrcnn_jax.data import masks


def _runs(mask: np.ndarray) -> np.ndarray:
    """Reference run lengths: column-major, first run = background (COCO uncompressed RLE)."""
    flat = mask.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    return np.concatenate([[0], runs]) if flat[0] else runs


def _sample_reference(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear value of a zero-extended mask at points (x, y); pixel centres at k + 0.5."""
    padded = np.pad(mask.astype(np.float64), 1)  # padded[r + 1, c + 1] = mask[r, c]
    u, v = x.astype(np.float64) + 0.5, y.astype(np.float64) + 0.5  # (x - 0.5) + 1 for the pad
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    out = np.zeros(x.shape)
    for dc, dr in ((0, 0), (1, 0), (0, 1), (1, 1)):
        c, r = u0 + dc, v0 + dr
        inside = (r >= 0) & (r < padded.shape[0]) & (c >= 0) & (c < padded.shape[1])
        rows = np.clip(r, 0, padded.shape[0] - 1)
        cols = np.clip(c, 0, padded.shape[1] - 1)
        weight = (1 - np.abs(u - c)) * (1 - np.abs(v - r))
        out += weight * np.where(inside, padded[rows, cols], 0.0)
    return out


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
def test_rle_counts_matches_pycocotools_runs(index):
    mask = _masks()[index]
    rle = masks.encode_mask(mask)
    assert np.array_equal(masks.decode_mask(rle, *mask.shape), mask)
    counts = masks.rle_counts(tf.constant([rle]))
    np.testing.assert_array_equal(counts[0].numpy(), _runs(mask))


def test_rle_counts_batch_of_different_lengths_and_empty_batch():
    ms = [m for m in _masks() if m.shape == (37, 53)]
    counts = masks.rle_counts(tf.constant([masks.encode_mask(m) for m in ms]))
    assert counts.shape[0] == len(ms)
    for row, m in zip(counts, ms):
        np.testing.assert_array_equal(row.numpy(), _runs(m))
    assert masks.rle_counts(tf.zeros([0], tf.string)).shape[0] == 0


def test_rle_counts_reads_rles_made_by_pycocotools_from_polygons():
    rle = mask_utils.merge(mask_utils.frPyObjects([[3, 4, 90, 10, 50, 70, 8, 60]], 80, 100))
    counts = masks.rle_counts(tf.constant([rle["counts"]]))[0].numpy()
    np.testing.assert_array_equal(counts, _runs(mask_utils.decode(rle)))


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
        np.testing.assert_allclose(values[k], _sample_reference(m, x[k], y[k]), atol=1e-6)
        assert values[k, 0] == m[0, 0] and values[k, 1] == m[36, 52] and values[k, 3] == 0


def test_sample_masks_with_no_masks():
    counts = masks.rle_counts(tf.zeros([0], tf.string))
    values = masks.sample_masks(counts, 4, 5, tf.zeros([0, 7]), tf.zeros([0, 7]))
    assert values.shape == (0, 7)
