"""Feature Pyramid Network (Lin et al., 2017) over ResNet stages C2–C5, NHWC."""

import flax.linen as nn
import jax.numpy as jnp

from mrcnn_jax.modeling.resnet import make_norm


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
    """

    dim: int = 256
    dtype: jnp.dtype = jnp.float32
    norm: str | None = None
    axis_name: str | None = None

    @nn.compact
    def __call__(
        self, features: dict[str, jnp.ndarray], train: bool = False
    ) -> dict[str, jnp.ndarray]:
        norm = make_norm(self.norm, train, self.axis_name, self.dtype) if self.norm else None

        def conv(x: jnp.ndarray, kernel: int, name: str) -> jnp.ndarray:
            pad = kernel // 2
            x = nn.Conv(
                self.dim,
                (kernel, kernel),
                padding=((pad, pad), (pad, pad)),
                use_bias=norm is None,
                dtype=self.dtype,
                name=name,
            )(x)
            return x if norm is None else norm(name=f"{name}_bn")(x)

        levels = (2, 3, 4, 5)
        laterals = {lvl: conv(features[f"C{lvl}"], 1, f"lateral{lvl}") for lvl in levels}
        outputs = {}
        top_down = laterals[5]
        for lvl in reversed(levels):
            if lvl < 5:
                lateral = laterals[lvl]
                top_down = lateral + resize_nearest(top_down, *lateral.shape[1:3])
            outputs[f"P{lvl}"] = conv(top_down, 3, f"output{lvl}")
        outputs["P6"] = outputs["P5"][:, ::2, ::2]
        return dict(sorted(outputs.items()))
