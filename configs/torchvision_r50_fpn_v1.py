"""torchvision's `maskrcnn_resnet50_fpn` (v1) exactly: the architecture its COCO weights fit.

Use with weights converted by `scripts/convert_torchvision.py --weights v1` (see
docs/torchvision_weights.md); training from scratch with it follows torchvision's COCO recipe
(26 epochs at batch 16). Every inference setting is torchvision's default:

- ResNet-50 with frozen BatchNorm (eps 1e-5), stem and res2 frozen (trainable_backbone_layers=3);
  FPN 256 with P6 = stride-2 subsampling of P5 (`LastLevelMaxPool`);
- anchors 32..512 on P2..P6, ratios (0.5, 1, 2); RPN 1000 per level before NMS and 1000 after
  (2000/2000 in training), NMS 0.7, min size 1e-3;
- RoIAlign 7×7 / 14×14 with `aligned=False`, `sampling_ratio=2`, torchvision's level mapper;
  box head 2×1024 FC, deltas weighted (10, 10, 5, 5); mask head 4×256 convs + deconv;
- detections: score > 0.05, per-class NMS 0.5, 100 per image; masks pasted at threshold 0.5.
- ImageNet mean/std on 0–255 pixels (torchvision's on 0–1 pixels, the same numbers).
- 91-way COCO class layout: `num_classes = 90` (torchvision label l + 1 = our label l, COCO
  `category_id = l + 1`; `data.label_to_category_id` and `data.class_names` record it).

Forced by static shapes: every image is padded to `data.image_size` = 1344² (torchvision pads a
batch to its largest image rounded up to 32), which changes features within a few pixels of the
bottom/right content edge, and the stride of P6 anchors when torchvision's padded size is not a
multiple of 64. Candidate (box, class) pairs entering the final NMS are capped at
`detections_pre_nms_topk` (torchvision has no cap); see docs/torchvision_weights.md for the
effect of each.
"""

import ml_collections

from configs import shapes_r18
from mrcnn_jax.convert.torchvision import torchvision_label_map

COCO_TRAIN_IMAGES = 117_266  # train2017 images with at least one annotation (torchvision's set).
STEPS_PER_EPOCH = COCO_TRAIN_IMAGES // 16


def get_config() -> ml_collections.ConfigDict:
    """Returns the torchvision Mask R-CNN R50-FPN v1 config."""
    config = shapes_r18.get_config()

    data = config.data
    data.dataset = "coco_instances"
    data.image_size = (1344, 1344)  # 1333 (torchvision's max_size) rounded up to a multiple of 64.
    data.max_instances = 100
    data.label_to_category_id, data.class_names = torchvision_label_map()

    model = config.model
    model.num_classes = 90  # torchvision's 91 outputs minus background.
    model.backbone_depth = 50
    model.norm = "frozen"
    model.freeze_at = 2
    model.fpn_dim = 256
    model.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
    model.aspect_ratios = (0.5, 1.0, 2.0)

    rpn = model.rpn
    rpn.pre_nms_topk_train = 2000
    rpn.pre_nms_topk_test = 1000
    rpn.post_nms_topk_train = 2000
    rpn.post_nms_topk_test = 1000
    rpn.nms_threshold = 0.7
    rpn.min_size = 1e-3

    roi = model.roi_heads
    roi.batch_size_per_image = 512
    roi.positive_fraction = 0.25
    roi.fg_iou = 0.5
    roi.box_head_dim = 1024
    roi.mask_head_dim = 256
    roi.aligned = False
    roi.smooth_l1_beta = 1.0 / 9.0  # torchvision's fastrcnn_loss.
    roi.score_threshold = 0.05
    roi.nms_threshold = 0.5
    roi.detections_per_image = 100
    roi.detections_pre_nms_topk = 5000

    train = config.train
    train.batch_size = 16
    train.num_steps = 26 * STEPS_PER_EPOCH
    train.base_lr = 0.02
    train.warmup_steps = 1000
    train.warmup_factor = 0.001
    train.schedule = "step"
    train.decay_steps = (16 * STEPS_PER_EPOCH, 22 * STEPS_PER_EPOCH)
    train.checkpoint_every = STEPS_PER_EPOCH
    train.log_every = 100
    config.eval.batch_size = 8
    return config
