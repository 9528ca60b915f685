"""COCO 2017, Mask R-CNN R50-FPN, Detectron2's 1× recipe in fixed-size form.

`configs/default.py` (global batch 16, lr 0.02 with 1000 warm-up steps, 90k steps decayed ×0.1 at
60k and 80k, frozen BN with the stem and res2 frozen, the shorter side drawn from 640..800 step
32 in training and 800 at eval (longer ≤ 1333), padded into a 1344² canvas; images without
annotations skipped, biases decayed) starting from torchvision's ImageNet ResNet-50
(`model.backbone_weights = "IMAGENET1K_V1"`: downloaded once; offline, pass the path of
`resnet50-0676ba61.pth` instead), with L1 box losses, no gradient clipping and, in training,
aspect-ratio grouping (`data.canvas_groups`: landscape images in 832×1344, portrait ones in
1344×832; eval keeps 1344²). Every field beside Detectron2's and torchvision's value, and each
remaining difference: docs/coco_recipes.md.
Build the dataset first (see README "Train on COCO 2017"):

  python scripts/train.py --config=configs/coco_r50_fpn_1x.py \
      --config.data.manual_dir=/data/coco --workdir=/tmp/coco_r50_1x
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the COCO R50-FPN 1× config."""
    config = default.get_config()
    # torchvision's ImageNet ResNet-50 (downloaded once; or the path of its .pth when offline).
    config.model.backbone_weights = "IMAGENET1K_V1"
    config.model.rpn.smooth_l1_beta = 0.0  # Detectron2: L1 box losses in the RPN and the heads.
    config.train.grad_clip_norm = 0.0  # Detectron2 does not clip gradients.
    # Aspect-ratio grouping: landscape (and square) images train in 832×1344, portrait ones in
    # 1344×832, instead of all in 1344² (eval keeps 1344²). Equal weights: no verified count
    # of COCO train2017's orientations is at hand; `pipeline.canvas_group_counts(config)` reads
    # it from the built dataset's image headers, to set data.canvas_group_weights from.
    config.data.canvas_groups = ((832, 1344), (1344, 832))
    config.data.canvas_group_weights = ()
    return config
