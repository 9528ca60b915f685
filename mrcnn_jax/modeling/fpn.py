"""Feature Pyramid Network (Lin et al., 2017) over ResNet stages C2–C5, NHWC."""

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling.resnet import Conv, make_norm, mask_outside
from mrcnn_jax.ops.extent import extent_mask

# The pyramid levels the RPN runs on (one shared head, `model.anchor_sizes` one tuple each).
RPN_LEVELS = ("P2", "P3", "P4", "P5", "P6")
RPN_STRIDES = (4, 8, 16, 32, 64)


def resize_nearest(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """Nearest-neighbour resize of `x [B, h, w, C]` to `[B, height, width, C]`.

    Source index `floor(i * h / height)`, as PyTorch's `F.interpolate(mode="nearest")`.
    """
    h, w = x.shape[1:3]
    rows = (jnp.arange(height) * h) // height
    cols = (jnp.arange(width) * w) // width
    return x[:, rows][:, :, cols]


class FPN(nn.Module):
    """FPN with P6 for the RPN.

    Input `{"C2".."C5"}` features; output `{"P2": [B, H/4, W/4, dim], ...,
    "P5": [B, H/32, W/32, dim], "P6": [B, ceil(H/64), ceil(W/64), dim]}`: lateral 1×1 convs, a
    nearest-upsampling top-down path, 3×3 output convs, and P6 as the stride-2 subsampling of P5
    (torchvision's `LastLevelMaxPool`). With `norm` (a `resnet.NORM_MODES` value) every conv
    drops its bias and is followed by BatchNorm `<conv>_bn`, as torchvision's v2 FPN.

    With `valid_size [B, 2]` (each image's valid extent, `ops/extent.py`) the 3×3 convs' inputs
    and all outputs are zero outside the extents and BatchNorm statistics count valid pixels only.
    """

    dim: int = 256
    dtype: jnp.dtype = jnp.float32
    norm: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self,
        features: dict[str, jnp.ndarray],
        valid_size: jnp.ndarray | None = None,
        train: bool = False,
    ) -> dict[str, jnp.ndarray]:
        norm = make_norm(self.norm, train, self.axis_name, self.dtype) if self.norm else None

        def conv(x: jnp.ndarray, kernel: int, name: str, level: int) -> jnp.ndarray:
            pad = kernel // 2
            if kernel > 1:
                x = mask_outside(x, valid_size, 2**level)
            x = Conv(
                self.dim,
                (kernel, kernel),
                padding=((pad, pad), (pad, pad)),
                use_bias=norm is None,
                dtype=self.dtype,
                name=name,
            )(x)
            if norm is None:
                return x
            mask = None if valid_size is None else extent_mask(valid_size, *x.shape[1:3], 2**level)
            return norm(name=f"{name}_bn")(x, mask=mask)

        levels = (2, 3, 4, 5)
        laterals = {lvl: conv(features[f"C{lvl}"], 1, f"lateral{lvl}", lvl) for lvl in levels}
        outputs = {}
        top_down = laterals[5]
        for lvl in reversed(levels):
            if lvl < 5:
                lateral = laterals[lvl]
                top_down = lateral + resize_nearest(top_down, *lateral.shape[1:3])
            outputs[f"P{lvl}"] = mask_outside(
                conv(top_down, 3, f"output{lvl}", lvl), valid_size, 2**lvl
            )
        outputs["P6"] = outputs["P5"][:, ::2, ::2]
        return dict(sorted(outputs.items()))
