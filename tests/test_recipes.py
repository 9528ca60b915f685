"""The COCO recipes build and train: each config shrunk to a tiny size (its structure kept: norm
modes, FPN/head BatchNorm, RPN convs, box-head convs, dtype) runs two data-parallel train steps
on 2 devices with finite losses, and its input settings pass the canvas checks."""

import jax
import numpy as np
import pytest
from helpers import synthetic_batch

from configs import coco_r50_fpn_1x, coco_r50_fpn_lsj_100ep, coco_r50_fpn_tpu
from mrcnn_jax import sharding
from mrcnn_jax.data import pipeline
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train import step as step_lib

RECIPES = {
    "lsj_100ep": pytest.param(coco_r50_fpn_lsj_100ep, marks=pytest.mark.slow),
    "1x": pytest.param(coco_r50_fpn_1x, marks=pytest.mark.slow),
    "tpu": pytest.param(coco_r50_fpn_tpu, marks=pytest.mark.slow),
}


def tiny(module):
    config = module.get_config()
    pipeline.check_canvas(config)  # the real recipe's input settings fit its canvas
    config.data.image_size = (96, 128)
    config.data.resize_short_side = config.data.resize_max_long_side = 0
    config.data.max_instances, config.data.mask_size = 4, 16
    m = config.model
    m.backbone_depth, m.fpn_dim, m.num_classes = 18, 16, 3
    m.backbone_weights, m.allow_random_frozen_backbone = "", True
    m.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
    m.rpn.pre_nms_topk_train = m.rpn.post_nms_topk_train = 64
    m.rpn.batch_size_per_image = 32
    r = m.roi_heads
    r.batch_size_per_image, r.box_head_dim, r.box_head_conv_dim, r.mask_head_dim = 16, 32, 8, 8
    r.mask_head_convs = 2
    r.roi_align_method = "gather"  # einsum (TPU) is tested in test_roi_align
    config.train.batch_size = 2
    return config


@pytest.mark.parametrize("module", RECIPES.values(), ids=RECIPES.keys())
def test_recipe_runs_two_steps(module):
    config = tiny(module)
    model = MaskRCNN.from_config(config.model, axis_name=sharding.AXIS)
    state, lr_fn = state_lib.create_train_state(jax.random.key(0), config, model)
    mesh = sharding.create_mesh(jax.devices()[:2])
    state = sharding.replicate(state, mesh)
    step = step_lib.make_train_step(config, mesh, lr_fn)
    rng = np.random.default_rng(0)
    for i in range(2):
        batch = sharding.shard_batch(synthetic_batch(config, rng, [2, 1]), mesh)
        state, metrics = step(state, batch, jax.random.key(i))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), metrics
        assert metrics["loss_mask"] > 0
    assert int(state.step) == 2
