"""Fine-tune torchvision's COCO-trained Mask R-CNN R50-FPN on your own COCO-format data.

Convert the weights once (`scripts/convert_torchvision.py`, docs/torchvision_weights.md), then
give the converted workdir as `model.init_from` with the four data paths:

  python scripts/convert_torchvision.py --weights=v1 --out=runs/torchvision_v1
  python scripts/train.py --config=configs/coco_format_torchvision.py --workdir=runs/mydata_ft \
    --config.model.init_from=runs/torchvision_v1 \
    --config.data.train_json=mydata/train.json --config.data.train_images=mydata/images \
    --config.data.val_json=mydata/val.json --config.data.val_images=mydata/images

`--config=configs/coco_format_torchvision.py:v2` fine-tunes the v2 weights (`--weights=v2`).
The data settings are `configs/coco_format.py`'s (images fitted into 512², flips and scale
jitter); the model is torchvision's release exactly (`configs/torchvision_r50_fpn_v1.py` or
`_v2.py`: frozen BatchNorm, stem and res2 frozen in v1, its anchors and heads), with the
classes of your json. Every weight starts from the checkpoint; the class predictors of
categories named as a COCO class (e.g. "person", "dog") start from that class's, the others
fresh (`mrcnn_jax/train/transfer.py`). The schedule (SGD, batch 8, lr 0.01, 2000 steps with a
cosine decay) is a starting point for a few hundred images, a few dozen epochs.
"""

import ml_collections

from configs import coco_format, torchvision_r50_fpn_v1, torchvision_r50_fpn_v2

RELEASES = {"v1": torchvision_r50_fpn_v1, "v2": torchvision_r50_fpn_v2}


def get_config(release: str = "v1") -> ml_collections.ConfigDict:
    """Returns the fine-tuning config for torchvision's `release` ("v1" or "v2") weights."""
    if release not in RELEASES:
        raise ValueError(f"release {release!r} must be one of {sorted(RELEASES)} (file.py:v2)")
    config = coco_format.get_config()
    config.model = RELEASES[release].get_config().model
    config.model.num_classes = 0  # From the json.
    config.model.backbone_weights = ""  # init_from brings every weight.
    config.model.init_from = ""  # Required: the converted checkpoint (see above).

    train = config.train
    train.optimizer = "sgd"
    train.base_lr = 0.01
    train.num_steps = 2000
    train.warmup_steps = 100
    train.schedule = "cosine"
    train.checkpoint_every = 250
    train.eval_every = 500
    return config
