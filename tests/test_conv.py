"""`ops/conv.py`: the convolution every layer uses (kernel gradient as matmuls, Winograd 3×3).

Forward values and both gradients against a numpy convolution written here (explicit padding and
a loop over kernel taps) and against XLA's own `lax.conv_general_dilated` gradients, for 1×1,
3×3 and 7×7 kernels, strides 1 and 2, symmetric, asymmetric and "SAME" padding, maps on both
sides of the one-matmul (im2col) threshold and output sizes that leave the last padded rows
unread; the Winograd F(2×2, 3×3) path on even, odd, one-pixel and layer-sized maps, and which
layers take it; bfloat16 inputs; and the clear errors for what it does not support.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from mrcnn_jax.modeling import resnet
from mrcnn_jax.ops import conv as conv_ops

CASES = {  # (B, H, W, C, O), kernel, strides, padding
    "1x1": ((2, 9, 7, 5, 3), 1, (1, 1), ((0, 0), (0, 0))),
    "1x1-stride2": ((2, 9, 8, 5, 3), 1, (2, 2), ((0, 0), (0, 0))),
    "3x3": ((3, 12, 10, 4, 6), 3, (1, 1), ((1, 1), (1, 1))),
    "3x3-stride2-unread-rows": ((2, 8, 9, 4, 6), 3, (2, 2), ((1, 1), (1, 1))),
    "3x3-asymmetric": ((1, 11, 6, 3, 2), 3, (2, 1), ((0, 2), (1, 0))),
    "3x3-large-map": ((1, 40, 36, 3, 4), 3, (1, 1), ((1, 1), (1, 1))),  # > im2col threshold
    "7x7-stem": ((2, 20, 18, 3, 8), 7, (2, 2), ((3, 3), (3, 3))),
    "3x3-same": ((2, 7, 10, 3, 5), 3, (2, 2), "SAME"),
}


def conv_numpy(x: np.ndarray, w: np.ndarray, strides, padding) -> np.ndarray:
    """Cross-correlation `y[b, p, q, o] = sum x_pad[b, s*p + i, s*q + j, c] w[i, j, c, o]`."""
    (kh, kw, _, o), (sh, sw) = w.shape, strides
    xp = np.pad(x, ((0, 0), *padding, (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    y = np.zeros((x.shape[0], ho, wo, o))
    for i in range(kh):
        for j in range(kw):
            y += xp[:, i : i + sh * ho : sh, j : j + sw * wo : sw] @ w[i, j]
    return y


def numpy_gradients(x, w, strides, padding, dy):
    """`(dL/dx, dL/dw)` of `L = sum(conv_numpy(x, w) * dy)`, by the same loop transposed."""
    (kh, kw, _, _), (sh, sw) = w.shape, strides
    xp = np.pad(x, ((0, 0), *padding, (0, 0)))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    ho, wo = dy.shape[1:3]
    for i in range(kh):
        for j in range(kw):
            window = (slice(None), slice(i, i + sh * ho, sh), slice(j, j + sw * wo, sw))
            dw[i, j] = np.einsum("bhwc,bhwo->co", xp[window], dy)
            dxp[window] += dy @ w[i, j].T
    (top, _), (left, _) = padding
    return dxp[:, top : top + x.shape[1], left : left + x.shape[2]], dw


def explicit(padding, shape, kernel, strides):
    if isinstance(padding, str):
        return jax.lax.padtype_to_pads(shape[1:3], (kernel, kernel), strides, padding)
    return padding


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_values_and_gradients_match_numpy_and_xla(case):
    (b, h, w, c, o), k, strides, padding = case
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(k, k, c, o)).astype(np.float32)
    ours = lambda x, kernel: conv_ops.conv_general_dilated(x, kernel, strides, padding)
    xla = lambda x, kernel: jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    y, vjp = jax.vjp(jax.jit(ours), x, kernel)
    pads = explicit(padding, x.shape, k, strides)
    np.testing.assert_allclose(y, conv_numpy(x, kernel, strides, pads), rtol=1e-4, atol=1e-4)
    dy = rng.normal(size=y.shape).astype(np.float32)
    dx, dw = vjp(dy)
    dx_np, dw_np = numpy_gradients(x, kernel, strides, pads, dy)
    np.testing.assert_allclose(dx, dx_np, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_np, rtol=1e-4, atol=1e-3)
    dx_xla, dw_xla = jax.vjp(xla, x, kernel)[1](dy)
    np.testing.assert_allclose(dx, dx_xla, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw_xla, rtol=1e-5, atol=1e-4)


WINOGRAD_CASES = {  # (B, H, W, C, O): stride 1, padding 1
    "even": (2, 8, 6, 5, 3),
    "odd-height-and-width": (3, 7, 9, 4, 6),
    "one-pixel": (2, 1, 1, 3, 2),
    "one-row": (1, 1, 6, 2, 3),
    "rois-14x14": (5, 14, 14, 8, 4),
}


@pytest.mark.parametrize("shape", WINOGRAD_CASES.values(), ids=WINOGRAD_CASES.keys())
def test_winograd_values_and_gradients_match_numpy(shape, monkeypatch):
    """Small maps forced through Winograd (thresholds lowered) against the numpy convolution."""
    monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(conv_ops, "_WINOGRAD_MIN_PIXELS", 1)
    b, h, w, c, o = shape
    rng = np.random.default_rng(3)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, c, o)).astype(np.float32)
    pads = ((1, 1), (1, 1))
    assert conv_ops.uses_winograd(x.shape, kernel.shape, (1, 1), pads)
    ours = jax.jit(lambda x, kernel: conv_ops.conv_general_dilated(x, kernel, (1, 1), pads))
    lowered = jax.jit(jax.grad(lambda *a: ours(*a).sum(), argnums=(0, 1))).lower(x, kernel)
    assert "stablehlo.convolution" not in lowered.as_text()  # no XLA conv, forward or backward
    y, vjp = jax.vjp(ours, x, kernel)
    np.testing.assert_allclose(y, conv_numpy(x, kernel, (1, 1), pads), rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=y.shape).astype(np.float32)
    for got, want in zip(vjp(dy), numpy_gradients(x, kernel, (1, 1), pads, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_winograd_on_a_layer_sized_map():
    """At the real thresholds (128 channels, 2 × 32² pixels): an RPN/res4-sized 3×3 layer."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 32, 33, 128)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 128, 130)) / 34).astype(np.float32)
    pads = ((1, 1), (1, 1))
    assert conv_ops.uses_winograd(x.shape, kernel.shape, (1, 1), pads)
    y, vjp = jax.vjp(
        jax.jit(lambda x, k: conv_ops.conv_general_dilated(x, k, (1, 1), pads)), x, kernel
    )
    np.testing.assert_allclose(y, conv_numpy(x, kernel, (1, 1), pads), rtol=1e-4, atol=1e-4)
    dy = rng.normal(size=y.shape).astype(np.float32)
    for got, want in zip(vjp(dy), numpy_gradients(x, kernel, (1, 1), pads, dy)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize(
    "lhs, rhs, strides, padding, dtype, expected",
    [
        ((2, 128, 128, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
        ((256, 14, 14, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
        ((2, 32, 32, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
        ((2, 16, 16, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),
        ((2, 128, 128, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),
        ((8, 32, 32, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
        ((128, 14, 14, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
        ((8, 32, 32, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),
        ((2, 128, 128, 256), (3, 3, 256, 256), (2, 2), ((1, 1), (1, 1)), jnp.float32, False),
        ((2, 128, 128, 256), (3, 3, 256, 256), (1, 1), ((0, 2), (1, 1)), jnp.float32, False),
        ((2, 128, 128, 256), (1, 1, 256, 256), (1, 1), ((0, 0), (0, 0)), jnp.float32, False),
        ((2, 128, 128, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16, False),
    ],
    ids=[
        "p2",
        "mask-head",
        "threshold",
        "res5-small-map",
        "64-channels-r50-res2",
        "64-channels-r18-res2",
        "64-channels-mask-head",
        "16-channels",
        "stride-2",
        "asymmetric-padding",
        "1x1",
        "bfloat16",
    ],
)
def test_which_layers_use_winograd(lhs, rhs, strides, padding, dtype, expected):
    assert conv_ops.uses_winograd(lhs, rhs, strides, padding, dtype, dtype) is expected


@pytest.mark.parametrize("platforms", [("cuda",), ("tpu",), ("cuda", "tpu")])
def test_other_platforms_get_xlas_convolution(platforms):
    """A program lowered for GPU/TPU (`jax.export`, as scripts/export.py does) holds XLA's own
    convolution, not the CPU paths, for a layer that takes Winograd on CPU: forward and
    gradients."""
    x, kernel = jnp.ones((2, 32, 32, 128)), jnp.ones((3, 3, 128, 128))
    assert conv_ops.uses_winograd(x.shape, kernel.shape, (1, 1), ((1, 1), (1, 1)))
    conv = lambda x, k: conv_ops.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)))
    grad = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
    for program in (conv, grad):
        text = jax_export.export(jax.jit(program), platforms=platforms)(x, kernel).mlir_module()
        assert "stablehlo.convolution" in text and "dot_general" not in text
        cpu = jax_export.export(jax.jit(program), platforms=("cpu",))(x, kernel).mlir_module()
        assert "stablehlo.convolution" not in cpu and "dot_general" in cpu


def test_bfloat16_keeps_dtypes_and_accumulates_in_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 14, 14, 16)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) / 12, jnp.bfloat16)
    pad = ((1, 1), (1, 1))
    y, vjp = jax.vjp(lambda x, k: conv_ops.conv_general_dilated(x, k, (1, 1), pad), x, kernel)
    dx, dw = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    dy = np.ones(y.shape)
    _, dw_np = numpy_gradients(np.float64(x), np.float64(kernel), (1, 1), pad, dy)
    np.testing.assert_allclose(np.float32(dw), dw_np, rtol=1e-2, atol=0.5)


def test_flax_layers_use_it_with_unchanged_parameters():
    """`resnet.Conv` (every conv layer of the model) has nn.Conv's parameters and outputs."""
    import flax.linen as nn

    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, 3)), jnp.float32)
    layer, reference = resnet.Conv(4, (3, 3), strides=2), nn.Conv(4, (3, 3), strides=2)
    variables = reference.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    grad = lambda module: jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))(variables)
    for a, b in zip(jax.tree.leaves(grad(layer)), jax.tree.leaves(grad(reference))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rhs_dilation": (2, 2)}, "no dilation"),
        ({"lhs_dilation": (2, 1)}, "no dilation"),
        ({"feature_group_count": 2}, "one group"),
        ({"dimension_numbers": ("NCHW", "OIHW", "NCHW")}, "NHWC/HWIO/NHWC"),
        ({"padding": ((-1, 0), (0, 0))}, "non-negative padding"),
    ],
)
def test_unsupported_arguments_are_clear_errors(kwargs, message):
    x, kernel = jnp.zeros((1, 6, 6, 4)), jnp.zeros((3, 3, 4, 4))
    kwargs = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), **kwargs}
    with pytest.raises(ValueError, match=message):
        conv_ops.conv_general_dilated(x, kernel, **kwargs)
