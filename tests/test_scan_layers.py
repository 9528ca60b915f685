"""`scan_layers`: repeated layers under one `lax.scan` give what the plain loop over them gives
(outputs, gradients, running statistics), with the variables left per layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables

from mrcnn_jax.modeling import resnet, roi_heads
from mrcnn_jax.modeling.resnet import ResNet
from mrcnn_jax.modeling.roi_heads import MaskHead
from mrcnn_jax.modeling.scan_layers import scan_layers


def loop(parent, layers, step, x):
    """The reference: each layer called in turn."""
    del parent
    for layer in layers:
        x = step(layer, x)
    return x


class DenseNormStack(nn.Module):
    """`num_layers` of Dense -> BatchNorm -> ReLU (`width` -> `width`) through `apply_layers`."""

    num_layers: int
    width: int = 8
    train: bool = False
    apply_layers: object = scan_layers

    @nn.compact
    def __call__(self, x):
        layers = [
            [
                nn.Dense(self.width, name=f"dense{i}"),
                nn.BatchNorm(use_running_average=not self.train, name=f"bn{i}"),
            ]
            for i in range(self.num_layers)
        ]
        return self.apply_layers(self, layers, lambda m, y: nn.relu(m[1](m[0](y))), x)


def max_differences(a, b):
    return jax.tree.leaves(jax.tree.map(lambda p, q: float(jnp.abs(p - q).max()), a, b))


@pytest.mark.parametrize("num_layers", [1, 2, 5])
@pytest.mark.parametrize("train", [False, True])
def test_scan_equals_loop_with_gradients_and_running_statistics(num_layers, train):
    rng = np.random.default_rng(num_layers)
    x = jnp.asarray(rng.normal(size=(6, 8)), jnp.float32)
    variables, _ = random_variables(DenseNormStack(num_layers, train=train), rng, x)

    def loss(params, apply_layers):
        module = DenseNormStack(num_layers, train=train, apply_layers=apply_layers)
        y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, updates)

    grad = jax.grad(loss, has_aux=True)
    (g_scan, (y_scan, u_scan)), (g_loop, (y_loop, u_loop)) = (
        jax.jit(grad, static_argnums=1)(variables["params"], fn) for fn in (scan_layers, loop)
    )
    assert jax.tree.structure(u_scan) == jax.tree.structure(u_loop)
    assert jax.tree.structure(g_scan) == jax.tree.structure(variables["params"])
    assert max(max_differences(y_scan, y_loop)) < 1e-5
    assert max(max_differences(g_scan, g_loop)) < 1e-5
    assert max(max_differences(u_scan, u_loop)) < 1e-6
    moved = max_differences(u_loop["batch_stats"], variables["batch_stats"])
    assert (max(moved) > 1e-3) == train  # the statistics move in training only


def test_layers_of_different_shapes_are_named():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            layers = [[nn.Dense(4, name="a")], [nn.Dense(4, name="b")]]
            return scan_layers(self, layers, lambda m, y: m[0](y), x)

    x = jnp.ones((2, 3))
    params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    params["b"] = {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}
    with pytest.raises(ValueError, match=r"\['b'\].*\['a'\]"):
        Mixed().apply({"params": params}, x)


def scan_lengths(jaxpr) -> list[int]:
    """The lengths of the scans in `jaxpr`, nested ones included, in order."""
    lengths = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            lengths.append(eqn.params["length"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple) else (param,):
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
                    lengths += scan_lengths(getattr(sub, "jaxpr", sub))
    return lengths


# "batch" (25 s) runs with the slow tests; BatchNorm updates through a scan stay in the default
# run with the heads' test below.
@pytest.mark.parametrize("norm", ["frozen", pytest.param("batch", marks=pytest.mark.slow)])
def test_resnet50_scans_its_repeated_blocks_and_equals_the_loop(norm, monkeypatch):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 64, 96, 3)), jnp.float32)
    valid_size = jnp.asarray([[64, 96], [40, 70]], jnp.int32)
    model = ResNet(depth=50, norm=norm)
    variables, _ = random_variables(model, rng, images, valid_size)

    def outputs(params):  # a new function per call: jax caches traces by function
        def run(params):
            features, updates = model.apply(
                {**variables, "params": params},
                images,
                valid_size,
                train=True,
                mutable=["batch_stats"],
            )
            loss = sum(jnp.mean(jnp.sin(f)) for f in features.values())
            return loss, (features, updates)

        lengths = scan_lengths(jax.make_jaxpr(run)(params).jaxpr)
        return lengths, jax.jit(jax.grad(run, has_aux=True))(params)

    lengths, (g_scan, (f_scan, u_scan)) = outputs(variables["params"])
    assert lengths == [2, 3, 5, 2]  # res2_1-2, res3_1-3, res4_1-5, res5_1-2
    monkeypatch.setattr(resnet, "scan_layers", loop)
    lengths, (g_loop, (f_loop, u_loop)) = outputs(variables["params"])
    assert lengths == []

    for name in f_loop:
        scale = float(jnp.abs(f_loop[name]).max())
        assert float(jnp.abs(f_scan[name] - f_loop[name]).max()) <= 1e-4 * scale, name
    assert jax.tree.structure(g_scan) == jax.tree.structure(variables["params"])
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(g_loop),
        jax.tree.leaves(g_scan),
        jax.tree.leaves(g_loop),
    ):
        assert float(jnp.abs(a - b).max()) <= 1e-3 * float(jnp.abs(b).max()) + 1e-9, path[0]
    assert jax.tree.structure(u_scan) == jax.tree.structure(u_loop)
    assert max(max_differences(u_scan, u_loop)) < 1e-4
    if norm == "batch":
        assert max(max_differences(u_loop["batch_stats"], variables["batch_stats"])) > 1e-3


@pytest.mark.parametrize("head_norm, in_channels", [(None, 16), ("batch", 16), (None, 24)])
def test_mask_head_convs_scanned_equal_the_loop(head_norm, in_channels, monkeypatch):
    """4 convs of width 16: all four scanned when the input has 16 channels, conv2-4 when not."""
    rng = np.random.default_rng(1)
    rois = jnp.asarray(rng.normal(size=(5, 7, 7, in_channels)), jnp.float32)
    classes = jnp.asarray([0, 2, 1, 1, 0])
    valid = jnp.asarray([True, True, True, False, False])
    head = MaskHead(num_classes=3, dim=16, norm=head_norm)
    variables, _ = random_variables(head, rng, rois, classes)

    def outputs(params):  # a new function per call: jax caches traces by function
        def run(params):
            logits, updates = head.apply(
                {**variables, "params": params}, rois, classes, True, valid, mutable=["batch_stats"]
            )
            return jnp.sum(jnp.sin(logits)), (logits, updates)

        lengths = scan_lengths(jax.make_jaxpr(run)(params).jaxpr)
        return lengths, jax.jit(jax.grad(run, has_aux=True))(params)

    lengths, (g_scan, (y_scan, u_scan)) = outputs(variables["params"])
    assert lengths == ([4] if in_channels == 16 else [3])
    monkeypatch.setattr(roi_heads, "scan_layers", loop)
    lengths, (g_loop, (y_loop, u_loop)) = outputs(variables["params"])
    assert lengths == []
    assert max(max_differences(y_scan, y_loop)) < 1e-4
    assert max(max_differences(g_scan, g_loop)) < 1e-4
    assert jax.tree.structure(u_scan) == jax.tree.structure(u_loop)
    assert max(max_differences(u_scan, u_loop), default=0.0) < 1e-5
    if head_norm:
        assert max(max_differences(u_loop["batch_stats"], variables["batch_stats"])) > 1e-3
