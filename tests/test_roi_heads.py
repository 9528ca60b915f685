"""The RoI-heads stage (`mrcnn_jax.modeling.roi_heads`) against torchvision and plain numpy.

Covers `BoxHead`, `MaskHead` (and its `Deconv2x2`), `sample_rois` (torchvision's box coder and
numpy IoU), `detect_boxes` (torchvision's `postprocess_detections`) and the stage losses
`fast_rcnn_loss` and `mask_loss` (numpy), and the mask-head budget (`sample_mask_rois`). The
summed Mask R-CNN loss is tested in test_losses.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_boxes, random_variables
from references import bce_numpy, numpy_iou, smooth_l1_numpy

from mrcnn_jax.modeling.roi_heads import (
    BoxHead,
    MaskHead,
    detect_boxes,
    fast_rcnn_loss,
    mask_loss,
    sample_mask_rois,
    sample_rois,
)

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


# --------------------------------------------------------------------------- box and mask heads


def test_box_head_shapes_and_numerics():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7, 7, 6)).astype(np.float32)
    head = BoxHead(num_classes=3, dim=16)
    params = random_variables(head, rng, x)[0]["params"]
    logits, deltas = head.apply({"params": params}, x)
    assert logits.shape == (5, 4) and deltas.shape == (5, 3, 4)
    assert logits.dtype == deltas.dtype == jnp.float32
    dense = lambda h, name: h @ params[name]["kernel"] + params[name]["bias"]
    h = np.maximum(dense(np.maximum(dense(x.reshape(5, -1), "fc1"), 0), "fc2"), 0)
    np.testing.assert_allclose(logits, dense(h, "cls_score"), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(deltas, dense(h, "bbox_pred").reshape(5, 3, 4), rtol=1e-4, atol=1e-5)


def test_mask_head_predicts_the_requested_class():
    rng = np.random.default_rng(2)
    num_classes = 4
    x = rng.normal(size=(6, 5, 5, 8)).astype(np.float32)
    classes = np.array([0, 3, 1, 1, 2, 3], np.int32)
    head = MaskHead(num_classes=num_classes, dim=12, num_convs=2)
    params = random_variables(head, rng, x, classes)[0]["params"]
    logits, state = head.apply(
        {"params": params}, x, classes, capture_intermediates=lambda m, _: m.name == "deconv"
    )
    assert logits.shape == (6, 10, 10) and logits.dtype == jnp.float32
    # All classes from the deconv output with the full 1x1 predictor, then the requested one.
    deconv = np.maximum(np.asarray(state["intermediates"]["deconv"]["__call__"][0]), 0)
    all_classes = deconv @ params["predictor_kernel"] + params["predictor_bias"]  # [N, 10, 10, K]
    want = all_classes[np.arange(6), :, :, classes]
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - all_classes[..., 0]).max() > 1e-2  # The class choice matters.


def test_deconv2x2_equals_flax_conv_transpose():
    import flax.linen as nn

    from mrcnn_jax.modeling.roi_heads import Deconv2x2

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 6, 4)), jnp.float32)
    reference = nn.ConvTranspose(7, (2, 2), strides=(2, 2))
    variables = reference.init(jax.random.key(0), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.1, variables)  # non-zero bias too
    got = Deconv2x2(7).apply(variables, x)
    np.testing.assert_allclose(got, reference.apply(variables, x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- sample_rois

jit_sample_rois = jax.jit(
    sample_rois,
    static_argnames=("batch_size", "positive_fraction", "fg_iou", "box_reg_weights"),
)


def roi_case(rng, num_valid_gt=3):
    """40 proposals (the last 6 padding) and 5 GT rows (the first `num_valid_gt` valid)."""
    gt_boxes = random_boxes(rng, 5, extent=50, min_wh=10, max_wh=30)
    gt_classes = rng.integers(0, 3, 5).astype(np.int32)
    gt_valid = np.arange(5) < num_valid_gt
    gt_classes[~gt_valid] = -1
    proposals = random_boxes(rng, 40, extent=60, min_wh=4, max_wh=30)
    # Some proposals near the GT so that there is foreground.
    proposals[:8] = np.tile(gt_boxes[:2], (4, 1)) + rng.uniform(-3, 3, (8, 4)).astype(np.float32)
    proposal_valid = np.arange(40) < 34
    # Padding proposals (and invalid GT) sit on the GT: they would be foreground if sampled.
    proposals[34:] = np.tile(gt_boxes[:3], (2, 1)) + np.float32(0.25)
    gt_boxes[num_valid_gt:] = proposals[: 5 - num_valid_gt] + np.float32(0.125)
    return proposals, proposal_valid, gt_boxes, gt_classes, gt_valid


def check_sampled_rois(result, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid):
    """Each sampled RoI against a numpy/torchvision recomputation; returns the candidate rows."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection._utils import BoxCoder

    candidates = np.concatenate([proposals, gt_boxes[gt_valid]])
    iou = numpy_iou(gt_boxes[gt_valid], candidates)
    valid_rows = np.flatnonzero(gt_valid)
    rows = []
    for k in np.flatnonzero(np.asarray(result.valid)):
        roi = np.array(result.rois[k])
        hits = np.flatnonzero((candidates == roi).all(axis=1))
        assert len(hits) >= 1, f"sampled RoI {roi} is not a valid proposal or valid GT box"
        c = hits[0]
        assert c >= len(proposals) or proposal_valid[c], "a padding proposal was sampled"
        rows.append(c)
        if len(valid_rows) == 0:
            fg, match = False, 0
        else:
            fg, match = iou[:, c].max() >= 0.5, valid_rows[np.argmax(iou[:, c])]
        assert bool(result.is_foreground[k]) == fg
        assert int(result.classes[k]) == (gt_classes[match] + 1 if fg else 0)
        if fg:
            assert int(result.gt_index[k]) == match
            want = BoxCoder(BOX_WEIGHTS).encode_single(
                torch.as_tensor(gt_boxes[match][None]), torch.as_tensor(roi[None])
            )
            np.testing.assert_allclose(result.box_targets[k], want[0].numpy(), rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_array_equal(result.box_targets[k], 0.0)
    assert len(set(rows)) == len(rows), "a candidate was sampled twice"
    padding = ~np.asarray(result.valid)
    assert not np.asarray(result.is_foreground)[padding].any()
    np.testing.assert_array_equal(np.asarray(result.classes)[padding], 0)
    np.testing.assert_array_equal(np.asarray(result.box_targets)[padding], 0.0)
    return np.array(rows, int), iou


@pytest.mark.parametrize("batch_size, fraction", [(64, 1.0), (16, 0.25)])
def test_sample_rois_targets(batch_size, fraction):
    case = roi_case(np.random.default_rng(9))
    proposals, proposal_valid, _, _, gt_valid = case
    result = jit_sample_rois(
        jax.random.key(0),
        *case,
        batch_size=batch_size,
        positive_fraction=fraction,
        fg_iou=0.5,
        box_reg_weights=BOX_WEIGHTS,
    )
    rows, iou = check_sampled_rois(result, *case)
    candidate_valid = np.concatenate([proposal_valid, np.ones(gt_valid.sum(), bool)])
    num_fg, num_valid = int((iou.max(axis=0) >= 0.5)[candidate_valid].sum()), candidate_valid.sum()
    p = min(num_fg, int(batch_size * fraction))
    assert int(np.sum(result.is_foreground)) == p
    assert int(np.sum(result.valid)) == min(num_valid, batch_size)
    assert np.asarray(result.is_foreground)[:p].all()  # Foreground first.
    if batch_size >= num_valid:  # Everything sampled: each valid GT box is a foreground RoI.
        assert set(range(len(proposals), len(proposals) + gt_valid.sum())) <= set(rows.tolist())


def test_sample_rois_without_gt_is_all_background():
    case = roi_case(np.random.default_rng(10), num_valid_gt=0)
    result = jit_sample_rois(
        jax.random.key(1),
        *case,
        batch_size=16,
        positive_fraction=0.25,
        fg_iou=0.5,
        box_reg_weights=BOX_WEIGHTS,
    )
    check_sampled_rois(result, *case)
    assert not np.asarray(result.is_foreground).any()
    assert int(np.sum(result.valid)) == 16
    assert np.isfinite(np.asarray(result.box_targets)).all()


def test_sample_rois_iou_equal_to_fg_iou_is_foreground():
    """IoU exactly `fg_iou` is foreground (Detectron2/torchvision `Matcher`: `iou >= high`).

    GT [0, 0, 10, 10]: proposal [0, 0, 10, 20] has IoU 100 / 200 = 0.5 exactly (foreground), and
    [0, 0, 10, 20.5] has IoU 100 / 205 < 0.5 (background).
    """
    proposals = np.array([[0, 0, 10, 20], [0, 0, 10, 20.5]], np.float32)
    gt_boxes = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
    gt_classes = np.array([1, -1], np.int32)
    gt_valid = np.array([True, False])
    result = jit_sample_rois(
        jax.random.key(0),
        proposals,
        np.ones(2, bool),
        gt_boxes,
        gt_classes,
        gt_valid,
        batch_size=4,
        positive_fraction=1.0,
        fg_iou=0.5,
        box_reg_weights=BOX_WEIGHTS,
    )
    rois, is_fg = np.asarray(result.rois), np.asarray(result.is_foreground)
    assert np.asarray(result.valid)[:3].all() and not np.asarray(result.valid)[3]
    foreground = {tuple(r) for r in rois[:3][is_fg[:3]].tolist()}
    background = {tuple(r) for r in rois[:3][~is_fg[:3]].tolist()}
    assert foreground == {(0, 0, 10, 20), (0, 0, 10, 10)}  # the IoU-0.5 proposal and the GT box
    assert background == {(0, 0, 10, 20.5)}
    assert sorted(np.asarray(result.classes)[:3].tolist()) == [0, 2, 2]


# --------------------------------------------------------------------------- detect_boxes


def torchvision_detections(
    class_logits, box_deltas, proposals, image_size, score_thresh, nms_thresh, max_det
):
    """torchvision `RoIHeads.postprocess_detections` for one image, K foreground deltas."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.ops import boxes as box_ops

    num_classes = box_deltas.shape[1]
    boxes = BoxCoder(BOX_WEIGHTS, bbox_xform_clip=np.log(1000.0 / 16)).decode_single(
        torch.as_tensor(box_deltas.reshape(len(proposals), -1)), torch.as_tensor(proposals)
    )
    boxes = box_ops.clip_boxes_to_image(boxes.reshape(-1, num_classes, 4), tuple(image_size))
    scores = torch.softmax(torch.as_tensor(class_logits), -1)[:, 1:]
    labels = torch.arange(num_classes).view(1, -1).expand_as(scores)
    boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, nms_thresh)[:max_det]
    return boxes[keep].numpy(), scores[keep].numpy(), labels[keep].numpy()


@pytest.mark.parametrize("max_det, score_thresh", [(12, 0.05), (100, 0.2), (50, 0.25)])
def test_detect_boxes_matches_torchvision(max_det, score_thresh):
    rng = np.random.default_rng(max_det)
    p, k, image_size = 40, 3, (60, 80)
    proposals = random_boxes(rng, p, extent=70, min_wh=3, max_wh=40)
    proposals[0] = [10, 10, 10.004, 30]  # Decodes to a box narrower than 0.01 px.
    valid = np.arange(p) < 34
    class_logits = rng.normal(0, 2, (p, k + 1)).astype(np.float32)
    box_deltas = rng.normal(0, 1, (p, k, 4)).astype(np.float32)
    box_deltas[1, :, 2:] = 20  # Huge dw, dh: clamped before exp.
    # Proposal 2 has one class score just below and one just above the threshold.
    near = [score_thresh - 2e-3, score_thresh + 2e-3]
    class_logits[2] = np.log([1 - sum(near) - 0.1, near[0], near[1], 0.1])
    # Proposal 3's 4 equal logits give each class a float32 softmax of exactly 0.25: at the
    # threshold 0.25 torchvision (`scores > thresh`) drops all 3 candidates.
    if score_thresh == 0.25:
        class_logits[3] = 0.0
        exp = np.exp(class_logits[3] - class_logits[3].max())
        assert (exp / exp.sum() == np.float32(0.25)).all()
    detect = jax.jit(
        functools.partial(
            detect_boxes,
            box_reg_weights=BOX_WEIGHTS,
            score_threshold=score_thresh,
            nms_threshold=0.5,
            max_detections=max_det,
            pre_nms_topk=p * k,
        )
    )
    got = detect(class_logits, box_deltas, proposals, valid, np.array(image_size, np.int32))
    want_boxes, want_scores, want_labels = torchvision_detections(
        class_logits[valid],
        box_deltas[valid],
        proposals[valid],
        image_size,
        score_thresh,
        0.5,
        max_det,
    )
    n = len(want_scores)
    assert 0 < n and got.valid.shape == (max_det,)
    np.testing.assert_array_equal(got.valid, np.arange(max_det) < n)
    np.testing.assert_allclose(got.scores[:n], want_scores, rtol=1e-5)
    np.testing.assert_array_equal(got.classes[:n], want_labels)
    np.testing.assert_allclose(got.boxes[:n], want_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(got.scores[n:], 0.0)
    np.testing.assert_array_equal(got.boxes[n:], 0.0)
    if max_det > n:  # The limit is not binding: some candidates were suppressed or dropped.
        assert n < valid.sum() * k


# --------------------------------------------------------------------------- fast_rcnn_loss


def fast_rcnn_case(rng, num_valid=(9, 12), num_fg=(4, 0), r=12, k=3):
    """Box-head outputs and targets of 2 images laid out as `sample_rois` returns them: the first
    `num_fg[b]` RoIs foreground (classes 1..k), then background, then padding from `num_valid[b]`
    on (class 0, zero targets, and large logits that would dominate the loss if counted)."""
    b = len(num_valid)
    rows = np.arange(r)[None]
    roi_valid = rows < np.array(num_valid)[:, None]
    fg = rows < np.array(num_fg)[:, None]
    roi_classes = np.where(fg, rng.integers(1, k + 1, (b, r)), 0).astype(np.int32)
    class_logits = rng.normal(0, 2, (b, r, k + 1)).astype(np.float32)
    class_logits[~roi_valid] = 30.0 * np.sign(rng.normal(size=(k + 1,))).astype(np.float32)
    box_deltas = rng.normal(0, 1, (b, r, k, 4)).astype(np.float32)
    roi_box_targets = np.where(fg[..., None], rng.normal(0, 1, (b, r, 4)), 0).astype(np.float32)
    return class_logits, box_deltas, roi_classes, roi_box_targets, roi_valid


def fast_rcnn_loss_numpy(
    class_logits, box_deltas, roi_classes, roi_box_targets, roi_valid, batch_size, beta
):
    """Softmax CE summed over valid RoIs and smooth L1 of the GT class's deltas summed over
    foreground RoIs, both divided by `batch_size · B`."""
    logits = class_logits.astype(np.float64)
    ce_sum = box_sum = 0.0
    for b, r in zip(*np.nonzero(roi_valid)):
        c = roi_classes[b, r]
        ce_sum += np.log(np.exp(logits[b, r]).sum()) - logits[b, r, c]
        if c > 0:
            err = box_deltas[b, r, c - 1].astype(np.float64) - roi_box_targets[b, r]
            box_sum += smooth_l1_numpy(err, beta).sum()
    norm = batch_size * len(class_logits)
    return ce_sum / norm, box_sum / norm


def jit_fast_rcnn_loss(batch_size, beta):
    return jax.jit(
        functools.partial(fast_rcnn_loss, batch_size_per_image=batch_size, smooth_l1_beta=beta)
    )


@pytest.mark.parametrize("batch_size, beta", [(12, 0.0), (12, 1.0), (16, 1.0 / 9.0)])
def test_fast_rcnn_loss_against_numpy(batch_size, beta):
    case = fast_rcnn_case(np.random.default_rng(batch_size), num_fg=(4, 2))
    loss_cls, loss_box = jit_fast_rcnn_loss(batch_size, beta)(*case)
    want_cls, want_box = fast_rcnn_loss_numpy(*case, batch_size, beta)
    assert want_cls > 0 and want_box > 0
    np.testing.assert_allclose(loss_cls, want_cls, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(loss_box, want_box, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("num_valid", [(9, 12), (0, 0)], ids=["background-only", "all-padding"])
def test_fast_rcnn_loss_without_foreground_is_zero_for_boxes_and_finite(num_valid):
    case = fast_rcnn_case(np.random.default_rng(3), num_valid=num_valid, num_fg=(0, 0))
    class_logits, box_deltas, *rest = case
    losses = jit_fast_rcnn_loss(12, 1.0)
    loss_cls, loss_box = losses(*case)
    want_cls, want_box = fast_rcnn_loss_numpy(*case, 12, 1.0)
    assert float(loss_box) == 0.0 and want_box == 0.0
    np.testing.assert_allclose(loss_cls, want_cls, rtol=2e-5, atol=1e-7)
    assert np.isfinite(float(loss_cls)) and (float(loss_cls) > 0) == (sum(num_valid) > 0)

    total = lambda logits, deltas: sum(losses(logits, deltas, *rest))
    g_logits, g_deltas = jax.jit(jax.grad(total, argnums=(0, 1)))(class_logits, box_deltas)
    assert np.isfinite(g_logits).all() and np.isfinite(g_deltas).all()
    assert np.abs(g_deltas).max() == 0
    assert (np.abs(g_logits).max() > 0) == (sum(num_valid) > 0)


# --------------------------------------------------------------------------- mask_loss


def mask_case(rng, mask_valid, side=6):
    """Mask logits (some saturated) and soft targets in [0, 1] (some exactly 0 or 1)."""
    shape = (*np.shape(mask_valid), side, side)
    logits = rng.normal(0, 3, shape).astype(np.float32)
    logits.reshape(-1)[::7] = 40.0 * np.sign(logits.reshape(-1)[::7])
    mask_targets = rng.uniform(0, 1, shape).astype(np.float32)
    mask_targets.reshape(-1)[::5] = np.round(mask_targets.reshape(-1)[::5])
    return logits, mask_targets, np.asarray(mask_valid)


def mask_loss_numpy(mask_logits, mask_targets, mask_valid):
    """Per-pixel sigmoid BCE summed over the foreground slots, over their number times S²."""
    pixel_sum = sum(
        bce_numpy(mask_logits[b, f], mask_targets[b, f]).sum()
        for b, f in zip(*np.nonzero(mask_valid))
    )
    return pixel_sum / max(mask_valid.sum() * mask_logits[0, 0].size, 1)


def test_mask_loss_against_numpy():
    valid = [[True, True, False, True], [False, True, False, False]]
    case = mask_case(np.random.default_rng(0), valid)
    got = jax.jit(mask_loss)(*case)
    want = mask_loss_numpy(*case)
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_mask_loss_without_foreground_is_zero_and_finite():
    logits, mask_targets, valid = mask_case(np.random.default_rng(1), np.zeros((2, 4), bool))
    assert float(jax.jit(mask_loss)(logits, mask_targets, valid)) == 0.0
    grad = jax.jit(jax.grad(mask_loss))(logits, mask_targets, valid)
    assert np.isfinite(grad).all() and np.abs(grad).max() == 0


def test_mask_loss_replica_means_equal_the_global_batch_mean():
    """With `axis_name`, the pmean over replicas of each replica's value is the mean over the
    global batch's foreground RoIs, also when the replicas' foreground counts differ (or are 0)."""
    valid = np.array([[True, True, True, False], [False] * 4, [True, False, False, False]])
    logits, mask_targets, valid = mask_case(np.random.default_rng(2), valid)
    per_replica = jax.jit(jax.vmap(lambda *a: mask_loss(*a, axis_name="data"), axis_name="data"))(
        *(x[:, None] for x in (logits, mask_targets, valid))
    )
    np.testing.assert_allclose(
        np.mean(per_replica), mask_loss_numpy(logits, mask_targets, valid), rtol=2e-5
    )
    np.testing.assert_allclose(
        np.mean(per_replica), jax.jit(mask_loss)(logits, mask_targets, valid), rtol=2e-5
    )


def test_head_batchnorm_statistics_count_valid_rois_only():
    """With BatchNorm in the heads (`norm="batch"`, training), padding RoIs full of garbage
    change neither the valid RoIs' outputs nor the running statistics."""
    rng = np.random.default_rng(4)
    head = BoxHead(num_classes=3, dim=16, num_convs=2, conv_dim=8, num_fcs=1, norm="batch")
    rois = rng.normal(size=(6, 7, 7, 4)).astype(np.float32)
    valid = np.array([True, True, False, True, False, False])
    variables = head.init(jax.random.key(0), rois)
    apply = jax.jit(
        lambda x, v: head.apply(variables, x, train=True, valid=v, mutable=["batch_stats"])
    )
    (logits, deltas), stats = apply(rois, valid)
    garbage = rois.copy()
    garbage[~valid] = 1e3 * rng.normal(size=garbage[~valid].shape)
    (logits2, deltas2), stats2 = apply(garbage, valid)
    np.testing.assert_allclose(logits2[valid], logits[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas2[valid], deltas[valid], rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, stats2
    )
    # The valid RoIs alone give the same statistics.
    (_, _), alone = jax.jit(
        lambda x: head.apply(variables, x, train=True, mutable=["batch_stats"])
    )(rois[valid])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, alone
    )


# --------------------------------------------------------------------------- the mask-head budget


def foreground_slots(slots, counts):
    """`[B, F]` bool foreground slots, `counts[b]` of them first in image b (as `sample_rois`)."""
    return np.arange(slots)[None, :] < np.asarray(counts)[:, None]


@pytest.mark.parametrize("counts", [[0, 3, 1, 4], [0, 0, 0, 0], [4, 4, 0, 0]])
def test_sample_mask_rois_takes_every_foreground_slot_that_fits(counts):
    foreground = foreground_slots(4, counts)
    keys = jax.random.split(jax.random.key(0), 4)
    index, valid = jax.jit(sample_mask_rois, static_argnums=2)(keys, foreground, 8)
    taken = np.flatnonzero(foreground.reshape(-1))
    assert index.shape == valid.shape == (8,) and index.dtype == jnp.int32
    np.testing.assert_array_equal(valid, np.arange(8) < len(taken))
    np.testing.assert_array_equal(np.asarray(index)[: len(taken)], taken)  # image-major order
    assert (np.asarray(index)[len(taken) :] == 0).all()


def test_sample_mask_rois_overflow_is_uniform_and_deterministic():
    """P = 14 positives in 4 images, G = 5: G distinct positives every time, each positive taken
    with frequency G / P over many keys, the same draw for the same keys."""
    counts, budget, num_draws = [6, 0, 3, 5], 5, 4000
    foreground = foreground_slots(8, counts)
    positives = np.flatnonzero(foreground.reshape(-1))
    draw = jax.jit(jax.vmap(lambda key: sample_mask_rois(jax.random.split(key, 4), foreground, 5)))
    index, valid = jax.device_get(draw(jax.random.split(jax.random.key(1), num_draws)))
    assert valid.all()
    assert all(len(set(row)) == budget and set(row) <= set(positives) for row in index)
    assert (np.diff(index, axis=1) > 0).all()  # image-major order
    frequency = np.bincount(index.reshape(-1), minlength=foreground.size)[positives] / num_draws
    p = budget / len(positives)
    np.testing.assert_allclose(frequency, p, atol=4 * np.sqrt(p * (1 - p) / num_draws))
    again = jax.device_get(draw(jax.random.split(jax.random.key(1), num_draws)))
    np.testing.assert_array_equal(again[0], index)


def test_budgeted_mask_head_equals_all_slots_when_they_fit():
    """The mask head (BatchNorm in training) and `mask_loss` on the G gathered slots give the
    loss, gradients and BatchNorm statistics of all B·F slots, padding slots full of garbage."""
    rng = np.random.default_rng(5)
    b, f, budget = 3, 4, 7
    foreground = foreground_slots(f, [3, 0, 4])
    features = rng.normal(size=(b * f, 6, 6, 5)).astype(np.float32)
    features[~foreground.reshape(-1)] = 1e3 * rng.normal(size=(5, 6, 6, 5))
    classes = rng.integers(0, 3, b * f).astype(np.int32)
    mask_targets = rng.uniform(size=(b * f, 12, 12)).astype(np.float32)
    head = MaskHead(num_classes=3, dim=8, num_convs=2, norm="batch")
    variables = head.init(jax.random.key(0), features, classes)
    index, valid = sample_mask_rois(jax.random.split(jax.random.key(2), b), foreground, budget)

    def loss(params, x, take):
        slots = (x, classes, mask_targets, foreground.reshape(-1))
        if take:
            slots = (*(a[index] for a in slots[:3]), valid)
        logits, stats = head.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            *slots[:2], train=True, valid=slots[3], mutable=["batch_stats"],
        )  # fmt: skip
        return mask_loss(logits, slots[2], slots[3]), stats

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (want, want_stats), want_grads = grad(variables["params"], features, False)
    (got, got_stats), got_grads = grad(variables["params"], features, True)
    assert float(want) > 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (path, a), g in zip(
        jax.tree_util.tree_leaves_with_path((want_grads, want_stats)),
        jax.tree_util.tree_leaves((got_grads, got_stats)),
    ):
        np.testing.assert_allclose(g, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
