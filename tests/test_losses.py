"""The summed Mask R-CNN loss (`train.losses.mask_rcnn_losses`) against a plain numpy computation
of the five terms; each stage's loss alone is tested in test_rpn.py and test_roi_heads.py. The
mask-head budget (`model.roi_heads.mask_rois_per_image`) leaves the losses and gradients of a
batch whose positives fit it unchanged."""

import functools

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import loss_gradient_fn, random_boxes, synthetic_batch
from references import anchor_labels_numpy, bce_numpy, encode_numpy, smooth_l1_numpy

from mrcnn_jax.modeling.mask_rcnn import MaskRCNN, TrainOutputs, num_mask_head_slots_run
from mrcnn_jax.ops import targets
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train.losses import mask_rcnn_losses

NAMES = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask")


# --------------------------------------------------------------------------- numpy reference


def losses_numpy(outputs: TrainOutputs, batch, model_config, rpn_samples):
    """The five losses; `rpn_samples[b]` = the anchor indices sampled in image b."""
    rpn, roi = model_config.rpn, model_config.roi_heads
    o = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), outputs)
    num_images = o.rpn_logits.shape[0]
    rpn_cls = rpn_box = 0.0
    for b in range(num_images):
        labels, match = anchor_labels_numpy(
            o.anchors[b], batch["gt_boxes"][b], batch["gt_valid"][b], rpn.fg_iou, rpn.bg_iou
        )
        idx = rpn_samples[b]
        assert (labels[idx] >= 0).all()
        rpn_cls += bce_numpy(o.rpn_logits[b, idx], labels[idx]).sum()
        pos = idx[labels[idx] == 1]
        deltas = encode_numpy(batch["gt_boxes"][b][match[pos]], o.anchors[b][pos])
        rpn_box += smooth_l1_numpy(o.rpn_deltas[b, pos] - deltas, rpn.smooth_l1_beta).sum()
    rpn_norm = rpn.batch_size_per_image * num_images

    logits = o.class_logits
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    classes = np.asarray(outputs.roi_classes)
    ce = -np.take_along_axis(log_probs, classes[..., None], -1)[..., 0]
    valid = np.asarray(outputs.roi_valid)
    roi_norm = roi.batch_size_per_image * num_images
    box_sum = 0.0
    for b, r in zip(*np.nonzero(classes > 0)):
        err = o.box_deltas[b, r, classes[b, r] - 1] - o.roi_box_targets[b, r]
        box_sum += smooth_l1_numpy(err, roi.smooth_l1_beta).sum()

    mask_valid = np.asarray(outputs.mask_valid)
    pixels = bce_numpy(o.mask_logits, o.mask_targets)[mask_valid]
    return {
        "loss_rpn_cls": rpn_cls / rpn_norm,
        "loss_rpn_box": rpn_box / rpn_norm,
        "loss_cls": ce[valid].sum() / roi_norm,
        "loss_box_reg": box_sum / roi_norm,
        "loss_mask": pixels.mean() if mask_valid.any() else 0.0,
    }


# --------------------------------------------------------------------------- a hand-made case


def make_case(seed=0, num_anchors=14, no_gt_images=(1,), mask_side=6):
    """Two images: image 0 has 2 valid GT (one a near copy of an anchor, one a low-quality
    match), the images in `no_gt_images` have none; RoI heads outputs with padding rows."""
    rng = np.random.default_rng(seed)
    model_config = tiny_config().model
    roi = model_config.roi_heads
    r, f, k = roi.batch_size_per_image, int(roi.batch_size_per_image * roi.positive_fraction), 3
    anchors = random_boxes(rng, num_anchors, extent=40.0, min_wh=8.0, max_wh=24.0)
    anchors[1] = anchors[0] + np.float32(2)  # Overlapping anchors give ignored labels.
    gt_boxes = np.zeros((2, 3, 4), np.float32)
    gt_valid = np.zeros((2, 3), bool)
    for b in range(2):
        if b in no_gt_images:
            continue
        gt_boxes[b, 0] = anchors[0] + rng.uniform(-1, 1, 4).astype(np.float32)
        width = anchors[5, 2] - anchors[5, 0]
        gt_boxes[b, 1] = anchors[5] + np.array([0.45, 0, 0.45, 0], np.float32) * width
        gt_valid[b, :2] = True
    gt_boxes[:, 2] = anchors[3]  # Padding rows on an anchor: must be ignored.

    roi_valid = np.arange(r) < r - 3
    roi_classes = np.where(np.arange(r) < f, rng.integers(1, k + 1, r), 0)
    roi_classes[1] = 0  # Fewer foreground than slots.
    roi_classes = np.where(roi_valid, roi_classes, 0).astype(np.int32)
    roi_classes = np.stack([roi_classes, roi_classes])
    mask_valid = roi_classes[:, :f] > 0
    for b in no_gt_images:
        roi_classes[b] = 0
        mask_valid[b] = False
    outputs = TrainOutputs(
        rpn_logits=rng.normal(0, 2, (2, num_anchors)).astype(np.float32),
        rpn_deltas=rng.normal(0, 0.3, (2, num_anchors, 4)).astype(np.float32),
        anchors=np.stack([anchors] * 2),
        anchor_valid=np.ones((2, num_anchors), bool),
        anchor_ids=np.tile(np.arange(num_anchors, dtype=np.int32), (2, 1)),
        class_logits=rng.normal(0, 2, (2, r, k + 1)).astype(np.float32),
        box_deltas=rng.normal(0, 1, (2, r, k, 4)).astype(np.float32),
        roi_classes=roi_classes,
        roi_box_targets=np.where(
            (roi_classes > 0)[..., None], rng.normal(0, 1, (2, r, 4)), 0
        ).astype(np.float32),
        roi_valid=np.stack([roi_valid, roi_valid]),
        mask_logits=rng.normal(0, 3, (2 * f, mask_side, mask_side)).astype(np.float32),
        mask_targets=rng.uniform(0, 1, (2 * f, mask_side, mask_side)).astype(np.float32),
        mask_valid=mask_valid.reshape(-1),  # G = 2 F: every foreground slot (no budget)
        num_proposals=np.array([20, 20], np.int32),
    )
    return outputs, {"gt_boxes": gt_boxes, "gt_valid": gt_valid}, model_config


def check_against_numpy(outputs, batch, model_config, keys, rpn_samples):
    losses = jax.jit(functools.partial(mask_rcnn_losses, config=model_config))(outputs, batch, keys)
    want = losses_numpy(outputs, batch, model_config, rpn_samples)
    for name in NAMES:
        np.testing.assert_allclose(losses[name], want[name], rtol=2e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(losses["loss"], sum(want.values()), rtol=2e-5)
    return losses


def test_losses_with_every_anchor_sampled():
    """batch_size_per_image > #anchors and positive_fraction 1: every labelled anchor counts."""
    outputs, batch, model_config = make_case()
    model_config.rpn.batch_size_per_image = 32
    model_config.rpn.positive_fraction = 1.0
    labels, _ = anchor_labels_numpy(
        outputs.anchors[0], batch["gt_boxes"][0], batch["gt_valid"][0], 0.7, 0.3
    )
    assert {-1, 0, 1} <= set(labels.tolist()) and (labels == 1).sum() >= 2
    samples = [
        np.flatnonzero(anchor_labels_numpy(outputs.anchors[0], g, v, 0.7, 0.3)[0] >= 0)
        for g, v in zip(batch["gt_boxes"], batch["gt_valid"])
    ]
    keys = jax.random.split(jax.random.key(0), 2)
    losses = check_against_numpy(outputs, batch, model_config, keys, samples)
    assert all(float(losses[name]) > 0 for name in NAMES)


def test_losses_with_a_partial_rpn_sample():
    """A sample smaller than the labelled anchors, rebuilt from the same per-image keys."""
    outputs, batch, model_config = make_case(seed=1, num_anchors=40, no_gt_images=())
    rpn = model_config.rpn
    rpn.batch_size_per_image, rpn.positive_fraction = 6, 0.5
    keys = jax.random.split(jax.random.key(3), 2)
    samples = []
    for b in range(2):
        labels, _ = anchor_labels_numpy(
            outputs.anchors[0], batch["gt_boxes"][b], batch["gt_valid"][b], 0.7, 0.3
        )
        assert (labels == 0).sum() > 6
        sample = targets.sample_balanced(keys[b], labels == 1, labels == 0, 6, 0.5)
        samples.append(np.asarray(sample.indices)[np.asarray(sample.valid)])
        assert (labels[samples[-1]] == 1).any() and (labels[samples[-1]] == 0).any()
    assert all(len(s) == 6 for s in samples)
    check_against_numpy(outputs, batch, model_config, keys, samples)


def test_losses_without_gt_are_zero_for_boxes_and_masks_and_finite():
    outputs, batch, model_config = make_case(no_gt_images=(0, 1))
    model_config.rpn.batch_size_per_image = 32
    samples = [np.arange(len(outputs.anchors[0]))] * 2  # Everything is a sampled negative.
    keys = jax.random.split(jax.random.key(0), 2)
    losses = check_against_numpy(outputs, batch, model_config, keys, samples)
    for name in ("loss_rpn_box", "loss_box_reg", "loss_mask"):
        assert float(losses[name]) == 0.0, name
    assert float(losses["loss_rpn_cls"]) > 0 and float(losses["loss_cls"]) > 0

    def total(floats):
        return mask_rcnn_losses(outputs._replace(**floats), batch, keys, model_config)["loss"]

    names = ("rpn_logits", "rpn_deltas", "class_logits", "box_deltas", "mask_logits")
    grads = jax.jit(jax.grad(total))({n: getattr(outputs, n) for n in names})
    for name, grad in grads.items():
        assert np.isfinite(grad).all(), name
    for name in ("rpn_deltas", "box_deltas", "mask_logits"):
        assert np.abs(grads[name]).max() == 0, name
    assert np.abs(grads["class_logits"]).max() > 0


def test_loss_gradients_against_numpy_differences():
    """d loss / d outputs is finite and matches central differences of the numpy losses."""
    outputs, batch, model_config = make_case(no_gt_images=())
    model_config.rpn.batch_size_per_image = 32
    model_config.rpn.positive_fraction = 1.0
    samples = [
        np.flatnonzero(anchor_labels_numpy(outputs.anchors[0], g, v, 0.7, 0.3)[0] >= 0)
        for g, v in zip(batch["gt_boxes"], batch["gt_valid"])
    ]
    keys = jax.random.split(jax.random.key(0), 2)

    def total(floats):
        return mask_rcnn_losses(outputs._replace(**floats), batch, keys, model_config)["loss"]

    names = ("rpn_logits", "rpn_deltas", "class_logits", "box_deltas", "mask_logits")
    grads = jax.jit(jax.grad(total))({n: getattr(outputs, n) for n in names})
    rng = np.random.default_rng(0)
    eps = 1e-3
    for name in names:
        g = np.asarray(grads[name])
        assert np.isfinite(g).all(), name
        # Check the entry with the largest gradient and a random one.
        for flat in (np.abs(g).argmax(), rng.integers(g.size)):
            index = np.unravel_index(flat, g.shape)
            values = []
            for sign in (1, -1):
                array = np.asarray(getattr(outputs, name), np.float64).copy()
                array[index] += sign * eps
                moved = outputs._replace(**{name: array})
                values.append(sum(losses_numpy(moved, batch, model_config, samples).values()))
            numeric = (values[0] - values[1]) / (2 * eps)
            np.testing.assert_allclose(g[index], numeric, rtol=1e-2, atol=1e-5, err_msg=name)


def test_replica_means_equal_the_global_batch_losses():
    """pmean over replicas of the per-replica losses == the losses of the whole batch."""
    outputs, batch, model_config = make_case(no_gt_images=())
    outputs = outputs._replace(mask_valid=np.array([True, False, False, False] + [True] * 4))
    keys = jax.random.split(jax.random.key(0), 2)
    whole = jax.jit(functools.partial(mask_rcnn_losses, config=model_config))(outputs, batch, keys)
    split = lambda x: x.reshape(2, -1, *x.shape[1:])  # images; mask slots: G / 2 per replica
    per_replica = jax.tree_util.tree_map(split, outputs)
    replicated = jax.jit(
        jax.vmap(
            lambda o, b, k: mask_rcnn_losses(o, b, k, model_config, axis_name="data"),
            in_axes=(0, 0, 0),
            axis_name="data",
        )
    )(per_replica, jax.tree_util.tree_map(split, batch), keys.reshape(2, 1))
    for name in (*NAMES, "loss"):
        np.testing.assert_allclose(np.mean(replicated[name]), whole[name], rtol=1e-5, err_msg=name)


# --------------------------------------------------------------------------- mask-head layouts


def assert_same_losses_and_gradients(configs, batch_counts, seed: int = 2):
    """Each config's losses, gradients and BatchNorm statistics equal the first config's on
    batches with `batch_counts` objects per image (same variables and sampling keys); returns
    the mask-slot validity `[G]` of every config on the last batch."""
    variables = state_lib.init_variables(
        MaskRCNN.from_config(configs[0].model), jax.random.key(0), (64, 64)
    )
    num_images = configs[0].train.batch_size
    roi_keys, rpn_keys = jax.random.split(jax.random.key(3), (2, num_images))
    steps = [
        loss_gradient_fn(
            MaskRCNN.from_config(c.model), c.model, variables["batch_stats"], roi_keys, rpn_keys
        )
        for c in configs
    ]
    rng = np.random.default_rng(seed)
    for counts in batch_counts:
        batch = synthetic_batch(configs[0], rng, counts)
        results = [jax.device_get(step(variables["params"], batch)) for step in steps]
        grads0, (losses0, stats0, valid0) = results[0]
        assert (valid0.sum() > 0) == (sum(counts) > 0)
        if not sum(counts):
            assert losses0["loss_mask"] == 0
        for grads, (losses, stats, valid) in results[1:]:
            assert valid.sum() == valid0.sum()
            for name, value in losses0.items():
                np.testing.assert_allclose(losses[name], value, rtol=1e-6, atol=1e-8, err_msg=name)
            for (path, a), b in zip(
                jax.tree_util.tree_leaves_with_path((grads0, stats0)),
                jax.tree_util.tree_leaves((grads, stats)),
            ):
                scale = np.abs(a).max() + 1e-12
                assert np.abs(a - b).max() <= 1e-5 * scale, jax.tree_util.keystr(path)
    return [valid for _, (_, _, valid) in results]


@pytest.mark.slow  # two full-model gradients; the head alone: test_roi_heads (seconds)
def test_budgeted_mask_head_gives_the_losses_and_gradients_of_all_slots():
    """G = 3 per image of F = 4 foreground slots: image 0 has no object, so the positives always
    fit; the losses, gradients and BatchNorm statistics (heads with BatchNorm, which counts only
    the taken slots) equal those of all B·F slots, on a batch with objects and on one without."""
    overrides = {"train.batch_size": 4, "model.roi_heads.head_norm": True}
    configs = [
        tiny_config(**overrides, **{"model.roi_heads.mask_rois_per_image": n}) for n in (0, 3)
    ]
    assert configs[0].model.norm == "batch"
    valid0, valid1 = assert_same_losses_and_gradients(configs, ([0, 3, 1, 4], [0, 0, 0, 0]))
    assert valid0.shape == (16,) and valid1.shape == (12,)


def test_chunked_mask_head_gives_the_losses_and_gradients_of_one_pass():
    """`mask_head_chunk` 3 over G = 16 slots (6 chunks, the last padded): chunks without a taken
    slot are skipped, and the losses and gradients equal one pass over all slots, on batches
    with no positive, some (partly filled chunks) and all slots taken. The heads carry frozen
    BatchNorm (torchvision v2), so its stored statistics are read inside the loop."""
    overrides = {
        "train.batch_size": 4,
        "model.norm": "frozen",
        "model.allow_random_frozen_backbone": True,
        "model.roi_heads.head_norm": True,
    }
    configs = [tiny_config(**overrides, **{"model.roi_heads.mask_head_chunk": n}) for n in (0, 3)]
    assert_same_losses_and_gradients(configs, ([0, 3, 1, 4], [0, 0, 0, 0], [4, 4, 4, 4]))


@pytest.mark.parametrize("norm, chunked", [("frozen", True), ("batch", False)])
def test_the_mask_head_is_chunked_only_without_batch_statistics(norm, chunked):
    """A mask head normalising with batch statistics (whose moments span all G slots) makes one
    pass whatever `mask_head_chunk` says: its training program has no more loops than with
    chunking off; a frozen-BatchNorm head gets the chunk loop."""
    batch, keys = None, jax.random.split(jax.random.key(0), 4)
    loops = []
    for chunk in (0, 3):
        config = tiny_config(
            **{
                "train.batch_size": 4,
                "model.norm": norm,
                "model.roi_heads.head_norm": True,
                "model.roi_heads.mask_head_chunk": chunk,
            }
        )
        model = MaskRCNN.from_config(config.model)
        variables = model.variable_shapes((64, 64))
        batch = batch or synthetic_batch(config, np.random.default_rng(0), [1, 2, 0, 1])
        apply = functools.partial(model.apply, train=True, keys=keys, mutable=["batch_stats"])
        loops.append(jax.jit(apply).lower(variables, batch).as_text().count("stablehlo.while"))
    assert loops[1] == loops[0] + chunked


def test_mask_head_slots_run_follow_the_taken_slots():
    """`num_mask_head_slots_run`: whole chunks up to the last taken slot; G without chunks (chunk
    0, a chunk of at least G, or a head with batch statistics)."""
    roi = {"model.roi_heads.batch_size_per_image": 512, "model.roi_heads.mask_rois_per_image": 0}
    config = tiny_config(**roi).model  # G = F = 128 per image
    config.roi_heads.mask_head_chunk = 32
    runs = [num_mask_head_slots_run(config, 2, taken) for taken in (0, 1, 23, 32, 33, 256)]
    assert runs == [0, 32, 32, 32, 64, 256]
    config.roi_heads.mask_head_chunk = 3  # G = 256 is no multiple: the last chunk is padded
    assert num_mask_head_slots_run(config, 2, 256) == 258
    for chunk, head_norm in ((0, False), (256, False), (32, True)):
        config.roi_heads.mask_head_chunk, config.roi_heads.head_norm = chunk, head_norm
        assert num_mask_head_slots_run(config, 2, 23) == 256
    config.norm = "frozen"  # stored statistics: chunked
    assert num_mask_head_slots_run(config, 2, 23) == 32
