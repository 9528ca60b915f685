"""Imports torchvision's ImageNet classification ResNets as the backbone of a fresh model.

COCO recipes (torchvision's, Detectron2's torchvision-style ones) start from an ImageNet
classifier: `model.backbone_weights` names torchvision's release (`"IMAGENET1K_V1"` of
`ResNet{18,34,50,101}_Weights`, downloaded once into `$TORCH_HOME/hub/checkpoints`) or a local
state dict of `torchvision.models.resnet{depth}` (`.pth`, read with `torch.load(weights_only=True)`,
never unpickled objects).

A classification ResNet's keys are those of `backbone.body.*` in torchvision's Mask R-CNN without
the prefix (`conv1.weight`, `layer1.0.bn1.running_var`, ...), so the Mask R-CNN converter's
explicit name and layout mapping (`torchvision.torchvision_key`, `torchvision.convert_variables`)
does the work; its classifier `fc.*` is expected and ignored. BatchNorm is folded with the
source's eps like every other conversion: torchvision's ImageNet ResNets use `BatchNorm2d` with
eps 1e-5, the same as ours, so the fold leaves the variances unchanged.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util

from mrcnn_jax import paths as paths_lib
from mrcnn_jax.convert import torchvision as tv_convert

IMAGENET_BN_EPSILON = 1e-5  # torchvision's ResNets: `nn.BatchNorm2d` default eps.
BACKBONE = "backbone"  # Our module holding the ResNet, in `params` and `batch_stats`.
_TORCHVISION_PREFIX = "backbone.body."  # The ResNet's keys inside torchvision's Mask R-CNN.
_IGNORED_PREFIXES = ("fc.",)  # The ImageNet classifier.
_WEIGHTS_ENUMS = {
    18: "ResNet18_Weights",
    34: "ResNet34_Weights",
    50: "ResNet50_Weights",
    101: "ResNet101_Weights",
}


def is_release_name(source: str) -> bool:
    """Whether `model.backbone_weights` names a torchvision release (e.g. "IMAGENET1K_V1")
    rather than a file."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", source) is not None


def backbone_keys(
    model_config: ml_collections.ConfigDict, paths: Iterable[tuple[str, ...]] | None = None
) -> dict[tuple[str, ...], str]:
    """`{our backbone variable path: torchvision classification ResNet key}` for the model of
    `model_config` (paths are (collection, "backbone", module, leaf)); `paths`: all variable
    paths of that model, if already known (`torchvision.variable_shapes`)."""
    paths = tv_convert.variable_shapes(model_config) if paths is None else paths
    return {
        path: tv_convert.torchvision_key(path, model_config).removeprefix(_TORCHVISION_PREFIX)
        for path in paths
        if path[1] == BACKBONE
    }


def resnet_depth(state_dict: Mapping[str, Any]) -> int | None:
    """The depth of the torchvision ResNet whose keys `state_dict` has (18, 34, 50, 101, 152),
    told by its block type (a third conv: bottleneck) and its blocks per stage; None if its
    keys are not a ResNet's."""
    blocks = [0] * 4
    for key in state_dict:
        if match := re.match(r"layer([1-4])\.(\d+)\.", key):
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    depths = {
        ((2, 2, 2, 2), False): 18,
        ((3, 4, 6, 3), False): 34,
        ((3, 4, 6, 3), True): 50,
        ((3, 4, 23, 3), True): 101,
        ((3, 8, 36, 3), True): 152,
    }
    return depths.get((tuple(blocks), bottleneck))


def convert_backbone_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_config: ml_collections.ConfigDict,
    *,
    bn_epsilon: float = IMAGENET_BN_EPSILON,
) -> dict[str, dict]:
    """Converts a torchvision ImageNet ResNet state dict to our backbone's variables.

    Args:
      state_dict: torchvision key -> float32 numpy array (`torchvision.load_state_dict` gives
        one), of `torchvision.models.resnet{model_config.backbone_depth}`.
      model_config: `config.model`.
      bn_epsilon: the `eps` of the source's BatchNorm layers (1e-5 for torchvision's).

    Returns:
      `{"params": {"backbone": ...}, "batch_stats": {"backbone": ...}}` nested dicts of float32
      numpy arrays: the backbone subtree of what `MaskRCNN.init` creates, nothing else.

    Raises:
      ValueError: the state dict is not a ResNet's, or one of another depth (`resnet_depth`),
        saying so; otherwise one message listing every missing key, every key no variable
        uses (other than the classifier `fc.*`) and every shape mismatch.
    """
    state = {
        k: v
        for k, v in state_dict.items()
        if not k.startswith(_IGNORED_PREFIXES) and not k.endswith(".num_batches_tracked")
    }
    depth, want = resnet_depth(state), model_config.backbone_depth
    if depth is None:
        detector = resnet_depth({k.removeprefix(_TORCHVISION_PREFIX): v for k, v in state.items()})
        whole_model = (
            f" (a whole detector's: its ResNet-{detector} is under {_TORCHVISION_PREFIX}*; to "
            "start from such a Mask R-CNN, convert it with scripts/convert_torchvision.py and "
            "pass the result as --config.model.init_from)"
            if detector
            else ""
        )
        raise ValueError(
            f"the state dict is not a torchvision classification ResNet's (no layer1-layer4 "
            f"blocks among its {len(state)} tensors, e.g. {', '.join(list(state)[:3])})"
            f"{whole_model}; give a torchvision ResNet-{want} state dict"
        )
    if depth != want:
        raise ValueError(
            f"the state dict is a ResNet-{depth}'s, the config's backbone a ResNet-{want} "
            f"(model.backbone_depth): give a ResNet-{want}'s weights, or set "
            f"--config.model.backbone_depth={depth}"
        )
    shapes = tv_convert.variable_shapes(model_config)
    keys = backbone_keys(model_config, shapes)
    converted = tv_convert.convert_variables(
        state,
        keys,
        shapes,
        model_config,
        bn_epsilon=bn_epsilon,
        what=(
            f"the state dict does not fit the ResNet-{model_config.backbone_depth} backbone "
            "(model.backbone_depth)"
        ),
    )
    return traverse_util.unflatten_dict(converted)


def import_torchvision() -> types.ModuleType:
    """Imports torchvision, which must come before TensorFlow in a process.

    torchvision imported after TensorFlow kills the process with a segmentation fault (torch
    2.14.1, torchvision 0.29.1, tensorflow-cpu 2.21), so `scripts/train.py` calls this before
    importing the input pipeline when `model.backbone_weights` names a release.

    Raises:
      RuntimeError: TensorFlow is imported and torchvision is not; the message says what to do.
    """
    tv_convert.import_torch()
    if "torchvision" not in sys.modules and "tensorflow" in sys.modules:
        raise RuntimeError(
            "reading torchvision's ImageNet releases needs torchvision, which crashes the process "
            "when imported after TensorFlow: `import torchvision` before anything that imports "
            "TensorFlow (mrcnn_jax.data, the trainer), or set model.backbone_weights to the "
            ".pth file of the weights"
        )
    import torchvision

    return torchvision


def _weights_enum(depth: int):
    models = import_torchvision().models

    if depth not in _WEIGHTS_ENUMS:
        raise ValueError(f"no torchvision ImageNet weights for ResNet depth {depth}")
    return getattr(models, _WEIGHTS_ENUMS[depth])


def download_backbone_state_dict(release: str, depth: int) -> dict[str, np.ndarray]:
    """Downloads (or reads from torch's cache) torchvision's ImageNet ResNet-`depth` `release`.

    Raises:
      ValueError: torchvision has no such release for that depth (the message lists them).
      ConnectionError: the download failed (the message names the URL to fetch by other means).
    """
    enum = _weights_enum(depth)
    names = [member.name for member in enum]
    if release not in names:
        raise ValueError(
            f"model.backbone_weights={release!r}: torchvision's {enum.__name__} has releases "
            f"{names}"
        )
    return tv_convert.fetch_weights(enum[release], "--config.model.backbone_weights=FILE.pth")


def read_backbone_state_dict(source: str, depth: int) -> dict[str, np.ndarray]:
    """The state dict `model.backbone_weights = source` names: a release or a `.pth` path
    (`~` expanded, relative to the current folder).

    Raises:
      FileNotFoundError: `source` is neither a release name nor an existing file.
    """
    if is_release_name(source):
        return download_backbone_state_dict(source, depth)
    check_backbone_file(source, depth)
    return tv_convert.load_state_dict(paths_lib.absolute(source))


def check_backbone_file(source: str, depth: int) -> None:
    """Raises FileNotFoundError, saying what to give, unless `source` (not a release name) is
    an existing file: checked before a dataset is built, so a mistyped path fails at once."""
    if not epath.Path(paths_lib.absolute(source)).is_file():
        raise FileNotFoundError(
            f"model.backbone_weights={source!r} is no file; give the path of a torchvision "
            f"ResNet-{depth} state dict (.pth) or a release name such as 'IMAGENET1K_V1'"
        )


def backbone_variables(model_config: ml_collections.ConfigDict) -> dict[str, dict]:
    """The backbone variables `model_config.backbone_weights` names, converted (see
    `convert_backbone_state_dict`)."""
    source = model_config.backbone_weights
    state_dict = read_backbone_state_dict(source, model_config.backbone_depth)
    try:
        return convert_backbone_state_dict(state_dict, model_config)
    except ValueError as error:
        raise ValueError(f"model.backbone_weights={source!r}: {error}") from None


def with_backbone(variables: Mapping[str, dict], backbone: Mapping[str, dict]) -> dict[str, dict]:
    """`variables` (`params`, `batch_stats` of a whole model) with the backbone subtree of each
    collection replaced by `backbone`'s (as `convert_backbone_state_dict` returns).

    Raises:
      ValueError: a collection of `backbone` holds anything but the backbone, or its tree or
        shapes differ from the one it replaces.
    """
    out = dict(variables)
    for collection, tree in backbone.items():
        if set(tree) != {BACKBONE}:
            raise ValueError(f"{collection}: expected only {BACKBONE!r}, got {sorted(tree)}")
        old = traverse_util.flatten_dict(variables[collection][BACKBONE])
        new = traverse_util.flatten_dict(tree[BACKBONE])
        wrong = sorted(
            "/".join(p)
            for p in set(old) | set(new)
            if p not in old or p not in new or np.shape(old[p]) != np.shape(new[p])
        )
        if wrong:
            raise ValueError(f"{collection}/{BACKBONE}: the variables do not fit at {wrong[:5]}")
        out[collection] = {**variables[collection], BACKBONE: tree[BACKBONE]}
    return out
