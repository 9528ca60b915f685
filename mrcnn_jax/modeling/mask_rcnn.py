"""Mask R-CNN: backbone + FPN → RPN → RoI sampling → box head and mask head.

`MaskRCNN.from_config(config.model)` is called on a batch dict (keys of docs/CONTRACTS.md). In
training it returns the predictions and targets the losses need (`TrainOutputs`); at inference it
returns a fixed-size result per image. Every size comes from the config.

The canvas never changes the answer: each image's valid extent (`image_size` rounded up to
`size_divisibility`, `ops/extent.py`) bounds what the model computes on it: activations are zeroed
outside it before every spatial convolution, BatchNorm statistics count only its pixels, anchors
exist only inside it (with torchvision's per-image strides) and RoIAlign clamps at it, so an image
gets what torchvision computes on that image alone, whatever canvas it is padded into.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrcnn_jax.modeling.checks import check_model_config
from mrcnn_jax.modeling.fpn import FPN, RPN_LEVELS, RPN_STRIDES
from mrcnn_jax.modeling.resnet import ResNet
from mrcnn_jax.modeling.roi_heads import (
    BoxHead,
    MaskHead,
    detect_boxes,
    sample_mask_rois,
    sample_rois,
)
from mrcnn_jax.modeling.rpn import RPNHead, generate_proposals
from mrcnn_jax.ops import anchors as anchor_ops
from mrcnn_jax.ops import extent as extent_ops
from mrcnn_jax.ops import roi_align as roi_align_ops
from mrcnn_jax.ops import targets as target_ops

ROI_LEVELS = ("P2", "P3", "P4", "P5")
MASK_SIZE_FACTOR = 2  # The mask head's deconv doubles the pooled size (14 → 28).
_MASK_SAMPLE_STREAM = 0x6D61736B  # folded into each image's key for `sample_mask_rois`


class TrainOutputs(NamedTuple):
    """What the losses need, for a replica's batch of B images (R sampled RoIs per image; G mask
    slots for the whole replica, `num_mask_slots`)."""

    rpn_logits: jnp.ndarray  # [B, A] objectness logits over all levels' anchors.
    rpn_deltas: jnp.ndarray  # [B, A, 4].
    anchors: jnp.ndarray  # [B, A, 4] each image's anchors (canvas grid).
    anchor_valid: jnp.ndarray  # [B, A] bool: inside the image's valid extent.
    anchor_ids: jnp.ndarray  # [B, A] int32 canvas-independent ids (`LevelAnchors.index`).
    class_logits: jnp.ndarray  # [B, R, K + 1].
    box_deltas: jnp.ndarray  # [B, R, K, 4].
    roi_classes: jnp.ndarray  # [B, R] int32 targets (0 background).
    roi_box_targets: jnp.ndarray  # [B, R, 4].
    roi_valid: jnp.ndarray  # [B, R] bool.
    mask_logits: jnp.ndarray  # [G, 28, 28] logits of each mask slot's GT class.
    mask_targets: jnp.ndarray  # [G, 28, 28] soft targets in [0, 1].
    mask_valid: jnp.ndarray  # [G] bool: the slot holds a (taken) foreground RoI.
    num_proposals: jnp.ndarray  # [B] valid proposals per image.


def dummy_inputs(image_shape: tuple[int, int]) -> dict[str, jnp.ndarray]:
    """A one-image inference batch of zeros `[1, H, W, 3]` (for `init` and shape tracing)."""
    return {
        "image": jnp.zeros((1, *image_shape, 3), jnp.float32),
        "image_size": jnp.array([image_shape], jnp.int32),
    }


def num_foreground_slots(roi_config: ml_collections.ConfigDict) -> int:
    """F: the RoI slots of an image that can hold foreground (the first F of its sample)."""
    return int(roi_config.batch_size_per_image * roi_config.positive_fraction)


def num_mask_slots(roi_config: ml_collections.ConfigDict, num_images: int) -> int:
    """G: the mask head's training slots for a replica of `num_images` images,
    `mask_rois_per_image * num_images`; with `mask_rois_per_image` 0 (or at least F), all
    `F * num_images` foreground slots (no budget)."""
    f = num_foreground_slots(roi_config)
    per_image = roi_config.mask_rois_per_image
    if per_image < 0:
        raise ValueError(f"model.roi_heads.mask_rois_per_image must be >= 0, got {per_image}")
    return min(per_image, f) * num_images if per_image else f * num_images


def mask_head_chunk_size(model_config: ml_collections.ConfigDict, num_slots: int) -> int:
    """C: how many of its `num_slots` (G) training slots the mask head takes at a time, skipping
    chunks without a taken slot; 0 for one pass over all of them.

    `roi_heads.mask_head_chunk` when it is below G and the head has no batch statistics (with
    `head_norm` in "batch"/"sync" mode their moments span all G slots, so it makes one pass).
    """
    c = model_config.roi_heads.mask_head_chunk
    batch_statistics = model_config.roi_heads.head_norm and model_config.norm in ("batch", "sync")
    return c if 0 < c < num_slots and not batch_statistics else 0


def num_mask_head_slots_run(
    model_config: ml_collections.ConfigDict, num_images: int, num_taken: int
) -> int:
    """The mask-head slots a replica of `num_images` images computes in training when
    `num_taken` of its G slots hold positives: whole chunks up to the last taken slot, or G."""
    g = num_mask_slots(model_config.roi_heads, num_images)
    c = mask_head_chunk_size(model_config, g)
    return -(-num_taken // c) * c if c else g


class MaskRCNN(nn.Module):
    """Mask R-CNN over NHWC images. `config` is the `config.model` section (frozen); build it
    with `MaskRCNN.from_config`."""

    config: ml_collections.FrozenConfigDict
    axis_name: str | None = None

    @classmethod
    def from_config(
        cls, model_config: ml_collections.ConfigDict, axis_name: str | None = None
    ) -> "MaskRCNN":
        """The model of `config.model` (`checks.check_model_config`: ValueError naming a bad
        field); `axis_name` is the data-parallel axis (sync BN). `num_classes` must be set:
        a config's 0 ("the dataset's count") is resolved by `trainer.with_dataset_classes`."""
        check_model_config(model_config)
        if model_config.num_classes < 1:
            raise ValueError(
                f"config.model.num_classes={model_config.num_classes}: a model needs its number "
                "of classes (0 means the dataset's count: trainer.with_dataset_classes(config, "
                "builder) sets it, as train.py does)"
            )
        return cls(config=ml_collections.FrozenConfigDict(model_config), axis_name=axis_name)

    def variable_shapes(self, image_shape: tuple[int, int] | None = None) -> dict:
        """`{"params", "batch_stats"}` of `jax.ShapeDtypeStruct`s (traced, nothing computed).

        Parameter shapes do not depend on the image size; `image_shape` only has to be a canvas
        the model takes (default: 128 rounded up to a multiple of `size_divisibility`).
        """
        if image_shape is None:
            side = -(-128 // self.config.size_divisibility) * self.config.size_divisibility
            image_shape = (side, side)
        return jax.eval_shape(
            lambda: self.init(jax.random.key(0), dummy_inputs(image_shape), train=False)
        )

    def setup(self):
        c = self.config
        dtype = jnp.dtype(c.dtype)
        r = c.roi_heads
        self.backbone = ResNet(
            depth=c.backbone_depth,
            norm=c.norm,
            freeze_at=c.freeze_at,
            axis_name=self.axis_name,
            dtype=dtype,
        )
        self.fpn = FPN(
            dim=c.fpn_dim,
            dtype=dtype,
            norm=c.norm if c.fpn_norm else None,
            axis_name=self.axis_name,
        )
        self.rpn_head = RPNHead(
            num_anchors=len(c.aspect_ratios) * len(c.anchor_sizes[0]),
            dtype=dtype,
            num_convs=c.rpn.num_convs,
        )
        self.box_head = BoxHead(
            num_classes=c.num_classes,
            dim=r.box_head_dim,
            dtype=dtype,
            num_convs=r.box_head_convs,
            conv_dim=r.box_head_conv_dim,
            num_fcs=r.box_head_fcs,
            norm=c.norm if r.head_norm else None,
            axis_name=self.axis_name,
        )
        self.mask_head = MaskHead(
            num_classes=c.num_classes,
            dim=r.mask_head_dim,
            num_convs=r.mask_head_convs,
            dtype=dtype,
            norm=c.norm if r.head_norm else None,
            axis_name=self.axis_name,
        )

    def _anchors(self, valid_size: jnp.ndarray, pyramid: dict) -> list[anchor_ops.LevelAnchors]:
        """Per level, each image's anchors `[B, N_l, ...]` (see `anchor_ops.generate_anchors`)."""
        shapes = [pyramid[name].shape[1:3] for name in RPN_LEVELS]
        generate = lambda valid: anchor_ops.generate_anchors(
            valid, shapes, RPN_STRIDES, self.config.anchor_sizes, self.config.aspect_ratios
        )
        return jax.vmap(generate)(valid_size)

    def _pool(
        self, pyramid: dict, boxes, output_size: int, valid_size, scope: str = "roi_align"
    ) -> jnp.ndarray:
        """RoIAlign `[B, N, S, S, C]` of `boxes [B, N, 4]`; `scope` names the stage in profiles."""
        r = self.config.roi_heads
        with jax.named_scope(scope):
            return roi_align_ops.multilevel_roi_align(
                [pyramid[name] for name in ROI_LEVELS],
                boxes,
                output_size,
                min_level=2,
                sampling_ratio=r.sampling_ratio,
                aligned=r.aligned,
                mode=r.roi_align_mode,
                method=r.roi_align_method,
                valid_size=valid_size,
            )

    def _proposals(self, logits, deltas, anchors, image_size, train: bool):
        rpn = self.config.rpn
        propose = lambda lg, dl, boxes, valid, size: generate_proposals(
            lg,
            dl,
            boxes,
            size,
            valid,
            pre_nms_topk=rpn.pre_nms_topk_train if train else rpn.pre_nms_topk_test,
            post_nms_topk=rpn.post_nms_topk_train if train else rpn.post_nms_topk_test,
            nms_threshold=rpn.nms_threshold,
            min_size=rpn.min_size,
        )
        with jax.named_scope("proposals"):
            return jax.vmap(propose)(
                logits, deltas, [a.boxes for a in anchors], [a.valid for a in anchors], image_size
            )

    def _mask_logits(self, pyramid, boxes, classes, valid_size) -> jnp.ndarray:
        """Mask logits `[B, N, 28, 28]` of `classes [B, N]` (0..K-1) in `boxes [B, N, 4]`."""
        b, n = classes.shape
        pooled = self._pool(
            pyramid, boxes, self.config.roi_heads.mask_pooler_size, valid_size, "mask_roi_align"
        )
        logits = self.mask_head(pooled.reshape(b * n, *pooled.shape[2:]), classes.reshape(-1))
        return logits.reshape(b, n, *logits.shape[1:])

    def __call__(
        self, batch: dict, *, train: bool, keys: jax.Array | None = None
    ) -> "TrainOutputs | dict[str, jax.Array]":
        """Runs the model.

        Args:
          batch: `image [B, H, W, 3]` float32 (normalised, zero beyond each image's content),
            `image_size [B, 2]` int32 (height, width of the content); in training also
            `gt_boxes [B, M, 4]`, `gt_classes [B, M]`, `gt_valid [B, M]`, `gt_masks [B, M, S, S]`.
          train: training mode (batch-statistics BN, RoI sampling, `TrainOutputs`).
          keys: `[B]` PRNG keys, one per image, for RoI sampling and the mask-head budget's
            draw (training only).

        Returns:
          `TrainOutputs` in training; otherwise a dict with `boxes [B, D, 4]`, `scores [B, D]`,
          `classes [B, D]` (labels 0..K-1), `masks [B, D, 28, 28]` probabilities of the predicted
          class and `valid [B, D]`.
        """
        images, image_size = batch["image"], batch["image_size"]
        if images.ndim != 4 or images.shape[-1] != 3 or not images.shape[0]:
            raise ValueError(f"batch['image'] must be [B, H, W, 3], got shape {images.shape}")
        if np.shape(image_size) != (images.shape[0], 2):
            raise ValueError(
                f"batch['image_size'] must be [B, 2] = {[images.shape[0], 2]} (height, width "
                f"of each image's content), got shape {np.shape(image_size)}"
            )
        if any(side % self.config.size_divisibility for side in images.shape[1:3]):
            raise ValueError(
                f"batch['image'] is {images.shape[1]}x{images.shape[2]}: the canvas must be a "
                f"multiple of model.size_divisibility={self.config.size_divisibility} (as "
                "data.pipeline.check_canvas requires; another would change the detections)"
            )
        valid_size = extent_ops.valid_size(
            image_size, self.config.size_divisibility, images.shape[1:3]
        )
        features = self.backbone(images, valid_size, train=train)
        pyramid = self.fpn(features, valid_size, train=train)
        rpn_logits, rpn_deltas = self.rpn_head(
            [pyramid[name] for name in RPN_LEVELS], valid_size, RPN_STRIDES
        )
        anchors = self._anchors(valid_size, pyramid)
        proposals = self._proposals(rpn_logits, rpn_deltas, anchors, image_size, train)
        if train:
            if keys is None:
                raise ValueError("MaskRCNN(train=True) needs per-image PRNG `keys`")
            return self._train_outputs(
                batch, valid_size, pyramid, rpn_logits, rpn_deltas, anchors, proposals, keys
            )
        return self._inference(pyramid, proposals, image_size, valid_size)

    def _train_outputs(
        self, batch, valid_size, pyramid, rpn_logits, rpn_deltas, anchors, proposals, keys
    ):
        r = self.config.roi_heads
        sample = lambda key, boxes, valid, gt_boxes, gt_classes, gt_valid: sample_rois(
            key,
            boxes,
            valid,
            gt_boxes,
            gt_classes,
            gt_valid,
            batch_size=r.batch_size_per_image,
            positive_fraction=r.positive_fraction,
            fg_iou=r.fg_iou,
            box_reg_weights=r.box_reg_weights,
        )
        with jax.named_scope("sample_rois"):
            targets = jax.vmap(sample)(
                keys,
                proposals.boxes,
                proposals.valid,
                batch["gt_boxes"],
                batch["gt_classes"],
                batch["gt_valid"],
            )
        b, num_rois = targets.classes.shape
        pooled = self._pool(pyramid, targets.rois, r.box_pooler_size, valid_size, "box_roi_align")
        class_logits, box_deltas = self.box_head(
            pooled.reshape(b * num_rois, *pooled.shape[2:]),
            train=True,
            valid=targets.valid.reshape(-1),
        )

        mask_logits, mask_targets, mask_valid = self._train_masks(
            batch, valid_size, pyramid, targets, keys
        )
        return TrainOutputs(
            rpn_logits=jnp.concatenate(rpn_logits, axis=1),
            rpn_deltas=jnp.concatenate(rpn_deltas, axis=1),
            anchors=jnp.concatenate([a.boxes for a in anchors], axis=1),
            anchor_valid=jnp.concatenate([a.valid for a in anchors], axis=1),
            anchor_ids=jnp.concatenate([a.index for a in anchors], axis=1),
            class_logits=class_logits.reshape(b, num_rois, -1),
            box_deltas=box_deltas.reshape(b, num_rois, *box_deltas.shape[1:]),
            roi_classes=targets.classes,
            roi_box_targets=targets.box_targets,
            roi_valid=targets.valid,
            mask_logits=mask_logits,
            mask_targets=jax.lax.stop_gradient(mask_targets),
            mask_valid=mask_valid,
            num_proposals=jnp.sum(proposals.valid, axis=1),
        )

    def _train_masks(self, batch, valid_size, pyramid, targets, keys):
        """Mask logits, targets `[G, 28, 28]` and validity `[G]` of the replica's G mask slots,
        filled from the first F (foreground) slots of every image (`sample_mask_rois`).

        Without a budget (G = B·F) the slots hold every foreground RoI, compacted. RoIAlign runs
        per image on all F slots before the gather (it needs each image's pyramid and extent), so
        the budget saves the mask head's convolutions, not RoIAlign."""
        r = self.config.roi_heads
        b, f = targets.classes.shape[0], num_foreground_slots(r)
        pooled = self._pool(
            pyramid, targets.rois[:, :f], r.mask_pooler_size, valid_size, "mask_roi_align"
        )
        with jax.named_scope("sample_mask_rois"):
            mask_keys = jax.vmap(lambda k: jax.random.fold_in(k, _MASK_SAMPLE_STREAM))(keys)
            foreground = targets.is_foreground[:, :f]
            index, valid = sample_mask_rois(mask_keys, foreground, num_mask_slots(r, b))
            take = lambda x: x[:, :f].reshape(b * f, *x.shape[2:])[index]
            features = pooled.reshape(b * f, *pooled.shape[2:])[index]
            classes, rois = jnp.maximum(take(targets.classes) - 1, 0), take(targets.rois)
            gt = (index // f, take(targets.gt_index))
        logits = self._train_mask_head(features, classes, valid)
        with jax.named_scope("mask_targets"):
            mask_targets = target_ops.mask_targets(
                jnp.asarray(batch["gt_masks"])[gt].astype(jnp.float32),  # numpy batches too
                jnp.asarray(batch["gt_boxes"])[gt],
                rois,
                r.mask_pooler_size * MASK_SIZE_FACTOR,
            )
        return logits, mask_targets, valid

    def _train_mask_head(self, features, classes, valid) -> jnp.ndarray:
        """The mask head on the replica's G slots (`features [G, S, S, C]`, `classes [G]`,
        `valid [G]`, taken slots first): logits `[G, 2S, 2S]`.

        With a chunk size C (`mask_head_chunk_size`) the slots go through the head C at a time
        (`nn.scan`), and a chunk holding no taken slot is skipped (`nn.cond`) in the forward
        and the backward pass: its logits are 0 and, being invalid, carry no loss. The head's
        work then follows the replica's positives, rounded up to C, while every logit of a
        taken slot is what one pass over all G slots gives (the head works per RoI).
        """
        g = features.shape[0]
        c = mask_head_chunk_size(self.config, g)
        if not c:
            return self.mask_head(features, classes, train=True, valid=valid)
        n = -(-g // c)
        pad = lambda x: jnp.pad(x, [(0, n * c - g)] + [(0, 0)] * (x.ndim - 1))
        chunks = [pad(x).reshape(n, c, *x.shape[1:]) for x in (features, classes, valid)]
        size = MASK_SIZE_FACTOR * features.shape[1]

        def run(head, x, cls, v):
            return head(x, cls, train=True, valid=v)

        def skip(head, x, cls, v):
            del head, cls, v
            return jnp.zeros((x.shape[0], size, size), jnp.float32)

        def body(head, carry, xs):
            return carry, nn.cond(jnp.any(xs[2]), run, skip, head, *xs)

        scan = nn.scan(
            body,
            variable_broadcast=True,
            split_rngs={"params": False},
            length=n,
        )
        _, logits = scan(self.mask_head, None, tuple(chunks))
        return logits.reshape(n * c, size, size)[:g]

    def _inference(self, pyramid, proposals, image_size, valid_size) -> dict[str, jnp.ndarray]:
        r = self.config.roi_heads
        b, p = proposals.valid.shape
        pooled = self._pool(
            pyramid, proposals.boxes, r.box_pooler_size, valid_size, "box_roi_align"
        )
        class_logits, box_deltas = self.box_head(pooled.reshape(b * p, *pooled.shape[2:]))
        detect = lambda logits, deltas, boxes, valid, size: detect_boxes(
            logits,
            deltas,
            boxes,
            valid,
            size,
            box_reg_weights=r.box_reg_weights,
            score_threshold=r.score_threshold,
            nms_threshold=r.nms_threshold,
            max_detections=r.detections_per_image,
            pre_nms_topk=r.detections_pre_nms_topk,
        )
        detections = jax.vmap(detect)(
            class_logits.reshape(b, p, -1),
            box_deltas.reshape(b, p, *box_deltas.shape[1:]),
            proposals.boxes,
            proposals.valid,
            image_size,
        )
        masks = jax.nn.sigmoid(
            self._mask_logits(pyramid, detections.boxes, detections.classes, valid_size)
        )
        return {
            "boxes": detections.boxes,
            "scores": detections.scores,
            "classes": detections.classes,
            "masks": jnp.where(detections.valid[..., None, None], masks, 0.0),
            "valid": detections.valid,
        }
