"""The jitted, data-parallel train step.

Per-replica code is written in the pmap style (an `axis_name`, explicit `lax.pmean` of gradients,
BN statistics and metrics) and run with `jax.shard_map` inside `jax.jit` over a 1-D mesh whose
data axis spans every device of every host. `check_vma=False` gives shard_map pmap's semantics:
replication is asserted by the explicit `pmean`s rather than inferred. Per-image PRNG keys are
derived from the step key and the image's index in the GLOBAL batch, so the result does not
depend on the number of devices.

On CPU the step is compiled with XLA's fast-compile preset (`compiler_options`): on the project's
2-core CPU the R50-FPN step at 512² compiles in ~22 s instead of ~25 s and the shapes_r18 step
in ~23.5 s instead of ~28 s, the steps as fast (docs/performance.md).
"""

import functools
import os
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mrcnn_jax.sharding import AXIS
from mrcnn_jax.train.losses import mask_rcnn_losses
from mrcnn_jax.train.state import TrainState


def _per_image_keys(key: jax.Array, local_batch: int) -> tuple[jax.Array, jax.Array]:
    first = jax.lax.axis_index(AXIS) * local_batch
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(
        first + jnp.arange(local_batch)
    )
    return keys[:, 0], keys[:, 1]


CPU_OPT_PRESET = "xla_cpu_opt_preset"
FAST_COMPILE = "CPU_OPT_PRESET_FAST_COMPILE"


def compiler_options(devices: Iterable[jax.Device]) -> dict[str, str] | None:
    """The XLA options the train step is compiled with for `devices`.

    On CPU: `{"xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_COMPILE"}` (XLA's preset that skips
    passes costly to compile; same losses up to float rounding), unless `XLA_FLAGS` already
    chooses a preset (`--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT` turns it off) or this
    jaxlib's XLA does not know the option (it came with jaxlib 0.10). Elsewhere: None.
    """
    if {device.platform for device in devices} != {"cpu"}:
        return None
    if CPU_OPT_PRESET in os.environ.get("XLA_FLAGS", ""):
        return None
    options = {CPU_OPT_PRESET: FAST_COMPILE}
    return options if accepts_compiler_options(tuple(options.items())) else None


@functools.cache
def accepts_compiler_options(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether XLA:CPU compiles a trivial program with `options` ((name, value) pairs): an
    option or value this jaxlib does not know is an error at compile time."""
    identity = jax.jit(lambda x: x, compiler_options=dict(options))
    try:
        identity.lower(jax.device_put(0.0, jax.devices("cpu")[0])).compile()
    except RuntimeError:  # JaxRuntimeError: INVALID_ARGUMENT, no such option / enum value
        return False
    return True


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    learning_rate_fn: optax.Schedule,
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """Builds `train_step(state, batch, key) -> (state, metrics)`, one XLA program.

    `state` is replicated, `batch` holds global arrays sharded over the mesh
    (`sharding.shard_batch`), `key` is the step's PRNG key. The state's buffers are donated:
    the state passed in (and whatever shares its arrays, e.g. the tree given to
    `sharding.replicate` on one device) is deleted by the call; use the returned one.
    Metrics are global-batch means: the losses, per image `num_proposals`, `num_fg_rois`
    (foreground RoIs sampled) and `num_mask_rois` (those the mask head trained on: fewer only
    when they overflow `model.roi_heads.mask_rois_per_image`), `grad_norm` (the stages frozen by
    `model.freeze_at` get no gradient, so it does not count them), `learning_rate` (the rate of
    this update: `learning_rate_fn(step)` at the state's step before it, so the trainer's row
    for step N shows the schedule at N - 1). The program is compiled with
    `compiler_options(mesh.devices.flat)`.
    """
    global_batch = config.train.batch_size
    if global_batch % mesh.size:
        raise ValueError(
            f"train.batch_size={global_batch} is not divisible by the {mesh.size} devices"
        )

    def per_replica(state: TrainState, batch: dict, key: jax.Array):
        roi_keys, rpn_keys = _per_image_keys(key, batch["image"].shape[0])

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            outputs, updates = state.apply_fn(
                variables, batch, train=True, keys=roi_keys, mutable=["batch_stats"]
            )
            with jax.named_scope("losses"):  # stage names in profiles (benchmark.py breakdown)
                losses = mask_rcnn_losses(outputs, batch, rpn_keys, config.model, AXIS)
            return losses["loss"], (losses, updates, outputs)

        grads, (losses, updates, outputs) = jax.grad(loss_fn, has_aux=True)(state.params)
        with jax.named_scope("optimizer"):
            grads = jax.lax.pmean(grads, AXIS)
            batch_stats = jax.lax.pmean(updates["batch_stats"], AXIS)
            new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        metrics = {
            **losses,
            "num_proposals": jnp.mean(outputs.num_proposals.astype(jnp.float32)),
            "num_fg_rois": jnp.mean(jnp.sum(outputs.roi_classes > 0, axis=1).astype(jnp.float32)),
            "num_mask_rois": jnp.sum(outputs.mask_valid) / batch["image"].shape[0],
            "grad_norm": optax.tree.norm(grads),
        }
        metrics = jax.lax.pmean(metrics, AXIS)
        metrics["learning_rate"] = learning_rate_fn(state.step)
        return new_state, metrics

    step = jax.shard_map(
        per_replica,
        mesh=mesh,
        in_specs=(P(), P(AXIS), P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    options = compiler_options(mesh.devices.flat)
    return jax.jit(step, donate_argnums=(0,), compiler_options=options)
