"""Orbax checkpoints of the train state plus the config that produced them.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds two items: `state` (params,
batch_stats, opt_state, step) and `config` (the full ConfigDict as JSON). Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a crash mid-save leaves
no checkpoint that `latest_step` would return.
"""

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train.state import TrainState

# Config sections whose values must match for a checkpoint to be restored into a run.
ARCHITECTURE_KEYS = ("model", "data.image_size")
# Fields inside them that may differ: how a fresh run initialises its backbone (a restored
# checkpoint brings its own), how masks are pasted at evaluation and how the mask head's
# training slots are batched (the same function). Checkpoints written before these fields
# existed restore too.
NON_ARCHITECTURE_KEYS = (
    "model.backbone_weights",
    "model.allow_random_frozen_backbone",
    "model.roi_heads.mask_paste",
    "model.roi_heads.mask_head_chunk",
)


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    """Where the checkpoints of a workdir live."""
    return epath.Path(workdir) / "checkpoints"


def create_manager(
    workdir: epath.PathLike, max_to_keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """A `CheckpointManager` over `<workdir>/checkpoints` with async saving."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=not read_only,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        },
    )


def state_tree(state: TrainState) -> dict[str, Any]:
    """The array part of a train state (what is written to disk)."""
    return {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
    }


def save(manager: ocp.CheckpointManager, state: TrainState, config) -> None:
    """Saves `state` at its step (asynchronously; call `manager.wait_until_finished()` to block)."""
    step = int(jax.device_get(state.step))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_tree(state)),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
    )


def _lookup(config_dict: dict, dotted: str):
    node = config_dict
    for name in dotted.split("."):
        node = node[name]
    return node


def _flatten(prefix: str, value) -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{prefix}.{k}", v))
        return out
    return {prefix: value}


def config_mismatches(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The `ARCHITECTURE_KEYS` fields (flattened) where `saved` (JSON) and `config` differ,
    except `NON_ARCHITECTURE_KEYS`."""
    current = json.loads(config.to_json())
    problems = []
    for key in ARCHITECTURE_KEYS:
        old = _flatten(key, _lookup(saved, key))
        new = _flatten(key, _lookup(current, key))
        for name in sorted(set(old) | set(new)):
            if name in NON_ARCHITECTURE_KEYS:
                continue
            if old.get(name) != new.get(name):
                problems.append(f"{name}: checkpoint {old.get(name)!r} vs config {new.get(name)!r}")
    return problems


def saved_optimizer(saved: dict) -> str:
    """`train.optimizer` of a saved config (JSON); checkpoints written before the field existed
    were trained with SGD."""
    return saved.get("train", {}).get("optimizer", "sgd")


def load_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config (as a JSON dict) stored with checkpoint `step`."""
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]


def restore(
    manager: ocp.CheckpointManager,
    state: TrainState,
    config: ml_collections.ConfigDict,
    step: int | None = None,
) -> TrainState:
    """Restores checkpoint `step` (default: the latest) into the structure of `state`.

    A checkpoint of another `train.optimizer` restores only at step 0 (converted weights,
    `save_variables`), where every optimizer's state is its initial one: `state` keeps its own.
    Gradient clipping may be turned on or off (`train.grad_clip_norm`, as the non-finite loss
    error advises): its stage holds no arrays, so the optimizer state carries over whole.

    Raises:
      FileNotFoundError: there is no (complete) checkpoint.
      ValueError: the checkpoint was written with a different architecture (the message lists
        the differing config fields), or trained past step 0 with another optimizer.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {manager.directory}")
    saved = load_config(manager, step)
    problems = config_mismatches(saved, config)
    if problems:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} was written with another config:\n  "
            + "\n  ".join(problems)
        )
    optimizer = saved_optimizer(saved)
    if optimizer != config.train.optimizer:
        if step:
            raise ValueError(
                f"checkpoint {manager.directory}/{step} was trained with train.optimizer="
                f"{optimizer!r}, the config asks for {config.train.optimizer!r}: its optimizer "
                f"state cannot continue under another optimizer. Resume with "
                f"--config.train.optimizer={optimizer}, or train in a new --workdir."
            )
        raw = restore_raw(manager, step)
        return state.replace(
            params=_like(state.params, raw["params"]),
            batch_stats=_like(state.batch_stats, raw.get("batch_stats") or {}),
        )
    saved_clip = float(saved.get("train", {}).get("grad_clip_norm", config.train.grad_clip_norm))
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(state))
    if (saved_clip > 0) != (config.train.grad_clip_norm > 0):
        target["opt_state"] = _opt_state_with_clipping(
            target["opt_state"], state.params, config, saved_clip
        )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]
    leaves = jax.tree_util.tree_leaves(restored["opt_state"])
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state.opt_state), leaves)
    return state.replace(**{**restored, "opt_state": opt_state})


def _opt_state_with_clipping(
    target, params, config: ml_collections.ConfigDict, grad_clip_norm: float
):
    """`target`, the optimizer state's arrays (ShapeDtypeStructs), in the tree of the optimizer
    with `train.grad_clip_norm = grad_clip_norm` over `params`: the clipping stage holds no
    arrays, so both trees have the same arrays in the same order."""
    other = ml_collections.ConfigDict(config.to_dict())
    other.train.grad_clip_norm = grad_clip_norm
    tx = state_lib.create_optimizer(other, state_lib.create_learning_rate_fn(other.train))
    saved = jax.eval_shape(tx.init, params)
    leaves = jax.tree_util.tree_leaves(target)
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(saved)]
    if shapes != [(x.shape, x.dtype) for x in leaves]:
        raise ValueError(
            f"the optimizer state under train.grad_clip_norm={grad_clip_norm} does not match "
            "this config's arrays"
        )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(saved), leaves)


def _like(target, values):
    """`values` (numpy) as arrays placed like the leaves of `target`, same tree and shapes."""

    def place(t, v):
        if t.shape != v.shape:
            raise ValueError(f"checkpoint array of shape {v.shape} where {t.shape} is expected")
        return jax.device_put(v.astype(t.dtype), t.sharding)

    return jax.tree_util.tree_map(place, target, values)


def restore_raw(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The state arrays of checkpoint `step` as stored (numpy), on any topology.

    The checkpoint may have been written on any number of devices and processes: the target is
    built from the stored shapes and dtypes and placed on this process's first local device, so
    orbax never tries to rebuild the saved device mesh. For inference: callers validate the tree
    against their model (see `mrcnn_jax.programs.predictor`).
    """
    metadata = manager.item_metadata(step)["state"]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    return jax.device_get(restored["state"])


def save_variables(
    workdir: epath.PathLike, config: ml_collections.ConfigDict, variables: dict
) -> epath.Path:
    """Writes `variables` (`params`, `batch_stats`) as step-0 checkpoint `<workdir>/checkpoints/0/`.

    The train state holds them with a fresh optimizer state and step 0, so `load_checkpoint`,
    the eval/predict scripts and `scripts/train.py --workdir` (fine-tuning) all restore it; used
    for converted weights. Returns the checkpoint directory.

    Raises:
      FileExistsError: `workdir` already holds checkpoints.
    """
    manager = create_manager(workdir)
    if manager.latest_step() is not None:
        raise FileExistsError(f"{checkpoint_dir(workdir)} already holds checkpoints")
    state, _ = state_lib.train_state_from_variables(
        config, MaskRCNN.from_config(config.model), variables
    )
    save(manager, state, config)
    manager.wait_until_finished()
    manager.close()
    return checkpoint_dir(workdir) / "0"
