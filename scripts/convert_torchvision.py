r"""Converts torchvision's COCO Mask R-CNN weights into a checkpoint of this project.

  # With internet: torchvision downloads the weights (cached in $TORCH_HOME/hub/checkpoints).
  python scripts/convert_torchvision.py --weights=v1 --out=/tmp/tv_r50_v1
  # Offline: the same weights from a local file (the URL is in docs/torchvision_weights.md).
  python scripts/convert_torchvision.py --weights=v1 \
      --state_dict=maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth --out=/tmp/tv_r50_v1
  # v2 (47.4 box / 41.8 mask AP in torchvision): --weights=v2, configs/torchvision_r50_fpn_v2.py.

`--weights` names the release (its architecture, config and BatchNorm epsilon); `--state_dict`
reads its tensors from a `.pth` file (`torch.load(weights_only=True)`) instead of downloading.
A state dict's box head tells its release, which is then the default of `--weights` (and so of
the config and the epsilon); a `--weights` naming the other release is a usage error. A state
dict holding BatchNorm step counters (`num_batches_tracked`: a model torchvision built without
pretrained weights, e.g. to train it) converts with eps 1e-5, torch.nn.BatchNorm2d's;
`--bn_epsilon` overrides either, and the last line says which eps was used and why.
The result, `<out>/checkpoints/0/` with the config, is read by `mrcnn_jax.load_checkpoint(out)`,
`scripts/eval.py` and `scripts/predict.py`, and can be fine-tuned with `scripts/train.py
--workdir=<out>`. Needs the `torch` extra: `pip install 'mrcnn_jax[torch]'`.
An argument that is not a flag (e.g. `config.model.x=1`, its `--` missing) is a usage error, as
is a `--state_dict` file that is no state dict (a failed download's web page, a truncated file, a
whole model saved with `torch.save(model)`: Python objects besides tensors are never loaded),
the state dict of another network, a `--config` of the other release's architecture, a state
dict that does not fit the config (a model fine-tuned on another number of classes: the message
gives the flags that convert it, quoted for the shell), a config whose `data.class_names` or
`data.label_to_category_id` do not have one entry per class, and an `--out` that already holds
checkpoints. A Ctrl-C or SIGTERM while saving lets the write end, then removes it: `--out`
holds no checkpoint, and the same command runs again (also after a kill: the temporary folder
of its save is not a checkpoint).
"""

import importlib.util
import math
import shlex
import sys
from pathlib import Path

import ml_collections
from absl import app, flags, logging

try:  # before TensorFlow (the config checks import it), after which torchvision segfaults
    import torchvision  # noqa: F401
except Exception:  # not installed or broken: convert.import_torch says so, when it is needed
    pass

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # configs/ import each other as the `configs` package.

from mrcnn_jax.convert import torchvision as convert  # noqa: E402
from mrcnn_jax.modeling.checks import check_new_model_config  # noqa: E402
from mrcnn_jax.programs import launch  # noqa: E402
from mrcnn_jax.train import checkpoint  # noqa: E402

_WEIGHTS = flags.DEFINE_enum(
    "weights", "v1", sorted(convert.RELEASES), "torchvision release (architecture and weights)."
)
_STATE_DICT = flags.DEFINE_string(
    "state_dict", None, "Local .pth state dict of that release; default: download it."
)
_OUT = flags.DEFINE_string("out", None, "Workdir to write <out>/checkpoints/0/ into.")
_CONFIG = launch.define_config_flag(
    "config", "Config file; default: the release's (configs/torchvision_r50_fpn_*.py)."
)
_BN_EPSILON = flags.DEFINE_float(
    "bn_epsilon",
    None,
    "BatchNorm eps of the source model; default: 1e-5 (torch.nn.BatchNorm2d's) if the state "
    "dict holds BatchNorm step counters (num_batches_tracked), else the release's (0 for v1, "
    "as torchvision sets it when loading its COCO weights). A v1 model fine-tuned from "
    "ImageNet weights (frozen BatchNorm, no counters) needs --bn_epsilon=1e-5.",
)
flags.register_validator(
    "bn_epsilon",
    lambda value: value is None or (math.isfinite(value) and value >= 0),
    "--bn_epsilon must be a finite number >= 0",
)
launch.mark_paths_required(["out"])


def release_config(path: Path):
    """`get_config()` of the config file at `path`."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def class_count_hint(state_dict: dict, config, release: convert.Release) -> str:
    """Advice for a state dict whose box predictor has another number of classes than `config`
    (a model fine-tuned on other data), or "". The flags are quoted for a POSIX shell."""
    scores = state_dict.get("roi_heads.box_predictor.cls_score.weight")
    if scores is None or scores.shape[0] - 1 == config.model.num_classes:
        return ""
    flags_to_give = [
        f"--config={release.config}",
        f"--config.model.num_classes={scores.shape[0] - 1}",
        '--config.data.class_names=("name 1", ...)',
        "--config.data.label_to_category_id=()",
    ]
    return (
        f"\nIts box predictor has {scores.shape[0]} outputs: a model fine-tuned on "
        f"{scores.shape[0] - 1} classes (and background). Convert it with "
        f"{shlex.join(flags_to_give)}"
    )


def _check_config(config) -> None:
    """A usage error unless a checkpoint written with `config` can be loaded: e.g. the release's
    90 class names with another num_classes, a canvas too small for the resize."""
    from mrcnn_jax.programs import predictor  # TensorFlow: not for --help, after torchvision

    try:
        predictor.check_loadable_config(config)
        check_new_model_config(config.model)
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:  # no torch extra: one line saying what to install
        convert.import_torch()
    except ImportError as error:
        raise app.UsageError(str(error)) from error
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every part of the save at INFO
    config = launch.config_of(_CONFIG)  # before reading the weights: a bad file is refused now
    if config is not None:
        _check_config(config)
    out = launch.path_flag(_OUT.value, "--out")
    if _STATE_DICT.value:
        launch.path_flag(_STATE_DICT.value, "--state_dict")
    if checkpoint.holds_checkpoints(out):
        raise app.UsageError(
            f"--out={_OUT.value} already holds checkpoints ({checkpoint.checkpoint_dir(out)})"
        )
    with launch.new_output_folder(out, "--out"):  # one that cannot be written: refused now
        _convert(out, config)


def _convert(out: str, config: ml_collections.ConfigDict | None) -> None:
    """Reads the state dict the flags name, converts it (with `config`, default: the
    release's) and saves it into `<out>/checkpoints/0`."""
    name = _WEIGHTS.value
    if _STATE_DICT.value:
        try:
            state_dict = convert.load_state_dict(_STATE_DICT.value)
        except (ValueError, OSError) as error:  # no state dict there: names the file
            raise app.UsageError(f"--state_dict: {error}") from error
        found = convert.release_of(state_dict)
        if found is None:
            raise app.UsageError(
                f"--state_dict={_STATE_DICT.value} is not a torchvision Mask R-CNN state dict "
                f"(no box head of v1 or v2 among its {len(state_dict)} tensors, e.g. "
                f"{', '.join(list(state_dict)[:3])})"
            )
        if found != name and flags.FLAGS["weights"].present:
            raise app.UsageError(
                f"--state_dict={_STATE_DICT.value} holds the {found} architecture "
                f"({convert.RELEASES[found].builder}), not --weights={name}'s"
            )
        name = found or name
    else:
        try:
            state_dict = convert.download_state_dict(name)
        except ConnectionError as error:  # offline: the message says what to fetch and pass
            sys.exit(f"error: {error}")
    release = convert.RELEASES[name]
    source = f"--state_dict={_STATE_DICT.value}" if _STATE_DICT.value else f"--weights={name}"
    if config is None:
        config = release_config(REPO / release.config)
    elif (built := convert.release_of_config(config.model)) != name:
        raise app.UsageError(
            f"{source} holds the {name} architecture ({release.builder}), but "
            f"--config={flags.FLAGS['config'].config_filename} builds {built}'s box head: give "
            f"--config={release.config} (the default)"
        )
    _check_config(config)
    if _BN_EPSILON.value is not None:
        bn_epsilon, why = _BN_EPSILON.value, "--bn_epsilon"
    else:
        bn_epsilon = convert.source_bn_epsilon(state_dict, name)
        why = (
            f"the {name} release's"
            if bn_epsilon == release.bn_epsilon
            else "torch.nn.BatchNorm2d's: the state dict has its step counters"
        )
    try:
        variables = convert.convert_state_dict(state_dict, config.model, bn_epsilon=bn_epsilon)
    except ValueError as error:  # e.g. fine-tuned on another number of classes
        hint = class_count_hint(state_dict, config, release)
        raise app.UsageError(f"{source}: {error}{hint}") from error
    try:
        directory = checkpoint.save_variables(out, config, variables)
    except checkpoint.CheckpointWriteError as error:  # e.g. a full disk: say where, no trace
        sys.exit(f"error: {error}")
    tensors = len(convert.canonical_keys(state_dict))
    print(f"wrote {directory} ({name}: {tensors} tensors, BatchNorm eps {bn_epsilon}, {why})")


if __name__ == "__main__":
    launch.run(main, flags_parser=launch.parse_flags)
