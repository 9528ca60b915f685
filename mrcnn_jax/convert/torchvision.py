"""Imports torchvision's Mask R-CNN weights (`maskrcnn_resnet50_fpn`, `_v2`) into our params.

torchvision's COCO models have the architectures of `configs/torchvision_r50_fpn_v1.py` (37.9 box
/ 34.6 mask AP on COCO val2017) and `configs/torchvision_r50_fpn_v2.py` (47.4 / 41.8: BatchNorm
in the FPN and the heads, two RPN convs, a 4-conv + 1-FC box head). `convert_state_dict` maps
every tensor of a torchvision state dict to the variable of `MaskRCNN.from_config(config.model)`
that plays its role, changing the layout where the two frameworks differ:

- conv kernels OIHW → HWIO; the mask head's `ConvTranspose2d` kernel `[in, out, kh, kw]` →
  `[kh, kw, in, out]` flipped in both spatial axes (Flax's `ConvTranspose` does not flip the
  kernel, PyTorch's transposed convolution does);
- `Linear` weights `[out, in]` → Dense kernels `[in, out]`; the box head's first FC reads RoI
  features flattened as (C, H, W) in torchvision and as (H, W, C) here, so its input rows are
  permuted;
- `FrozenBatchNorm2d`/`BatchNorm2d` map one to one: `weight`/`bias` to the `params` `scale`/`bias`,
  `running_mean`/`running_var` to the `batch_stats` `mean`/`var`; `num_batches_tracked` counters
  are dropped. Our BatchNorm adds `BN_EPSILON` (1e-5) to the variance, torchvision's adds the
  source model's `eps`, which a state dict does not record: `maskrcnn_resnet50_fpn(weights=
  COCO_V1)` sets it to 0 (`overwrite_eps(model, 0.0)`, kept for old checkpoints), v2 and a model
  trained from ImageNet weights keep 1e-5. The difference is folded into the stored variance
  (`var = running_var + eps - BN_EPSILON`), so `var + BN_EPSILON` is torchvision's denominator;
- classes: torchvision's 91-way COCO layout (index 0 background, then COCO category ids 1..90
  with "N/A" at the ids COCO does not use) becomes `num_classes = 90`: class logits keep all 91
  columns (ours are also background-first), the box regressor and the mask predictor drop
  torchvision's background slot. Label `l` here is torchvision label `l + 1`, i.e. COCO
  `category_id = l + 1` (the label map of `configs/torchvision_r50_fpn_v1.py`).

Legacy key spellings of old torchvision checkpoints (`fpn.inner_blocks.0.weight`,
`rpn.head.conv.weight`, `mask_head.mask_fcn1.weight`, as in the released v1 weights file) are
accepted as torchvision itself accepts them. Any missing or unmatched key and any shape mismatch
is an error listing all of them.

PyTorch is needed only to read `.pth` files or download weights (`load_state_dict`,
`download_state_dict`), and imported lazily: `pip install 'mrcnn_jax[torch]'`.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from mrcnn_jax import paths
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.resnet import BN_EPSILON


class Release(NamedTuple):
    """A released torchvision Mask R-CNN: how to fetch it and what its BatchNorm epsilon is."""

    weights_enum: str  # In torchvision.models.detection; its COCO_V1 member is used.
    builder: str  # The torchvision function building the model.
    bn_epsilon: float  # The BatchNorm eps the builder gives the model with these weights.
    config: str  # This project's config file of the architecture.


RELEASES = {
    "v1": Release(
        "MaskRCNN_ResNet50_FPN_Weights",
        "maskrcnn_resnet50_fpn",
        0.0,
        "configs/torchvision_r50_fpn_v1.py",
    ),
    "v2": Release(
        "MaskRCNN_ResNet50_FPN_V2_Weights",
        "maskrcnn_resnet50_fpn_v2",
        1e-5,
        "configs/torchvision_r50_fpn_v2.py",
    ),
}

# State-dict entries that carry no weights: the step counters of `torch.nn.BatchNorm2d` layers
# (`FrozenBatchNorm2d` has none).
_IGNORED_SUFFIXES = (".num_batches_tracked",)
TORCH_BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default eps, which torchvision's builders keep

# Old torchvision spellings (before the modules' `_version = 2`) -> current ones.
_LEGACY_KEYS: tuple[tuple[str, str | Callable[[re.Match], str]], ...] = (
    (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2"),
    (r"^(rpn\.head\.conv)\.(weight|bias)$", r"\1.0.0.\2"),
    (
        r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$",
        lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}",
    ),
)


def _box_head_fc(index: int, num_convs: int) -> str:
    """torchvision name of our box-head FC `fc<index>`: v1's `TwoMLPHead` (no convs) calls its
    FCs fc6, fc7; v2's `FastRCNNConvFCHead` is a Sequential of conv blocks, a Flatten, then
    (Linear, ReLU) pairs."""
    if num_convs == 0:
        return f"roi_heads.box_head.fc{index + 5}"
    return f"roi_heads.box_head.{num_convs + 1 + 2 * (index - 1)}"


# Our module path (joined by "/") -> torchvision module name, given the match and `config.model`.
# torchvision's conv blocks (`Conv2dNormActivation`) hold the conv at `.0` and its norm at `.1`;
# ours are `<conv>` and `<conv>_bn`.
_MODULES: tuple[tuple[str, Callable[[re.Match, ml_collections.ConfigDict], str]], ...] = (
    (r"backbone/stem_conv", lambda m, c: "backbone.body.conv1"),
    (r"backbone/stem_bn", lambda m, c: "backbone.body.bn1"),
    (
        r"backbone/res(\d)_(\d+)/(conv\d|bn\d)",
        lambda m, c: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.{m[3]}",
    ),
    (
        r"backbone/res(\d)_(\d+)/downsample_(conv|bn)",
        lambda m, c: f"backbone.body.layer{int(m[1]) - 1}.{m[2]}.downsample.{int(m[3] == 'bn')}",
    ),
    (
        r"fpn/(lateral|output)(\d)(_bn)?",
        lambda m, c: (
            f"backbone.fpn.{'inner' if m[1] == 'lateral' else 'layer'}_blocks."
            f"{int(m[2]) - 2}.{int(bool(m[3]))}"
        ),
    ),
    (r"rpn_head/conv(\d*)", lambda m, c: f"rpn.head.conv.{int(m[1] or 1) - 1}.0"),
    (r"rpn_head/objectness", lambda m, c: "rpn.head.cls_logits"),
    (r"rpn_head/deltas", lambda m, c: "rpn.head.bbox_pred"),
    (
        r"box_head/conv(\d+)(_bn)?",
        lambda m, c: f"roi_heads.box_head.{int(m[1]) - 1}.{int(bool(m[2]))}",
    ),
    (r"box_head/fc(\d+)", lambda m, c: _box_head_fc(int(m[1]), c.roi_heads.box_head_convs)),
    (r"box_head/cls_score", lambda m, c: "roi_heads.box_predictor.cls_score"),
    (r"box_head/bbox_pred", lambda m, c: "roi_heads.box_predictor.bbox_pred"),
    (
        r"mask_head/conv(\d+)(_bn)?",
        lambda m, c: f"roi_heads.mask_head.{int(m[1]) - 1}.{int(bool(m[2]))}",
    ),
    (r"mask_head/deconv", lambda m, c: "roi_heads.mask_predictor.conv5_mask"),
    (r"mask_head", lambda m, c: "roi_heads.mask_predictor.mask_fcn_logits"),
)

# Our leaf name -> torchvision parameter/buffer name.
_LEAVES = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
    "predictor_kernel": "weight",
    "predictor_bias": "bias",
}

Shape = tuple[int, ...]
VariablePath = tuple[str, ...]  # (collection, module, ..., leaf), e.g. ("params", "fpn", ...)


class Layout(NamedTuple):
    """How one torchvision tensor becomes one of our variables."""

    torch_shape: Callable[[Shape], Shape]  # our variable's shape -> the torchvision shape
    convert: Callable[[np.ndarray], np.ndarray]  # torchvision array -> our array


_IDENTITY = Layout(lambda s: s, lambda a: a)
# Conv2d weight [O, I, kh, kw] -> Flax Conv kernel [kh, kw, I, O].
_CONV = Layout(lambda s: (s[3], s[2], s[0], s[1]), lambda a: a.transpose(2, 3, 1, 0))
# ConvTranspose2d weight [I, O, kh, kw] -> Flax ConvTranspose kernel [kh, kw, I, O], flipped.
_DECONV = Layout(
    lambda s: (s[2], s[3], s[0], s[1]), lambda a: a[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
)
# Linear weight [O, I] -> Dense kernel [I, O].
_DENSE = Layout(lambda s: (s[1], s[0]), lambda a: a.T)
# Box regressor over 1 + K classes -> over the K foreground classes (drop background's 4).
_BOX_PRED_KERNEL = Layout(lambda s: (s[1] + 4, s[0]), lambda a: a[4:].T)
_BOX_PRED_BIAS = Layout(lambda s: (s[0] + 4,), lambda a: a[4:])
# Mask logits 1×1 conv [1 + K, D, 1, 1] -> per-class predictor [D, K] (drop background).
_MASK_PRED_KERNEL = Layout(lambda s: (s[1] + 1, s[0], 1, 1), lambda a: a[1:, :, 0, 0].T)
_MASK_PRED_BIAS = Layout(lambda s: (s[0] + 1,), lambda a: a[1:])


def _dense_from_chw(pooler_size: int) -> Layout:
    """Linear weight over RoI features flattened (C, S, S) -> Dense kernel over (S, S, C)."""

    def convert(a: np.ndarray) -> np.ndarray:
        out, flat = a.shape
        channels = flat // pooler_size**2
        kernel = a.reshape(out, channels, pooler_size, pooler_size).transpose(2, 3, 1, 0)
        return kernel.reshape(flat, out)

    return Layout(_DENSE.torch_shape, convert)


def _variance(bn_epsilon: float) -> Layout:
    """`running_var` of a torch BatchNorm with `eps = bn_epsilon` -> our `var` (see module doc)."""
    shift = np.float32(bn_epsilon) - np.float32(BN_EPSILON)
    return Layout(_IDENTITY.torch_shape, lambda a: a + shift)


def _layout(
    path: VariablePath, shape: Shape, model_config: ml_collections.ConfigDict, bn_epsilon: float
) -> Layout:
    """The layout change from torchvision for our variable at `path` of `shape`."""
    module, leaf = path[-2], path[-1]
    if leaf == "var":
        return _variance(bn_epsilon)
    if leaf == "predictor_kernel":
        return _MASK_PRED_KERNEL
    if leaf == "predictor_bias":
        return _MASK_PRED_BIAS
    if module == "bbox_pred":
        return _BOX_PRED_KERNEL if leaf == "kernel" else _BOX_PRED_BIAS
    if leaf != "kernel":
        return _IDENTITY
    if module == "deconv":
        return _DECONV
    if module == "fc1":
        return _dense_from_chw(model_config.roi_heads.box_pooler_size)
    return _DENSE if len(shape) == 2 else _CONV


def torchvision_key(path: VariablePath, model_config: ml_collections.ConfigDict) -> str:
    """The torchvision state-dict key of our variable `path` (collection, modules..., leaf) in
    the model of `model_config`.

    Raises:
      KeyError: the variable has no torchvision counterpart.
    """
    module = "/".join(path[1:-1])
    for pattern, name in _MODULES:
        match = re.fullmatch(pattern, module)
        if match and path[-1] in _LEAVES:
            return f"{name(match, model_config)}.{_LEAVES[path[-1]]}"
    raise KeyError(f"no torchvision counterpart for variable {'/'.join(path)}")


def canonical_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`state_dict` with legacy torchvision key spellings renamed and step counters dropped.

    Raises:
      ValueError: a tensor is present under both its legacy and its current name.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        for pattern, replacement in _LEGACY_KEYS:
            key = re.sub(pattern, replacement, key)
        if key in out:
            raise ValueError(f"state dict holds {key!r} under both a legacy and the current name")
        out[key] = value
    return out


def release_of(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """The `RELEASES` key whose architecture `state_dict` has, told by its box head: "v1" for
    two FCs (`roi_heads.box_head.fc6`), "v2" for convolutions first (`roi_heads.box_head.0.0`);
    None for neither (not a torchvision Mask R-CNN state dict)."""
    keys = canonical_keys(state_dict)
    if "roi_heads.box_head.fc6.weight" in keys:
        return "v1"
    if "roi_heads.box_head.0.0.weight" in keys:
        return "v2"
    return None


def release_of_config(model_config: ml_collections.ConfigDict) -> str:
    """The `RELEASES` key whose box head `model_config` builds, as `release_of` tells a state
    dict's: "v2" for convolutions first (`roi_heads.box_head_convs`), else "v1"."""
    return "v2" if model_config.roi_heads.box_head_convs else "v1"


def source_bn_epsilon(state_dict: Mapping[str, np.ndarray], version: str) -> float:
    """The BatchNorm eps of the torchvision model that `state_dict`, of release `version`'s
    architecture, comes from: torch's default `TORCH_BN_EPSILON` when it holds BatchNorm step
    counters (`num_batches_tracked`: trainable `nn.BatchNorm2d` layers, as torchvision builds
    them without pretrained weights), else the release's (`RELEASES[version].bn_epsilon`: v1's
    COCO weights go into `FrozenBatchNorm2d` layers with eps 0). Counters cannot tell a v1 model
    fine-tuned from ImageNet weights (frozen layers with eps 1e-5, no counters) from the COCO
    release: that one needs the eps given (`scripts/convert_torchvision.py --bn_epsilon`)."""
    if any(key.endswith(_IGNORED_SUFFIXES) for key in state_dict):
        return TORCH_BN_EPSILON
    return RELEASES[version].bn_epsilon


def variable_shapes(model_config: ml_collections.ConfigDict) -> dict[VariablePath, Shape]:
    """Shapes of every variable of the model of `model_config`, keyed by (collection, ..., leaf).

    Traced with `jax.eval_shape`: nothing is computed or compiled.
    """
    shapes = MaskRCNN.from_config(model_config).variable_shapes()
    return {path: tuple(x.shape) for path, x in traverse_util.flatten_dict(shapes).items()}


def convert_variables(
    state: Mapping[str, np.ndarray],
    keys: Mapping[VariablePath, str],
    shapes: Mapping[VariablePath, Shape],
    model_config: ml_collections.ConfigDict,
    *,
    bn_epsilon: float,
    what: str = "the state dict does not fit this model config",
) -> dict[VariablePath, np.ndarray]:
    """Converts the tensors `state[keys[path]]` to our variables at `path` of `shapes[path]`.

    The layout change of each variable is `_layout`'s (kernels transposed, variances folded with
    `bn_epsilon`, ...). Every key of `state` must be used by exactly one variable.

    Returns:
      `{path: float32 array}` for every path of `keys`.

    Raises:
      ValueError: starting with `what` and listing every variable whose tensor is missing, every
        key of `state` that no variable uses, and every shape or dtype mismatch.
    """
    converted, missing, mismatched, used = {}, [], [], set()
    for path, key in keys.items():
        shape = shapes[path]
        if key not in state:
            missing.append(f"{key} (for {'/'.join(path)})")
            continue
        used.add(key)
        layout = _layout(path, shape, model_config, bn_epsilon)
        array = np.asarray(state[key])
        if array.shape != layout.torch_shape(shape) or array.dtype != np.float32:
            mismatched.append(
                f"{key}: {array.dtype}{list(array.shape)}, expected "
                f"float32{list(layout.torch_shape(shape))} for {'/'.join(path)} {list(shape)}"
            )
            continue
        converted[path] = np.ascontiguousarray(layout.convert(array))
    unmatched = sorted(set(state) - used)
    problems = [
        (f"{len(missing)} missing", missing),
        (f"{len(unmatched)} unmatched", unmatched),
        (f"{len(mismatched)} mismatched", mismatched),
    ]
    if missing or unmatched or mismatched:
        raise ValueError(
            f"{what}: "
            + "; ".join(
                f"{title} keys:\n  " + "\n  ".join(items) for title, items in problems if items
            )
        )
    return converted


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    bn_epsilon: float,
) -> dict[str, dict]:
    """Converts a torchvision Mask R-CNN state dict to the variables of the model of `model_config`.

    Args:
      state_dict: torchvision key -> float32 numpy array (`load_state_dict` gives one).
      model_config: the `config.model` section of a config with torchvision's architecture,
        e.g. `configs/torchvision_r50_fpn_v1.py` (`num_classes` = torchvision classes - 1).
      bn_epsilon: the `eps` of the source model's BatchNorm layers (`RELEASES[v].bn_epsilon` for
        the released weights; 1e-5 for a model torchvision built without COCO weights).

    Returns:
      `{"params": ..., "batch_stats": ...}` nested dicts of float32 numpy arrays, exactly the
      structure and shapes its `init` creates.

    Raises:
      ValueError: listing every variable whose torchvision tensor is missing, every state-dict key
        that no variable uses, and every shape mismatch (e.g. another class count or depth).
    """
    shapes = variable_shapes(model_config)
    keys = {path: torchvision_key(path, model_config) for path in shapes}
    converted = convert_variables(
        canonical_keys(state_dict), keys, shapes, model_config, bn_epsilon=bn_epsilon
    )
    return traverse_util.unflatten_dict(converted)


def import_torch() -> types.ModuleType:
    """`torch`, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            "reading torchvision weights needs PyTorch: pip install 'mrcnn_jax[torch]'"
        ) from error
    return torch


def state_dict_to_numpy(state_dict: Mapping) -> dict[str, np.ndarray]:
    """A torch state dict (str -> floating `torch.Tensor`) as float32 numpy arrays.

    BatchNorm's integer `num_batches_tracked` counters are kept as int64 (they tell the source's
    eps, `source_bn_epsilon`; the conversions skip them); any other non-float tensor,
    non-tensor value or non-str key is an error, and so is a NaN or infinite value or a
    negative BatchNorm `running_var` (a diverged or damaged file: no detection, no error).
    """
    torch = import_torch()
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"a state dict must be a mapping, got {type(state_dict).__name__}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"state dict entries must be str -> torch.Tensor, got {key!r} -> "
                f"{type(value).__name__}"
            )
        if key.endswith(_IGNORED_SUFFIXES):
            out[key] = value.detach().to(device="cpu", dtype=torch.int64).numpy()
            continue
        if not value.is_floating_point():
            raise ValueError(f"{key}: expected a floating-point tensor, got {value.dtype}")
        array = value.detach().to(device="cpu", dtype=torch.float32).numpy()
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise ValueError(f"{key}: {bad} NaN or infinite values of {array.size}")
        if key.endswith("running_var") and np.any(array < 0):
            raise ValueError(f"{key}: negative values (a BatchNorm variance)")
        out[key] = array
    return out


# What `load_state_dict` reads, in its errors.
_EXPECTED_FILE = (
    "expected a PyTorch state dict, a file of tensors written with "
    "`torch.save(model.state_dict(), path)` such as torchvision's released .pth weights"
)


def _unreadable(error: Exception) -> str:
    """Why `torch.load(weights_only=True)` failed with `error`, in a few words, without torch's
    advice to load with `weights_only=False` (which runs any code a downloaded file holds)."""
    message = str(error)
    blocked = re.search(r"GLOBAL ([\w.]+)", message)
    if blocked:  # e.g. torch.save(model): the module's class; or a pickle calling os.system
        return (
            f"it holds Python objects besides tensors ({blocked[1]}), e.g. a whole model saved "
            "with `torch.save(model)`; they are not loaded, as loading them could run any code "
            "the file holds"
        )
    if "PytorchStreamReader" in message:  # a zip archive without its end
        return "it is truncated or damaged (an interrupted download?)"
    if "weights_only" in message:  # torch's advice: only the unpickler's complaint is kept
        operand = re.search(r"Unsupported operand \S+", message)
        message = operand[0] if operand else ""
    detail = f"{type(error).__name__}: {message.strip()[:100]}".rstrip(": ")
    return (
        "it is not a file written by `torch.save` (a web page or an error message saved by a "
        f"failed download? an empty file?; torch.load: {detail})"
    )


def load_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a torchvision `.pth` state dict (tensors only: `torch.load(weights_only=True)`).

    Raises:
      OSError: `path` cannot be opened (e.g. FileNotFoundError), naming it.
      ValueError: the file is no state dict (not written by `torch.save`, truncated, a whole
        model or other Python objects, which are never loaded, or not str -> float tensor
        entries), naming `path`, the problem and what is expected.
    """
    torch = import_torch()
    with epath.Path(paths.absolute(path)).open("rb") as f:
        try:
            state_dict = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as error:  # pickle.UnpicklingError, RuntimeError, KeyError, EOFError...
            reason = _unreadable(error)
        else:
            reason = None
    if reason is not None:  # raised here, not chained to torch's error and its advice
        raise ValueError(f"cannot read {path}: {reason}; {_EXPECTED_FILE}")
    try:
        return state_dict_to_numpy(state_dict)
    except ValueError as error:
        raise ValueError(f"{path} is no state dict: {error}; {_EXPECTED_FILE}") from error


def download_state_dict(version: str) -> dict[str, np.ndarray]:
    """Downloads (or reads from torch's cache) torchvision's COCO weights of `version` (`RELEASES`).

    Needs internet on first use; the file lands in `$TORCH_HOME/hub/checkpoints`, its hash is
    checked and it is read with `weights_only=True`.

    Raises:
      ConnectionError: the download failed (the message names the URL to fetch by other means
        and pass to `load_state_dict`).
    """
    if version not in RELEASES:
        raise ValueError(f"version must be one of {sorted(RELEASES)}, got {version!r}")
    import_torch()
    from torchvision.models import detection

    weights = getattr(detection, RELEASES[version].weights_enum).COCO_V1
    return fetch_weights(weights, "scripts/convert_torchvision.py --state_dict=FILE")


def fetch_weights(weights: Any, pass_file_as: str) -> dict[str, np.ndarray]:
    """The state dict of a torchvision `WeightsEnum` member, downloaded (hash checked) or read
    from torch's cache with `weights_only=True`, as float32 numpy arrays.

    Raises:
      ConnectionError: the download failed; the message names the URL to fetch by other means
        and how to pass the file (`pass_file_as`).
    """
    try:
        state_dict = weights.get_state_dict(
            progress=True, check_hash=True, weights_only=True, map_location="cpu"
        )
    except OSError as error:  # urllib's URLError and socket errors
        raise ConnectionError(
            f"could not download {weights.url} ({error}); fetch it elsewhere and pass the file "
            f"({pass_file_as})"
        ) from error
    return state_dict_to_numpy(state_dict)
