"""The optimizer's parameter groups: which tensors decay (kernels, biases per
`train.bias_weight_decay`, never BatchNorm) and which are frozen, checked on a first SGD update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


@pytest.mark.parametrize("bias_decay", [True, False])
@pytest.mark.parametrize("norm, freeze_at", [("batch", 0), ("frozen", 2)])
def test_weight_decay_groups(bias_decay, norm, freeze_at):
    config = shapes_r18.get_config()
    config.train.bias_weight_decay = bias_decay
    config.model.norm, config.model.freeze_at = norm, freeze_at
    lr = config.train.base_lr * config.train.warmup_factor
    decay_step = -lr * config.train.weight_decay  # SGD's first step on g + wd·p, p = 1, g = 0
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
    variables = ResNet(depth=18, norm="batch").init(jax.random.key(0), images)

    def grad_fn(freeze_at):
        def loss(params):
            outputs, _ = ResNet(depth=18, norm="batch", freeze_at=freeze_at).apply(
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


@pytest.mark.parametrize("freeze_at", [3, -1])
def test_unsupported_freeze_at_is_a_clear_error(freeze_at):
    from mrcnn_jax.modeling.resnet import ResNet

    with pytest.raises(ValueError, match=f"model.freeze_at must be 0 .* got {freeze_at}"):
        ResNet(depth=18, freeze_at=freeze_at).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
