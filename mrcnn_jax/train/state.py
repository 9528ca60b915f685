"""Train state, learning-rate schedule and optimizer (SGD with momentum, Detectron2-style, or
AdamW)."""

import collections
import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state

from mrcnn_jax.modeling.checks import is_number
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN, dummy_inputs


class TrainState(train_state.TrainState):
    """`params`, `opt_state`, `step` plus the BatchNorm statistics."""

    batch_stats: Any = None


SCHEDULES = ("cosine", "step")
OPTIMIZERS = ("sgd", "adamw")


def check_train_settings(train: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the field, unless `config.train`'s batch, learning-rate
    schedule and optimizer values are in range: `batch_size` >= 1, `base_lr` > 0,
    `warmup_steps` >= 0, `warmup_factor` in [0, 1], `decay_steps` steps >= 0, `decay_factor` in
    (0, 1], `momentum` and each of `adam_betas` in [0, 1), `weight_decay` and `grad_clip_norm`
    >= 0, and a known `schedule` and `optimizer`. Decay steps beyond `num_steps` are allowed:
    a run may stop early and resume with more steps on the same schedule."""

    def number(name: str, ok: Callable[[float], bool], rule: str) -> None:
        value = train[name]
        if not (is_number(value) and ok(value)):
            raise ValueError(f"config.train.{name}={train[name]!r} must be {rule}")

    number("batch_size", lambda v: v >= 1 and v == int(v), "a positive number of images")
    number("base_lr", lambda v: v > 0, "positive (the peak learning rate)")
    number("warmup_steps", lambda v: v >= 0 and v == int(v), "0 or more steps")
    number("warmup_factor", lambda v: 0 <= v <= 1, "in [0, 1] (of base_lr at step 0)")
    number("decay_factor", lambda v: 0 < v <= 1, "in (0, 1] (the lr is multiplied by it)")
    number("momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    number("weight_decay", lambda v: v >= 0, "0 or more")
    number("grad_clip_norm", lambda v: v >= 0, "0 (off) or more")
    if not all(is_number(s) and s >= 0 and s == int(s) for s in train.decay_steps):
        raise ValueError(f"config.train.decay_steps={train.decay_steps!r} must be steps >= 0")
    betas = tuple(train.adam_betas)
    if len(betas) != 2 or not all(is_number(b) and 0 <= b < 1 for b in betas):
        raise ValueError(f"config.train.adam_betas={train.adam_betas!r} must be (b1, b2) in [0, 1)")
    for name, choices in (("schedule", SCHEDULES), ("optimizer", OPTIMIZERS)):
        if train[name] not in choices:
            raise ValueError(f"config.train.{name}={train[name]!r} must be one of {choices}")


def create_learning_rate_fn(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up from `warmup_factor · base_lr` to `base_lr`, then cosine or step decay.

    "cosine" decays to 0 at `num_steps`; "step" multiplies by `decay_factor` at each step of
    `decay_steps` (twice at a step listed twice, as torch's `MultiStepLR`), also at those within
    the warm-up (Detectron2's `WarmupMultiStepLR`: the warm-up ramp times the decays so far).
    Raises ValueError naming the field for settings out of range (`check_train_settings`).
    """
    check_train_settings(train)
    warmup = optax.linear_schedule(
        train.base_lr * train.warmup_factor, train.base_lr, max(train.warmup_steps, 1)
    )
    if train.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            train.base_lr, max(train.num_steps - train.warmup_steps, 1)
        )
    elif train.schedule == "step":
        # A step listed n times decays n times there (torch's MultiStepLR).
        factors = {
            step: train.decay_factor**n
            for step, n in collections.Counter(int(s) for s in train.decay_steps).items()
        }
        decay = optax.piecewise_constant_schedule(
            train.base_lr, {s - train.warmup_steps: f for s, f in factors.items()}
        )
        early = {s: f for s, f in factors.items() if s < train.warmup_steps}
        if early:
            ramp, decays = warmup, optax.piecewise_constant_schedule(1.0, early)
            warmup = lambda step: ramp(step) * decays(step)
    else:
        raise ValueError(f"train.schedule must be one of {SCHEDULES}, got {train.schedule!r}")
    return optax.join_schedules([warmup, decay], [train.warmup_steps])


def schedule_warnings(train: ml_collections.ConfigDict) -> list[str]:
    """What `config.train`'s learning-rate schedule never reaches within `num_steps`: a warm-up
    longer than the run, or "step" decays after its end (a recipe's `num_steps` overridden
    without its `decay_steps`, which stay absolute steps). Allowed (a run may stop early and
    resume with more steps), but said."""
    warnings = []
    if train.warmup_steps >= train.num_steps > 0:
        warnings.append(
            f"config.train.warmup_steps={train.warmup_steps} >= num_steps={train.num_steps}: "
            "the run ends in its warm-up, below base_lr"
        )
    late = [int(s) for s in train.decay_steps if s >= train.num_steps]
    if train.schedule == "step" and late:
        warnings.append(
            f"config.train.decay_steps {tuple(int(s) for s in train.decay_steps)} has "
            f"{tuple(late)} at or after num_steps={train.num_steps}: the learning rate is not "
            f"multiplied by {train.decay_factor} there in this run (decay steps are absolute: "
            "set them with num_steps, e.g. at the same fractions of the run)"
        )
    return warnings


def _path_names(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", str(k)) for k in path)


def _is_norm(names: tuple[str, ...]) -> bool:
    """Whether the parameter at `names` belongs to a BatchNorm (`bn`, `bn1`, `conv1_bn`, ...)."""
    return any(re.fullmatch(r"(.*_)?bn\d?", name) for name in names[:-1])


def is_decayed(names: tuple[str, ...], train: ml_collections.ConfigDict) -> bool:
    """Whether weight decay applies to the parameter at `names`: kernels always, biases when
    `train.bias_weight_decay` (Detectron2), BatchNorm scales and offsets never."""
    if names[-1] in ("kernel", "predictor_kernel"):
        return True
    is_bias = names[-1] in ("bias", "predictor_bias")
    return bool(train.bias_weight_decay) and is_bias and not _is_norm(names)


def is_frozen(names: tuple[str, ...], model: ml_collections.ConfigDict) -> bool:
    """Whether the parameter at `names` (module path + leaf name) is excluded from training.

    Frozen: every BatchNorm scale/bias when `model.norm == "frozen"`; the stem when
    `model.freeze_at >= 1`; the stem and res2 when `model.freeze_at >= 2`.
    """
    if names[0] != "backbone":
        return False
    if model.norm == "frozen" and _is_norm(names):
        return True
    stage = names[1].split("_")[0]
    return (model.freeze_at >= 1 and stage == "stem") or (model.freeze_at >= 2 and stage == "res2")


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """`train.optimizer` with weight decay on `is_decayed` params; frozen params (`is_frozen`)
    kept.

    "sgd": SGD with `train.momentum` on the gradient plus `weight_decay` × params (L2, as
    PyTorch's SGD and Detectron2). "adamw": Adam with `train.adam_betas` and decoupled weight
    decay (`learning_rate × weight_decay × params` per step, as PyTorch's AdamW). Optional
    global-norm clipping (`train.grad_clip_norm > 0`) comes first, as in PyTorch. Raises
    ValueError naming the field for settings out of range (`check_train_settings`).
    """
    train = config.train
    check_train_settings(train)

    def decay_mask(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: is_decayed(_path_names(p), train), tree
        )

    def labels(tree):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if is_frozen(_path_names(p), config.model) else "train", tree
        )

    steps = []
    if train.grad_clip_norm > 0:
        steps.append(optax.clip_by_global_norm(train.grad_clip_norm))
    if train.optimizer == "sgd":
        steps += [
            optax.add_decayed_weights(train.weight_decay, mask=decay_mask),
            optax.sgd(learning_rate_fn, momentum=train.momentum),
        ]
    else:  # "adamw"
        b1, b2 = train.adam_betas
        steps.append(
            optax.adamw(
                learning_rate_fn, b1=b1, b2=b2, weight_decay=train.weight_decay, mask=decay_mask
            )
        )
    return optax.multi_transform(
        {"train": optax.chain(*steps), "frozen": optax.set_to_zero()}, labels
    )


def init_variables(model: MaskRCNN, key: jax.Array, image_shape: tuple[int, int]) -> dict:
    """Initialises the model's `params` and `batch_stats` for `image_shape` (H, W) inputs."""
    batch = dummy_inputs(image_shape)
    # Parameter init draws many independent normals; XLA compiles threefry's bit generation for
    # each of them, which dominates the compile time. The "rbg" generator compiles ~3x faster.
    seed = jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max)
    init_key = jax.random.key(seed, impl="rbg")
    variables = jax.jit(lambda k: model.init(k, batch, train=False))(init_key)
    return flax.core.unfreeze(variables)


def zero_variables(model: MaskRCNN, image_shape: tuple[int, int]) -> dict:
    """`params` and `batch_stats` as `init_variables` makes them for `image_shape` (H, W) inputs
    (same tree, shapes, dtypes), all zeros, as host numpy arrays.

    The target of a restore that overwrites every variable (resuming a run): traced with
    `jax.eval_shape`, so none of `init_variables`' compile and run (~5 s for shapes_r18, ~8 s
    for R50-FPN on a 2-core CPU) is spent on values that are thrown away.
    """
    return jax.tree_util.tree_map(
        lambda s: np.zeros(s.shape, s.dtype),
        flax.core.unfreeze(model.variable_shapes(image_shape)),
    )


def train_state_from_variables(
    config: ml_collections.ConfigDict, model: MaskRCNN, variables: dict
) -> tuple[TrainState, optax.Schedule]:
    """A step-0 `TrainState` holding `variables` (`params`, `batch_stats`) with a fresh
    optimizer, and the learning-rate schedule it uses."""
    learning_rate_fn = create_learning_rate_fn(config.train)
    params = jax.tree_util.tree_map(jnp.asarray, dict(variables["params"]))
    tx = create_optimizer(config, learning_rate_fn)
    state = TrainState(  # what `TrainState.create` builds, the optimizer's init jitted:
        # eagerly its zeros_like per parameter shape are op-by-op compiles, ~1 s on a 2-core CPU.
        step=0,
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=jax.jit(tx.init)(params),
        batch_stats=jax.tree_util.tree_map(jnp.asarray, dict(variables.get("batch_stats", {}))),
    )
    return state, learning_rate_fn


def create_train_state(
    key: jax.Array, config: ml_collections.ConfigDict, model: MaskRCNN
) -> tuple[TrainState, optax.Schedule]:
    """A freshly initialised `TrainState` for `config` and the learning-rate schedule it uses."""
    variables = init_variables(model, key, tuple(config.data.image_size))
    return train_state_from_variables(config, model, variables)


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
