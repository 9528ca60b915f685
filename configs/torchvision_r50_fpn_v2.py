"""torchvision's `maskrcnn_resnet50_fpn_v2` exactly: the architecture its COCO weights fit.

Use with weights converted by `scripts/convert_torchvision.py --weights v2` (47.4 box / 41.8 mask
AP on COCO val2017 in torchvision; see docs/torchvision_weights.md). It is the v1 config
(`configs/torchvision_r50_fpn_v1.py`: same inputs, anchors, RPN and detection settings) with
v2's layers (Li et al., 2021, "Benchmarking Detection Transfer Learning with Vision Transformers"):

- BatchNorm after every FPN conv (the convs lose their bias), in the backbone's "frozen" mode;
- two shared 3×3 convs in the RPN head;
- box head: four 3×3 convs of 256 with BatchNorm, then one 1024 FC; mask head convs with
  BatchNorm. The heads' BatchNorm always uses its stored statistics, so this config serves
  inference and fine-tuning; it is not torchvision's v2 training recipe (large-scale jitter,
  sync BN, 400 epochs), and the `train` section is v1's.

torchvision's v2 BatchNorm layers have eps 1e-5 (as ours), so no variance folding is needed.
"""

import ml_collections

from configs import torchvision_r50_fpn_v1


def get_config() -> ml_collections.ConfigDict:
    """Returns the torchvision Mask R-CNN R50-FPN v2 config."""
    config = torchvision_r50_fpn_v1.get_config()
    model = config.model
    model.fpn_norm = True
    model.rpn.num_convs = 2
    roi = model.roi_heads
    roi.box_head_convs = 4
    roi.box_head_conv_dim = 256
    roi.box_head_fcs = 1
    roi.head_norm = True
    return config
