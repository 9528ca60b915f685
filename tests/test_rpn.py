"""The RPN stage (`mrcnn_jax.modeling.rpn`) against torchvision and plain numpy references.

Covers `RPNHead` (output order, torchvision's layout), `generate_proposals` (torchvision's
`filter_proposals`) and `rpn_losses` (a numpy computation on the same anchor sample). The summed
Mask R-CNN loss is tested in test_losses.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import oihw_to_hwio, random_boxes, to_torch_nchw
from references import anchor_labels_numpy, bce_numpy, encode_numpy, smooth_l1_numpy

from mrcnn_jax.modeling.rpn import RPNHead, generate_proposals, rpn_losses
from mrcnn_jax.ops import targets
from mrcnn_jax.ops.anchors import generate_anchors

FG_IOU, BG_IOU = 0.7, 0.3


# --------------------------------------------------------------------------- RPN head


def test_rpn_head_output_order_matches_the_anchors():
    """A hand-set head whose outputs encode (row, column, anchor) reads back in anchor order."""
    num_anchors, shapes = 3, [(4, 6), (2, 3)]
    # Features: channel 0 = row, channel 1 = column (non-negative, so the ReLU keeps them).
    features = []
    for h, w in shapes:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        features.append(np.stack([rows, cols], -1)[None].astype(np.float32))
    head = RPNHead(num_anchors)
    abstract = jax.eval_shape(head.init, jax.random.key(0), features)["params"]
    params = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), abstract)
    params["conv"]["kernel"][1, 1] = np.eye(2)  # Centre tap: identity.
    params["objectness"]["kernel"][0, 0] = [[100] * num_anchors, [10] * num_anchors]
    params["objectness"]["bias"][:] = np.arange(num_anchors)
    # Deltas channel a * 4 + c = 1000 row + 100 column + 10 a + c.
    params["deltas"]["kernel"][0, 0] = [[1000] * 4 * num_anchors, [100] * 4 * num_anchors]
    params["deltas"]["bias"][:] = (10 * np.arange(num_anchors)[:, None] + np.arange(4)).ravel()
    logits, deltas = head.apply({"params": params}, features)

    levels = generate_anchors(np.array([16, 24]), shapes, (4, 8), ((8,), (16,)), (0.5, 1.0, 2.0))
    for lvl, ((h, w), level) in enumerate(zip(shapes, levels)):
        anchor = np.asarray(level.boxes)
        assert np.asarray(level.valid).all()
        assert logits[lvl].shape == (1, h * w * num_anchors)
        assert deltas[lvl].shape == (1, h * w * num_anchors, 4)
        n = np.arange(h * w * num_anchors)
        row, col, a = n // (w * num_anchors), (n // num_anchors) % w, n % num_anchors
        np.testing.assert_array_equal(logits[lvl][0], 100 * row + 10 * col + a)
        want = 1000 * row + 100 * col + 10 * a
        np.testing.assert_array_equal(deltas[lvl][0], want[:, None] + np.arange(4))
        # The anchor of that row is centred on that cell and has that anchor's shape.
        stride = 16 // h
        np.testing.assert_allclose((anchor[:, 0] + anchor[:, 2]) / 2, col * stride)
        np.testing.assert_allclose((anchor[:, 1] + anchor[:, 3]) / 2, row * stride)
        np.testing.assert_array_equal(
            anchor - anchor[a], (stride * np.stack([col - col[a], row - row[a]] * 2, 1))
        )


def test_rpn_head_matches_torchvision_layout():
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.rpn import RPNHead as TorchRPNHead
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    rng = np.random.default_rng(0)
    features = [rng.normal(size=(2, h, w, 8)).astype(np.float32) for h, w in [(6, 5), (3, 3)]]
    torch.manual_seed(0)
    reference = TorchRPNHead(8, 3).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
        tv_logits, tv_deltas = reference([to_torch_nchw(f) for f in features])
        tv_logits, tv_deltas = concat_box_prediction_layers(tv_logits, tv_deltas)
    params = {
        "conv": {
            "kernel": oihw_to_hwio(reference.conv[0][0].weight),
            "bias": reference.conv[0][0].bias.detach().numpy(),
        },
        "objectness": {
            "kernel": oihw_to_hwio(reference.cls_logits.weight),
            "bias": reference.cls_logits.bias.detach().numpy(),
        },
        "deltas": {
            "kernel": oihw_to_hwio(reference.bbox_pred.weight),
            "bias": reference.bbox_pred.bias.detach().numpy(),
        },
    }
    logits, deltas = RPNHead(3).apply({"params": params}, features)
    np.testing.assert_allclose(
        np.concatenate(logits, 1).reshape(-1), tv_logits.numpy().reshape(-1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        np.concatenate(deltas, 1).reshape(-1, 4), tv_deltas.numpy(), rtol=1e-5, atol=1e-5
    )


# --------------------------------------------------------------------------- generate_proposals


def torchvision_proposals(
    logits, deltas, anchors, image_size, pre_nms, post_nms, nms_thresh, min_size
):
    """torchvision `RegionProposalNetwork.filter_proposals` on decoded proposals, one image."""
    torch = pytest.importorskip("torch")
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork

    rpn = RegionProposalNetwork(
        AnchorGenerator(),
        torch.nn.Identity(),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": pre_nms, "testing": pre_nms},
        post_nms_top_n={"training": post_nms, "testing": post_nms},
        nms_thresh=nms_thresh,
    ).eval()
    rpn.min_size = min_size
    all_anchors = torch.as_tensor(np.concatenate(anchors))
    boxes = rpn.box_coder.decode_single(torch.as_tensor(np.concatenate(deltas)), all_anchors)
    boxes, scores = rpn.filter_proposals(
        boxes.reshape(1, -1, 4),
        torch.as_tensor(np.concatenate(logits))[None],
        [tuple(image_size)],
        [len(a) for a in anchors],
    )
    return boxes[0].numpy(), scores[0].numpy()


@pytest.mark.parametrize(
    "pre_nms, post_nms, min_size", [(50, 40, 1e-3), (500, 300, 1e-3), (30, 60, 3.0)]
)
def test_generate_proposals_matches_torchvision(pre_nms, post_nms, min_size):
    rng = np.random.default_rng(pre_nms + post_nms)
    image_size = (60, 80)
    sizes = (120, 40, 12)  # Anchors per level: the last has fewer than pre_nms_topk.
    anchors = [random_boxes(rng, n, extent=90, min_wh=1, max_wh=40) for n in sizes]
    logits = [rng.normal(0, 2, n).astype(np.float32) for n in sizes]
    deltas = [rng.normal(0, 0.3, (n, 4)).astype(np.float32) for n in sizes]
    propose = jax.jit(
        functools.partial(
            generate_proposals,
            pre_nms_topk=pre_nms,
            post_nms_topk=post_nms,
            nms_threshold=0.7,
            min_size=min_size,
        )
    )
    got = propose(logits, deltas, anchors, np.array(image_size, np.int32))
    want_boxes, want_scores = torchvision_proposals(
        logits, deltas, anchors, image_size, pre_nms, post_nms, 0.7, min_size
    )
    n = len(want_scores)
    assert got.valid.shape == (post_nms,) and 0 < n
    np.testing.assert_array_equal(got.valid, np.arange(post_nms) < n)
    np.testing.assert_allclose(got.boxes[:n], want_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.nn.sigmoid(got.scores[:n]), want_scores, rtol=1e-5)
    assert np.isneginf(np.asarray(got.scores[n:])).all()
    np.testing.assert_array_equal(got.boxes[n:], 0.0)


# --------------------------------------------------------------------------- rpn_losses


def rpn_case(seed, gt_images=(0, 1), num_anchors=30):
    """Two images over shared anchors. Each image in `gt_images` has 2 valid GT boxes (a near
    copy of an anchor and a low-quality match); the other images have none. The padding GT row
    sits on an anchor, so it would make that anchor positive if it leaked in."""
    rng = np.random.default_rng(seed)
    anchors = random_boxes(rng, num_anchors, extent=40.0, min_wh=8.0, max_wh=24.0)
    anchors[1] = anchors[0] + np.float32(2)  # Overlapping anchors give ignored labels.
    gt_boxes = np.zeros((2, 3, 4), np.float32)
    gt_valid = np.zeros((2, 3), bool)
    for b in gt_images:
        gt_boxes[b, 0] = anchors[b] + rng.uniform(-1, 1, 4).astype(np.float32)
        width = anchors[5, 2] - anchors[5, 0]
        gt_boxes[b, 1] = anchors[5] + np.array([0.45, 0, 0.45, 0], np.float32) * width
        gt_valid[b, :2] = True
    gt_boxes[:, 2] = anchors[3]
    logits = rng.normal(0, 2, (2, num_anchors)).astype(np.float32)
    deltas = rng.normal(0, 0.3, (2, num_anchors, 4)).astype(np.float32)
    return logits, deltas, anchors, gt_boxes, gt_valid


def rpn_losses_numpy(logits, deltas, anchors, gt_boxes, gt_valid, samples, batch_size, beta):
    """Sigmoid CE over the sampled anchors `samples[b]` of image b and smooth L1 of the positive
    ones' deltas against their matched GT, both divided by `batch_size · B`."""
    cls_sum = box_sum = 0.0
    for b, idx in enumerate(samples):
        labels, match = anchor_labels_numpy(anchors, gt_boxes[b], gt_valid[b], FG_IOU, BG_IOU)
        assert (labels[idx] >= 0).all()  # Only labelled anchors are sampled.
        cls_sum += bce_numpy(logits[b, idx], labels[idx]).sum()
        pos = idx[labels[idx] == 1]
        err = deltas[b, pos] - encode_numpy(gt_boxes[b][match[pos]], anchors[pos])
        box_sum += smooth_l1_numpy(err, beta).sum()
    norm = batch_size * len(samples)
    return cls_sum / norm, box_sum / norm


def jit_rpn_losses(batch_size, fraction, beta):
    """`rpn_losses` of anchors `[A, 4]` shared by the images, all existing (valid, ids 0..A-1)."""
    losses = functools.partial(
        rpn_losses,
        fg_iou=FG_IOU,
        bg_iou=BG_IOU,
        batch_size_per_image=batch_size,
        positive_fraction=fraction,
        smooth_l1_beta=beta,
    )

    def shared(keys, logits, deltas, anchors, gt_boxes, gt_valid):
        b, a = logits.shape
        return losses(
            keys,
            logits,
            deltas,
            jnp.broadcast_to(anchors, (b, a, 4)),
            jnp.ones((b, a), bool),
            jnp.broadcast_to(jnp.arange(a, dtype=jnp.int32), (b, a)),
            gt_boxes,
            gt_valid,
        )

    return jax.jit(shared)


@pytest.mark.parametrize(
    "seed, batch_size, fraction, beta, gt_images",
    [
        (1, 64, 1.0, 0.0, (0, 1)),  # Every labelled anchor sampled; L1.
        (2, 64, 1.0, 1.0 / 9.0, (0,)),  # Image 1 has no GT: all its anchors are negatives.
        (3, 8, 0.5, 1.0 / 9.0, (0, 1)),  # A partial sample, rebuilt from the same keys.
        (4, 6, 0.25, 1.0, (1,)),
    ],
)
def test_rpn_losses_against_numpy(seed, batch_size, fraction, beta, gt_images):
    case = rpn_case(seed, gt_images)
    _, _, anchors, gt_boxes, gt_valid = case
    keys = jax.random.split(jax.random.key(seed), 2)
    samples = []
    for b in range(2):
        labels, _ = anchor_labels_numpy(anchors, gt_boxes[b], gt_valid[b], FG_IOU, BG_IOU)
        if b in gt_images:
            assert {-1, 0, 1} <= set(labels.tolist()) and (labels == 1).sum() >= 2
        else:
            assert (labels == 0).all()
        sample = targets.sample_balanced(keys[b], labels == 1, labels == 0, batch_size, fraction)
        samples.append(np.asarray(sample.indices)[np.asarray(sample.valid)])
        if batch_size >= len(anchors) and fraction == 1.0:  # The sample is every labelled anchor.
            np.testing.assert_array_equal(np.sort(samples[-1]), np.flatnonzero(labels >= 0))
        else:
            assert len(samples[-1]) == batch_size
    loss_cls, loss_box = jit_rpn_losses(batch_size, fraction, beta)(keys, *case)
    want_cls, want_box = rpn_losses_numpy(*case, samples, batch_size, beta)
    assert float(loss_cls) > 0 and float(loss_box) > 0
    np.testing.assert_allclose(loss_cls, want_cls, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(loss_box, want_box, rtol=2e-5, atol=1e-7)


def test_rpn_losses_without_gt_are_zero_for_boxes_and_finite():
    """Only padding GT rows (on an anchor): every anchor is a negative, the box loss is exactly 0
    and has zero gradient; the objectness loss covers all anchors (fewer than the batch)."""
    logits, deltas, anchors, gt_boxes, gt_valid = rpn_case(0, gt_images=())
    keys = jax.random.split(jax.random.key(0), 2)
    losses = jit_rpn_losses(64, 0.5, 1.0 / 9.0)
    loss_cls, loss_box = losses(keys, logits, deltas, anchors, gt_boxes, gt_valid)
    samples = [np.arange(len(anchors))] * 2
    want_cls, want_box = rpn_losses_numpy(
        logits, deltas, anchors, gt_boxes, gt_valid, samples, 64, 1.0 / 9.0
    )
    assert float(loss_box) == 0.0 and want_box == 0.0
    np.testing.assert_allclose(loss_cls, want_cls, rtol=2e-5, atol=1e-7)
    assert np.isfinite(float(loss_cls)) and float(loss_cls) > 0

    total = lambda lg, dl: sum(losses(keys, lg, dl, anchors, gt_boxes, gt_valid))
    g_logits, g_deltas = jax.jit(jax.grad(total, argnums=(0, 1)))(logits, deltas)
    assert np.isfinite(g_logits).all() and np.isfinite(g_deltas).all()
    assert np.abs(g_deltas).max() == 0 and np.abs(g_logits).min() > 0


def test_rpn_losses_never_sample_anchors_outside_the_extent():
    """Anchors marked invalid (outside the image's valid extent) are neither positive nor
    negative: the losses equal those of the valid anchors alone, whose ids are kept."""
    logits, deltas, anchors, gt_boxes, gt_valid = rpn_case(5)
    keep = np.arange(len(anchors)) % 3 != 2
    keep[[0, 1, 5]] = True  # The GT's anchors stay.
    ids = np.cumsum(keep) - 1  # ids of the valid anchors: 0..n-1 in order
    keys = jax.random.split(jax.random.key(5), 2)
    losses = functools.partial(
        rpn_losses, fg_iou=FG_IOU, bg_iou=BG_IOU, batch_size_per_image=8,
        positive_fraction=0.5, smooth_l1_beta=0.0,
    )  # fmt: skip
    b, a = logits.shape
    full = jax.jit(losses)(
        keys, logits, deltas, np.broadcast_to(anchors, (b, a, 4)), np.tile(keep, (b, 1)),
        np.tile(ids, (b, 1)).astype(np.int32), gt_boxes, gt_valid,
    )  # fmt: skip
    n = int(keep.sum())
    alone = jax.jit(losses)(
        keys, logits[:, keep], deltas[:, keep], np.broadcast_to(anchors[keep], (b, n, 4)),
        np.ones((b, n), bool), np.tile(np.arange(n), (b, 1)).astype(np.int32), gt_boxes, gt_valid,
    )  # fmt: skip
    assert float(alone[0]) > 0 and float(alone[1]) > 0
    np.testing.assert_allclose(full, alone, rtol=1e-6)
