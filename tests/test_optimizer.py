"""The optimizers: which tensors decay (kernels, biases per `train.bias_weight_decay`, never
BatchNorm) and which are frozen, checked on a first update of SGD and of AdamW; AdamW's updates
against Adam written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import backend_compiles

from configs import shapes_r18
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import state as state_lib


def _first_updates(config) -> dict[str, float]:
    """Every parameter's first update with zero gradients and all-ones parameters, by path."""
    shapes = MaskRCNN.from_config(config.model).variable_shapes((64, 64))["params"]
    params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    optimizer = state_lib.create_optimizer(config, state_lib.create_learning_rate_fn(config.train))
    updates, _ = optimizer.update(
        jax.tree_util.tree_map(jnp.zeros_like, params), optimizer.init(params), params
    )
    return {
        "/".join(k.key for k in path): np.unique(np.asarray(u))
        for path, u in jax.tree_util.tree_leaves_with_path(updates)
    }


def _expected_decay(path: str, bias_decay: bool) -> bool:
    """The rule, written out: kernels decay; biases of convs/FCs when asked; norms never."""
    *modules, leaf = path.split("/")
    if modules[-1].endswith("bn") or modules[-1][:-1].endswith("bn"):  # bn, bn1, conv1_bn
        return False
    return leaf.endswith("kernel") or (bias_decay and leaf.endswith("bias"))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("bias_decay", [True, False])
@pytest.mark.parametrize("norm, freeze_at", [("batch", 0), ("frozen", 2)])
def test_weight_decay_groups(optimizer, bias_decay, norm, freeze_at):
    config = shapes_r18.get_config()
    config.train.optimizer = optimizer
    config.train.bias_weight_decay = bias_decay
    config.model.norm, config.model.freeze_at = norm, freeze_at
    lr = config.train.base_lr * config.train.warmup_factor
    # The first step on p = 1, g = 0: SGD's on g + wd·p; AdamW's Adam part is 0/(0 + eps) = 0
    # and its decoupled decay lr·wd·p.
    decay_step = -lr * config.train.weight_decay
    updates = _first_updates(config)
    kinds = {"kernel": 0, "bias": 0, "norm": 0, "frozen": 0}
    for path, values in updates.items():
        assert len(values) == 1, path
        frozen = path.startswith("backbone/") and (
            (norm == "frozen" and not _expected_decay(path, True))
            or (freeze_at >= 1 and path.split("/")[1].startswith("stem"))
            or (freeze_at >= 2 and path.split("/")[1].startswith("res2"))
        )
        expected = 0.0 if frozen or not _expected_decay(path, bias_decay) else decay_step
        np.testing.assert_allclose(values[0], expected, rtol=1e-4, err_msg=path)
        leaf = path.rsplit("/", 1)[1]
        kind = "frozen" if frozen else "norm" if not _expected_decay(path, True) else leaf
        kinds[kind.replace("predictor_", "")] += 1
    assert kinds["kernel"] and kinds["bias"] and kinds["norm" if norm == "batch" else "frozen"]


def test_frozen_stages_get_no_gradient_and_no_backward_pass():
    """`model.freeze_at` stops gradients at the frozen stages' output (torchvision's
    `requires_grad=False`): their parameters' gradients are exactly zero, their backward is not in
    the program, and every other gradient equals the one without the stop (freeze_at 2 vs 0)."""
    from mrcnn_jax.modeling.resnet import ResNet

    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    # "frozen" norm: the forward pass is the same for every freeze_at (with "batch", the frozen
    # stages use stored statistics, the others batch statistics: the next test).
    variables = ResNet(depth=18, norm="frozen").init(jax.random.key(0), images)

    def grad_fn(freeze_at):
        def loss(params):
            outputs, _ = ResNet(depth=18, norm="frozen", freeze_at=freeze_at).apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return sum(jnp.sum(jnp.sin(c)) for c in outputs.values())

        return jax.grad(loss)

    lowered = {f: jax.jit(grad_fn(f)).lower(variables["params"]) for f in (0, 2)}
    grads = {f: lowered[f].compile()(variables["params"]) for f in lowered}
    for name, tree in grads[2].items():
        leaves = jax.tree_util.tree_leaves(tree)
        if name.startswith(("stem", "res2")):
            assert all(not np.any(leaf) for leaf in leaves), name
        else:
            for got, want in zip(leaves, jax.tree_util.tree_leaves(grads[0][name])):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)
                assert np.any(got), name
    # the stem's and res2's kernel gradients (matmuls on CPU) are not in the program at all
    matmuls = {f: lowered[f].as_text().count("dot_general") for f in lowered}
    assert matmuls[0] > matmuls[2], matmuls


@pytest.mark.parametrize("norm", ["batch", "sync"])
@pytest.mark.parametrize("freeze_at", [1, 2])
def test_frozen_stages_keep_their_batchnorm_statistics(norm, freeze_at):
    """With batch statistics ("batch", "sync"), the BatchNorm layers of the stages that
    `freeze_at` freezes behave as Detectron2's FrozenBatchNorm2d: in training they normalise
    with their stored statistics, which stay as they were; the later stages use and update
    batch statistics."""
    from mrcnn_jax.modeling.resnet import ResNet

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = ResNet(depth=18).init(jax.random.key(0), images)
    # Stored statistics far from these images' moments, so that using either shows.
    stats = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32),
        variables["batch_stats"],
    )
    variables = {**variables, "batch_stats": stats}
    model = ResNet(depth=18, norm=norm, freeze_at=freeze_at, axis_name="data")
    train = jax.vmap(  # one replica, so that "sync" has its axis
        lambda x: model.apply(variables, x, train=True, mutable=["batch_stats"]),
        axis_name="data",
    )
    outputs, updates = jax.tree_util.tree_map(lambda x: x[0], train(images[None]))
    inference = ResNet(depth=18, norm=norm, freeze_at=freeze_at).apply(variables, images)

    frozen = ("stem",) if freeze_at == 1 else ("stem", "res2")
    for name, before in stats.items():
        after = updates["batch_stats"][name]
        same = all(
            np.array_equal(a, b)
            for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before))
        )
        assert same == name.startswith(frozen), name
    c2 = np.abs(outputs["C2"] - inference["C2"]).max()
    assert (c2 == 0) if freeze_at == 2 else (c2 > 1e-2), c2
    assert np.abs(outputs["C3"] - inference["C3"]).max() > 1e-2


@pytest.mark.parametrize("freeze_at", [3, -1])
def test_unsupported_freeze_at_is_a_clear_error(freeze_at):
    from mrcnn_jax.modeling.resnet import ResNet

    with pytest.raises(ValueError, match=f"model.freeze_at must be 0 .* got {freeze_at}"):
        ResNet(depth=18, freeze_at=freeze_at).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_adamw_follows_adam_with_decoupled_decay():
    """Three AdamW steps on random gradients equal Adam written out in numpy (bias-corrected
    moments, eps outside the square root, decay `lr·wd·p` on decayed params only, clipping of
    the global norm first); frozen params never move."""
    config = shapes_r18.get_config()
    config.train.optimizer = "adamw"
    config.train.adam_betas = (0.8, 0.95)
    config.train.weight_decay = 0.05
    config.train.grad_clip_norm = 30.0
    config.model.norm, config.model.freeze_at = "batch", 1
    learning_rate_fn = state_lib.create_learning_rate_fn(config.train)
    optimizer = state_lib.create_optimizer(config, learning_rate_fn)
    shapes = MaskRCNN.from_config(config.model).variable_shapes((64, 64))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    opt_state = optimizer.init(params)

    (b1, b2), eps, wd = config.train.adam_betas, 1e-8, config.train.weight_decay
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    names = [tuple(getattr(k, "key", k) for k in p) for p, _ in
             jax.tree_util.tree_leaves_with_path(params)]  # fmt: skip
    frozen = [state_lib.is_frozen(name, config.model) for name in names]
    want = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(params)]
    m = [np.zeros_like(x) for x in want]
    v = [np.zeros_like(x) for x in want]
    got = params
    for t in range(1, 4):
        grads = jax.tree_util.tree_map(
            lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes
        )
        updates, opt_state = optimizer.update(grads, opt_state, got)
        got = optax.apply_updates(got, updates)

        flat = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grads)]
        # the clipping is inside the trained group: its norm counts trained params only
        norm = np.sqrt(sum(np.sum(g**2) for g, f in zip(flat, frozen) if not f))
        lr = float(learning_rate_fn(t - 1))
        for i, (name, g) in enumerate(zip(names, flat)):
            if frozen[i]:
                continue
            g = g * min(1.0, config.train.grad_clip_norm / norm)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step = (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
            if state_lib.is_decayed(name, config.train):
                step = step + wd * want[i]
            want[i] = want[i] - lr * step
    for path, actual, expected in zip(paths, jax.tree_util.tree_leaves(got), want):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6, err_msg=path)
    stem = params["backbone"]["stem_conv"]["kernel"]
    np.testing.assert_array_equal(got["backbone"]["stem_conv"]["kernel"], stem)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_new_train_state_is_what_train_state_create_builds(optimizer):
    """`train_state_from_variables` (its optimizer init jitted) equals flax's
    `TrainState.create`: step 0, the variables, and `tx.init(params)` run eagerly, leaf for leaf
    (structure, dtypes, values)."""
    config = shapes_r18.get_config()
    config.train.optimizer = optimizer
    model = MaskRCNN.from_config(config.model)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: rng.normal(size=s.shape).astype(s.dtype), model.variable_shapes((64, 64))
    )
    state, _ = state_lib.train_state_from_variables(config, model, variables)
    want = state_lib.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=state.tx,
        batch_stats=variables["batch_stats"],
    )
    assert state.step == 0 and state.apply_fn == model.apply
    for got, expected in ((state.opt_state, want.opt_state), (state.params, want.params),
                          (state.batch_stats, want.batch_stats)):  # fmt: skip
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_zero_variables_have_the_init_shapes_and_compile_nothing():
    """`zero_variables` (the target of a resume's restore) has `init_variables`' tree, shapes
    and dtypes, holds zeros, and compiles no XLA program (it is traced only)."""
    model = MaskRCNN.from_config(shapes_r18.get_config().model)
    with backend_compiles() as compiles:
        zeros = state_lib.zero_variables(model, (64, 64))
        assert not compiles
        initial = state_lib.init_variables(model, jax.random.key(0), (64, 64))
        assert compiles  # the listener sees compiles: init_variables compiles the model's init
    assert jax.tree_util.tree_structure(zeros) == jax.tree_util.tree_structure(initial)
    for z, v in zip(jax.tree_util.tree_leaves(zeros), jax.tree_util.tree_leaves(initial)):
        assert isinstance(z, np.ndarray) and (z.shape, z.dtype) == (v.shape, v.dtype)
        assert not z.any()


def test_an_unknown_optimizer_is_a_clear_error():
    config = shapes_r18.get_config()
    config.train.optimizer = "adam"
    with pytest.raises(
        ValueError, match=r"config\.train\.optimizer='adam' must be one of \('sgd', 'adamw'\)"
    ):
        state_lib.create_optimizer(config, state_lib.create_learning_rate_fn(config.train))


def _warmup_multistep(train, step: int) -> float:
    """Detectron2's WarmupMultiStepLR (linear warm-up) at `step`, written out."""
    factor = 1.0
    if step < train.warmup_steps:
        alpha = step / train.warmup_steps
        factor = train.warmup_factor * (1 - alpha) + alpha
    decays = sum(step >= s for s in train.decay_steps)
    return train.base_lr * factor * train.decay_factor**decays


@pytest.mark.parametrize(
    "warmup_steps, decay_steps",
    [
        (1000, (60_000, 80_000)),
        (1000, (500, 2000)),
        (100, (100,)),
        (0, (0, 10)),
        (300, (10, 20)),
        (0, (60, 60)),
        (300, (200, 10, 200)),
        (1000, (80_000, 60_000, 60_000)),
    ],
)
def test_the_step_schedule_is_detectron2s_warmup_multistep(warmup_steps, decay_steps):
    """Decay steps within the warm-up count from where they are (they were left out until the
    warm-up ended: 10x the rate from step 500 to 999 with decays at 500 and 2000); a step given
    twice decays twice, as torch's MultiStepLR (it decayed once), in any order."""
    train = shapes_r18.get_config().train
    train.schedule, train.base_lr, train.warmup_factor = "step", 0.02, 0.001
    train.warmup_steps, train.decay_steps, train.num_steps = warmup_steps, decay_steps, 90_000
    schedule = state_lib.create_learning_rate_fn(train)
    for step in sorted({0, 1, 9, 10, 11, 99, 100, 101, 499, 500, 501, 999, 1000, 1001, 2000,
                        60_000, 80_000, *decay_steps}):  # fmt: skip
        want = _warmup_multistep(train, step)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-9, err_msg=step)
