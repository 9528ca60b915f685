"""torchvision's `maskrcnn_resnet50_fpn` (v1) exactly: the architecture its COCO weights fit.

Use with weights converted by `scripts/convert_torchvision.py --weights v1` (see
docs/torchvision_weights.md). It is `configs/coco_r50_fpn_1x.py` with torchvision's 91-way class
layout, `aligned=False` RoIAlign, 2000 RPN proposals in training, smooth-L1 beta 1/9 in the box
loss and its 26-epoch schedule (batch 16, lr 0.02, ×0.1 after epochs 16 and 22). Every inference
setting is torchvision's default:

- ResNet-50 with frozen BatchNorm (the v1 weights' eps 0 is folded into the variances by the
  converter), stem and res2 frozen (trainable_backbone_layers=3);
  FPN 256 with P6 = stride-2 subsampling of P5 (`LastLevelMaxPool`);
- anchors 32..512 on P2..P6, ratios (0.5, 1, 2); RPN 1000 per level before NMS and 1000 after
  (2000/2000 in training), NMS 0.7, min size 1e-3;
- RoIAlign 7×7 / 14×14 with `aligned=False`, `sampling_ratio=2`, torchvision's level mapper;
  box head 2×1024 FC, deltas weighted (10, 10, 5, 5); mask head 4×256 convs + deconv;
- detections: score > 0.05, per-class NMS 0.5, 100 per image; masks pasted as torchvision's
  `paste_masks_in_image` (`mask_paste = "torchvision"`: expanded integer box, > 0.5).
- ImageNet mean/std on 0–255 pixels (torchvision's on 0–1 pixels, the same numbers).
- 91-way COCO class layout: `num_classes = 90` (torchvision label l + 1 = our label l, COCO
  `category_id = l + 1`; `data.label_to_category_id` and `data.class_names` record it).

Input: torchvision's resize (shorter side 800, longer ≤ 1333, its float64 floor arithmetic) into a
1344² canvas (`data.image_size`); each image's valid extent is its content rounded up to
`model.size_divisibility` = 32, as torchvision pads. Forced by static shapes: candidate (box,
class) pairs entering the final NMS are capped at `detections_pre_nms_topk` (torchvision has no
cap). See docs/torchvision_weights.md.
"""

import ml_collections

from configs import coco_r50_fpn_1x

# torchvision's `_COCO_CATEGORIES`: name of each of its 91 labels (0 background, j = COCO id j).
TORCHVISION_COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

COCO_TRAIN_IMAGES = 117_266  # train2017 images with at least one annotation (torchvision's set).
STEPS_PER_EPOCH = COCO_TRAIN_IMAGES // 16


def get_config() -> ml_collections.ConfigDict:
    """Returns the torchvision Mask R-CNN R50-FPN v1 config: the COCO R50-FPN config with
    torchvision's class layout, RoIAlign, RPN train budget, box loss and 26-epoch recipe."""
    config = coco_r50_fpn_1x.get_config()
    # Our label l is torchvision label l + 1, whose COCO category id is l + 1; labels at ids
    # COCO leaves unused are named "N/A" (the model never predicts them with any confidence).
    config.data.class_names = TORCHVISION_COCO_CATEGORIES[1:]
    config.data.label_to_category_id = tuple(range(1, len(TORCHVISION_COCO_CATEGORIES)))
    config.data.train_short_sides = ()  # torchvision's recipe trains at the shorter side 800.

    model = config.model
    model.num_classes = 90  # torchvision's 91 outputs minus background.
    model.rpn.post_nms_topk_train = 2000
    model.rpn.smooth_l1_beta = 1.0 / 9.0  # torchvision's RPN box loss.
    roi = model.roi_heads
    roi.aligned = False
    roi.smooth_l1_beta = 1.0 / 9.0  # torchvision's fastrcnn_loss.
    roi.mask_paste = "torchvision"  # The paste torchvision's COCO mask AP is measured with.

    train = config.train
    train.num_steps = 26 * STEPS_PER_EPOCH
    train.decay_steps = (16 * STEPS_PER_EPOCH, 22 * STEPS_PER_EPOCH)
    train.checkpoint_every = STEPS_PER_EPOCH
    train.eval_every = 0
    return config
