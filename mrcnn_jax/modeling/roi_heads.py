"""RoI heads: RoI sampling and targets, the box head, the mask head, their losses, and detection
postprocessing (torchvision's `roi_heads.py`: `fastrcnn_loss`, `maskrcnn_loss`, ...).

Per-image functions (`sample_rois`, `detect_boxes`) are written for one image and `jax.vmap`ped by
`MaskRCNN`. Class indices inside the heads: 0 is background, dataset label `l` is `l + 1`.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mrcnn_jax.modeling.resnet import Conv, make_norm
from mrcnn_jax.modeling.scan_layers import scan_layers
from mrcnn_jax.ops import boxes as box_ops
from mrcnn_jax.ops import nms as nms_ops
from mrcnn_jax.ops import targets as target_ops

_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def head_convs(
    parent: nn.Module,
    x: jnp.ndarray,
    num_convs: int,
    dim: int,
    norm: Callable[..., nn.Module] | None,
    dtype: jnp.dtype,
    valid: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """`num_convs` 3×3 convs `conv1, conv2, ...` of width `dim`, each followed by ReLU.

    With `norm` (a `resnet.make_norm` constructor), each conv has no bias and is followed by
    BatchNorm `conv<i>_bn` (torchvision v2's heads); in training, batch statistics count only the
    RoIs where `valid [N]` is True (padding RoIs would bias them). Call from a compact method of
    `parent`: the layers become its children. `x [N, S, S, C]` -> `[N, S, S, dim]`.
    """
    mask = None if valid is None else valid[:, None, None, None]
    layers = []
    for i in range(1, num_convs + 1):
        conv = Conv(
            dim,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=not norm,
            kernel_init=_msra_fill,
            dtype=dtype,
            name=f"conv{i}",
        )
        layers.append([conv, norm(name=f"conv{i}_bn")] if norm else [conv])

    def step(layer, x):
        x = layer[0](x)
        if norm:
            x = layer[1](x, mask=mask)
        return nn.relu(x)

    if layers and x.shape[-1] != dim:
        x, layers = step(layers[0], x), layers[1:]
    # The layers with `dim` channels in and out: one compiled layer (`scan_layers`).
    return scan_layers(parent, layers, step, x)


class BoxHead(nn.Module):
    """Optional 3×3 convs (`head_convs`: `num_convs` of width `conv_dim`), then `num_fcs` FCs
    (`dim`, ReLU) over the flattened RoI features, then class logits and box deltas.

    torchvision v1: 2 FCs; v2: 4 convs with BatchNorm (`norm`, a `resnet.NORM_MODES` value) and
    1 FC. Input `[N, S, S, C]` RoI features (and in training `valid [N]`, the sampled RoIs, for
    the BatchNorm statistics); output class logits `[N, K + 1]` (index 0 background) and
    class-specific deltas `[N, K, 4]` for the K foreground classes, both float32 (the two
    predictors compute in float32 whatever `dtype`).
    """

    num_classes: int
    dim: int = 1024
    dtype: jnp.dtype = jnp.float32
    num_convs: int = 0
    conv_dim: int = 256
    num_fcs: int = 2
    norm: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self, x: jnp.ndarray, train: bool = False, valid: jnp.ndarray | None = None
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        norm = make_norm(self.norm, train, self.axis_name, self.dtype) if self.norm else None
        x = head_convs(self, x, self.num_convs, self.conv_dim, norm, self.dtype, valid)
        x = x.reshape(x.shape[0], -1)
        for i in range(self.num_fcs):
            x = nn.relu(nn.Dense(self.dim, dtype=self.dtype, name=f"fc{i + 1}")(x))
        # The predictors compute in float32 whatever `dtype` (bf16 deltas are coarse coordinates).
        logits = nn.Dense(
            self.num_classes + 1,
            dtype=jnp.float32,
            name="cls_score",
            kernel_init=nn.initializers.normal(0.01),
        )(x)
        deltas = nn.Dense(
            self.num_classes * 4,
            dtype=jnp.float32,
            name="bbox_pred",
            kernel_init=nn.initializers.normal(0.001),
        )(x)
        return logits, deltas.reshape(-1, self.num_classes, 4)


class Deconv2x2(nn.Module):
    """2×2 stride-2 transposed convolution `[N, H, W, C] -> [N, 2H, 2W, features]` as one matmul.

    Same parameters (`kernel [2, 2, C, features]`, `bias`) and outputs as
    `nn.ConvTranspose(features, (2, 2), strides=(2, 2))`, whose kernel is applied flipped; the
    windows do not overlap, so each input pixel's four outputs are a plain product. XLA:CPU's
    gradient of the transposed convolution is two orders of magnitude slower than this.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", _msra_fill, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        n, h, w, _ = x.shape
        y = jnp.einsum("nhwc,abco->nhawbo", x, kernel[::-1, ::-1].astype(self.dtype))
        return y.reshape(n, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class MaskHead(nn.Module):
    """`num_convs` 3×3 convs (`head_convs`: `dim`, ReLU, BatchNorm with `norm` as torchvision v2),
    a 2×2 stride-2 deconv (ReLU), a per-class 1×1 predictor.

    Input RoI features `[N, S, S, C]` and the foreground class of each RoI `classes [N]` (0..K-1)
    (and in training `valid [N]`, the foreground slots, for the BatchNorm statistics); output
    float32 mask logits `[N, 2S, 2S]` of that class only (the per-class predictor, in float32
    whatever `dtype`, is evaluated just for the requested class, which is what the loss and
    inference need).
    """

    num_classes: int
    dim: int = 256
    num_convs: int = 4
    dtype: jnp.dtype = jnp.float32
    norm: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        classes: jnp.ndarray,
        train: bool = False,
        valid: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        norm = make_norm(self.norm, train, self.axis_name, self.dtype) if self.norm else None
        x = head_convs(self, x, self.num_convs, self.dim, norm, self.dtype, valid)
        x = Deconv2x2(self.dim, dtype=self.dtype, name="deconv")(x)
        x = nn.relu(x)
        kernel = self.param(
            "predictor_kernel",
            nn.initializers.normal(0.001),
            (self.dim, self.num_classes),
            jnp.float32,
        )
        bias = self.param("predictor_bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        # jnp.take: numpy parameters (closed over under jit) cannot be indexed by traced classes;
        # clipped as indexing is
        kernel = jnp.take(kernel, classes, axis=1, mode="clip")
        logits = jnp.einsum("nhwd,dn->nhw", x.astype(jnp.float32), kernel)
        return logits + jnp.take(bias, classes, mode="clip")[:, None, None]  # float32, as others


class RoITargets(NamedTuple):
    """Sampled RoIs of one image with their targets, foreground first."""

    rois: jnp.ndarray  # [R, 4] (x1, y1, x2, y2).
    classes: jnp.ndarray  # [R] int32: 0 background, label + 1 foreground.
    box_targets: jnp.ndarray  # [R, 4] encoded deltas of the matched GT (0 for background).
    gt_index: jnp.ndarray  # [R] int32 matched GT row.
    is_foreground: jnp.ndarray  # [R] bool.
    valid: jnp.ndarray  # [R] bool: sampled (foreground or background), not padding.


def sample_rois(
    key: jax.Array,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_classes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    *,
    batch_size: int,
    positive_fraction: float,
    fg_iou: float,
    box_reg_weights: Sequence[float],
) -> RoITargets:
    """Detectron2's `label_and_sample_proposals` for ONE image with a static output size.

    The valid ground-truth boxes are appended to `proposals [P, 4]`; each candidate is matched to
    the GT of highest IoU; IoU ≥ `fg_iou` is foreground, below is background (with no valid GT all
    are background); `batch_size` RoIs are sampled with at most `positive_fraction` foreground,
    foreground first. `gt_boxes [M, 4]`, `gt_classes [M]` (0..K-1), `gt_valid [M]`.
    """
    candidates = jnp.concatenate([proposals, gt_boxes])
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid])
    matches = target_ops.match_boxes(candidates, gt_boxes, gt_valid)
    foreground = candidate_valid & (matches.iou >= fg_iou)
    background = candidate_valid & ~foreground
    sample = target_ops.sample_balanced(key, foreground, background, batch_size, positive_fraction)
    rois = candidates[sample.indices]
    gt_index = matches.gt_index[sample.indices]
    matched_boxes = gt_boxes[gt_index]
    is_fg = sample.is_positive & sample.valid
    encodable = is_fg & (box_ops.box_area(rois) > 0)
    safe_rois = jnp.where(encodable[:, None], rois, jnp.array([0.0, 0.0, 1.0, 1.0]))
    safe_gt = jnp.where(encodable[:, None], matched_boxes, jnp.array([0.0, 0.0, 1.0, 1.0]))
    box_targets = box_ops.encode_boxes(safe_gt, safe_rois, box_reg_weights)
    return RoITargets(
        rois=jax.lax.stop_gradient(rois),
        classes=jnp.where(is_fg, gt_classes[gt_index] + 1, 0).astype(jnp.int32),
        box_targets=jnp.where(encodable[:, None], box_targets, 0.0),
        gt_index=gt_index,
        is_foreground=is_fg,
        valid=sample.valid,
    )


def sample_mask_rois(
    keys: jax.Array, foreground: jnp.ndarray, budget: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The foreground slots of a replica's B images that the mask head trains on: `budget` (G)
    slots filled from all images, so the mask head's cost follows the replica's positives.

    When the P foreground slots fit (P ≤ G) every one is taken; otherwise G of them are drawn
    uniformly without replacement (the G highest of independent random priorities, image b's
    drawn from `keys[b]`, so the draw is deterministic and does not depend on how the batch is
    split over devices). Taken slots come first, in image-major order, then padding.

    Args:
      keys: `[B]` PRNG keys, one per image.
      foreground: `[B, F]` bool, the RoI sample's foreground slots (`RoITargets.is_foreground`
        of its first F slots).
      budget: G, static, at most `B * F`.

    Returns:
      `(index [G] int32, valid [G] bool)`: `index` into the flattened `[B * F]` slots (0 on
      padding), `valid` the taken ones (`min(P, G)` of them).
    """
    b, f = foreground.shape
    if not 0 < budget <= b * f:
        raise ValueError(f"the mask RoI budget must be in [1, {b * f}], got {budget}")
    bits = jax.vmap(lambda key: jax.random.bits(key, (f,), jnp.uint32))(keys)
    priority = jnp.where(foreground, (bits >> 1).astype(jnp.int32), -1).reshape(-1)
    top_priority, top = jax.lax.top_k(priority, budget)
    index = jnp.sort(jnp.where(top_priority >= 0, top, b * f))
    valid = index < b * f
    return jnp.where(valid, index, 0).astype(jnp.int32), valid


class Detections(NamedTuple):
    """Fixed-size detections of one image (or a batch, with a leading B)."""

    boxes: jnp.ndarray  # [D, 4] (x1, y1, x2, y2) input pixels.
    scores: jnp.ndarray  # [D] float32 class probabilities, decreasing; 0 on padding.
    classes: jnp.ndarray  # [D] int32 dataset labels 0..K-1.
    valid: jnp.ndarray  # [D] bool.


def detect_boxes(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    image_size: jnp.ndarray,
    *,
    box_reg_weights: Sequence[float],
    score_threshold: float,
    nms_threshold: float,
    max_detections: int,
    pre_nms_topk: int,
) -> Detections:
    """torchvision's `RoIHeads.postprocess_detections` for ONE image, static shapes.

    Softmax scores of the K foreground classes for each of the P proposals, class-specific boxes
    decoded and clipped to `image_size`, candidates with score ≤ `score_threshold` or a side
    < 0.01 px dropped, per-class NMS, the `max_detections` best kept. To bound the cost of NMS
    only the `pre_nms_topk` highest-scoring candidates enter it; the result is exact whenever fewer
    candidates pass the threshold or NMS keeps `max_detections` of them.

    Args:
      class_logits: [P, K + 1]. box_deltas: [P, K, 4]. proposals: [P, 4]; proposal_valid: [P].
      image_size: [2] (height, width).
    """
    num_classes = box_deltas.shape[1]
    probs = jax.nn.softmax(class_logits, axis=-1)[:, 1:]
    boxes = box_ops.decode_boxes(box_deltas, proposals[:, None, :], box_reg_weights)
    boxes = box_ops.clip_boxes(boxes, image_size).reshape(-1, 4)
    scores = probs.reshape(-1)
    classes = jnp.tile(jnp.arange(num_classes, dtype=jnp.int32), proposals.shape[0])
    valid = (
        (scores > score_threshold)
        & box_ops.min_size_mask(boxes, 1e-2)
        & jnp.repeat(proposal_valid, num_classes)
    )
    k = min(pre_nms_topk, scores.shape[0])
    _, top = jax.lax.top_k(jnp.where(valid, scores, -1.0), k)
    keep, keep_valid = nms_ops.batched_nms(
        boxes[top], scores[top], classes[top], nms_threshold, max_detections, valid=valid[top]
    )
    keep = top[keep]
    return Detections(
        boxes=jnp.where(keep_valid[:, None], boxes[keep], 0.0),
        scores=jnp.where(keep_valid, scores[keep], 0.0),
        classes=jnp.where(keep_valid, classes[keep], 0),
        valid=keep_valid,
    )


def fast_rcnn_loss(
    class_logits: jnp.ndarray,
    box_deltas: jnp.ndarray,
    roi_classes: jnp.ndarray,
    roi_box_targets: jnp.ndarray,
    roi_valid: jnp.ndarray,
    *,
    batch_size_per_image: int,
    smooth_l1_beta: float,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The box head's classification and box-regression losses of B images (`fastrcnn_loss`).

    Args:
      class_logits: `[B, R, K + 1]`; box_deltas: `[B, R, K, 4]` class-specific deltas.
      roi_classes: `[B, R]` int32 targets (0 background); roi_box_targets: `[B, R, 4]` encoded
        deltas of the matched GT; roi_valid: `[B, R]` bool (sampled, not padding).

    Returns:
      `(loss_cls, loss_box_reg)`: softmax CE over sampled RoIs and smooth L1 of the GT class's
      deltas over foreground RoIs, both divided by `batch_size_per_image · B`, a constant (so
      that replicas average to the global batch's loss). Detectron2 and torchvision divide by
      the number of RoIs sampled: the same whenever every slot is filled (COCO, where 1000
      proposals fill all 512).
    """
    norm = batch_size_per_image * class_logits.shape[0]
    ce = optax.softmax_cross_entropy_with_integer_labels(class_logits, roi_classes)
    loss_cls = jnp.sum(jnp.where(roi_valid, ce, 0.0)) / norm
    fg = roi_classes > 0
    gt_deltas = jnp.take_along_axis(
        box_deltas, jnp.maximum(roi_classes - 1, 0)[..., None, None], axis=2
    )[:, :, 0]
    box_err = box_ops.smooth_l1(gt_deltas - roi_box_targets, smooth_l1_beta)
    loss_box = jnp.sum(jnp.where(fg[..., None], box_err, 0.0)) / norm
    return loss_cls, loss_box


def mask_loss(
    mask_logits: jnp.ndarray,
    mask_targets: jnp.ndarray,
    mask_valid: jnp.ndarray,
    axis_name: str | None = None,
) -> jnp.ndarray:
    """Per-pixel sigmoid BCE of the GT class's mask, mean over foreground RoIs (`maskrcnn_loss`).

    Args:
      mask_logits: `[..., S, S]` logits of each mask slot's GT class (the model's `[G, S, S]`).
      mask_targets: `[..., S, S]` soft targets in [0, 1]; mask_valid: `[...]` bool, the slots
        holding a foreground RoI.
      axis_name: the data-parallel axis, or None outside shard_map/pmap.

    Returns:
      This replica's share of the mean over the foreground RoIs of the GLOBAL batch, scaled so
      that its `pmean` over `axis_name` is that mean (the foreground count is `psum`med).
    """
    pixel_bce = optax.sigmoid_binary_cross_entropy(mask_logits, mask_targets)
    mask_sum = jnp.sum(jnp.where(mask_valid[..., None, None], pixel_bce, 0.0))
    num_fg = jnp.sum(mask_valid).astype(jnp.float32)
    replicas = 1.0
    if axis_name is not None:
        num_fg = jax.lax.psum(num_fg, axis_name)
        replicas = jax.lax.psum(1.0, axis_name)
    mask_pixels = mask_logits.shape[-1] * mask_logits.shape[-2]
    return replicas * mask_sum / (jnp.maximum(num_fg, 1.0) * mask_pixels)
