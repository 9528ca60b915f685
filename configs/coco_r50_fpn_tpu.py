"""COCO 2017, Mask R-CNN R50-FPN, the TPU recipe: global batch 64 at 1024², bf16, sync BN.

Run the same command on every host of a pod slice; each host feeds its shard:

  python scripts/train.py --config=configs/coco_r50_fpn_tpu.py \
      --config.data.manual_dir=gs://.../coco --workdir=gs://.../coco_r50_tpu
"""

import ml_collections

from configs import coco_r50_fpn_1x


def get_config() -> ml_collections.ConfigDict:
    """Returns the TPU COCO R50-FPN config."""
    config = coco_r50_fpn_1x.get_config()
    config.data.image_size = (1024, 1024)
    config.data.resize_max_long_side = 1024  # Shorter side 800, longer ≤ 1024: fits the canvas.
    config.data.canvas_groups = ((832, 1024), (1024, 832))  # Training: landscape, portrait.
    config.model.dtype = "bfloat16"  # Compute in bf16; parameters and the optimizer stay fp32.
    config.model.norm = "sync"  # Cross-replica BN statistics over the data axis.
    config.model.freeze_at = 1
    config.model.roi_heads.roi_align_method = "einsum"  # Dense matmuls suit the MXU.
    config.train.batch_size = 64
    config.train.base_lr = 0.08  # Linear scaling of 0.02 at batch 16.
    config.train.num_steps = 22_500  # The 1× schedule's 1.44M images.
    config.train.warmup_steps = 500
    config.train.decay_steps = (15_000, 20_000)
    config.train.checkpoint_every = 1000
    config.train.eval_every = 2500
    config.eval.batch_size = 64
    return config
