"""The jitted data-parallel train step: 8 devices == 1 device (also with a mask-head budget
whose positives fit, and with the mask head in chunks), no recompiles, finite on edge cases and
when the positives overflow the mask-head budget."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from helpers import synthetic_batch

from mrcnn_jax import sharding
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib
from mrcnn_jax.train import step as step_lib


def make_trainer(config, devices):
    model = MaskRCNN.from_config(config.model, axis_name=sharding.AXIS)
    state, lr_fn = state_lib.create_train_state(jax.random.key(0), config, model)
    mesh = sharding.create_mesh(devices)
    return (
        sharding.replicate(state, mesh),
        step_lib.make_train_step(config, mesh, lr_fn),
        mesh,
    )


# F = 8 foreground slots per image and a budget of 5 (G = 40 on one device, 5 per replica on 8):
# the batch's images have at most 5 positives, so every positive is taken in both runs.
MASK_BUDGET = {"model.roi_heads.positive_fraction": 0.5, "model.roi_heads.mask_rois_per_image": 5}


@pytest.mark.parametrize(
    "norm, overrides",
    [
        ("frozen", {}),
        pytest.param("frozen", MASK_BUDGET, id="frozen-mask_budget", marks=pytest.mark.slow),
        # chunks of 3 of G = 32 slots on one device (11 chunks) and of 4 per replica on 8 (slow:
        # test_losses checks chunks against one pass, the default case 8 devices against 1)
        pytest.param(
            "frozen",
            {"model.roi_heads.mask_head_chunk": 3},
            id="frozen-mask_chunks",
            marks=pytest.mark.slow,
        ),
        pytest.param("sync", {}, marks=pytest.mark.slow),
    ],
)
def test_eight_devices_match_one_device(norm, overrides):
    assert jax.device_count() >= 8, "conftest should force 8 CPU devices"
    config = tiny_config(**{"model.norm": norm, "train.batch_size": 8, **overrides})
    batch = synthetic_batch(config, np.random.default_rng(0), [1, 2, 3, 0, 2, 1, 3, 4])
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        state, train_step, mesh = make_trainer(config, devices)
        new_state, metrics = train_step(state, sharding.shard_batch(batch, mesh), jax.random.key(1))
        results.append(jax.device_get((new_state.params, new_state.batch_stats, metrics)))
    (params1, stats1, metrics1), (params8, stats8, metrics8) = results
    for name in ("loss", "loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask"):
        np.testing.assert_allclose(
            metrics8[name], metrics1[name], rtol=1e-4, atol=1e-6, err_msg=name
        )
    assert metrics1["loss_mask"] > 0 and metrics1["loss_box_reg"] > 0
    for metrics in (metrics1, metrics8):  # every positive trained the mask head
        assert metrics["num_mask_rois"] == metrics["num_fg_rois"]
    flat1 = jax.tree_util.tree_leaves_with_path(params1)
    flat8 = jax.tree_util.tree_leaves(params8)
    for (path, a), b in zip(flat1, flat8):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree_util.tree_leaves(stats1), jax.tree_util.tree_leaves(stats8)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_second_step_does_not_recompile_and_edge_cases_stay_finite():
    config = tiny_config()
    m = config.data.max_instances
    state, train_step, mesh = make_trainer(config, jax.devices()[:2])
    rng = np.random.default_rng(1)
    # One image without objects, one with max_instances objects; then new data of another kind.
    for step, counts in enumerate(([0, m], [2, 1], [0, 0])):
        batch = synthetic_batch(config, rng, counts)
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh), jax.random.key(step))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), (counts, metrics)
        finite = jax.tree_util.tree_map(lambda x: np.isfinite(np.asarray(x)).all(), state.params)
        assert all(jax.tree_util.tree_leaves(finite)), counts
    assert metrics["loss_mask"] == 0 and metrics["loss_box_reg"] == 0  # no objects at all
    assert train_step._cache_size() == 1
    assert int(state.step) == 3


def test_batch_size_not_divisible_by_devices_is_a_clear_error():
    config = tiny_config(**{"train.batch_size": 3})
    with pytest.raises(ValueError, match="not divisible"):
        make_trainer(config, jax.devices()[:2])


@pytest.mark.slow  # overflow sampling itself: test_roi_heads (seconds)
def test_mask_budget_overflow_subsamples_stays_finite_and_does_not_recompile():
    """A budget of 1 mask RoI per image (G = 2 per replica of 2 images): steps whose positives
    overflow it train the mask head on exactly G of them, a step without objects on none."""
    config = tiny_config(**{"train.batch_size": 4, "model.roi_heads.mask_rois_per_image": 1})
    m = config.data.max_instances
    state, train_step, mesh = make_trainer(config, jax.devices()[:2])
    rng = np.random.default_rng(2)
    for step, counts in enumerate(([m, 2, 3, m], [1, m, 3, 2], [0, 0, 0, 0])):
        batch = synthetic_batch(config, rng, counts)
        state, metrics = train_step(state, sharding.shard_batch(batch, mesh), jax.random.key(step))
        metrics = jax.device_get(metrics)
        assert all(np.isfinite(v) for v in metrics.values()), (counts, metrics)
        if sum(counts):  # every replica overflows: 2 RoIs of its 2 images, 1 per image
            assert metrics["num_fg_rois"] > 1 and metrics["num_mask_rois"] == 1
            assert metrics["loss_mask"] > 0
        else:
            assert metrics["num_mask_rois"] == metrics["loss_mask"] == 0
    finite = jax.tree_util.tree_map(lambda x: np.isfinite(np.asarray(x)).all(), state.params)
    assert all(jax.tree_util.tree_leaves(finite))
    assert train_step._cache_size() == 1


class FakeDevice:
    platform = "tpu"


def test_compiler_options_fast_compile_preset_on_cpu_only(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    preset = {step_lib.CPU_OPT_PRESET: step_lib.FAST_COMPILE}
    assert step_lib.accepts_compiler_options(tuple(preset.items()))  # this jaxlib has it
    assert step_lib.compiler_options(jax.devices()[:2]) == preset
    assert step_lib.compiler_options([FakeDevice()]) is None
    assert step_lib.compiler_options([jax.devices()[0], FakeDevice()]) is None
    # The user's own preset wins (XLA reads XLA_FLAGS when the backend starts).
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT")
    assert step_lib.compiler_options(jax.devices()[:1]) is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert step_lib.compiler_options(jax.devices()[:1]) == preset
    # A jaxlib whose XLA lacks the option or the value: no options rather than an error.
    assert not step_lib.accepts_compiler_options(((step_lib.CPU_OPT_PRESET, "NO_SUCH_PRESET"),))
    assert not step_lib.accepts_compiler_options((("xla_cpu_no_such_option", "1"),))
    monkeypatch.setattr(step_lib, "accepts_compiler_options", lambda options: False)
    assert step_lib.compiler_options(jax.devices()[:1]) is None


@pytest.mark.slow  # two compiles (~50 s); every other step test runs with the preset
def test_fast_compile_preset_gives_the_default_step(monkeypatch):
    """The step compiled with the CPU preset (as make_train_step does) and without it: the same
    losses and updated parameters up to float rounding."""
    config = tiny_config(**{"train.batch_size": 2})
    batch = synthetic_batch(config, np.random.default_rng(3), [2, 1])
    results = []
    for flags in ("", "--xla_cpu_opt_preset=CPU_OPT_PRESET_DEFAULT"):
        monkeypatch.setenv("XLA_FLAGS", flags)
        state, train_step, mesh = make_trainer(config, jax.devices()[:1])
        inputs = sharding.shard_batch(batch, mesh)
        compiled = train_step.lower(state, inputs, jax.random.key(1)).compile()
        new_state, metrics = compiled(state, inputs, jax.random.key(1))
        # The preset merges fewer fusions: a different program, not the same one cached.
        fusions = compiled.as_text().count(" fusion(")
        results.append((fusions, *jax.device_get((new_state.params, metrics))))
    (fusions_preset, params_preset, metrics_preset), (fusions, params, metrics) = results
    assert fusions_preset != fusions
    assert metrics["loss_mask"] > 0 and metrics["loss_box_reg"] > 0
    for name in ("loss", "loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg", "loss_mask"):
        np.testing.assert_allclose(metrics_preset[name], metrics[name], rtol=1e-5, err_msg=name)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(params_preset)
    ):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
