"""COCO 2017, Mask R-CNN R50-FPN trained from scratch with large-scale jitter, 100 epochs.

After Detectron2's `new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ` (44.6 box / 40.3 mask AP, no
ImageNet weights): images fitted into a 1024² canvas and scaled by a random factor in
[0.1, 2.0] (large-scale jitter) with a random 1024² crop, sync BatchNorm in the backbone, the FPN
and the heads (statistics over valid pixels and valid RoIs only), the 2-conv RPN head and the
4-conv + 1-FC box head, batch 64, 100 epochs of lr 0.1 decayed ×0.1 at 89 % and 96 % (183,200
steps over the 117,266 annotated images; Detectron2 counts 184,375 over 118k). These steps are
computed here for batch 64: with another `train.batch_size`, or a shorter run, set
`train.num_steps` and `train.decay_steps` with it (the trainer warns about decay steps a run
never reaches).

  python scripts/train.py --config=configs/coco_r50_fpn_lsj_100ep.py \
      --config.data.manual_dir=/data/coco --workdir=gs://.../coco_r50_lsj_100ep

As in Detectron2's recipe, the boxes of objects the random crop cuts are recomputed from their
masks' visible parts (objects with no visible pixel are dropped: `recompute_boxes`), images are
shrunk with antialiasing (PIL's bilinear resize there), images without annotations are skipped
in training and biases decay (configs/default.py). Differences: RoIAlign uses 2 samples per bin
(Detectron2: adaptive; see docs/coco_recipes.md); Detectron2's `FixedSizeCrop` pads every
image to 1024² with grey (128) and the model sees that padding as image (anchors, proposals
clipped to 1024), where here the padding beyond the content rounded up to 32 is no image
(CONTRACTS.md: padding never changes the answer).
"""

import ml_collections

from configs import default

COCO_TRAIN_IMAGES = 117_266  # train2017 images with at least one annotation.


def get_config() -> ml_collections.ConfigDict:
    """Returns the from-scratch LSJ config."""
    config = default.get_config()

    data = config.data
    data.image_size = (1024, 1024)
    data.resize_short_side = 0  # Fit the 1024² canvas, then jitter and crop.
    data.resize_max_long_side = 0
    data.train_short_sides = ()  # Large scale jitter replaces multi-scale resizing.
    data.scale_jitter = (0.1, 2.0)
    data.resize_antialias = True  # Detectron2 shrinks with PIL's (antialiased) bilinear resize.

    model = config.model
    model.backbone_weights = ""  # From scratch.
    model.norm = "sync"  # Cross-replica BN in the backbone, the FPN and the heads.
    model.freeze_at = 0
    model.fpn_norm = True
    model.dtype = "bfloat16"
    model.rpn.num_convs = 2
    model.rpn.smooth_l1_beta = 0.0
    roi = model.roi_heads
    roi.box_head_convs = 4
    roi.box_head_conv_dim = 256
    roi.box_head_fcs = 1
    roi.head_norm = True
    roi.roi_align_method = "einsum"  # Dense matmuls for TPU MXUs.

    train = config.train
    train.batch_size = 64
    steps_per_epoch = COCO_TRAIN_IMAGES // train.batch_size
    train.num_steps = 100 * steps_per_epoch
    train.base_lr = 0.1
    train.warmup_steps = 250
    train.warmup_factor = 0.067
    train.schedule = "step"
    train.decay_steps = (int(0.8889 * train.num_steps), int(0.963 * train.num_steps))
    train.weight_decay = 4e-5
    train.grad_clip_norm = 0.0
    train.checkpoint_every = 5000
    train.eval_every = 20_000
    config.eval.batch_size = 64
    return config
