"""Start a run from another run's weights (`config.model.init_from`), e.g. to fine-tune a COCO
model on a dataset with other classes.

Every variable (`params` and `batch_stats`) is taken from the source, except in the
class-specific predictors (`CLASS_LAYERS`: the box classifier and regressor, the mask
predictor), whose last axis has one slice per class: there each class of the new run takes the
slice of the source's class of the same name, and classes the source lacks keep their fresh
initialisation (the box classifier's background logit is always taken). The rest of the
architecture must be the source's: a variable missing on either side or of another shape is an
error, never a silent re-initialisation.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import traverse_util

# Variables whose last axis holds `leading` class-agnostic entries (the background logit), then
# `per_class` entries for each foreground class 0..K-1 (`roi_heads.BoxHead`, `MaskHead`).
CLASS_LAYERS: dict[tuple[str, ...], tuple[int, int]] = {
    ("params", "box_head", "cls_score", "kernel"): (1, 1),
    ("params", "box_head", "cls_score", "bias"): (1, 1),
    ("params", "box_head", "bbox_pred", "kernel"): (0, 4),
    ("params", "box_head", "bbox_pred", "bias"): (0, 4),
    ("params", "mask_head", "predictor_kernel"): (0, 1),
    ("params", "mask_head", "predictor_bias"): (0, 1),
}
# Shown in an error listing the variables that do not fit.
_MAX_LISTED = 6


def plain_name(name: str) -> str:
    """`name` compared without case, `_` or extra spaces ("Traffic_Light" ~ "traffic light"):
    how class names are matched here and by `evaluator.check_dataset_classes`."""
    return " ".join(name.replace("_", " ").lower().split())


def class_sources(
    names: Sequence[str], source_names: Sequence[str], num_classes: int, source_num_classes: int
) -> list[int | None]:
    """For each of the `num_classes` classes, the source class whose slices it takes, or None.

    By name (`plain_name`: case, `_` and spaces aside): class `j` takes the source class named
    `names[j]`, if exactly one is (torchvision's COCO layout repeats "N/A"). Without names on
    either side (an empty tuple), class `j` takes source class `j` when both have as many
    classes, and none otherwise.
    """
    if not names or not source_names:
        same = num_classes == source_num_classes
        return [j if same else None for j in range(num_classes)]
    index = {}
    for i, name in enumerate(map(plain_name, source_names)):
        index[name] = None if name in index else i  # repeated names match nothing
    return [index.get(plain_name(name)) for name in names]


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def transfer_variables(
    fresh: dict[str, Any], source: dict[str, Any], sources: Sequence[int | None]
) -> dict[str, Any]:
    """`fresh` (the new run's initial `{"params", "batch_stats"}`) with every variable of
    `source` (a checkpoint's, numpy) put in, the class layers mapped by `sources`
    (`class_sources`: for each class of `fresh`, its class in `source` or None).

    Returns numpy arrays in the tree of `fresh`.

    Raises:
      ValueError: variables only on one side, or of other shapes or dtypes (the class layers:
        other than the class count), listing the first few and how many.
    """
    want = traverse_util.flatten_dict(fresh)
    have = traverse_util.flatten_dict(source)
    problems, out = [], {}
    for path in sorted(set(want) | set(have)):
        if path not in have:
            problems.append(f"{_name(path)} is not in the checkpoint")
            continue
        if path not in want:
            problems.append(f"{_name(path)} {np.shape(have[path])} is only in the checkpoint")
            continue
        new, old = np.asarray(want[path]), np.asarray(have[path])
        if new.dtype != old.dtype:
            problems.append(f"{_name(path)} is {old.dtype} there, {new.dtype} here")
        elif path in CLASS_LAYERS:
            leading, per_class = CLASS_LAYERS[path]
            if new.shape[:-1] != old.shape[:-1] or (old.shape[-1] - leading) % per_class:
                problems.append(f"{_name(path)} has shape {old.shape} there, {new.shape} here")
                continue
            out[path] = _mapped_classes(new, old, sources, leading, per_class)
        elif new.shape != old.shape:
            problems.append(f"{_name(path)} has shape {old.shape} there, {new.shape} here")
        else:
            out[path] = old
    if problems:
        more = len(problems) - _MAX_LISTED
        listed = "; ".join(problems[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise ValueError(f"{len(problems)} variables do not fit: {listed}")
    return traverse_util.unflatten_dict(out)


def _mapped_classes(
    new: np.ndarray, old: np.ndarray, sources: Sequence[int | None], leading: int, per_class: int
) -> np.ndarray:
    """`new` with its leading entries and each class's `per_class` slice of the last axis taken
    from `old`'s class `sources[j]` (kept where None)."""
    out = np.array(new)
    out[..., :leading] = old[..., :leading]
    for j, i in enumerate(sources):
        if i is not None:
            start, source_start = leading + per_class * j, leading + per_class * i
            out[..., start : start + per_class] = old[..., source_start : source_start + per_class]
    return out
