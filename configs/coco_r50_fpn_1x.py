"""COCO 2017, Mask R-CNN R50-FPN, Detectron2's 1× recipe in fixed-size form.

Global batch 16, lr 0.02 with 1000 warm-up steps, 90k steps decayed ×0.1 at 60k and 80k, frozen
BN with the stem and res2 frozen (ImageNet-pretrained backbone expected), images fitted into a
padded 1344² canvas. Build the dataset first (see README "Train on COCO"):

  python scripts/train.py --config=configs/coco_r50_fpn_1x.py \
      --config.data.manual_dir=/data/coco --workdir=/tmp/coco_r50_1x
"""

import ml_collections

from configs import shapes_r18


def get_config() -> ml_collections.ConfigDict:
    """Returns the COCO R50-FPN 1× config."""
    config = shapes_r18.get_config()

    data = config.data
    data.dataset = "coco_instances"
    data.image_size = (1344, 1344)  # Longer side ≤ 1333 fits; a multiple of 64 (P6 stride).
    data.resize_short_side = 800  # Detectron2/torchvision: shorter side 800 ...
    data.resize_max_long_side = 1333  # ... longer side at most 1333, then padded to 1344².
    data.max_instances = 100  # COCO train has ≤ 93 non-crowd objects per image.
    data.mask_size = 112  # GT-box mask crops (the 28² targets are resampled from them).

    model = config.model
    model.num_classes = 80
    model.backbone_depth = 50
    model.norm = "frozen"
    model.freeze_at = 2
    model.fpn_dim = 256
    model.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))

    rpn = model.rpn
    rpn.pre_nms_topk_train = 2000
    rpn.pre_nms_topk_test = 1000
    rpn.post_nms_topk_train = 1000
    rpn.post_nms_topk_test = 1000

    roi = model.roi_heads
    roi.batch_size_per_image = 512
    roi.box_head_dim = 1024
    roi.mask_head_dim = 256
    roi.detections_per_image = 100
    roi.detections_pre_nms_topk = 5000

    train = config.train
    train.batch_size = 16
    train.num_steps = 90_000
    train.base_lr = 0.02
    train.warmup_steps = 1000
    train.warmup_factor = 0.001
    train.schedule = "step"
    train.decay_steps = (60_000, 80_000)
    train.log_every = 100
    train.checkpoint_every = 5000
    train.eval_every = 10_000

    config.eval.batch_size = 16
    return config
