"""Tests for mrcnn_jax.ops.boxes against plain numpy and torchvision."""

import functools
import math

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops.boxes import smooth_l1

WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]


# [n, 4] float32 boxes with top-left corners in [0, 100) and sizes in [1, 40).
random_boxes = functools.partial(helpers.random_boxes, extent=100.0, min_wh=1.0, max_wh=40.0)


def edge_boxes() -> np.ndarray:
    """Zero-width, zero-area, sub-pixel, huge, outside-the-image and identical boxes."""
    return np.array(
        [
            [10, 10, 10, 30],  # zero width
            [10, 10, 10, 10],  # a point
            [5.2, 5.2, 5.6, 5.5],  # smaller than a pixel
            [-1e4, -1e4, 1e4, 1e4],  # huge
            [-50, -50, -10, -10],  # wholly outside the image
            [90, 90, 150, 150],  # partly outside
            [0, 0, 20, 20],
            [0, 0, 20, 20],  # duplicate
            [10, 10, 30, 30],
        ],
        dtype=np.float32,
    )


def numpy_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU with explicit loops, float32 arithmetic, 0 where the union is 0."""
    out = np.zeros((len(boxes1), len(boxes2)), np.float32)
    for i, a in enumerate(boxes1):
        for j, b in enumerate(boxes2):
            w = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
            h = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
            inter = w * h
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            out[i, j] = inter / union if union > 0 else 0
    return out


def numpy_encode(boxes: np.ndarray, reference: np.ndarray, weights) -> np.ndarray:
    """Faster R-CNN deltas in float64 from the formulas of the paper's appendix."""
    boxes, reference = boxes.astype(np.float64), reference.astype(np.float64)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    rcx, rcy = reference[:, 0] + rw / 2, reference[:, 1] + rh / 2
    wx, wy, ww, wh = weights
    return np.stack(
        [wx * (cx - rcx) / rw, wy * (cy - rcy) / rh, ww * np.log(w / rw), wh * np.log(h / rh)], 1
    )


def numpy_decode(deltas: np.ndarray, reference: np.ndarray, weights, clamp: float) -> np.ndarray:
    """Inverse of numpy_encode in float64, with dw/dh clamped from above at `clamp`."""
    deltas, reference = deltas.astype(np.float64), reference.astype(np.float64)
    rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    rcx, rcy = reference[:, 0] + rw / 2, reference[:, 1] + rh / 2
    wx, wy, ww, wh = weights
    cx = deltas[:, 0] / wx * rw + rcx
    cy = deltas[:, 1] / wy * rh + rcy
    w = np.exp(np.minimum(deltas[:, 2] / ww, clamp)) * rw
    h = np.exp(np.minimum(deltas[:, 3] / wh, clamp)) * rh
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def test_box_area_and_min_size_mask():
    boxes = edge_boxes()
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    np.testing.assert_array_equal(box_ops.box_area(jnp.asarray(boxes)), widths * heights)
    for min_size in (0.0, 0.3, 1.0, 20.0):
        expected = (widths >= min_size) & (heights >= min_size)
        np.testing.assert_array_equal(box_ops.min_size_mask(jnp.asarray(boxes), min_size), expected)
    # Leading dims broadcast.
    stacked = jnp.asarray(np.stack([boxes, boxes[::-1]]))
    assert box_ops.box_area(stacked).shape == (2, len(boxes))
    assert box_ops.min_size_mask(stacked, 1.0).shape == (2, len(boxes))


@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (40, 25)])
def test_pairwise_iou_matches_numpy(n, m):
    rng = np.random.default_rng(n * 100 + m)
    boxes1 = np.concatenate([random_boxes(rng, n), edge_boxes()])
    boxes2 = np.concatenate([edge_boxes(), random_boxes(rng, m)])
    iou = np.asarray(jax.jit(box_ops.pairwise_iou)(boxes1, boxes2))
    expected = numpy_iou(boxes1, boxes2)
    assert iou.shape == (len(boxes1), len(boxes2))
    assert np.isfinite(iou).all()
    np.testing.assert_allclose(iou, expected, rtol=1e-6, atol=1e-7)
    # Known values: identical boxes, point/zero-width boxes, a box inside the huge one.
    edge = numpy_iou(edge_boxes(), edge_boxes())
    assert edge[6, 7] == 1 and edge[0, 0] == 0 and edge[1, 1] == 0 and edge[0, 1] == 0
    np.testing.assert_allclose(edge[6, 8], 100 / 700)


def test_pairwise_iou_batched_leading_dims():
    rng = np.random.default_rng(1)
    boxes1 = np.stack([random_boxes(rng, 5) for _ in range(3)])
    boxes2 = np.stack([random_boxes(rng, 4) for _ in range(3)])
    iou = box_ops.pairwise_iou(jnp.asarray(boxes1), jnp.asarray(boxes2))
    for b in range(3):
        np.testing.assert_allclose(iou[b], numpy_iou(boxes1[b], boxes2[b]), rtol=1e-6, atol=1e-7)


def test_pairwise_iou_gradient_is_finite_for_degenerate_boxes():
    boxes = jnp.asarray(edge_boxes())

    def total_iou(b1, b2):
        return box_ops.pairwise_iou(b1, b2).sum()

    g1, g2 = jax.grad(total_iou, argnums=(0, 1))(boxes, boxes)
    assert np.isfinite(np.asarray(g1)).all() and np.isfinite(np.asarray(g2)).all()
    # Two identical points: union 0, IoU 0, gradient exactly 0.
    point = jnp.asarray([[3.0, 3.0, 3.0, 3.0]])
    assert float(box_ops.pairwise_iou(point, point)[0, 0]) == 0
    np.testing.assert_array_equal(jax.grad(total_iou)(point, point), np.zeros((1, 4)))


def test_pairwise_iou_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    import torch

    rng = np.random.default_rng(2)
    boxes1 = np.concatenate([random_boxes(rng, 50), edge_boxes()[2:]])  # torch gives NaN at 0/0
    boxes2 = random_boxes(rng, 60)
    expected = torchvision.ops.box_iou(torch.from_numpy(boxes1), torch.from_numpy(boxes2)).numpy()
    iou = np.asarray(jax.jit(box_ops.pairwise_iou)(boxes1, boxes2))
    np.testing.assert_allclose(iou, expected, rtol=1e-6, atol=1e-7)


def test_safe_divide_values_and_gradients():
    num = jnp.asarray([1.0, 2.0, 0.0, 3.0])
    den = jnp.asarray([2.0, 0.0, 0.0, -1.0])
    np.testing.assert_array_equal(box_ops.safe_divide(num, den), [0.5, 0.0, 0.0, 0.0])
    g_num, g_den = jax.grad(lambda a, b: box_ops.safe_divide(a, b).sum(), argnums=(0, 1))(num, den)
    np.testing.assert_array_equal(g_num, [0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(g_den, [-0.25, 0.0, 0.0, 0.0])


def coding_pair(seed: int, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, reference) including huge, sub-pixel and far-away pairs."""
    rng = np.random.default_rng(seed)
    boxes = np.concatenate([random_boxes(rng, n), edge_boxes()[2:]])
    reference = np.concatenate([random_boxes(rng, n), edge_boxes()[[3, 2, 2, 3, 6, 8, 6]]])
    return boxes, reference


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_decode_match_numpy_and_round_trip(weights):
    boxes, reference = coding_pair(3)
    deltas = jax.jit(lambda b, r: box_ops.encode_boxes(b, r, weights))(boxes, reference)
    expected = numpy_encode(boxes, reference, weights)
    np.testing.assert_allclose(deltas, expected, rtol=1e-5, atol=1e-5)
    decoded = box_ops.decode_boxes(deltas, jnp.asarray(reference), weights)
    expected = numpy_decode(np.asarray(deltas), reference, weights, math.log(1000 / 16))
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-3)
    # Round trip where no clamp is hit (the 1e4-pixel box vs the 0.4-pixel one is clamped).
    unclamped = np.abs(numpy_encode(boxes, reference, weights)[:, 2:] / weights[2:]).max(1) < 4
    np.testing.assert_allclose(
        np.asarray(decoded)[unclamped], boxes[unclamped], rtol=1e-5, atol=1e-3
    )
    assert not unclamped.all()


def test_decode_clamps_huge_deltas_and_broadcasts():
    reference = jnp.asarray([[0.0, 0.0, 16.0, 8.0]])
    deltas = jnp.asarray([[[0.0, 0.0, 100.0, 1e30], [0.0, 0.0, -100.0, 4.0]]])  # [1, 2, 4]
    decoded = box_ops.decode_boxes(deltas, reference[:, None], (1, 1, 1, 1))
    assert decoded.shape == (1, 2, 4)
    np.testing.assert_allclose(decoded[0, 0], [8 - 500, 4 - 250, 8 + 500, 4 + 250], rtol=1e-5)
    assert np.isfinite(np.asarray(decoded)).all()
    # Negative dw is not clamped: the box collapses onto its centre.
    np.testing.assert_allclose(decoded[0, 1, [0, 2]], [8.0, 8.0], atol=1e-6)
    custom = box_ops.decode_boxes(deltas[0], reference, scale_clamp=1.0)
    np.testing.assert_allclose(custom[0, 2] - custom[0, 0], 16 * math.e, rtol=1e-6)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_encode_decode_match_torchvision_box_coder(weights):
    pytest.importorskip("torchvision")
    import torch
    from torchvision.models.detection._utils import BoxCoder

    boxes, reference = coding_pair(4)
    coder = BoxCoder(weights)
    expected = coder.encode_single(torch.from_numpy(boxes), torch.from_numpy(reference)).numpy()
    deltas = np.asarray(jax.jit(lambda b, r: box_ops.encode_boxes(b, r, weights))(boxes, reference))
    np.testing.assert_allclose(deltas, expected, rtol=1e-6, atol=1e-6)

    rng = np.random.default_rng(5)
    raw = rng.normal(0, 2, (len(reference), 4)).astype(np.float32)
    raw[:4, 2:] = [[100, -100], [1e6, 1e6], [-50, 30], [9, 9]]  # hit the log(1000/16) clamp
    expected = coder.decode_single(torch.from_numpy(raw), torch.from_numpy(reference)).numpy()
    decoded = np.asarray(jax.jit(lambda d, r: box_ops.decode_boxes(d, r, weights))(raw, reference))
    np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-4)
    assert np.isfinite(decoded).all()


def test_clip_boxes_matches_numpy_and_traces_image_size():
    rng = np.random.default_rng(6)
    boxes = np.concatenate([rng.uniform(-100, 300, (30, 4)), edge_boxes()]).astype(np.float32)
    height, width = 120, 200
    expected = boxes.copy()
    expected[:, 0::2] = np.minimum(np.maximum(boxes[:, 0::2], 0), width)
    expected[:, 1::2] = np.minimum(np.maximum(boxes[:, 1::2], 0), height)
    np.testing.assert_array_equal(box_ops.clip_boxes(jnp.asarray(boxes), (height, width)), expected)
    # A traced per-image size inside vmap.
    sizes = jnp.asarray([[height, width], [50, 60]], jnp.int32)
    clipped = jax.jit(jax.vmap(box_ops.clip_boxes, in_axes=(None, 0)))(jnp.asarray(boxes), sizes)
    np.testing.assert_array_equal(clipped[0], expected)
    assert float(clipped[1, :, 0::2].max()) == 60 and float(clipped[1, :, 1::2].max()) == 50
    assert clipped.dtype == jnp.float32


def test_clip_boxes_matches_torchvision():
    torchvision = pytest.importorskip("torchvision")
    import torch

    boxes = np.random.default_rng(7).uniform(-100, 300, (50, 4)).astype(np.float32)
    expected = torchvision.ops.clip_boxes_to_image(torch.from_numpy(boxes), (90, 130)).numpy()
    np.testing.assert_array_equal(box_ops.clip_boxes(jnp.asarray(boxes), (90, 130)), expected)


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9.0, 1.0, 2.5])
def test_smooth_l1_matches_torch(beta):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(0, 2, 200), [0.0, beta, -beta, beta * 0.999, -beta * 1.001, 1e-7, -3.0]]
    ).astype(np.float32)
    want = torch.nn.functional.smooth_l1_loss(
        torch.as_tensor(x), torch.zeros(len(x)), reduction="none", beta=beta
    ).numpy()
    np.testing.assert_allclose(jax.jit(smooth_l1, static_argnums=1)(x, beta), want, rtol=1e-6)
    grad = jax.vmap(jax.grad(smooth_l1), in_axes=(0, None))(x, beta)
    assert np.isfinite(grad).all()


def test_bad_static_arguments_raise():
    boxes = jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="weights"):
        box_ops.encode_boxes(boxes, boxes, (1, 1, 1))
    with pytest.raises(ValueError, match="weights"):
        box_ops.decode_boxes(boxes, boxes, (1, 1, 0, 1))
    with pytest.raises(ValueError, match="image_size"):
        box_ops.clip_boxes(boxes, (1, 2, 3))


def test_iou_of_large_half_precision_boxes_is_computed_in_float32():
    """float16 areas overflow past 255² pixels: IoU of two equal 300-px boxes was 0 (inf - inf
    in the union), so NMS kept duplicates. Computed in float32, returned in the boxes' dtype;
    integer boxes give float32."""
    from mrcnn_jax.ops.nms import nms

    boxes = np.array([[0, 0, 300, 300], [1, 1, 301, 301], [500, 500, 520, 520]], np.float32)
    want = np.array(box_ops.pairwise_iou(jnp.asarray(boxes), jnp.asarray(boxes)))
    assert math.isclose(want[0, 1], 299**2 / (2 * 300**2 - 299**2), rel_tol=1e-6)
    for dtype in (jnp.float16, jnp.bfloat16):
        got = box_ops.pairwise_iou(jnp.asarray(boxes, dtype), jnp.asarray(boxes, dtype))
        assert got.dtype == dtype
        np.testing.assert_allclose(np.float32(got), want, atol=8e-3)  # bfloat16: 2**-7 steps
        scores = jnp.asarray([0.9, 0.8, 0.7], dtype)
        keep, valid = nms(jnp.asarray(boxes, dtype), scores, 0.5, 3)
        assert keep[valid].tolist() == [0, 2]
    integers = box_ops.pairwise_iou(boxes.astype(np.int32), boxes.astype(np.int32))
    assert integers.dtype == jnp.float32
    np.testing.assert_allclose(integers, want, rtol=1e-6)
