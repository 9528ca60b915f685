"""Tests for mrcnn_jax.ops.nms against a plain numpy greedy NMS and torchvision."""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops.nms import batched_nms, nms

jit_nms = jax.jit(nms, static_argnames="max_output")
jit_batched_nms = jax.jit(batched_nms, static_argnames="max_output")


# [n, 4] float32 boxes, dense enough that many pairs overlap.
random_boxes = functools.partial(helpers.random_boxes, extent=100.0, min_wh=2.0, max_wh=40.0)


def edge_boxes() -> np.ndarray:
    """Zero-width, point, sub-pixel, huge, outside-the-image, duplicate and nested boxes."""
    return np.array(
        [
            [10, 10, 10, 30],
            [10, 10, 10, 10],
            [5.2, 5.2, 5.6, 5.5],
            [5.2, 5.2, 5.6, 5.5],
            [-1e4, -1e4, 1e4, 1e4],
            [-50, -50, -10, -10],
            [-45, -45, -10, -10],
            [90, 90, 150, 150],
            [0, 0, 20, 20],
            [0, 0, 20, 20],
            [1, 1, 21, 21],
            [10, 10, 30, 30],
        ],
        dtype=np.float32,
    )


def numpy_iou(boxes: np.ndarray) -> np.ndarray:
    """[N, N] float32 IoU with torchvision's nms kernel formula; 0 where the union is 0."""
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    wh = np.maximum(rb - lt, np.float32(0))
    inter = wh[..., 0] * wh[..., 1]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[:, None] + area[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.float32(0))


def numpy_nms(boxes, scores, threshold, valid=None, groups=None) -> list[int]:
    """Plain greedy NMS: visit by (-score, index), keep unless a kept box of the group overlaps."""
    n = len(boxes)
    candidates = [
        i
        for i in range(n)
        if not np.isnan(scores[i]) and scores[i] > -np.inf and (valid is None or valid[i])
    ]
    iou = numpy_iou(boxes)
    keep: list[int] = []
    for i in sorted(candidates, key=lambda i: (-scores[i], i)):
        same_group = [groups is None or groups[k] == groups[i] for k in keep]
        if not any(iou[k, i] > threshold and same for k, same in zip(keep, same_group)):
            keep.append(i)
    return keep


def assert_result(result, expected: list[int], max_output: int) -> None:
    """The padded (indices, valid) output equals the first max_output kept indices."""
    indices, valid = (np.asarray(x) for x in result)
    assert indices.shape == valid.shape == (max_output,)
    assert indices.dtype == np.int32 and valid.dtype == np.bool_
    expected = expected[:max_output]
    k = len(expected)
    np.testing.assert_array_equal(valid, np.arange(max_output) < k)
    np.testing.assert_array_equal(indices[:k], expected)
    np.testing.assert_array_equal(indices[k:], 0)


@pytest.mark.parametrize("n", [1, 37, 300])
@pytest.mark.parametrize("threshold", [-0.1, 0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_nms_matches_numpy_on_random_boxes(n, threshold):
    rng = np.random.default_rng(n)
    boxes = random_boxes(rng, n)
    scores = rng.random(n).astype(np.float32)
    expected = numpy_nms(boxes, scores, threshold)
    # The threshold is traced: one compile per (n, max_output) serves every threshold.
    for max_output in sorted({1, max(1, n // 10), n + 5}):
        assert_result(
            jit_nms(boxes, scores, threshold, max_output=max_output), expected, max_output
        )


def test_nms_edge_boxes_and_invalid_scores():
    boxes = edge_boxes()
    n = len(boxes)
    scores = np.linspace(1, 0, n, dtype=np.float32)[np.random.default_rng(0).permutation(n)]
    scores[[2, 5]] = [np.nan, -np.inf]
    scores[7] = np.inf
    valid = np.ones(n, bool)
    valid[9] = False
    for threshold in (0.0, 0.3, 0.5, 0.9):
        expected = numpy_nms(boxes, scores, threshold, valid)
        assert 2 not in expected and 5 not in expected and 9 not in expected
        assert expected[0] == 7
        assert_result(jit_nms(boxes, scores, threshold, 20, valid), expected, 20)
        assert_result(
            nms(jnp.asarray(boxes), jnp.asarray(scores), threshold, 20, valid), expected, 20
        )
    # Zero-area boxes never suppress, even at threshold 0 and with themselves duplicated.
    points = np.array([[3, 3, 3, 3]] * 3 + [[3, 3, 3, 9]], np.float32)
    assert_result(jit_nms(points, np.ones(4, np.float32), 0.0, 6), [0, 1, 2, 3], 6)


def test_nms_all_invalid_inputs():
    rng = np.random.default_rng(1)
    boxes = random_boxes(rng, 16)
    scores = rng.random(16).astype(np.float32)
    assert_result(jit_nms(boxes, scores, 0.5, 8, np.zeros(16, bool)), [], 8)
    bad = np.where(np.arange(16) % 2 == 0, -np.inf, np.nan).astype(np.float32)
    assert_result(jit_nms(boxes, bad, 0.5, 8), [], 8)
    # All-padding boxes (zeros) with valid False, as the RPN's padded proposals.
    assert_result(
        jit_nms(np.zeros((5, 4), np.float32), np.zeros(5), 0.7, 3, np.zeros(5, bool)), [], 3
    )


def test_nms_single_and_empty_inputs():
    box = np.array([[1, 2, 3, 4]], np.float32)
    assert_result(jit_nms(box, np.array([0.3], np.float32), 0.5, 4), [0], 4)
    assert_result(jit_nms(box, np.array([0.3], np.float32), 0.5, 4, np.array([False])), [], 4)
    assert_result(nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 3), [], 3)


def test_nms_ties_broken_by_lower_index():
    same = np.array([[0, 0, 10, 10]] * 4, np.float32)
    # Identical boxes and tied top scores: the lowest index among the top scores survives.
    assert_result(jit_nms(same, np.array([0.5, 0.9, 0.5, 0.9], np.float32), 0.5, 4), [1], 4)
    # Disjoint boxes: order is decreasing score, then increasing index; -0.0 ties with 0.0.
    disjoint = np.array([[20 * i, 0, 20 * i + 10, 10] for i in range(6)], np.float32)
    scores = np.array([0.0, 0.5, -0.0, 0.9, 0.5, 0.0], np.float32)
    assert_result(jit_nms(disjoint, scores, 0.5, 6), [3, 1, 4, 0, 2, 5], 6)
    assert numpy_nms(disjoint, scores, 0.5) == [3, 1, 4, 0, 2, 5]
    # Many ties among random overlapping boxes (scores on a coarse grid).
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, 200)
    scores = rng.integers(0, 5, 200).astype(np.float32) / 4
    for threshold in (0.3, 0.7):
        assert_result(
            jit_nms(boxes, scores, threshold, 200), numpy_nms(boxes, scores, threshold), 200
        )


def test_nms_iou_equal_to_threshold_does_not_suppress():
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)  # IoU exactly 0.5
    scores = np.array([0.9, 0.8], np.float32)
    assert_result(jit_nms(boxes, scores, 0.5, 2), [0, 1], 2)
    assert_result(jit_nms(boxes, scores, 0.49, 2), [0], 2)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, 0.9])
def test_nms_and_batched_nms_identical_to_torchvision(threshold):
    torchvision = pytest.importorskip("torchvision")
    import torch

    rng = np.random.default_rng(int(threshold * 10))
    boxes = np.concatenate([random_boxes(rng, 400), edge_boxes()[[2, 4, 5, 6, 7, 8, 10, 11]]])
    n = len(boxes)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: torch's sort is not stable
    groups = rng.integers(0, 4, n).astype(np.int32)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)

    expected = torchvision.ops.nms(tb, ts, threshold).tolist()
    assert_result(jit_nms(boxes, scores, threshold, n), expected, n)
    assert_result(jit_nms(boxes, scores, threshold, 50), expected, 50)

    expected = torchvision.ops.batched_nms(tb, ts, torch.from_numpy(groups), threshold).tolist()
    assert_result(jit_batched_nms(boxes, scores, groups, threshold, n), expected, n)
    assert expected == numpy_nms(boxes, scores, threshold, groups=groups)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8])
def test_batched_nms_matches_numpy(threshold):
    rng = np.random.default_rng(3)
    boxes = np.concatenate([random_boxes(rng, 150), edge_boxes()])
    n = len(boxes)
    scores = rng.integers(0, 20, n).astype(np.float32) / 19  # with ties
    scores[:3] = [np.nan, -np.inf, np.inf]
    groups = rng.integers(-2, 3, n).astype(np.int32)
    valid = rng.random(n) > 0.1
    expected = numpy_nms(boxes, scores, threshold, valid, groups)
    for max_output in (7, n):
        assert_result(
            jit_batched_nms(boxes, scores, groups, threshold, max_output, valid),
            expected,
            max_output,
        )
    # One group is plain NMS; a group per box keeps every candidate.
    assert_result(
        jit_batched_nms(boxes, scores, np.zeros(n, np.int32), threshold, n, valid),
        numpy_nms(boxes, scores, threshold, valid),
        n,
    )
    assert_result(
        jit_batched_nms(boxes, scores, np.arange(n, dtype=np.int32), threshold, n, valid),
        numpy_nms(boxes, scores, 2.0, valid),
        n,
    )


def test_nms_vmapped_over_images_and_thresholds():
    rng = np.random.default_rng(4)
    batch, n, max_output = 4, 120, 40
    boxes = np.stack([random_boxes(rng, n) for _ in range(batch)])
    scores = rng.random((batch, n)).astype(np.float32)
    valid = rng.random((batch, n)) < np.array([1.0, 0.5, 0.0, 0.9])[:, None]
    thresholds = np.array([0.5, 0.3, 0.7, 0.9], np.float32)
    groups = rng.integers(0, 3, (batch, n)).astype(np.int32)

    run = jax.jit(jax.vmap(lambda b, s, t, v: nms(b, s, t, max_output, v)))
    result = run(boxes, scores, thresholds, valid)
    run_batched = jax.jit(jax.vmap(lambda b, s, g, t, v: batched_nms(b, s, g, t, max_output, v)))
    result_batched = run_batched(boxes, scores, groups, thresholds, valid)
    for b in range(batch):
        expected = numpy_nms(boxes[b], scores[b], thresholds[b], valid[b])
        assert_result((result[0][b], result[1][b]), expected, max_output)
        expected = numpy_nms(boxes[b], scores[b], thresholds[b], valid[b], groups[b])
        assert_result((result_batched[0][b], result_batched[1][b]), expected, max_output)
    assert not np.asarray(result[1][2]).any()


def test_bad_static_arguments_raise():
    boxes, scores = jnp.zeros((3, 4)), jnp.zeros(3)
    for bad in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="max_output"):
            nms(boxes, scores, 0.5, bad)
    with pytest.raises(ValueError, match="boxes"):
        nms(jnp.zeros((3, 5)), scores, 0.5, 2)
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, jnp.zeros(4), 0.5, 2)
    with pytest.raises(ValueError, match="valid"):
        nms(boxes, scores, 0.5, 2, jnp.ones((3, 1), bool))
    with pytest.raises(ValueError, match="groups"):
        batched_nms(boxes, scores, jnp.zeros(2, jnp.int32), 0.5, 2)


def test_numpy_arrays_are_taken_as_jax_arrays():
    """numpy boxes, scores and groups: the sorted boxes stayed numpy and were indexed by the
    loop's traced index (TracerArrayConversionError)."""
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 50, (20, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(5, 30, (20, 2))], 1).astype(np.float32)
    scores = rng.permutation(20).astype(np.float32) / 20  # distinct
    groups = rng.integers(0, 3, 20).astype(np.int32)
    want = nms(jnp.asarray(boxes), jnp.asarray(scores), 0.3, 8)
    for got, expected in zip(nms(boxes, scores, 0.3, 8), want):
        np.testing.assert_array_equal(got, expected)
    want = batched_nms(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(groups), 0.3, 8)
    for got, expected in zip(batched_nms(boxes, scores, groups, 0.3, 8), want):
        np.testing.assert_array_equal(got, expected)
