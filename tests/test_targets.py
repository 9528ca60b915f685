"""Training-target ops (`mrcnn_jax.ops.targets`) against torchvision and plain numpy references.

Covers match_boxes, label_anchors, sample_balanced, bilinear_weights and mask_targets; the stage
functions built on them are tested in test_rpn.py (`generate_proposals`, `rpn_losses`) and
test_roi_heads.py (`sample_rois`, `detect_boxes`, `fast_rcnn_loss`, `mask_loss`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_boxes
from references import numpy_iou

from mrcnn_jax.ops import targets

FG_IOU, BG_IOU = 0.7, 0.3

jit_label_anchors = jax.jit(targets.label_anchors, static_argnames=("fg_iou", "bg_iou"))
jit_sample_balanced = jax.jit(
    targets.sample_balanced, static_argnames=("batch_size", "positive_fraction")
)
jit_mask_targets = jax.jit(targets.mask_targets, static_argnames=("output_size", "sampling_ratio"))


# --------------------------------------------------------------------------- label_anchors


def torchvision_anchor_labels(anchors, gt_boxes, fg_iou=FG_IOU, bg_iou=BG_IOU):
    """torchvision `Matcher(allow_low_quality_matches=True)` in our convention.

    Returns labels (1 / 0 / -1) and the matched GT index of the positives (-1 elsewhere)."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection._utils import Matcher
    from torchvision.ops import box_iou

    iou = box_iou(torch.as_tensor(gt_boxes), torch.as_tensor(anchors))
    matches = Matcher(fg_iou, bg_iou, allow_low_quality_matches=True)(iou).numpy()
    labels = np.where(matches >= 0, 1, np.where(matches == -1, 0, -1))
    return labels, np.where(matches >= 0, matches, -1)


def check_label_anchors(anchors, gt_boxes, gt_valid, *, ignore_gt=()):
    """Ours on the padded GT == torchvision on the valid GT rows (minus `ignore_gt` rows)."""
    labels, gt_index = jit_label_anchors(anchors, gt_boxes, gt_valid, fg_iou=FG_IOU, bg_iou=BG_IOU)
    labels, gt_index = np.asarray(labels), np.asarray(gt_index)
    rows = np.array([i for i in np.flatnonzero(gt_valid) if i not in ignore_gt], dtype=int)
    if len(rows):
        want_labels, want_match = torchvision_anchor_labels(anchors, gt_boxes[rows])
    else:
        want_labels, want_match = np.zeros(len(anchors), int), np.full(len(anchors), -1)
    np.testing.assert_array_equal(labels, want_labels)
    positive = want_labels == 1
    np.testing.assert_array_equal(gt_index[positive], rows[want_match[positive]])
    return labels, gt_index


@pytest.mark.parametrize("seed", range(4))
def test_label_anchors_matches_torchvision_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    anchors = random_boxes(rng, 300, extent=80, min_wh=4, max_wh=40)
    gt_boxes = random_boxes(rng, 6, extent=70, min_wh=8, max_wh=40)
    gt_valid = np.array([True, True, False, True, True, False])
    # Padding rows hold boxes equal to some anchors: if they leaked in, those would turn positive.
    gt_boxes[~gt_valid] = anchors[:2]
    best = numpy_iou(gt_boxes[gt_valid], anchors).max(axis=1)
    assert (best > 0).all()
    labels, _ = check_label_anchors(anchors, gt_boxes, gt_valid)
    assert set(np.unique(labels)) == {-1, 0, 1}


def test_label_anchors_without_valid_gt_are_all_negative():
    rng = np.random.default_rng(0)
    anchors = random_boxes(rng, 50)
    gt_boxes = anchors[:3].copy()  # Perfect matches, but padding.
    labels, gt_index = check_label_anchors(anchors, gt_boxes, np.zeros(3, bool))
    assert (labels == 0).all() and (gt_index == 0).all()


def test_label_anchors_ignores_a_gt_that_overlaps_no_anchor():
    rng = np.random.default_rng(1)
    anchors = random_boxes(rng, 60, extent=40)
    gt_boxes = np.array([[5, 5, 25, 25], [500, 500, 520, 520], [0, 0, 0, 0]], np.float32)
    gt_valid = np.array([True, True, False])
    assert numpy_iou(gt_boxes[1:2], anchors).max() == 0
    labels, _ = check_label_anchors(anchors, gt_boxes, gt_valid, ignore_gt=(1,))
    assert (labels == 0).sum() > 0
    # Alone, the far GT gives no positive at all (torchvision would make every anchor positive).
    labels, _ = jit_label_anchors(
        anchors, gt_boxes, np.array([False, True, False]), fg_iou=FG_IOU, bg_iou=BG_IOU
    )
    assert (np.asarray(labels) == 0).all()


def test_label_anchors_ties_and_low_quality_matches_keep_the_argmax_gt():
    gt_boxes = np.array(
        [
            [0, 0, 10, 10],
            [5, 0, 15, 10],
            [30, 30, 40, 40],
            [30, 30, 40, 40],
            [0, 0, 1, 1],
            [60, 0, 70, 10],
        ],
        np.float32,
    )
    anchors = np.array(
        [
            [3, 0, 13, 10],  # GT0's best (0.54) but GT1's IoU is higher (0.67): positive, GT1.
            [5, 0, 15, 10.5],  # GT1's best (0.95): positive.
            [30, 30, 40, 50],  # Best (0.5) of the duplicated GT2/GT3, twice: positive, GT2.
            [30, 30, 40, 50],
            [34, 30, 44, 40],  # 0.43 with GT2 and GT3: ignored.
            [60, 60, 70, 70],  # Overlaps nothing: negative.
            [60, 0, 70, 10],  # The perfect match of GT5: positive, and GT5's best.
            [60, 0, 70, 7],  # IoU exactly 0.7 with GT5: positive (fg_iou is inclusive).
            [60, 0, 70, 3],  # IoU exactly 0.3 with GT5: ignored (below bg_iou is negative).
        ],
        np.float32,
    )
    gt_valid = np.array([True, True, True, True, False, True])
    labels, gt_index = check_label_anchors(anchors, gt_boxes, gt_valid)
    np.testing.assert_array_equal(labels, [1, 1, 1, 1, -1, 0, 1, 1, -1])
    np.testing.assert_array_equal(gt_index[[0, 1, 2, 3, 6, 7]], [1, 1, 2, 2, 5, 5])


# --------------------------------------------------------------------------- match_boxes


@pytest.mark.parametrize("valid", [[True, False, True, True], [False] * 4])
def test_match_boxes_against_numpy(valid):
    rng = np.random.default_rng(2)
    boxes, gt_boxes = random_boxes(rng, 40), random_boxes(rng, 4)
    valid = np.array(valid)
    matches = jax.jit(targets.match_boxes)(boxes, gt_boxes, valid)
    iou = np.where(valid[:, None], numpy_iou(gt_boxes, boxes), -1.0)
    np.testing.assert_array_equal(matches.gt_index, np.argmax(iou, axis=0))
    np.testing.assert_allclose(matches.iou, iou.max(axis=0), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sample_balanced


def candidate_masks(rng, n, num_pos, num_neg):
    """Disjoint random positive/negative masks over n candidates (the rest ignored)."""
    order = rng.permutation(n)
    positive, negative = np.zeros(n, bool), np.zeros(n, bool)
    positive[order[:num_pos]] = True
    negative[order[num_pos : num_pos + num_neg]] = True
    return positive, negative


@pytest.mark.parametrize(
    "n, num_pos, num_neg, batch_size, fraction",
    [
        (100, 30, 50, 32, 0.25),  # Enough of both: 8 positives, 24 negatives.
        (100, 3, 50, 32, 0.25),  # Few positives: negatives fill up.
        (100, 30, 5, 32, 0.5),  # Few negatives: padding at the end.
        (100, 0, 60, 16, 0.5),  # No positive.
        (100, 40, 0, 16, 0.5),  # No negative.
        (100, 0, 0, 8, 0.5),  # Nothing to sample.
        (10, 4, 5, 16, 1.0),  # Batch larger than the candidate array.
        # 10 * 0.25 = 2.5: int() gives 2 positives, but so would round() (half to even).
        (50, 20, 20, 10, 0.25),
        (50, 20, 20, 6, 0.25),  # 6 * 0.25 = 1.5: int() gives 1 positive, round() would give 2.
    ],
)
def test_sample_balanced_counts_and_membership(n, num_pos, num_neg, batch_size, fraction):
    rng = np.random.default_rng(n + num_pos + num_neg)
    positive, negative = candidate_masks(rng, n, num_pos, num_neg)
    sample = jit_sample_balanced(
        jax.random.key(3), positive, negative, batch_size=batch_size, positive_fraction=fraction
    )
    indices, is_pos, valid = (np.asarray(a) for a in sample[:3])
    p = min(num_pos, int(batch_size * fraction))
    q = min(num_neg, batch_size - p)
    assert indices.shape == (batch_size,) and indices.dtype == np.int32
    assert int(sample.num_positive) == p
    np.testing.assert_array_equal(is_pos, np.arange(batch_size) < p)
    np.testing.assert_array_equal(valid, np.arange(batch_size) < p + q)
    assert positive[indices[:p]].all()
    assert negative[indices[p : p + q]].all()
    assert len(set(indices[: p + q].tolist())) == p + q
    assert ((indices >= 0) & (indices < n)).all()


def test_sample_balanced_is_deterministic_per_key_and_varies_across_keys():
    positive, negative = candidate_masks(np.random.default_rng(4), 200, 40, 120)
    draw = lambda seed: np.asarray(
        jit_sample_balanced(
            jax.random.key(seed), positive, negative, batch_size=32, positive_fraction=0.25
        ).indices
    )
    np.testing.assert_array_equal(draw(0), draw(0))
    first = draw(0)
    for seed in (1, 2):
        other = draw(seed)
        assert set(other[:8].tolist()) != set(first[:8].tolist())
        assert set(other[8:].tolist()) != set(first[8:].tolist())


def test_sample_balanced_draws_uniformly():
    n, draws = 30, 3000
    positive, negative = candidate_masks(np.random.default_rng(5), n, 10, 12)
    sample = jax.jit(
        jax.vmap(lambda key: targets.sample_balanced(key, positive, negative, 8, 0.25))
    )(jax.random.split(jax.random.key(6), draws))
    indices, valid = np.asarray(sample.indices), np.asarray(sample.valid)
    counts = np.bincount(indices[valid], minlength=n)
    for mask, per_draw in ((positive, 2), (negative, 6)):
        expected = draws * per_draw / mask.sum()
        chi2 = np.sum((counts[mask] - expected) ** 2 / expected)
        # df = 9 or 11; P(chi2 > 45) < 1e-5 for uniform draws, while a fixed or biased
        # choice (e.g. always the lowest indices) gives chi2 in the thousands.
        assert chi2 < 45, (chi2, counts[mask])
    assert counts[~positive & ~negative].sum() == 0


# --------------------------------------------------------------------------- mask targets


def interpolate_numpy(mask: np.ndarray, y: float, x: float) -> float:
    """Bilinear value of `mask [S, S]` at continuous crop coordinates (pixel centres at +0.5).

    Clamped to the edge pixels inside [0, S]; 0 outside (the `bilinear_weights` docstring)."""
    s = mask.shape[0]
    if not (0 <= y <= s and 0 <= x <= s):
        return 0.0
    py, px = min(max(y - 0.5, 0.0), s - 1.0), min(max(x - 0.5, 0.0), s - 1.0)
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    y1, x1 = min(y0 + 1, s - 1), min(x0 + 1, s - 1)
    fy, fx = py - y0, px - x0
    return (
        (1 - fy) * (1 - fx) * mask[y0, x0]
        + (1 - fy) * fx * mask[y0, x1]
        + fy * (1 - fx) * mask[y1, x0]
        + fy * fx * mask[y1, x1]
    )


def mask_targets_numpy(gt_masks, gt_boxes, rois, output_size, sampling_ratio):
    """Loop reference: RoIAlign sample points of each output pixel, located in the GT crop."""
    r, s = gt_masks.shape[:2]
    out = np.zeros((r, output_size, output_size))
    for k in range(r):
        gx1, gy1, gx2, gy2 = gt_boxes[k].astype(np.float64)
        rx1, ry1, rx2, ry2 = rois[k].astype(np.float64)
        bin_w, bin_h = (rx2 - rx1) / output_size, (ry2 - ry1) / output_size
        for i in range(output_size):
            for j in range(output_size):
                total = 0.0
                for a in range(sampling_ratio):
                    for b in range(sampling_ratio):
                        y = ry1 + (i + (a + 0.5) / sampling_ratio) * bin_h
                        x = rx1 + (j + (b + 0.5) / sampling_ratio) * bin_w
                        # Crop pixel c covers [c, c + 1) of (point - box corner) * S / box side.
                        cy = (y - gy1) * s / (gy2 - gy1)
                        cx = (x - gx1) * s / (gx2 - gx1)
                        total += interpolate_numpy(gt_masks[k], cy, cx)
                out[k, i, j] = total / sampling_ratio**2
    return out


def test_bilinear_weights_against_numpy():
    size = 5
    coords = np.array([-0.5, -1e-4, 0.0, 0.3, 0.5, 1.25, 2.0, 4.5, 4.7, 5.0, 5.0001, 7.0])
    weights = np.asarray(targets.bilinear_weights(jnp.asarray(coords, jnp.float32), size))
    for c, row in zip(coords, weights):
        want = [
            interpolate_numpy(np.eye(size)[:, [v]].T.repeat(size, 0), 1.0, c) for v in range(size)
        ]
        np.testing.assert_allclose(row, want, atol=1e-6, err_msg=f"coordinate {c}")
    assert weights.shape == (len(coords), size)


def random_mask_case(rng, r=5, s=8):
    gt_masks = rng.uniform(size=(r, s, s)).astype(np.float32)
    gt_boxes = random_boxes(rng, r, extent=40, min_wh=4, max_wh=30)
    # RoIs jittered around their GT: partly outside, partly inside, one far outside.
    jitter = rng.uniform(-8, 8, (r, 4)).astype(np.float32)
    rois = gt_boxes + jitter
    rois[:, 2:] = np.maximum(rois[:, 2:], rois[:, :2] + 1)
    rois[-1] = gt_boxes[-1] + np.float32(100)
    return gt_masks, gt_boxes, rois


@pytest.mark.parametrize("output_size, sampling_ratio", [(6, 2), (5, 1), (4, 3)])
def test_mask_targets_against_numpy_loops(output_size, sampling_ratio):
    gt_masks, gt_boxes, rois = random_mask_case(np.random.default_rng(output_size))
    got = jit_mask_targets(
        gt_masks, gt_boxes, rois, output_size=output_size, sampling_ratio=sampling_ratio
    )
    want = mask_targets_numpy(gt_masks, gt_boxes, rois, output_size, sampling_ratio)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.abs(want[-1]).max() == 0  # The far RoI sees nothing.
    assert np.abs(want[:-1]).max() > 0.1


def test_mask_targets_of_the_gt_box_reproduce_the_crop():
    rng = np.random.default_rng(7)
    gt_masks, gt_boxes, _ = random_mask_case(rng, s=6)
    same = jit_mask_targets(gt_masks, gt_boxes, gt_boxes, output_size=6, sampling_ratio=1)
    np.testing.assert_allclose(same, gt_masks, rtol=1e-5, atol=1e-5)
    doubled = jit_mask_targets(gt_masks, gt_boxes, gt_boxes, output_size=12, sampling_ratio=2)
    want = mask_targets_numpy(gt_masks, gt_boxes, gt_boxes, 12, 2)
    np.testing.assert_allclose(doubled, want, rtol=1e-4, atol=1e-5)
    # A full mask stays full inside the GT box and is the covered fraction on a larger RoI.
    ones = np.ones_like(gt_masks)
    np.testing.assert_allclose(
        jit_mask_targets(ones, gt_boxes, gt_boxes, output_size=4, sampling_ratio=2), 1.0, atol=1e-6
    )
    wide = gt_boxes.copy()
    wide[:, 2] += gt_boxes[:, 2] - gt_boxes[:, 0]  # Twice as wide: right half outside.
    got = np.asarray(jit_mask_targets(ones, gt_boxes, wide, output_size=4, sampling_ratio=2))
    np.testing.assert_allclose(got[:, :, :2], 1.0, atol=1e-6)
    np.testing.assert_allclose(got[:, :, 2:], 0.0, atol=1e-6)


def test_mask_targets_of_degenerate_boxes_are_finite():
    rng = np.random.default_rng(8)
    gt_masks, gt_boxes, rois = random_mask_case(rng, r=4)
    rois[0, 2] = rois[0, 0]  # Zero-width RoI.
    rois[1, 1:4:2] = rois[1, 1]  # Zero-height RoI.
    gt_boxes[2, 2] = gt_boxes[2, 0]  # Zero-width GT box,
    rois[2] = gt_boxes[2]  # and its RoI on it.
    gt_boxes[3, 2:] = gt_boxes[3, :2]  # A point GT box.
    got = np.asarray(jit_mask_targets(gt_masks, gt_boxes, rois, output_size=4, sampling_ratio=2))
    assert np.isfinite(got).all() and (got >= 0).all() and (got <= 1 + 1e-6).all()
    want = mask_targets_numpy(gt_masks[:2], gt_boxes[:2], rois[:2], 4, 2)
    np.testing.assert_allclose(got[:2], want, rtol=1e-4, atol=1e-5)


def test_sample_balanced_depends_on_ids_not_on_the_layout():
    """The same candidates (same ids) inside a longer, padded and shuffled array are drawn
    identically: what a canvas-independent sample of anchors needs."""
    rng = np.random.default_rng(7)
    n = 300
    positive = rng.uniform(size=n) < 0.1
    negative = ~positive & (rng.uniform(size=n) < 0.7)
    ids = np.arange(n, dtype=np.int32)
    key = jax.random.key(11)
    sample = jax.jit(targets.sample_balanced, static_argnums=(3, 4))(
        key, positive, negative, 64, 0.25, ids
    )
    # A layout with 200 extra non-candidates and the real candidates shuffled among them.
    order = rng.permutation(n + 200)
    big_pos = np.zeros(n + 200, bool)
    big_neg = np.zeros(n + 200, bool)
    big_ids = np.full(n + 200, -7, np.int32)
    big_pos[order[:n]], big_neg[order[:n]], big_ids[order[:n]] = positive, negative, ids
    moved = jax.jit(targets.sample_balanced, static_argnums=(3, 4))(
        key, big_pos, big_neg, 64, 0.25, big_ids
    )
    valid = np.asarray(sample.valid)
    np.testing.assert_array_equal(valid, np.asarray(moved.valid))
    np.testing.assert_array_equal(
        ids[np.asarray(sample.indices)[valid]], big_ids[np.asarray(moved.indices)[valid]]
    )
    np.testing.assert_array_equal(sample.is_positive, moved.is_positive)
    assert int(sample.num_positive) == min(positive.sum(), 16)


def test_label_anchors_ignores_anchors_outside_the_extent():
    """Invalid anchors get -1 and take no part in the low-quality matches: the labels of the
    valid ones equal those of the valid anchors alone."""
    rng = np.random.default_rng(3)
    anchors = random_boxes(rng, 40)
    gt_boxes = random_boxes(rng, 3)
    gt_valid = np.array([True, True, False])
    valid = rng.uniform(size=40) < 0.6
    labels, match = targets.label_anchors(anchors, gt_boxes, gt_valid, 0.5, 0.3, valid)
    alone, alone_match = targets.label_anchors(anchors[valid], gt_boxes, gt_valid, 0.5, 0.3)
    assert (np.asarray(labels)[~valid] == -1).all()
    np.testing.assert_array_equal(np.asarray(labels)[valid], alone)
    assigned = np.asarray(alone) >= 0
    np.testing.assert_array_equal(
        np.asarray(match)[valid][assigned], np.asarray(alone_match)[assigned]
    )
