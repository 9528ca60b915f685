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
