"""The model's training outputs are wired to the right targets (`MaskRCNN._train_outputs`): each
mask slot gets its RoI's class, its mask target is its GT mask resampled into its RoI (not into
the GT box), and the box targets are encoded with `roi_heads.box_reg_weights`.

The stage functions (`sample_rois`, `mask_targets`, the mask head) have their own tests against
references; these check what the model passes between them, against numpy written here, on a
tiny random model whose mask predictor is set to answer its class: kernel 0, bias 10·label.
One GT object per image with a mask covering its whole box, so that a mask target is the part
of its RoI inside the GT box, and each foreground RoI can be recovered from its box target.
(torchvision parity of the whole step, which also catches these: the slow
tests/test_train_parity_torchvision.py.)
"""

import jax
import numpy as np
from conftest import tiny_config

from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib

GT_BOXES = np.float32([[6.5, 9.0, 38.0, 41.5], [20.0, 14.5, 55.5, 47.0]])  # one per image
GT_LABELS = (1, 2)  # contiguous labels: RoI classes 2 and 3 (0 is background)


def recover_rois(box_targets, gt, weights):
    """The RoIs whose encoded deltas of `gt` (x1, y1, x2, y2) with `weights` are `box_targets`
    `[N, 4]` (the inverse of Faster R-CNN's encoding), float64."""
    wx, wy, ww, wh = weights
    gw, gh = gt[2] - gt[0], gt[3] - gt[1]
    gx, gy = gt[0] + gw / 2, gt[1] + gh / 2
    t = box_targets.astype(np.float64)
    rw, rh = gw / np.exp(t[:, 2] / ww), gh / np.exp(t[:, 3] / wh)
    rx, ry = gx - t[:, 0] / wx * rw, gy - t[:, 1] / wy * rh
    return np.stack([rx - rw / 2, ry - rh / 2, rx + rw / 2, ry + rh / 2], axis=1)


def inside_fraction(roi, gt, size=28, sampling_ratio=2):
    """[size, size]: per bin of `roi`, the fraction of its sampling_ratio² sample points (bin
    centres of a size·ratio grid) inside `gt`: the mask target of a GT mask that fills its box."""
    steps = (np.arange(size * sampling_ratio) + 0.5) / (size * sampling_ratio)

    def axis(lo, hi, gt_lo, gt_hi):
        points = lo + steps * (hi - lo)
        inside = (points >= gt_lo) & (points <= gt_hi)
        return inside.reshape(size, sampling_ratio).mean(axis=1)

    return np.outer(axis(roi[1], roi[3], gt[1], gt[3]), axis(roi[0], roi[2], gt[0], gt[2]))


def test_mask_slots_get_their_rois_class_and_mask_target_and_box_targets_their_weights():
    config = tiny_config(
        **{
            "model.roi_heads.positive_fraction": 0.5,  # 8 foreground slots per image
            "model.rpn.pre_nms_topk_train": 1000,  # proposals near the GT boxes
            "model.rpn.post_nms_topk_train": 1000,
        }
    )
    h, w = config.data.image_size
    m, s = config.data.max_instances, config.data.mask_size
    batch = {
        "image": np.random.default_rng(0).normal(size=(2, h, w, 3)).astype(np.float32),
        "image_size": np.tile(np.int32([h, w]), (2, 1)),
        "gt_boxes": np.zeros((2, m, 4), np.float32),
        "gt_classes": np.full((2, m), -1, np.int32),
        "gt_valid": np.zeros((2, m), bool),
        "gt_masks": np.zeros((2, m, s, s), np.uint8),
    }
    batch["gt_boxes"][:, 0] = GT_BOXES
    batch["gt_classes"][:, 0] = GT_LABELS
    batch["gt_valid"][:, 0] = True
    batch["gt_masks"][:, 0] = 1  # the whole box

    model = MaskRCNN.from_config(config.model)
    variables = state_lib.init_variables(model, jax.random.key(0), (h, w))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    (predictor,) = [
        node for path, node in _dicts(params) if "predictor_bias" in node and "mask" in path
    ]
    predictor["predictor_kernel"] = np.zeros_like(predictor["predictor_kernel"])
    predictor["predictor_bias"] = 10 * np.arange(predictor["predictor_bias"].size, dtype=np.float32)
    apply = jax.jit(lambda v, x, k: model.apply(v, x, train=True, keys=k, mutable=["batch_stats"]))
    out, _ = apply({**variables, "params": params}, batch, jax.random.split(jax.random.key(1), 2))
    out = jax.tree_util.tree_map(np.asarray, out)

    weights = tuple(config.model.roi_heads.box_reg_weights)
    expected = []  # (class, target) of every foreground RoI of the batch
    for b in range(2):
        foreground = out.roi_valid[b] & (out.roi_classes[b] > 0)
        assert (out.roi_classes[b][foreground] == GT_LABELS[b] + 1).all()
        rois = recover_rois(out.roi_box_targets[b][foreground], GT_BOXES[b], weights)
        expected += [(GT_LABELS[b] + 1, inside_fraction(roi, GT_BOXES[b])) for roi in rois]
    # The test has power: RoIs that are not the GT box, partly outside it.
    assert sum(target.min() < 0.5 for _, target in expected) >= 2, "no RoI reaches outside"

    slots = np.flatnonzero(out.mask_valid)
    assert len(slots) == len(expected)  # every foreground RoI has a mask slot (no budget)
    unmatched = list(range(len(expected)))
    for g in slots:
        # The mask logits are 10 · (class - 1) everywhere: the slot's class.
        assert np.ptp(out.mask_logits[g]) == 0
        label = out.mask_logits[g][0, 0] / 10
        errors = [
            np.abs(out.mask_targets[g] - expected[i][1]).mean()
            if expected[i][0] == label + 1
            else np.inf
            for i in unmatched
        ]
        best = int(np.argmin(errors))
        assert errors[best] < 1e-3, (g, label, sorted(errors)[:3])
        unmatched.pop(best)


def _dicts(tree, path=""):
    """(path, dict) of every dict in a nested dict of parameters."""
    yield path, tree
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _dicts(value, f"{path}/{key}")
