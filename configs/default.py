"""Every config field, documented; the values are Mask R-CNN R50-FPN on COCO (Detectron2's).

Every other config is a small variant: `get_config()` of this file with a few fields changed
(`shapes_r18.py`, the README's main job; `coco_r50_fpn_1x.py`; `coco_format.py`; the torchvision
configs). Configs hold data only and import no library code. Override any field on the command
line, e.g. `--config.train.batch_size=4`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config (Mask R-CNN R50-FPN, COCO 2017, 1× schedule at batch 16)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, the data order and the per-step RNG; < 2**32.

    # ---------------------------------------------------------------- data
    config.data = data = ml_collections.ConfigDict()
    data.dataset = "coco_instances"  # TFDS builder: "coco_instances", "coco_format" or "shapes".
    data.data_dir = ""  # TFDS data dir; "" = TFDS default (~/tensorflow_datasets).
    data.manual_dir = ""  # Where the COCO zips/folders are (coco_instances only).
    data.train_split = "train"  # TFDS split spec trained on (slices and sums work).
    data.val_split = "validation"  # TFDS split spec evaluated (eval.max_images limits it).
    data.train_json = ""  # coco_format only: COCO-format annotation json of the train split.
    data.train_images = ""  # coco_format only: folder its image file_names are relative to.
    data.val_json = ""  # coco_format only: the same for the validation split (evaluated).
    data.val_images = ""
    # coco_format only: True turns each JPEG, PNG or WebP as its EXIF orientation says (as photo
    # viewers and annotation tools show phone photos) when the dataset is built, for json files
    # annotated on the turned images; False (default) reads the stored pixels.
    data.exif_orientation = False
    data.shapes_num_train = 2000  # shapes only: images generated for the train split.
    data.shapes_num_val = 200  # shapes only: images generated for the validation split.
    data.image_size = (1344, 1344)  # Canvas (H, W): multiple of model.size_divisibility.
    data.max_instances = 100  # Ground truth padded/truncated to this many objects per image.
    data.resize_short_side = 800  # > 0: shorter side resized to this; 0: fit image_size.
    # With resize_short_side > 0: longer side ≤ this (required > 0; image_size must hold it,
    # rounded up to model.size_divisibility, in both orientations).
    data.resize_max_long_side = 1333
    data.mask_size = 112  # GT masks are cropped to their box and resized to mask_size².
    data.mean = (123.675, 116.28, 103.53)  # RGB mean subtracted from 0–255 pixels.
    data.std = (58.395, 57.12, 57.375)  # RGB std the centred pixels are divided by.
    data.hflip = True  # Random horizontal flip at train time.
    # Antialiased resizing: shrinking widens the bilinear filter to the scale (PIL's bilinear
    # resize, which Detectron2 uses); False = torchvision's F.interpolate (no antialiasing).
    # Only shrinking differs (large-scale jitter's small scales); enlarging is the same.
    data.resize_antialias = False
    data.scale_jitter = (1.0, 1.0)  # (min, max) random scale of the fitted image at train time.
    # Multi-scale training: the shorter side of each training image is drawn uniformly from
    # these (Detectron2's MIN_SIZE_TRAIN); () = resize_short_side, which eval always uses.
    data.train_short_sides = (640, 672, 704, 736, 768, 800)
    # Training skips images without a non-crowd object (Detectron2's FILTER_EMPTY_ANNOTATIONS,
    # torchvision's references); False trains on them as all-negative images.
    data.skip_empty_train_images = True
    # Aspect-ratio grouping (training only; eval keeps image_size): canvases (H, W), multiples
    # of model.size_divisibility, e.g. ((832, 1344), (1344, 832)) (landscape, portrait) instead
    # of one square that pads every image. Each image goes to the first canvas holding its
    # resized size (at the largest training shorter side); each global batch is one group,
    # drawn per step from the seed and the step (so resumes and hosts agree); one compiled
    # train step per canvas. Needs resize_short_side > 0. () = off: image_size only.
    data.canvas_groups = ()
    # Probability of each group per step; () = equal. Match the fraction of the training images
    # in each group (pipeline.canvas_group_counts reads it from the image headers); else the
    # images of an over-weighted group repeat more often than the others.
    data.canvas_group_weights = ()
    data.shuffle_buffer = 1024  # Examples in the tf.data shuffle buffer.
    data.class_names = ()  # Names of labels 0..K-1; () = taken from the dataset at train start.
    data.label_to_category_id = ()  # COCO category id of each label; () = from the dataset.

    # ---------------------------------------------------------------- model
    config.model = model = ml_collections.ConfigDict()
    model.num_classes = 80  # Foreground classes (0 = the dataset's); box head adds background.
    model.backbone_depth = 50  # ResNet depth: 18, 34, 50 or 101.
    # "frozen" (fixed affine), "batch" (per-device batch statistics: they depend on the images
    # per device, so resuming on another number of devices changes training; a resume warns)
    # or "sync" (statistics over the global batch, the same on any number of devices).
    model.norm = "frozen"
    model.freeze_at = 2  # 0: train all; 1: freeze stem; 2: freeze stem and res2.
    # Backbone initialisation when training starts without a checkpoint: "" (random init), a
    # torchvision ImageNet classification release of ResNet-`backbone_depth` ("IMAGENET1K_V1",
    # torchvision's and Detectron2's torchvision-style recipes; downloaded once into
    # $TORCH_HOME) or the path of such a state dict (.pth, e.g. `resnet50-0676ba61.pth`, read with
    # `torch.load(weights_only=True)`; its `fc.*` is ignored). Needs the `torch` extra.
    model.backbone_weights = ""
    # Every variable from a checkpoint when training starts without one of its own (a workdir,
    # its checkpoints/ or one checkpoints/<step>, e.g. torchvision's COCO weights converted by
    # scripts/convert_torchvision.py): fine-tuning. Its architecture must be this one, the
    # classes aside: the class predictors are mapped by class name, classes it lacks start
    # fresh (`train.transfer`). Exclusive with `backbone_weights`; ignored when resuming.
    model.init_from = ""
    # `norm = "frozen"` or `freeze_at > 0` without `backbone_weights` or `init_from` freezes
    # randomly initialised layers, so training refuses to start; True allows it (tests,
    # experiments).
    model.allow_random_frozen_backbone = False
    model.fpn_dim = 256  # Channels of every FPN level.
    model.fpn_norm = False  # BatchNorm after every FPN conv, in the `norm` mode (torchvision v2).
    model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params stay float32).
    # Each image's valid extent is its content rounded up to this (torchvision/Detectron2 pad
    # to 32); the model computes on that extent only, so the canvas size never changes a result.
    model.size_divisibility = 32
    model.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))  # One tuple per level P2..P6.
    model.aspect_ratios = (0.5, 1.0, 2.0)  # Anchor height/width ratios, shared by levels.

    model.rpn = rpn = ml_collections.ConfigDict()
    rpn.num_convs = 1  # Shared 3×3 conv + ReLU layers of the RPN head (torchvision v2: 2).
    rpn.pre_nms_topk_train = 2000  # Per-level top-k before NMS at train time.
    rpn.pre_nms_topk_test = 1000  # Per-level top-k before NMS at test time.
    rpn.post_nms_topk_train = 1000  # Proposals kept per image after NMS (train).
    rpn.post_nms_topk_test = 1000  # Proposals kept per image after NMS (test).
    rpn.nms_threshold = 0.7  # IoU threshold of the proposal NMS.
    rpn.min_size = 1e-3  # Proposals narrower or lower than this (pixels) are dropped.
    rpn.fg_iou = 0.7  # Anchor IoU with a GT at/above which it is positive.
    rpn.bg_iou = 0.3  # Anchor max IoU below which it is negative.
    rpn.batch_size_per_image = 256  # Anchors sampled per image for the RPN loss.
    rpn.positive_fraction = 0.5  # Max fraction of positives among sampled anchors.
    rpn.smooth_l1_beta = 1.0 / 9.0  # Smooth-L1 beta of the RPN box loss.

    model.roi_heads = roi = ml_collections.ConfigDict()
    roi.batch_size_per_image = 512  # RoIs sampled per image for the box/mask heads.
    roi.positive_fraction = 0.25  # Max fraction of foreground RoIs.
    roi.fg_iou = 0.5  # RoI IoU at/above which it is foreground.
    # Mask-head budget (training): a replica of B images trains its mask head on
    # G = mask_rois_per_image * B slots filled with the foreground RoIs of all its images, so
    # its cost follows the positives rather than the F = batch_size_per_image *
    # positive_fraction slots per image (mostly padding). Positives that fit are all taken
    # (the loss is unchanged); beyond G, G of them are drawn uniformly. Per image, so a config
    # means the same on any number of devices. 0 (or >= F): every foreground slot, no budget:
    # with no measurement of COCO's positives per image at every step, COCO keeps all F.
    roi.mask_rois_per_image = 0
    # Training: the mask head runs over its G slots this many at a time and skips the chunks
    # that hold no positive (forward and backward), so its work follows the replica's
    # positives rounded up to a chunk, with the same loss and gradients as one pass. 0 = one
    # pass over all G slots. Not applied to heads with batch statistics (head_norm with norm
    # "batch"/"sync"), whose moments span all slots.
    roi.mask_head_chunk = 32
    roi.box_head_convs = 0  # 3×3 convs before the box head's FCs (torchvision v2: 4).
    roi.box_head_conv_dim = 256  # Width of those convs.
    roi.box_head_fcs = 2  # FC layers of the box head (torchvision v2: 1).
    roi.box_head_dim = 1024  # Width of the box head's FC layers.
    roi.mask_head_convs = 4  # 3×3 convs of the mask head before its deconv.
    roi.mask_head_dim = 256  # Width of the mask-head convs.
    roi.head_norm = False  # BatchNorm after box/mask-head convs; stored stats only (tv v2).
    roi.box_pooler_size = 7  # RoIAlign output of the box head.
    roi.mask_pooler_size = 14  # RoIAlign output of the mask head (masks are 2× this).
    roi.sampling_ratio = 2  # Bilinear samples per bin side in RoIAlign.
    roi.aligned = True  # RoIAlign half-pixel shift (torchvision Mask R-CNN v1 uses False).
    roi.roi_align_mode = "avg"  # "avg" (torchvision/Detectron2) or "max" over bin samples.
    roi.roi_align_method = "gather"  # "gather" (CPU/GPU) or "einsum" (dense matmuls, for TPU).
    roi.box_reg_weights = (10.0, 10.0, 5.0, 5.0)  # Box-head delta weights (dx, dy, dw, dh).
    roi.smooth_l1_beta = 0.0  # Box-head smooth-L1 beta (0 = L1, as Detectron2).
    roi.score_threshold = 0.05  # Detections below this score are dropped at inference.
    roi.nms_threshold = 0.5  # Per-class NMS IoU at inference.
    roi.detections_per_image = 100  # D: fixed number of (padded) detections per image.
    roi.detections_pre_nms_topk = 5000  # Best (box, class) candidates entering NMS; at least D.
    # How eval/predict paste each 28×28 mask into the image: "detectron2" (bilinear sampling of
    # the map over the float box at pixel centres, >= 0.5; the convention of `aligned=True`
    # models) or "torchvision" (legacy: 1-pixel zero pad, box expanded and truncated to ints,
    # resized, > 0.5; what torchvision's `aligned=False` COCO numbers use).
    roi.mask_paste = "detectron2"

    # ---------------------------------------------------------------- training
    config.train = train = ml_collections.ConfigDict()
    train.batch_size = 16  # Global batch (all devices, all hosts).
    train.num_steps = 90_000  # Total optimiser steps.
    train.base_lr = 0.02  # Peak learning rate (after warm-up); 0.02 per 16 images, linearly.
    train.warmup_steps = 1000  # Linear warm-up from warmup_factor * base_lr.
    train.warmup_factor = 0.001
    train.schedule = "step"  # "cosine" or "step".
    train.decay_steps = (60_000, 80_000)  # "step": lr times decay_factor at each (repeats count).
    train.decay_factor = 0.1
    train.optimizer = "sgd"  # "sgd" (with momentum, L2 weight decay) or "adamw" (decoupled).
    train.momentum = 0.9  # sgd only.
    train.adam_betas = (0.9, 0.999)  # adamw only: (b1, b2).
    train.weight_decay = 1e-4  # On kernels (and biases, see below); never on norm parameters.
    # Biases decay with weight_decay too (Detectron2's WEIGHT_DECAY_BIAS = WEIGHT_DECAY).
    train.bias_weight_decay = True
    train.grad_clip_norm = 10.0  # Global-norm gradient clipping; 0 = off.
    train.log_every = 100  # Steps between scalar logs.
    train.checkpoint_every = 5000  # Steps between checkpoints (and one at the end).
    train.keep_checkpoints = 3  # The newest checkpoints kept in the workdir; 0 = all.
    train.eval_every = 10_000  # Steps between evaluations on the val split; 0 = only at the end.

    # ---------------------------------------------------------------- evaluation
    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 16  # Global; rounded up to a multiple of the devices, last one padded.
    config.eval.max_images = 0  # Evaluate on at most this many val images; 0 = all.
    return config
