"""ResNet-18/34/50/101 backbone (torchvision layout, NHWC).

Bottlenecks put the stride on the 3×3 conv (ResNet v1.5, as torchvision). Convolutions use explicit
symmetric padding so that outputs match torchvision pixel for pixel (Flax's "SAME" pads stride-2
convolutions asymmetrically).

Padding: with `valid_size` (each image's valid extent, `ops/extent.py`) every convolution input
is zeroed outside the extent at its resolution and BatchNorm batch statistics count valid pixels
only, so an image's features do not depend on the canvas it is padded into.
"""

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrcnn_jax.modeling.scan_layers import scan_layers
from mrcnn_jax.ops.conv import conv_general_dilated
from mrcnn_jax.ops.extent import extent_mask

# Every conv layer of the model: `nn.Conv` with a kernel gradient fast on CPU (`ops/conv.py`).
Conv = partial(nn.Conv, conv_general_dilated=conv_general_dilated)

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NORM_MODES = ("frozen", "batch", "sync")
BN_EPSILON = 1e-5  # Added to the variance, as torch's BatchNorm2d/FrozenBatchNorm2d default.


class BatchNorm(nn.Module):
    """BatchNorm over NHWC (or [N, C]) with a validity mask for its batch statistics.

    Variables and arithmetic are `flax.linen.BatchNorm`'s (params `scale`, `bias`; batch_stats
    `mean`, `var`; `E[x²] - E[x]²` variance; running averages with `momentum`), so checkpoints and
    converted weights carry over. In training the statistics are the moments of the positions
    where `mask` is True (all positions without a mask) and, with `axis_name`, of those positions
    on all replicas: sums and counts are `psum`med, so replicas holding different numbers of
    valid pixels still get the global moments (a `pmean` of per-replica means would not).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        features = x.shape[-1]
        # float32 also under jax_enable_x64 (the initialisers' default dtype is then float64)
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            weight = jnp.ones((*x.shape[:-1], 1), jnp.float32)
            if mask is not None:
                weight = jnp.broadcast_to(mask, weight.shape).astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            sums = jnp.stack([jnp.sum(xf * weight, axes), jnp.sum(xf * xf * weight, axes)])
            count = jnp.sum(weight)
            if self.axis_name is not None:
                sums, count = jax.lax.psum((sums, count), self.axis_name)
            mean, mean2 = sums / jnp.maximum(count, 1.0)
            var = jnp.maximum(0.0, mean2 - mean * mean)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean
                ra_var.value = m * ra_var.value + (1 - m) * var
        y = x.astype(jnp.float32) - mean
        y = y * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
        return y.astype(self.dtype)


def make_norm(
    mode: str, train: bool, axis_name: str | None, dtype: jnp.dtype
) -> Callable[..., nn.Module]:
    """Returns a `BatchNorm` constructor for one of `NORM_MODES`.

    "frozen" always uses the stored statistics (its scale and bias are excluded from training by
    the optimizer); "batch" uses per-replica batch statistics when training; "sync" the
    statistics over `axis_name` (cross-replica BN) when training.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {mode!r}")
    use_running_average = mode == "frozen" or not train
    return partial(
        BatchNorm,
        use_running_average=use_running_average,
        momentum=0.9,
        epsilon=BN_EPSILON,
        dtype=dtype,
        axis_name=axis_name if (mode == "sync" and train) else None,
    )


def mask_outside(x: jnp.ndarray, valid_size: jnp.ndarray | None, stride: int) -> jnp.ndarray:
    """Zeros `x [B, H, W, C]` (at feature stride `stride`) outside each image's valid extent.

    Returns `x` unchanged when `valid_size` is None.
    """
    if valid_size is None:
        return x
    return x * extent_mask(valid_size, x.shape[1], x.shape[2], stride).astype(x.dtype)


def _bn_mask(valid_size: jnp.ndarray | None, x: jnp.ndarray, stride: int):
    return None if valid_size is None else extent_mask(valid_size, x.shape[1], x.shape[2], stride)


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    name: str | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> "Conv":
    """A bias-free convolution with torchvision's symmetric padding `kernel // 2`."""
    pad = kernel // 2
    return Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        name=name,
    )


class ResidualBlock(nn.Module):
    """A residual block: basic (two 3×3 convs, ResNet-18/34, output `features` channels) or
    bottleneck (1×1 → strided 3×3 → 1×1, ResNet-50/101, output 4 · `features` channels), with a
    1×1 projection shortcut when the shape changes.

    `x [B, H, W, C]` is at feature stride `in_stride`; the inputs of its spatial (3×3) convs are
    zeroed outside the extents, so what lies there in `x` never reaches a valid output. The
    output (at `in_stride · stride`) is not masked: its consumers are 1×1 convs or mask first."""

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    bottleneck: bool
    in_stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, valid_size: jnp.ndarray | None = None) -> jnp.ndarray:
        if self.bottleneck:
            out = self.features * 4
            layers = ((self.features, 1, 1), (self.features, 3, self.stride), (out, 1, 1))
        else:
            out = self.features
            layers = ((out, 3, self.stride), (out, 3, 1))
        y, stride = x, self.in_stride
        for i, (width, kernel, conv_stride) in enumerate(layers, start=1):
            if kernel > 1:
                y = mask_outside(y, valid_size, stride)
            y = conv(width, kernel, conv_stride, f"conv{i}", self.dtype)(y)
            stride *= conv_stride
            y = self.norm(name=f"bn{i}")(y, mask=_bn_mask(valid_size, y, stride))
            if i < len(layers):
                y = nn.relu(y)
        residual = x
        if residual.shape != y.shape:
            residual = conv(out, 1, self.stride, "downsample_conv", self.dtype)(x)
            residual = self.norm(name="downsample_bn")(
                residual, mask=_bn_mask(valid_size, residual, stride)
            )
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet trunk returning the stage outputs C2–C5.

    Input `images [B, H, W, 3]` (zero beyond each image's content) and optionally `valid_size
    [B, 2]` (each image's valid extent, `ops/extent.py`); output `{"C2": [B, H/4, W/4, c], ...,
    "C5": [B, H/32, W/32, 8c]}` (sizes rounded up), c = 64 (basic blocks) or 256 (bottlenecks).
    Inside the extents they are what the image alone computes; outside, anything (a consumer's
    spatial conv masks its input first).

    `freeze_at` stops gradients at the output of the frozen stages (1: the stem, 2: the stem and
    res2), as torchvision's and Detectron2's `requires_grad=False` do, so their backward pass is
    not computed; the optimizer (`train/state.is_frozen`) keeps their parameters unchanged. Their
    BatchNorm always normalises with its stored statistics and never updates them, whatever
    `norm` says (Detectron2's `freeze()` makes them FrozenBatchNorm2d).
    """

    depth: int = 50
    norm: str = "frozen"
    freeze_at: int = 0
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, images: jnp.ndarray, valid_size: jnp.ndarray | None = None, train: bool = False
    ) -> dict[str, jnp.ndarray]:
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(
                f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}"
            )
        if self.freeze_at not in (0, 1, 2):  # the optimizer's groups (state.is_frozen) know 0-2
            raise ValueError(
                f"model.freeze_at must be 0 (train all), 1 (freeze the stem) or 2 (the stem and "
                f"res2), got {self.freeze_at}"
            )
        norm = make_norm(self.norm, train, self.axis_name, self.dtype)
        frozen_norm = make_norm("frozen", train, self.axis_name, self.dtype)
        # Part 1 is the stem, part 2 res2, ...: the frozen ones keep their statistics.
        part_norm = lambda part: frozen_norm if part <= self.freeze_at else norm
        x = conv(64, 7, 2, "stem_conv", self.dtype)(images.astype(self.dtype))
        x = nn.relu(part_norm(1)(name="stem_bn")(x, mask=_bn_mask(valid_size, x, 2)))
        # The max pool's valid outputs read only valid inputs (stride 2, window 3, padding 1).
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        if self.freeze_at >= 1:
            x = jax.lax.stop_gradient(x)
        outputs, stride = {}, 4
        for stage, num_blocks in enumerate(STAGE_BLOCKS[self.depth]):
            block_stride = 2 if stage > 0 else 1
            block = partial(
                ResidualBlock,
                features=64 * 2**stage,
                norm=part_norm(stage + 2),
                bottleneck=self.depth >= 50,
                dtype=self.dtype,
            )
            x = block(stride=block_stride, in_stride=stride, name=f"res{stage + 2}_0")(
                x, valid_size
            )
            stride *= block_stride
            # Blocks 1.. keep the shape: one compiled block (`scan_layers`).
            repeats = [
                [block(stride=1, in_stride=stride, name=f"res{stage + 2}_{i}")]
                for i in range(1, num_blocks)
            ]
            x = scan_layers(self, repeats, lambda b, y: b[0](y, valid_size), x)
            if self.freeze_at >= stage + 2:
                x = jax.lax.stop_gradient(x)
            outputs[f"C{stage + 2}"] = x
        return outputs
