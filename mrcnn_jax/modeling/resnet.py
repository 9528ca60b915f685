"""ResNet-18/34/50/101 backbone (torchvision layout, NHWC).

Bottlenecks put the stride on the 3×3 conv (ResNet v1.5, as torchvision). Convolutions use explicit
symmetric padding so that outputs match torchvision pixel for pixel (Flax's "SAME" pads stride-2
convolutions asymmetrically).
"""

from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax.numpy as jnp

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
NORM_MODES = ("frozen", "batch", "sync")
BN_EPSILON = 1e-5  # Added to the variance, as torch's BatchNorm2d/FrozenBatchNorm2d default.


def make_norm(mode: str, train: bool, axis_name: str | None, dtype) -> Callable[..., nn.Module]:
    """Returns a BatchNorm constructor for one of `NORM_MODES`.

    "frozen" always uses the stored statistics (its scale and bias are excluded from training by
    the optimizer); "batch" uses per-replica batch statistics when training; "sync" averages the
    statistics over `axis_name` (cross-replica BN) when training.
    """
    if mode not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {mode!r}")
    use_running_average = mode == "frozen" or not train
    return partial(
        nn.BatchNorm,
        use_running_average=use_running_average,
        momentum=0.9,
        epsilon=BN_EPSILON,
        dtype=dtype,
        axis_name=axis_name if (mode == "sync" and train) else None,
    )


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None, dtype=jnp.float32):
    """A bias-free convolution with torchvision's symmetric padding `kernel // 2`."""
    pad = kernel // 2
    return nn.Conv(
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
    1×1 projection shortcut when the shape changes."""

    features: int
    stride: int
    norm: Callable[..., nn.Module]
    bottleneck: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.bottleneck:
            out = self.features * 4
            layers = ((self.features, 1, 1), (self.features, 3, self.stride), (out, 1, 1))
        else:
            out = self.features
            layers = ((out, 3, self.stride), (out, 3, 1))
        y = x
        for i, (width, kernel, stride) in enumerate(layers, start=1):
            y = conv(width, kernel, stride, f"conv{i}", self.dtype)(y)
            y = self.norm(name=f"bn{i}")(y)
            if i < len(layers):
                y = nn.relu(y)
        residual = x
        if residual.shape != y.shape:
            residual = conv(out, 1, self.stride, "downsample_conv", self.dtype)(x)
            residual = self.norm(name="downsample_bn")(residual)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet trunk returning the stage outputs C2–C5.

    Input `images [B, H, W, 3]`; output `{"C2": [B, H/4, W/4, c], ..., "C5": [B, H/32, W/32, 8c]}`
    (sizes rounded up), c = 64 (basic blocks) or 256 (bottlenecks).
    """

    depth: int = 50
    norm: str = "frozen"
    axis_name: str | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        if self.depth not in STAGE_BLOCKS:
            raise ValueError(
                f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}"
            )
        norm = make_norm(self.norm, train, self.axis_name, self.dtype)
        x = conv(64, 7, 2, "stem_conv", self.dtype)(images.astype(self.dtype))
        x = nn.relu(norm(name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        outputs = {}
        for stage, num_blocks in enumerate(STAGE_BLOCKS[self.depth]):
            for block in range(num_blocks):
                stride = 2 if (stage > 0 and block == 0) else 1
                x = ResidualBlock(
                    64 * 2**stage,
                    stride,
                    norm,
                    bottleneck=self.depth >= 50,
                    dtype=self.dtype,
                    name=f"res{stage + 2}_{block}",
                )(x)
            outputs[f"C{stage + 2}"] = x
        return outputs
