"""COCO 2017, Mask R-CNN R50-FPN, Detectron2's 1× recipe in fixed-size form.

Exactly `configs/default.py`: global batch 16, lr 0.02 with 1000 warm-up steps, 90k steps decayed
×0.1 at 60k and 80k, frozen BN with the stem and res2 frozen (ImageNet-pretrained backbone
expected), the shorter side resized to 800 (longer ≤ 1333) and padded into a 1344² canvas.
Build the dataset first (see README "Train on COCO"):

  python scripts/train.py --config=configs/coco_r50_fpn_1x.py \
      --config.data.manual_dir=/data/coco --workdir=/tmp/coco_r50_1x
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    """Returns the COCO R50-FPN 1× config."""
    return default.get_config()
