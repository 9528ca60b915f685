"""torchvision Mask R-CNN weights converted by `mrcnn_jax.convert.torchvision` give torchvision's
numbers at every stage: backbone + FPN features, RPN objectness and proposals, box and mask heads
on the same RoIs, and the final detections (boxes, scores, classes, pasted masks).

The torchvision models get seeded weights that make scores distinct (its default init gives
near-tied RPN scores, so NMS order would be arbitrary): every tensor is redrawn from a seeded
normal, and the class-score layer is calibrated on the test images so that a few dozen detections
per image pass the 0.05 threshold with well-separated scores. Images are 192×256 and 128×256 (no
resize at min_size 192 / max_size 256, so both models see identical pixels) and one 150×200 image
that both resize ×1.28 to 192×256. Models: "small-v1"/"small-v2" are ResNet-18 FPNs with narrow
heads built like torchvision's v1/v2 (the conversion is the same code path, seconds to compile);
"r50-v1"/"r50-v2" are `maskrcnn_resnet50_fpn` and `maskrcnn_resnet50_fpn_v2` themselves (slow).
"""

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from pycocotools import mask as mask_util

from configs import torchvision_r50_fpn_v1, torchvision_r50_fpn_v2
from mrcnn_jax.convert import torchvision as convert
from mrcnn_jax.data import pipeline
from mrcnn_jax.evaluation.coco_eval import detections_to_coco
from mrcnn_jax.modeling.mask_rcnn import RPN_LEVELS, RPN_STRIDES, MaskRCNN
from mrcnn_jax.modeling.resnet import make_norm
from mrcnn_jax.ops import extent as extent_ops
from mrcnn_jax.train import checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
from torchvision.models import detection as tv_detection  # noqa: E402
from torchvision.models.detection._utils import overwrite_eps  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

V1 = convert.RELEASES["v1"]

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (192, 256)  # torchvision min_size / max_size and our padded input.
ORIGINAL_SIZES = ((192, 256), (128, 256), (150, 200))  # the last is resized ×1.28.
MASK_ROIS = 64  # RoIs per image whose mask logits are compared.
CLASS_LOGIT_STD = 3.0  # Spread of each calibrated class logit over the RoIs.
# Added to the calibrated background logit; more classes need more (see the detection counts).
BACKGROUND_OFFSET = {"small": 13.0, "r50": 18.0}
MIN_DETECTIONS = 10  # Per image: fewer would make the end-to-end comparison weak.

# Tolerances (the acceptance criteria).
FEATURE_RTOL = 1e-4  # max |ours - torchvision| / max |torchvision| per tensor.
PROPOSAL_IOU, PROPOSAL_FRACTION = 0.999, 0.99
BOX_IOU, SCORE_ATOL, MASK_IOU = 0.99, 1e-3, 0.98


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference| over all elements."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


# ------------------------------------------------------------------ the torchvision side


def small_torchvision_model(num_classes: int, version: str = "v1", sizes=IMAGE_SIZE):
    """A ResNet-18 FPN-32 Mask R-CNN with narrow heads and `num_classes` + background, built like
    torchvision's `maskrcnn_resnet50_fpn` ("v1": frozen BN backbone, 2-FC box head) or `_v2`
    (BatchNorm in the backbone, FPN and heads, 2 RPN convs, 4-conv + 1-FC box head)."""
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import (
        FastRCNNConvFCHead,
        FastRCNNPredictor,
        TwoMLPHead,
    )
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops.misc import FrozenBatchNorm2d

    v2 = version == "v2"
    norm = torch.nn.BatchNorm2d if v2 else None
    backbone = BackboneWithFPN(
        resnet18(norm_layer=torch.nn.BatchNorm2d if v2 else FrozenBatchNorm2d),
        {f"layer{i}": str(i - 1) for i in range(1, 5)},
        [64, 128, 256, 512],
        out_channels=32,
        norm_layer=norm,
    )
    if v2:
        box_head = FastRCNNConvFCHead((32, 7, 7), [16] * 4, [64], norm_layer=norm)
    else:
        box_head = TwoMLPHead(32 * 7 * 7, 64)
    return tv_detection.MaskRCNN(
        backbone,
        min_size=sizes[0],
        max_size=sizes[1],
        rpn_head=RPNHead(32, 3, conv_depth=2 if v2 else 1),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(64, num_classes + 1),
        mask_head=MaskRCNNHeads(32, [32] * 4, 1, norm_layer=norm),
        mask_predictor=MaskRCNNPredictor(32, 32, num_classes + 1),
    )


def release_config(version: str) -> ml_collections.ConfigDict:
    """The config of a torchvision release, at the test's image size."""
    module = {"v1": torchvision_r50_fpn_v1, "v2": torchvision_r50_fpn_v2}[version]
    config = module.get_config()
    config.data.image_size = IMAGE_SIZE
    # Fit the canvas: for these landscape images, torchvision's min_size=192, max_size=256 rule.
    config.data.resize_short_side = config.data.resize_max_long_side = 0
    config.data.canvas_groups = ()  # Groups need a canvas-independent resize.
    return config


def small_config(version: str = "v1", config=None) -> ml_collections.ConfigDict:
    """`release_config` (or `config`) shrunk to `small_torchvision_model`."""
    config = release_config(version) if config is None else config
    model = config.model
    model.num_classes = 10
    for name in ("class_names", "label_to_category_id"):  # one per class
        config.data[name] = tuple(config.data[name])[: model.num_classes]
    model.backbone_depth = 18
    model.fpn_dim = 32
    model.roi_heads.box_head_dim = 64
    model.roi_heads.box_head_conv_dim = 16
    model.roi_heads.mask_head_dim = 32
    return config


def r50_torchvision_model(version: str):
    """`maskrcnn_resnet50_fpn` (with frozen BN, as built with its COCO weights) or `_v2`."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    sizes = {"min_size": IMAGE_SIZE[0], "max_size": IMAGE_SIZE[1]}
    if version == "v2":
        return tv_detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, **sizes)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    return tv_detection.MaskRCNN(backbone, num_classes=91, **sizes)


def seed_weights(model, seed: int) -> None:
    """Redraws every parameter and buffer: weights N(0, gain² / fan_in), biases and BN means
    N(0, 0.1²), BN scales U(0.5, 1), BN variances U(0.5, 2)."""
    generator = torch.Generator().manual_seed(seed)
    gains = {
        "rpn.head.cls_logits": 1.0,
        "rpn.head.bbox_pred": 0.2,
        "roi_heads.box_predictor.bbox_pred": 0.3,
    }
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():  # BatchNorm2d's num_batches_tracked
                continue
            module, leaf = name.rsplit(".", 1)
            noise = torch.randn(tensor.shape, generator=generator)
            uniform = torch.rand(tensor.shape, generator=generator)
            if leaf == "running_var":
                tensor.copy_(0.5 + 1.5 * uniform)
            elif leaf in ("running_mean", "bias"):
                tensor.copy_(0.1 * noise)
            elif tensor.ndim == 1:  # FrozenBatchNorm2d weight
                tensor.copy_(0.5 + 0.5 * uniform)
            else:
                fan_in = tensor[0].numel()
                tensor.copy_(noise * gains.get(module, 2**0.5) / fan_in**0.5)


def calibrate_class_scores(model, class_logits, background_offset: float):
    """Makes the class logits of the test images' proposals, `class_logits [N, K + 1]` (computed
    with the current weights), have mean 0 and standard deviation `CLASS_LOGIT_STD` per class,
    then favours background by `background_offset`: scores are spread, no class dominates, and
    the 0.05 threshold, not the 100-detection cap, decides how many detections there are.
    Rescales `cls_score` in place and returns the recalibrated `class_logits`."""
    mean, std = class_logits.mean(0), class_logits.std(0)
    scale = CLASS_LOGIT_STD / std
    offset = torch.zeros_like(mean)
    offset[0] = background_offset
    layer = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        layer.weight *= scale[:, None]
        layer.bias.copy_((layer.bias - mean) * scale + offset)
    return (class_logits - mean) * scale + offset


def make_images() -> list[np.ndarray]:
    """Smooth random colour images (uint8 HWC) of `ORIGINAL_SIZES` with some pixel noise."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in ORIGINAL_SIZES:
        coarse = torch.tensor(rng.uniform(0, 255, (1, 3, h // 16 + 1, w // 16 + 1)))
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear")[0]
        noisy = smooth.permute(1, 2, 0).numpy() + rng.normal(0, 10, (h, w, 3))
        images.append(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    return images


def torchvision_input(image: np.ndarray):
    """uint8 HWC -> the float CHW tensor in [0, 1] torchvision's detection models take."""
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


@dataclasses.dataclass
class TorchvisionRun:
    """Everything torchvision computes for the test images, each image run ALONE (a batch of
    one, padded to its own size rounded up to 32: the dynamic reference of that image), in
    numpy and our layouts."""

    image: np.ndarray  # [B, H, W, 3] its normalised inputs, zero-padded into our canvas.
    image_size: np.ndarray  # [B, 2] content sizes.
    features: list[dict[str, np.ndarray]]  # per image, P2..P6 [H_l, W_l, C] of its own extent.
    objectness: list[np.ndarray]  # per image [A_b] logits, anchor order (level, row, col, a).
    proposals: list[np.ndarray]  # per image [P_b, 4].
    class_logits: list[np.ndarray]  # per image [P_b, K + 1] on its proposals.
    box_deltas: list[np.ndarray]  # per image [P_b, K, 4] (background dropped).
    mask_classes: np.ndarray  # [B, MASK_ROIS] labels 0..K-1 (random).
    mask_logits: np.ndarray  # [B, MASK_ROIS, 28, 28] of those classes on the first proposals.
    detections: list[dict[str, np.ndarray]]  # torchvision's final output per image.


def run_torchvision(
    model,
    images: list[np.ndarray],
    num_classes: int,
    background_offset: float,
    canvas: tuple[int, int],
) -> TorchvisionRun:
    """Runs `model` stage by stage on each image alone (calibrating its class scores on the way
    on all images' proposals, see `calibrate_class_scores`) and end to end."""
    rng = np.random.default_rng(1)
    mask_classes = rng.integers(num_classes, size=(len(images), MASK_ROIS))
    heads = model.roi_heads
    stages = []
    with torch.no_grad():
        for image in images:
            image_list, _ = model.transform([torchvision_input(image)])
            features = model.backbone(image_list.tensors)
            objectness, _ = model.rpn.head(list(features.values()))
            proposals, _ = model.rpn(image_list, features)
            pooled = heads.box_roi_pool(features, proposals, image_list.image_sizes)
            stages.append((image_list, features, objectness, proposals, pooled))
        class_logits, box_regression = heads.box_predictor(
            heads.box_head(torch.cat([pooled for *_, pooled in stages]))
        )
        class_logits = calibrate_class_scores(model, class_logits, background_offset)
        mask_logits = []
        for (image_list, features, _, proposals, _), classes in zip(stages, mask_classes):
            pooled = heads.mask_roi_pool(
                features, [proposals[0][:MASK_ROIS]], image_list.image_sizes
            )
            logits = heads.mask_predictor(heads.mask_head(pooled)).numpy()
            mask_logits.append(logits[np.arange(MASK_ROIS), classes + 1])
        detections = [model([torchvision_input(image)])[0] for image in images]
    padded_inputs = np.zeros((len(images), *canvas, 3), np.float32)
    for i, (image_list, *_) in enumerate(stages):
        tensor = image_list.tensors[0].permute(1, 2, 0).numpy()
        padded_inputs[i, : tensor.shape[0], : tensor.shape[1]] = tensor
    counts = [len(proposals[0]) for *_, proposals, _ in stages]
    return TorchvisionRun(
        image=padded_inputs,
        image_size=np.array([s[0].image_sizes[0] for s in stages], np.int32),
        features=[
            {name: f[0].permute(1, 2, 0).numpy() for name, f in zip(RPN_LEVELS, s[1].values())}
            for s in stages
        ],
        objectness=[
            torch.cat([o[0].permute(1, 2, 0).flatten() for o in s[2]]).numpy() for s in stages
        ],
        proposals=[s[3][0].numpy() for s in stages],
        class_logits=[x.numpy() for x in class_logits.split(counts)],
        box_deltas=[x.reshape(len(x), -1, 4)[:, 1:].numpy() for x in box_regression.split(counts)],
        mask_classes=mask_classes,
        mask_logits=np.stack(mask_logits),
        detections=[{k: v.numpy() for k, v in d.items()} for d in detections],
    )


# ------------------------------------------------------------------ our side


def probe(module: MaskRCNN, batch: dict, rois: jnp.ndarray, mask_classes: jnp.ndarray) -> dict:
    """Our model's intermediate results: features, objectness, proposals, and the box and mask
    heads on given RoIs `rois [B, R, 4]` (mask logits of `mask_classes [B, MASK_ROIS]` on the
    first `MASK_ROIS` of them)."""
    valid_size = extent_ops.valid_size(
        batch["image_size"], module.config.size_divisibility, batch["image"].shape[1:3]
    )
    pyramid = module.fpn(module.backbone(batch["image"], valid_size), valid_size)
    levels = [pyramid[name] for name in RPN_LEVELS]
    logits, deltas = module.rpn_head(levels, valid_size, RPN_STRIDES)
    anchors = module._anchors(valid_size, pyramid)
    proposals = module._proposals(logits, deltas, anchors, batch["image_size"], train=False)
    b, r = rois.shape[:2]
    pooled = module._pool(pyramid, rois, module.config.roi_heads.box_pooler_size, valid_size)
    class_logits, box_deltas = module.box_head(pooled.reshape(b * r, *pooled.shape[2:]))
    return {
        "features": pyramid,
        "objectness": jnp.concatenate(logits, axis=1),
        "anchor_valid": jnp.concatenate([a.valid for a in anchors], axis=1),
        "proposals": proposals,
        "class_logits": class_logits.reshape(b, r, -1),
        "box_deltas": box_deltas.reshape(b, r, *box_deltas.shape[1:]),
        "mask_logits": module._mask_logits(pyramid, rois[:, :MASK_ROIS], mask_classes, valid_size),
    }


def padded(arrays: list[np.ndarray], rows: int) -> np.ndarray:
    """Stacks `[n_b, ...]` arrays, zero-padded to `rows`."""
    out = np.zeros((len(arrays), rows, *arrays[0].shape[1:]), arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


def our_input(images: list[np.ndarray], config) -> dict[str, np.ndarray]:
    """Our eval input (`pipeline.preprocess_image`, as eval and predict prepare images): resized to
    fit `config.data.image_size` (bilinear, half-pixel centres, no antialiasing), normalised with
    `config.data.mean/std`, zero-padded; with the content sizes."""
    prepared = [pipeline.preprocess_image(image, config) for image in images]
    return {key: np.stack([inputs[key] for inputs in prepared]) for key in ("image", "image_size")}


@dataclasses.dataclass
class Pair:
    """A seeded torchvision model, its conversion and both models' results."""

    config: ml_collections.ConfigDict
    state_dict: dict[str, np.ndarray]
    images: list[np.ndarray]
    torchvision: TorchvisionRun
    ours: dict  # `probe` on torchvision's input tensor and RoIs.
    ours_detections: dict  # `MaskRCNN(...)(train=False)` on our own preprocessing.
    ours_image_sizes: np.ndarray  # (height, width) of our resized inputs.


def make_pair(size: str, version: str) -> Pair:
    if size == "small":
        config = small_config(version)
        tv_model = small_torchvision_model(config.model.num_classes, version)
    else:
        config = release_config(version)
        tv_model = r50_torchvision_model(version)
    tv_model.eval()
    # The eps torchvision's builder gives the model when it loads the release's weights.
    bn_epsilon = convert.RELEASES[version].bn_epsilon
    overwrite_eps(tv_model, bn_epsilon)
    seed_weights(tv_model, seed=0)
    images = make_images()
    run = run_torchvision(
        tv_model, images, config.model.num_classes, BACKGROUND_OFFSET[size], IMAGE_SIZE
    )

    state_dict = convert.state_dict_to_numpy(tv_model.state_dict())
    variables = convert.convert_state_dict(state_dict, config.model, bn_epsilon=bn_epsilon)
    model = MaskRCNN.from_config(config.model)
    rois = padded(run.proposals, config.model.rpn.post_nms_topk_test)
    ours = jax.jit(lambda v, b, r, c: model.apply(v, b, r, c, method=probe))(
        variables, {"image": run.image, "image_size": run.image_size}, rois, run.mask_classes
    )
    batch = our_input(images, config)
    detections = jax.jit(lambda v, b: model.apply(v, b, train=False))(
        variables, {"image": batch["image"], "image_size": batch["image_size"]}
    )
    return Pair(
        config,
        state_dict,
        images,
        run,
        jax.device_get(ours),
        jax.device_get(detections),
        batch["image_size"],
    )


@pytest.fixture(
    scope="module",
    params=[
        "small-v1",
        pytest.param("small-v2", marks=pytest.mark.slow),  # v1 runs the shared converter by default
        pytest.param("r50-v1", marks=pytest.mark.slow),
        pytest.param("r50-v2", marks=pytest.mark.slow),
    ],
)
def pair(request) -> Pair:
    return make_pair(*request.param.split("-"))


# ------------------------------------------------------------------ parity tests


def test_input_is_identical_without_resize(pair):
    """For the images torchvision does not resize, our normalisation gives its input tensor."""
    ours = our_input(pair.images, pair.config)
    for i, (h, w) in enumerate(ORIGINAL_SIZES[:2]):
        np.testing.assert_allclose(
            ours["image"][i, :h, :w], pair.torchvision.image[i, :h, :w], atol=2e-6
        )


def test_backbone_and_fpn_features(pair):
    """Each image's features on its extent equal torchvision's on that image alone (image 1,
    128×256 in a 192×256 canvas, was padded to 192×256 when torchvision batched it)."""
    for i, reference in enumerate(pair.torchvision.features):
        for name in RPN_LEVELS:
            h, w = reference[name].shape[:2]
            error = relative_error(pair.ours["features"][name][i, :h, :w], reference[name])
            print(f"image {i} {name} features: relative error {error:.2e}")
            assert error <= FEATURE_RTOL, (i, name)
            # Beyond the extent, the canvas holds zeros.
            assert not np.asarray(pair.ours["features"][name][i, h:]).any()


def test_rpn_objectness(pair):
    for i, reference in enumerate(pair.torchvision.objectness):
        ours = pair.ours["objectness"][i][pair.ours["anchor_valid"][i]]
        assert ours.shape == reference.shape
        error = relative_error(ours, reference)
        print(f"image {i} RPN objectness: relative error {error:.2e}")
        assert error <= FEATURE_RTOL


def test_rpn_proposals(pair):
    proposals = pair.ours["proposals"]
    for i, reference in enumerate(pair.torchvision.proposals):
        ours = proposals.boxes[i][proposals.valid[i]]
        iou = box_iou(torch.from_numpy(reference), torch.from_numpy(np.asarray(ours))).numpy()
        matched = np.mean(iou.max(axis=1) >= PROPOSAL_IOU)
        matched_back = np.mean(iou.max(axis=0) >= PROPOSAL_IOU)
        print(
            f"image {i}: {len(reference)} torchvision / {len(ours)} our proposals, "
            f"{matched:.2%} / {matched_back:.2%} matched at IoU >= {PROPOSAL_IOU}"
        )
        assert abs(len(ours) - len(reference)) <= (1 - PROPOSAL_FRACTION) * len(reference)
        assert matched >= PROPOSAL_FRACTION and matched_back >= PROPOSAL_FRACTION


def test_box_head_on_same_rois(pair):
    for i, reference in enumerate(pair.torchvision.class_logits):
        n = len(reference)
        logits = pair.ours["class_logits"][i, :n]
        deltas = pair.ours["box_deltas"][i, :n]
        scores = jax.nn.softmax(logits, axis=-1)
        reference_scores = torch.softmax(torch.from_numpy(reference), -1).numpy()
        errors = (
            relative_error(logits, reference),
            np.abs(scores - reference_scores).max(),
            relative_error(deltas, pair.torchvision.box_deltas[i]),
        )
        print(
            f"image {i}: class logits {errors[0]:.2e} relative, class scores {errors[1]:.2e} "
            f"absolute, box deltas {errors[2]:.2e} relative"
        )
        assert max(errors) <= FEATURE_RTOL


def test_mask_head_on_same_rois(pair):
    error = relative_error(pair.ours["mask_logits"], pair.torchvision.mask_logits)
    print(f"mask logits: relative error {error:.2e}")
    assert error <= FEATURE_RTOL


def decoded_results(pair: Pair, i: int) -> list[dict]:
    """Our detections of image `i` as COCO results in the original image (the eval path), with
    `category_id` = our label + 1 = torchvision's label, and the pasted masks decoded."""
    d = pair.ours_detections
    results = detections_to_coco(
        image_id=i,
        boxes=d["boxes"][i],
        scores=d["scores"][i],
        classes=d["classes"][i],
        masks=d["masks"][i],
        valid=d["valid"][i],
        image_size=pair.ours_image_sizes[i],
        orig_size=ORIGINAL_SIZES[i],
        label_to_category_id={label: label + 1 for label in range(pair.config.model.num_classes)},
    )
    for result in results:
        rle = dict(result["segmentation"], counts=result["segmentation"]["counts"].encode())
        result["mask"] = mask_util.decode(rle).astype(bool)
        x, y, w, h = result["bbox"]
        result["box"] = np.array([x, y, x + w, y + h], np.float32)
    return results


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
@pytest.mark.parametrize("image", range(len(ORIGINAL_SIZES)))
def test_final_detections(pair, image):
    """Every torchvision detection has one of ours of the same class with box IoU >= 0.99,
    score within 1e-3 and pasted-mask IoU >= 0.98, and the counts are equal. Image 2 is resized
    ×1.28 by both (torchvision resizes its normalised float image, we the 0-255 image before
    normalising; the interpolation is the same), the others are not resized."""
    reference = pair.torchvision.detections[image]
    ours = decoded_results(pair, image)
    unmatched = list(range(len(ours)))
    worst = {"box IoU": 1.0, "score diff": 0.0, "mask IoU": 1.0}
    for box, label, score, mask in zip(
        reference["boxes"], reference["labels"], reference["scores"], reference["masks"][:, 0]
    ):
        candidates = [j for j in unmatched if ours[j]["category_id"] == label]
        assert candidates, f"no detection of class {label} left to match"
        ious = box_iou(
            torch.from_numpy(box[None]),
            torch.from_numpy(np.stack([ours[j]["box"] for j in candidates])),
        )[0].numpy()
        best = candidates[int(ious.argmax())]
        unmatched.remove(best)
        worst["box IoU"] = min(worst["box IoU"], float(ious.max()))
        worst["score diff"] = max(worst["score diff"], abs(ours[best]["score"] - float(score)))
        worst["mask IoU"] = min(worst["mask IoU"], mask_iou(ours[best]["mask"], mask > 0.5))
    count = len(reference["scores"])
    assert count >= MIN_DETECTIONS, "the seeded torchvision model detects too little to compare"
    print(f"image {image}: {count} torchvision / {len(ours)} our detections, {worst}")
    assert len(ours) == count
    assert worst["box IoU"] >= BOX_IOU
    assert worst["score diff"] <= SCORE_ATOL
    assert worst["mask IoU"] >= MASK_IOU


# ------------------------------------------------------------------ conversion details


@pytest.fixture(scope="module")
def small_model():
    """A seeded small torchvision model with BN eps 0 (as the released v1 weights), in eval."""
    model = small_torchvision_model(small_config().model.num_classes).eval()
    seed_weights(model, seed=1)
    overwrite_eps(model, V1.bn_epsilon)
    return model


def converted(model, bn_epsilon: float = V1.bn_epsilon) -> dict:
    """The variables of the small config converted from `model`."""
    state = convert.state_dict_to_numpy(model.state_dict())
    return convert.convert_state_dict(state, small_config().model, bn_epsilon=bn_epsilon)


def test_deconv_kernel_is_flipped():
    """torch's ConvTranspose2d = Flax's ConvTranspose with the spatially flipped kernel."""
    torch.manual_seed(0)
    deconv = torch.nn.ConvTranspose2d(3, 5, 2, 2)
    x = torch.randn(2, 3, 4, 6)
    with torch.no_grad():
        reference = deconv(x).permute(0, 2, 3, 1).numpy()
    params = {
        "kernel": convert._DECONV.convert(deconv.weight.detach().numpy()),
        "bias": deconv.bias.detach().numpy(),
    }
    ours = nn.ConvTranspose(5, (2, 2), strides=(2, 2)).apply(
        {"params": params}, x.permute(0, 2, 3, 1).numpy()
    )
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_batchnorm_epsilon_is_folded_into_the_variance(small_model):
    """Tiny variances make eps matter: the converted BN equals torchvision's only with the
    source's eps (0 here)."""
    bn = small_model.backbone.body.bn1
    with torch.no_grad():
        bn.running_var.copy_(torch.linspace(1e-7, 1e-4, bn.running_var.numel()))
    x = torch.randn(2, 64, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = bn(x).permute(0, 2, 3, 1).numpy()
    errors = {}
    for eps in (V1.bn_epsilon, 1e-5):
        variables = converted(small_model, bn_epsilon=eps)
        stem_bn = {c: variables[c]["backbone"]["stem_bn"] for c in ("params", "batch_stats")}
        ours = make_norm("frozen", False, None, jnp.float32)().apply(
            stem_bn, x.permute(0, 2, 3, 1).numpy()
        )
        errors[eps] = relative_error(ours, reference)
    assert errors[V1.bn_epsilon] < 1e-5
    assert errors[1e-5] > 0.1


def test_legacy_key_names_are_accepted(small_model):
    """The released v1 file spells FPN, RPN-conv and mask-head keys as before torchvision's
    `_version = 2`; they convert to the same variables."""
    state = convert.state_dict_to_numpy(small_model.state_dict())
    legacy = {}
    for key, value in state.items():
        key = re.sub(r"^(backbone\.fpn\.\w+_blocks\.\d+)\.0\.", r"\1.", key)
        key = re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
        key = re.sub(
            r"^roi_heads\.mask_head\.(\d+)\.0\.",
            lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.",
            key,
        )
        legacy[key] = value
    assert "roi_heads.mask_head.mask_fcn4.weight" in legacy
    assert "backbone.fpn.layer_blocks.3.bias" in legacy
    config = small_config().model
    expected = convert.convert_state_dict(state, config, bn_epsilon=0.0)
    ours = convert.convert_state_dict(legacy, config, bn_epsilon=0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, expected)
    with pytest.raises(ValueError, match="both a legacy and the current name"):
        convert.canonical_keys(
            {**legacy, "rpn.head.conv.0.0.bias": state["rpn.head.conv.0.0.bias"]}
        )


def test_every_missing_unmatched_and_misshapen_key_is_reported(small_model):
    state = convert.state_dict_to_numpy(small_model.state_dict())
    del state["backbone.body.layer3.1.bn2.running_mean"]
    state["roi_heads.box_head.fc8.weight"] = state["roi_heads.box_head.fc7.weight"]
    state["rpn.head.cls_logits.weight"] = state["rpn.head.cls_logits.weight"][:2]
    with pytest.raises(ValueError) as error:
        convert.convert_state_dict(state, small_config().model, bn_epsilon=0.0)
    message = str(error.value)
    assert "1 missing keys:\n  backbone.body.layer3.1.bn2.running_mean" in message
    assert "1 unmatched keys:\n  roi_heads.box_head.fc8.weight" in message
    assert (
        "rpn.head.cls_logits.weight: float32[2, 32, 1, 1], expected float32[3, 32, 1, 1]" in message
    )
    # Another class count: every class-dependent tensor is named.
    config = small_config().model
    config.num_classes = 90
    with pytest.raises(ValueError, match="6 mismatched keys") as error:
        convert.convert_state_dict(
            convert.state_dict_to_numpy(small_model.state_dict()), config, bn_epsilon=0.0
        )
    assert (
        "roi_heads.box_predictor.cls_score.weight: float32[11, 64], expected float32[91, 64]"
        in str(error.value)
    )


def test_state_dict_validation():
    good = {
        "a.weight": torch.ones(2, dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    out = convert.state_dict_to_numpy(good)
    assert list(out) == ["a.weight", "bn.num_batches_tracked"]
    assert out["a.weight"].dtype == np.float32 and out["bn.num_batches_tracked"].dtype == np.int64
    assert convert.source_bn_epsilon(out, "v1") == 1e-5
    del out["bn.num_batches_tracked"]
    assert convert.source_bn_epsilon(out, "v1") == 0.0
    with pytest.raises(ValueError, match="floating-point"):
        convert.state_dict_to_numpy({"a.weight": torch.ones(2, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"str -> torch\.Tensor"):
        convert.state_dict_to_numpy({"a.weight": [1.0, 2.0]})
    with pytest.raises(ValueError, match="mapping"):
        convert.state_dict_to_numpy([torch.ones(2)])
    # A diverged or damaged file: refused, naming the tensor (it gave no detection, no error).
    with pytest.raises(ValueError, match=r"^a\.weight: 1 NaN or infinite values of 3$"):
        convert.state_dict_to_numpy({"a.weight": torch.tensor([1.0, float("inf"), 2.0])})
    with pytest.raises(ValueError, match=r"^bn\.running_var: negative values"):
        convert.state_dict_to_numpy({"bn.running_var": torch.tensor([1.0, -0.5])})
    assert convert.state_dict_to_numpy({"bn.running_mean": torch.tensor([-1.0])})  # may be < 0


class NotATensor:
    """Pickled into a .pth file, it must not be unpickled (`weights_only=True`)."""


def test_load_state_dict_reads_tensors_only(tmp_path, small_model):
    path = tmp_path / "model.pth"
    torch.save(small_model.state_dict(), path)
    loaded = convert.load_state_dict(path)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, loaded, convert.state_dict_to_numpy(small_model.state_dict())
    )
    torch.save({"a.weight": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"holds Python objects besides tensors \(\S+NotATensor\)"):
        convert.load_state_dict(tmp_path / "evil.pth")


class CreatesAFile:
    """Unpickled, it would run `touch <path>` (harmless; the test checks it never runs)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def bad_state_dict(tmp_path: Path, small_model, kind: str) -> Path:
    """A `.pth` file that is no state dict, as users get them: a failed download's `page` (HTML),
    a whole `model` (`torch.save(model)`), a `truncated` download, a `malicious` pickle (that
    would create tmp_path/pwned), a `list` of tensors; or a `missing` file."""
    path = tmp_path / f"{kind}.pth"
    if kind == "page":
        path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n")
    elif kind == "model":
        torch.save(small_model, path)
    elif kind == "truncated":
        torch.save(small_model.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "malicious":
        torch.save({"backbone.body.conv1.weight": CreatesAFile(tmp_path / "pwned")}, path)
    elif kind == "list":
        torch.save(list(small_model.state_dict().values()), path)
    return path


BAD_STATE_DICTS = {  # kind -> what the error says about the file
    "page": r"cannot read {path}: it is not a file written by `torch\.save` \(a web page",
    "model": (
        r"cannot read {path}: it holds Python objects besides tensors "
        r"\(torchvision\.models\.detection\.mask_rcnn\.MaskRCNN\), e\.g\. a whole model saved "
        r"with `torch\.save\(model\)`; they are not loaded"
    ),
    "truncated": r"cannot read {path}: it is truncated or damaged \(an interrupted download\?\)",
    "malicious": r"cannot read {path}: it holds Python objects besides tensors \(\w+\.system\)",
    "list": r"{path} is no state dict: a state dict must be a mapping, got list",
}


@pytest.mark.parametrize("kind", sorted(BAD_STATE_DICTS))
def test_a_file_that_is_no_state_dict_is_refused_naming_it(tmp_path, small_model, kind):
    """Was torch's error naming no file: `KeyError: 101` or "Unsupported operand" (a web page),
    the weights_only error advising `weights_only=False` (a whole model), `PytorchStreamReader
    failed ... central directory` (truncated), "GLOBAL posix.system blocked" (malicious). The
    file is still read with `weights_only=True`: the malicious pickle's command never runs."""
    path = bad_state_dict(tmp_path, small_model, kind)
    expected = BAD_STATE_DICTS[kind].format(path=re.escape(str(path)))
    with pytest.raises(ValueError, match=expected) as error:
        convert.load_state_dict(path)
    message = str(error.value)
    assert message.endswith(
        "expected a PyTorch state dict, a file of tensors written with "
        "`torch.save(model.state_dict(), path)` such as torchvision's released .pth weights"
    )
    assert "weights_only" not in message and "safe_globals" not in message
    if kind != "list":  # no chained torch error whose traceback would advise weights_only=False
        assert error.value.__cause__ is None and error.value.__context__ is None
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("kind", ["page", "model", "missing"])
def test_convert_script_refuses_a_file_that_is_no_state_dict(tmp_path, small_model, kind):
    """A usage error naming the file (was torch's traceback), nothing written."""
    path = bad_state_dict(tmp_path, small_model, kind)
    command = [
        sys.executable,
        str(REPO / "scripts" / "convert_torchvision.py"),
        f"--state_dict={path}",
        f"--out={tmp_path / 'out'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    expected = {
        "page": f"--state_dict: cannot read {path}: it is not a file written by `torch.save`",
        "model": f"--state_dict: cannot read {path}: it holds Python objects besides tensors",
        "missing": f"--state_dict: [Errno 2] No such file or directory: '{path}'",
    }[kind]
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "weights_only=False" not in result.stderr and "set to `False`" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_download_reads_torchvision_cache(tmp_path, monkeypatch, small_model):
    """`download_state_dict` fetches the release through torchvision's weights enum; a file
    already in `$TORCH_HOME/hub/checkpoints` is read instead (no network in this test)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = tv_detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url
    torch.save(small_model.state_dict(), cache / url.rsplit("/", 1)[1])
    loaded = convert.download_state_dict("v1")
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, loaded, convert.state_dict_to_numpy(small_model.state_dict())
    )
    with pytest.raises(ValueError, match="version must be one of"):
        convert.download_state_dict("v3")


def test_label_map_matches_torchvision_and_coco():
    from torchvision.models._meta import _COCO_CATEGORIES

    from mrcnn_jax.data.coco_instances import COCO_CATEGORIES

    assert torchvision_r50_fpn_v1.TORCHVISION_COCO_CATEGORIES == tuple(_COCO_CATEGORIES)
    config = torchvision_r50_fpn_v1.get_config()
    label_to_category = dict(enumerate(config.data.label_to_category_id))
    names = dict(enumerate(config.data.class_names))
    assert len(label_to_category) == len(names) == config.model.num_classes == 90
    coco_names = dict(COCO_CATEGORIES)
    real = {label for label, name in names.items() if name != "N/A"}
    assert len(real) == 80
    for label in real:
        assert coco_names[label_to_category[label]] == names[label]


def test_converted_checkpoint_loads(tmp_path, small_model, monkeypatch):
    """`checkpoint.save_variables` writes what `mrcnn_jax.load_checkpoint` restores as converted;
    a `~` in its workdir is expanded (scripts/convert_torchvision.py --out=~/...); class names
    that are not one per class are refused before anything is written."""
    import mrcnn_jax

    config = small_config()
    variables = converted(small_model)
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    directory = checkpoint.save_variables(f"~/{tmp_path.name}", config, variables)
    assert directory == tmp_path / "checkpoints" / "0"
    predictor = mrcnn_jax.load_checkpoint(tmp_path)
    assert predictor.step == 0
    assert predictor.config.model.to_dict() == json.loads(config.model.to_json())
    assert predictor.class_names[:3] == ["person", "bicycle", "car"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, predictor.variables, variables)
    with pytest.raises(FileExistsError):
        checkpoint.save_variables(tmp_path, config, variables)
    config.data.class_names = config.data.class_names[:-1]
    with pytest.raises(ValueError, match=r"config\.data\.class_names has 9 entries"):
        checkpoint.save_variables(tmp_path / "other", config, variables)
    assert not (tmp_path / "other").exists()


def test_an_interrupted_save_leaves_nothing_and_a_killed_ones_folder_blocks_no_rerun(
    tmp_path, small_model, monkeypatch
):
    """convert_torchvision.py stopped while saving left `checkpoints/0.orbax-checkpoint-tmp*`
    (and orbax's thread tracebacks): every rerun was refused ("already holds checkpoints")
    while the readers found no checkpoint. A Ctrl-C now waits for the write and removes it; a
    kill's temporary folder is not a checkpoint (a training's save in progress: left alone)."""
    config, variables = small_config(), converted(small_model)
    save = checkpoint.save

    def save_then_ctrl_c(*args):
        save(*args)
        os.kill(os.getpid(), signal.SIGINT)  # while orbax writes in the background

    monkeypatch.setattr(checkpoint, "save", save_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_variables(tmp_path, config, variables)
    assert os.listdir(tmp_path / "checkpoints") == []
    monkeypatch.setattr(checkpoint, "save", save)
    killed = tmp_path / "checkpoints" / "0.orbax-checkpoint-tmp-1796620000"
    (killed / "state").mkdir(parents=True)
    assert not checkpoint.holds_checkpoints(tmp_path)
    checkpoint.save_variables(tmp_path, config, variables)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["0", killed.name]
    assert checkpoint.holds_checkpoints(tmp_path)


def small_v2_model():
    """A seeded small torchvision v2 model (BN eps 1e-5, as torchvision's v2 and ImageNet-based
    models), in eval."""
    model = small_torchvision_model(small_config("v2").model.num_classes, "v2").eval()
    seed_weights(model, seed=2)
    return model


def test_release_of_tells_the_architecture(small_model):
    v1 = convert.state_dict_to_numpy(small_model.state_dict())
    v2 = convert.state_dict_to_numpy(small_v2_model().state_dict())
    assert convert.release_of(v1) == "v1"
    assert convert.release_of(v2) == "v2"
    assert convert.release_of({k: v for k, v in v1.items() if k.startswith("backbone.")}) is None


def run_convert_script(tmp_path, model, version: str, *flags: str) -> subprocess.CompletedProcess:
    """scripts/convert_torchvision.py on `model`'s state dict (or `model`, a state dict) as a
    local .pth, the release's config shrunk to the small models by flags, into tmp_path/out."""
    torch.save(model if isinstance(model, dict) else model.state_dict(), tmp_path / "small.pth")
    overrides = {
        "model.backbone_depth": 18,
        "model.fpn_dim": 32,
        "model.num_classes": 10,
        "model.roi_heads.box_head_dim": 64,
        "model.roi_heads.box_head_conv_dim": 16,
        "model.roi_heads.mask_head_dim": 32,
        "data.class_names": "()",  # the release's 90 COCO names do not fit 10 classes
        "data.label_to_category_id": "()",
    }
    command = [
        sys.executable,
        str(REPO / "scripts" / "convert_torchvision.py"),
        f"--state_dict={tmp_path / 'small.pth'}",
        f"--out={tmp_path / 'out'}",
        f"--config={REPO / 'configs' / f'torchvision_r50_fpn_{version}.py'}",
        *(f"--config.{key}={value}" for key, value in overrides.items()),
        *flags,
    ]
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, check=False)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_convert_script(tmp_path, small_model, version):
    """scripts/convert_torchvision.py on a local .pth without --weights: the state dict's
    release gives the BatchNorm eps (0 for v1, 1e-5 for v2)."""
    model = small_model if version == "v1" else small_v2_model()
    result = run_convert_script(tmp_path, model, version)
    assert result.returncode == 0, result.stderr[-3000:]
    eps = convert.RELEASES[version].bn_epsilon
    assert f"{version}: " in result.stdout and f"BatchNorm eps {eps}" in result.stdout
    manager = checkpoint.create_manager(tmp_path / "out", read_only=True)
    restored = checkpoint.restore_raw(manager, 0)
    state = convert.state_dict_to_numpy(model.state_dict())
    expected = convert.convert_state_dict(state, small_config(version).model, bn_epsilon=eps)
    for collection in ("params", "batch_stats"):
        jax.tree_util.tree_map(
            np.testing.assert_array_equal, restored[collection], expected[collection]
        )


def test_convert_script_says_what_does_not_fit_in_one_line(tmp_path, small_model):
    """A Mask R-CNN fine-tuned on another number of classes (the flags that convert it), the
    state dict of another network, and an --out that holds checkpoints already: usage errors,
    no traceback."""
    result = run_convert_script(tmp_path, small_torchvision_model(4, "v1"), "v1")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "its box predictor has 5 outputs: a model fine-tuned on 4 classes" in (
        result.stderr.lower()
    )
    advice = shlex.split(result.stderr.split("Convert it with ")[1].splitlines()[0])
    assert advice == [  # pasted into a shell as printed
        "--config=configs/torchvision_r50_fpn_v1.py",
        "--config.model.num_classes=4",
        '--config.data.class_names=("name 1", ...)',
        "--config.data.label_to_category_id=()",
    ]
    result = run_convert_script(tmp_path, small_model.backbone, "v1")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "small.pth is not a torchvision Mask R-CNN state dict" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~10 s a converter start; the default run keeps two refusals (above)
@pytest.mark.parametrize(
    "flag, message",
    [  # both wrote a checkpoint that load_checkpoint refused
        ("--config.data.image_size=(800, 800)", "config.data.image_size=(800, 800) cannot hold"),
        ("--bn_epsilon=nan", "--bn_epsilon must be a finite number >= 0"),
        ("", "already holds checkpoints"),  # an --out with checkpoints/0
    ],
)
def test_convert_script_refuses_flags_and_an_out_before_writing(
    tmp_path, small_model, flag, message
):
    if not flag:
        (tmp_path / "out" / "checkpoints" / "0").mkdir(parents=True)
    result = run_convert_script(tmp_path, small_model, "v1", *[flag] * bool(flag))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "out").exists() == (not flag)


def test_convert_script_offline_says_what_to_fetch_in_one_line(tmp_path):
    """--weights without a network (here a proxy nobody listens on) was a ConnectionError
    traceback of ~80 lines around the one that names the file to fetch."""
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "no_proxy": "",
        "NO_PROXY": "",
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_torchvision.py"), "--weights=v1",
         f"--out={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=tmp_path, env=env, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "error: could not download https://download.pytorch.org/models/maskrcnn_resnet50_fpn"
        in (result.stderr)
    ), result.stderr[-3000:]
    assert "pass the file (scripts/convert_torchvision.py --state_dict=FILE)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_script_refuses_weights_of_the_other_release(tmp_path):
    """v2 tensors with --weights=v1 (whose eps, 0, would skew every v2 BatchNorm) or with the v1
    config: a usage error naming both, and nothing written (the config's was a list of 88
    keys)."""
    result = run_convert_script(tmp_path, small_v2_model(), "v2", "--weights=v1")
    assert result.returncode != 0
    assert "holds the v2 architecture (maskrcnn_resnet50_fpn_v2), not --weights=v1" in (
        result.stderr
    )
    result = run_convert_script(tmp_path, small_v2_model(), "v1")  # v1's config
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert (
        "small.pth holds the v2 architecture (maskrcnn_resnet50_fpn_v2), but --config="
        f"{REPO / 'configs' / 'torchvision_r50_fpn_v1.py'} builds v1's box head: give "
        "--config=configs/torchvision_r50_fpn_v2.py (the default)"
    ) in result.stderr, result.stderr[-3000:]
    assert "missing keys" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_script_takes_the_eps_of_trainable_batchnorm(tmp_path, small_model):
    """A v1 state dict with BatchNorm step counters (torch.nn.BatchNorm2d layers, as
    torchvision builds a model without pretrained weights) converts with their eps, 1e-5, not
    the COCO release's 0, and says so."""
    state_dict = small_model.state_dict()
    bn_layers = {key.rsplit(".", 1)[0] for key in state_dict if key.endswith(".running_var")}
    counters = {f"{layer}.num_batches_tracked": torch.tensor(7) for layer in bn_layers}
    result = run_convert_script(tmp_path, {**state_dict, **counters}, "v1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"v1: {len(state_dict)} tensors, BatchNorm eps 1e-05, torch.nn.BatchNorm2d's: the "
        "state dict has its step counters)"
    ) in result.stdout
    manager = checkpoint.create_manager(tmp_path / "out", read_only=True)
    restored = checkpoint.restore_raw(manager, 0)
    state = convert.state_dict_to_numpy(state_dict)
    expected = convert.convert_state_dict(state, small_config().model, bn_epsilon=1e-5)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, restored["batch_stats"], expected["batch_stats"]
    )


# ------------------------------------------------------------------ photographs, the user path

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")  # 512², 400×600, 300×451,
# 427×640: natural sizes, none a multiple of 32 after torchvision's resize (800 × 800..1202).


def photographs() -> list[np.ndarray]:
    """scikit-image's bundled photographs (read from its data folder; not imported)."""
    import importlib.util

    from mrcnn_jax.evaluation.visualize import read_image

    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (test extra) holds the photographs")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    return [read_image(str(folder / name)) for name in PHOTOS]


@pytest.fixture(scope="module", params=["v1", pytest.param("v2", marks=pytest.mark.slow)])
def photo_pair(request, tmp_path_factory):
    """torchvision's small model on the photographs at its defaults (800 / 1333), and the same
    weights through the user path: convert -> checkpoint -> `mrcnn_jax.load_checkpoint` ->
    predictor, on the COCO canvas (1344²) of the release config."""
    import mrcnn_jax

    version = request.param
    module = {"v1": torchvision_r50_fpn_v1, "v2": torchvision_r50_fpn_v2}[version]
    config = small_config(version, module.get_config())
    tv_model = small_torchvision_model(config.model.num_classes, version, sizes=(800, 1333))
    tv_model.eval()
    overwrite_eps(tv_model, convert.RELEASES[version].bn_epsilon)
    seed_weights(tv_model, seed=0)
    images = photographs()
    run = run_torchvision(
        tv_model, images, config.model.num_classes, BACKGROUND_OFFSET["small"],
        tuple(config.data.image_size),
    )  # fmt: skip
    variables = convert.convert_state_dict(
        convert.state_dict_to_numpy(tv_model.state_dict()),
        config.model,
        bn_epsilon=convert.RELEASES[version].bn_epsilon,
    )
    workdir = tmp_path_factory.mktemp(f"photos_{version}")
    checkpoint.save_variables(workdir, config, variables)
    predictor = mrcnn_jax.load_checkpoint(workdir)
    ours = [predictor(image, score_threshold=0.0) for image in images]
    return images, run, ours


@pytest.mark.parametrize("image", range(len(PHOTOS)))
def test_photographs_give_torchvisions_detections(photo_pair, image):
    """Same detections as torchvision on each photograph at its natural size: the same count and
    labels, box IoU >= 0.999 (boxes under 1 px wide or high, where IoU is ill-conditioned: every
    coordinate within 0.01 px), |score difference| <= 2e-4, pasted-mask IoU >= 0.99."""
    images, run, ours = photo_pair
    reference, mine = run.detections[image], ours[image]
    count = len(reference["scores"])
    assert count >= 5, "the seeded torchvision model detects too little to compare"
    assert len(mine["scores"]) == count
    labels = mine["classes"] + 1  # torchvision's label of our label l is l + 1
    unmatched = list(range(count))
    worst = {"box IoU": 1.0, "box px": 0.0, "score diff": 0.0, "mask IoU": 1.0}
    for box, label, score, mask in zip(
        reference["boxes"], reference["labels"], reference["scores"], reference["masks"][:, 0]
    ):
        candidates = [j for j in unmatched if labels[j] == label]
        assert candidates, f"no detection of class {label} left to match"
        ious = box_iou(torch.from_numpy(box[None]), torch.from_numpy(mine["boxes"][candidates]))[
            0
        ].numpy()
        best = candidates[int(ious.argmax())]
        unmatched.remove(best)
        worst["box px"] = max(worst["box px"], float(np.abs(mine["boxes"][best] - box).max()))
        if min(box[2] - box[0], box[3] - box[1]) >= 1:
            worst["box IoU"] = min(worst["box IoU"], float(ious.max()))
        worst["score diff"] = max(worst["score diff"], abs(float(mine["scores"][best] - score)))
        worst["mask IoU"] = min(worst["mask IoU"], mask_iou(mine["masks"][best], mask > 0.5))
    print(f"{PHOTOS[image]} {images[image].shape[:2]}: {count} detections, {worst}")
    assert worst["box IoU"] >= 0.999
    assert worst["box px"] <= 0.01
    assert worst["score diff"] <= 2e-4  # float32 rounding (Winograd 3×3 layers) through 50 layers
    assert worst["mask IoU"] >= 0.99
