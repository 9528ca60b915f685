"""Padding never changes the answer: one image on several canvases gives the same detections,
losses, gradients and BatchNorm statistics (../shared/DESIGN.md, "Padding never changes the
answer"). The canvases are multiples of `model.size_divisibility` (32) but not of 64, and the
images' contents are not multiples of 32, so every extent rule (rounding, P6's ceil, anchors'
strides, RoIAlign clamping, masked BN moments) is exercised."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import loss_gradient_fn

from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib

SIZES = [(50, 41), (64, 30)]  # content (height, width) of the two images
CANVASES = [(64, 64), (96, 160), (160, 96)]


def on_canvas(contents, canvas):
    image = np.zeros((len(contents), *canvas, 3), np.float32)
    for i, content in enumerate(contents):
        image[i, : content.shape[0], : content.shape[1]] = content
    return {"image": image, "image_size": np.array([c.shape[:2] for c in contents], np.int32)}


@pytest.fixture(scope="module")
def setup():
    config = tiny_config(**{"model.roi_heads.score_threshold": 0.0})
    model = MaskRCNN.from_config(config.model)
    variables = state_lib.init_variables(model, jax.random.key(0), (64, 64))
    # Separate the class scores so the top-k of the detections is well conditioned.
    kernel = variables["params"]["box_head"]["cls_score"]["kernel"]
    variables["params"]["box_head"]["cls_score"]["kernel"] = kernel * 40
    rng = np.random.default_rng(0)
    contents = [rng.normal(size=(*s, 3)).astype(np.float32) for s in SIZES]
    return config, model, variables, contents


def test_inference_is_the_same_on_every_canvas(setup):
    _, model, variables, contents = setup
    predict = jax.jit(lambda v, b: model.apply(v, b, train=False))
    results = [jax.device_get(predict(variables, on_canvas(contents, c))) for c in CANVASES]
    first = results[0]
    assert first["valid"].sum(axis=1).min() >= 5
    for scores, valid in zip(first["scores"], first["valid"]):
        assert np.min(np.abs(np.diff(np.sort(scores[valid])))) > 1e-5 * 10, "near-tied scores"
    for canvas, other in zip(CANVASES[1:], results[1:]):
        np.testing.assert_array_equal(other["valid"], first["valid"], err_msg=str(canvas))
        np.testing.assert_array_equal(other["classes"], first["classes"], err_msg=str(canvas))
        np.testing.assert_allclose(other["boxes"], first["boxes"], atol=1e-3, err_msg=str(canvas))
        np.testing.assert_allclose(other["scores"], first["scores"], atol=1e-5, err_msg=str(canvas))
        np.testing.assert_allclose(other["masks"], first["masks"], atol=1e-5, err_msg=str(canvas))


def test_a_train_step_is_the_same_on_every_canvas(setup):
    """Losses, gradients and the new BatchNorm statistics ("batch" norm: masked moments)."""
    config, model, variables, contents = setup
    assert config.model.norm == "batch"
    m, s = config.data.max_instances, config.data.mask_size
    rng = np.random.default_rng(1)
    targets = {
        "gt_boxes": np.zeros((2, m, 4), np.float32),
        "gt_valid": np.zeros((2, m), bool),
        "gt_classes": np.full((2, m), -1, np.int32),
        "gt_masks": (rng.uniform(size=(2, m, s, s)) > 0.4).astype(np.uint8),
    }
    targets["gt_boxes"][0, :2] = [[5, 6, 30, 40], [20, 10, 39, 25]]
    targets["gt_boxes"][1, :1] = [[2, 3, 25, 60]]
    targets["gt_valid"][0, :2] = targets["gt_valid"][1, :1] = True
    targets["gt_classes"][0, :2], targets["gt_classes"][1, :1] = [0, 2], [1]
    roi_keys = jax.random.split(jax.random.key(3), 2)
    rpn_keys = jax.random.split(jax.random.key(4), 2)

    step = loss_gradient_fn(model, config.model, variables["batch_stats"], roi_keys, rpn_keys)
    results = [
        jax.device_get(step(variables["params"], {**on_canvas(contents, c), **targets}))
        for c in CANVASES[:2]
    ]
    (grads0, (losses0, stats0, _)), (grads1, (losses1, stats1, _)) = results
    assert losses0["loss_mask"] > 0 and losses0["loss_box_reg"] > 0
    for name, value in losses0.items():
        np.testing.assert_allclose(losses1[name], value, rtol=1e-5, err_msg=name)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(grads0), jax.tree_util.tree_leaves(grads1)
    ):
        scale = np.abs(a).max() + 1e-12
        assert np.abs(a - b).max() <= 1e-3 * scale, jax.tree_util.keystr(path)
    for a, b in zip(jax.tree_util.tree_leaves(stats0), jax.tree_util.tree_leaves(stats1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
