"""Shapes, dtypes, layouts and torchvision numerics of the backbone, FPN and whole Mask R-CNN
(the RPN and RoI heads are tested in test_rpn.py and test_roi_heads.py)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import from_torch_nchw, oihw_to_hwio, random_variables, to_torch_nchw

from mrcnn_jax.modeling.fpn import FPN
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.resnet import ResNet
from mrcnn_jax.modeling.roi_heads import BoxHead, MaskHead
from mrcnn_jax.modeling.rpn import RPNHead


def ceil_halvings(size: int, times: int) -> int:
    """`size` after `times` stride-2 layers with torchvision padding (each rounds up)."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


def assert_close_relative(got, want, rtol=1e-4):
    """max |got - want| <= rtol * max |want| (a scale-aware tolerance for deep activations)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(got - want).max() <= rtol * scale, np.abs(got - want).max() / scale


# --------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("depth, width", [(18, 64), (50, 256)])
@pytest.mark.parametrize("height, img_width", [(64, 128), (50, 70)])
def test_resnet_stage_shapes(depth, width, height, img_width):
    model = ResNet(depth=depth, norm="frozen")
    images = jax.ShapeDtypeStruct((2, height, img_width, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    out = jax.eval_shape(model.apply, variables, images)
    assert list(out) == ["C2", "C3", "C4", "C5"]
    for level, name in enumerate(out, start=2):
        want = (2, ceil_halvings(height, level), ceil_halvings(img_width, level))
        assert out[name].shape == (*want, width * 2 ** (level - 2)), name
        assert out[name].dtype == jnp.float32


def test_resnet_rejects_unknown_depth():
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    with pytest.raises(ValueError, match="depth"):
        jax.eval_shape(ResNet(depth=26).init, jax.random.key(0), images)


def torch_to_flax_path(name: str) -> tuple[str, ...]:
    """torchvision ResNet parameter/buffer name -> (collection-free) Flax module path + leaf."""
    parts = name.split(".")
    leaf = {
        "weight": "kernel" if "conv" in name or "downsample.0" in name else "scale",
        "bias": "bias",
        "running_mean": "mean",
        "running_var": "var",
    }[parts[-1]]
    if parts[0] in ("conv1", "bn1"):
        return ("stem_conv" if parts[0] == "conv1" else "stem_bn", leaf)
    stage, block, layer = int(parts[0][len("layer") :]) + 1, parts[1], parts[2]
    if layer == "downsample":
        layer = "downsample_conv" if parts[3] == "0" else "downsample_bn"
    return (f"res{stage}_{block}", layer, leaf)


def test_resnet18_matches_torchvision():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.resnet18().eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)

    model = ResNet(depth=18, norm="frozen")
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    variables, _ = random_variables(model, np.random.default_rng(1), images[:1])
    copied = set()
    tensors = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    for name, tensor in tensors.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            continue
        path = torch_to_flax_path(name)
        collection = "batch_stats" if path[-1] in ("mean", "var") else "params"
        node = variables[collection]
        for key in path[:-1]:
            node = node[key]
        value = oihw_to_hwio(tensor) if tensor.ndim == 4 else tensor.detach().numpy()
        assert node[path[-1]].shape == value.shape, name
        node[path[-1]] = value
        copied.add((collection, *path))
    num_leaves = len(jax.tree_util.tree_leaves(variables))
    assert len(copied) == num_leaves  # Every Flax variable came from torchvision.

    out = jax.jit(model.apply)(variables, images)
    with torch.no_grad():
        r = reference
        x = r.maxpool(r.relu(r.bn1(r.conv1(to_torch_nchw(images)))))
        for level in range(2, 6):
            x = getattr(r, f"layer{level - 1}")(x)
            assert_close_relative(out[f"C{level}"], from_torch_nchw(x))


# --------------------------------------------------------------------------- FPN


def backbone_shaped_features(rng, height, width, channels=(8, 16, 32, 64)):
    return {
        f"C{level}": rng.normal(
            size=(1, ceil_halvings(height, level), ceil_halvings(width, level), c)
        ).astype(np.float32)
        for level, c in zip(range(2, 6), channels)
    }


@pytest.mark.parametrize("height, width", [(64, 128), (50, 70), (200, 136)])
def test_fpn_shapes_and_torchvision_numerics(height, width):
    """P2..P6 shapes (P6 = ceil(P5 / 2)) and values equal to torchvision's FPN + LastLevelMaxPool
    with the same weights, also for odd sizes where the top-down upsampling is not exactly 2x."""
    torch = pytest.importorskip("torch")
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    features = backbone_shaped_features(np.random.default_rng(height), height, width)
    model = FPN(dim=16)
    torch.manual_seed(0)
    reference = FeaturePyramidNetwork([8, 16, 32, 64], 16, extra_blocks=LastLevelMaxPool()).eval()
    params = random_variables(model, np.random.default_rng(0), features)[0]["params"]
    with torch.no_grad():
        for i, level in enumerate(range(2, 6)):
            for block, name in (
                (reference.inner_blocks, "lateral"),
                (reference.layer_blocks, "output"),
            ):
                conv = block[i][0]
                params[f"{name}{level}"]["kernel"] = oihw_to_hwio(conv.weight)
                params[f"{name}{level}"]["bias"] = conv.bias.numpy()
        want = reference({k: to_torch_nchw(v) for k, v in features.items()})
    out = jax.jit(model.apply)({"params": params}, features)
    assert list(out) == ["P2", "P3", "P4", "P5", "P6"]
    for level, name in enumerate(out, start=2):
        shape = (1, ceil_halvings(height, level), ceil_halvings(width, level), 16)
        assert out[name].shape == shape and out[name].dtype == jnp.float32, name
    for name, value in zip(out, want.values()):
        assert_close_relative(out[name], from_torch_nchw(value), rtol=1e-5)


# --------------------------------------------------------------------------- MaskRCNN


def run_inference(config):
    """MaskRCNN(config.model) inference on two random images (the second with padding).

    Returns the abstract variables `init` creates, the outputs and the images' sizes."""
    model = MaskRCNN.from_config(config.model)
    h, w = config.data.image_size
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(2, h, w, 3)).astype(np.float32),
        "image_size": np.array([[h, w], [h // 2 - 2, w // 3]], np.int32),
    }
    variables, abstract = random_variables(model, rng, batch, train=False)
    out = jax.jit(functools.partial(model.apply, train=False))(variables, batch)
    return abstract, jax.tree_util.tree_map(np.asarray, out), batch["image_size"]


def check_detections(out, image_size, config):
    d = config.model.roi_heads.detections_per_image
    mask = 2 * config.model.roi_heads.mask_pooler_size
    expected = {
        "boxes": ((2, d, 4), np.float32),
        "scores": ((2, d), np.float32),
        "classes": ((2, d), np.int32),
        "masks": ((2, d, mask, mask), np.float32),
        "valid": ((2, d), np.bool_),
    }
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == expected
    assert out["valid"].any() and not out["valid"].all()
    for b in range(2):
        valid = out["valid"][b]
        n = valid.sum()
        assert valid[:n].all() and not valid[n:].any()  # Valid rows come first.
        boxes, scores = out["boxes"][b][valid], out["scores"][b][valid]
        height, width = image_size[b]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
        assert (boxes[:, [1, 3]] <= height).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (scores > config.model.roi_heads.score_threshold).all() and (scores <= 1).all()
        assert (np.diff(scores) <= 0).all()
        assert ((out["classes"][b] >= 0) & (out["classes"][b] < config.model.num_classes)).all()
        masks = out["masks"][b]
        assert (masks >= 0).all() and (masks <= 1).all() and (masks[~valid] == 0).all()
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_mask_rcnn_inference_outputs(dtype):
    # A high score threshold so that some detection rows are padding.
    config = tiny_config(**{"model.dtype": dtype, "model.roi_heads.score_threshold": 0.6})
    variables, out, image_size = run_inference(config)
    check_detections(out, image_size, config)
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves(variables)}
    assert dtypes == {jnp.dtype(jnp.float32)}  # Parameters and statistics stay float32.


def test_numpy_variables_closed_over_are_taken_and_bad_batches_named():
    """Variables restored as numpy (msgpack), closed over under a transform: the mask head
    indexed its numpy kernel by traced classes (TracerArrayConversionError). Batches the model
    cannot take are named: an image_size not [B, 2] (was an IndexError), B = 0 (a
    ZeroDivisionError), a canvas not a multiple of size_divisibility (silently other boxes: the
    extent clamped at the canvas instead of its multiple)."""
    config = tiny_config()
    model = MaskRCNN.from_config(config.model)
    h, w = config.data.image_size
    batch = {
        "image": np.zeros((2, h, w, 3), np.float32),
        "image_size": np.array([[h, w], [h // 2, w]], np.int32),
    }
    variables, _ = random_variables(model, np.random.default_rng(0), batch, train=False)
    variables = jax.tree_util.tree_map(np.asarray, variables)

    def apply(batch):
        return jax.eval_shape(lambda b: model.apply(variables, b, train=False), batch)

    d = config.model.roi_heads.detections_per_image
    assert apply(batch)["masks"].shape[:2] == (2, d)
    config.model.size_divisibility = 96  # variable_shapes' default canvas follows it (was 128)
    shapes = MaskRCNN.from_config(config.model).variable_shapes()
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(variables)
    for bad, message in (
        (
            {"image_size": np.array([h, w], np.int32)},
            r"\['image_size'\] must be \[B, 2\] = \[2, 2\]",
        ),
        (
            {"image": np.zeros((0, h, w, 3), np.float32), "image_size": np.zeros((0, 2), np.int32)},
            r"must be \[B, H, W, 3\], got shape \(0, ",
        ),
        (
            {"image": np.zeros((2, h + 8, w, 3), np.float32)},
            rf"is {h + 8}x{w}: the canvas must be a multiple of model.size_divisibility=32",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            apply({**batch, **bad})


def test_bfloat16_mask_rcnn_computes_in_bfloat16_with_float32_params_and_outputs():
    """Abstract evaluation (no compile; the full bf16 run is the slow case above)."""
    model = MaskRCNN.from_config(tiny_config(**{"model.dtype": "bfloat16"}).model)
    batch = {
        "image": jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32),
        "image_size": jax.ShapeDtypeStruct((2, 2), jnp.int32),
    }
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), batch)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out, state = jax.eval_shape(
        functools.partial(model.apply, train=False, capture_intermediates=True), variables, batch
    )
    assert {k: v.dtype for k, v in out.items()} == {
        "boxes": jnp.float32,
        "scores": jnp.float32,
        "classes": jnp.int32,
        "masks": jnp.float32,
        "valid": jnp.bool_,
    }
    pyramid = state["intermediates"]["fpn"]["__call__"][0]
    assert {v.dtype for v in pyramid.values()} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_heads_predict_in_float32():
    """With `dtype` bfloat16 the heads' hidden layers compute in bf16, their predictors (RPN
    objectness and deltas, box head class scores and deltas, the mask predictor) in float32: the
    outputs are not bf16 values cast up (bf16 deltas are coordinates off by up to ~1 px on large
    boxes; bf16 scores tie by the dozen in a top-k)."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    bf16 = jnp.bfloat16
    heads = [
        (RPNHead(num_anchors=3, dtype=bf16), ([normal(2, 8, 8, 16), normal(2, 4, 4, 16)],)),
        (BoxHead(num_classes=3, dim=16, dtype=bf16), (normal(6, 7, 7, 16),)),
        (MaskHead(num_classes=3, dim=8, num_convs=1, dtype=bf16), (normal(6, 14, 14, 16),
                                                                    jnp.array([0, 1, 2] * 2))),
    ]  # fmt: skip
    for head, inputs in heads:
        variables = head.init(jax.random.key(0), *inputs)
        for x in jax.tree_util.tree_leaves(head.apply(variables, *inputs)):
            assert x.dtype == jnp.float32, type(head).__name__
            x = np.asarray(x)
            rounded = np.asarray(jnp.asarray(x).astype(bf16).astype(jnp.float32))
            assert np.mean(x == rounded) < 0.05, type(head).__name__
