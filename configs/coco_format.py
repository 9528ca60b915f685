"""Mask R-CNN R18-FPN on your own COCO-format data (annotation json + image folder per split).

Only the four paths need setting:

  python scripts/train.py --config=configs/coco_format.py --workdir=runs/mydata \
    --config.data.train_json=mydata/train.json --config.data.train_images=mydata/images \
    --config.data.val_json=mydata/val.json --config.data.val_images=mydata/images

The dataset is built into `data.data_dir` on first use and rebuilt when a json or an image file
changes (`mrcnn_jax/data/coco_format.py`); the categories, their number (`model.num_classes = 0`
means "from the json") and their names come from the json, and evaluation reports the json's
category ids. The defaults are a starting point for a few hundred to a few thousand images
trained from scratch: images fitted into 512² with flips and scale jitter, a ResNet-18-FPN and
modest RoI budgets, 6000 steps of batch 8 (about 50 epochs of 1000 images). Change any field on
the command line, e.g. `--config.train.num_steps=20000 --config.model.backbone_depth=50`.
Every other field is documented in `configs/default.py`.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the config for training on COCO-format data given by path."""
    config = default.get_config()

    data = config.data
    data.dataset = "coco_format"
    # Required, given on the command line: data.train_json, data.train_images, data.val_json,
    # data.val_images.
    data.image_size = (512, 512)
    data.resize_short_side = 0  # Images are resized to fit the canvas, keeping their aspect.
    data.resize_max_long_side = 0
    data.train_short_sides = ()  # Scale augmentation comes from scale_jitter instead.
    data.max_instances = 50
    data.mask_size = 56
    data.scale_jitter = (0.75, 1.25)  # Small data: scale augmentation on top of flips.

    model = config.model
    model.num_classes = 0  # 0 = the number of categories in the json.
    model.backbone_depth = 18
    model.norm = "batch"  # From scratch: batch statistics, nothing frozen.
    model.freeze_at = 0
    model.fpn_dim = 128
    model.anchor_sizes = ((16,), (32,), (64,), (128,), (256,))  # For objects of 10-400 px.

    rpn = model.rpn
    rpn.pre_nms_topk_train = 1000
    rpn.pre_nms_topk_test = 500
    rpn.post_nms_topk_train = 500
    rpn.post_nms_topk_test = 500

    roi = model.roi_heads
    roi.batch_size_per_image = 128
    roi.box_head_dim = 512
    roi.mask_head_dim = 128
    roi.detections_per_image = 50
    roi.detections_pre_nms_topk = 1000

    train = config.train
    train.batch_size = 8
    train.num_steps = 6000
    train.base_lr = 0.01
    train.warmup_steps = 300
    train.schedule = "cosine"
    train.log_every = 20
    train.checkpoint_every = 500
    train.eval_every = 1000

    config.eval.batch_size = 8
    return config
