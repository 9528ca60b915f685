"""Each image's valid extent inside the static canvas, and masks of it at every feature stride.

torchvision and Detectron2 pad a batch to its largest image rounded up to `size_divisibility`
(32) and compute on that padded tensor; beyond it, convolutions see zeros. The static program
pads every image into one fixed canvas, so to compute the same function it tracks, per image,
the *valid extent* `E = roundup(content, size_divisibility)` and treats everything beyond it as
the reference treats the outside of its tensor: activations there are zeroed before they can
reach a valid position, anchors there do not exist, RoIAlign clamps at the extent. At feature
stride `s` the extent is `ceil(E / s)` (exact for s ≤ size_divisibility; P6's `ceil` is
torchvision's `max_pool2d(kernel 1, stride 2)` of P5).
"""

import jax.numpy as jnp


def valid_size(
    image_size: jnp.ndarray, size_divisibility: int, canvas: tuple[int, int]
) -> jnp.ndarray:
    """`[..., 2]` int32 (height, width) extents: `image_size` (the content) rounded up to
    `size_divisibility`, at most the `canvas` (H, W)."""
    d = size_divisibility
    rounded = (jnp.asarray(image_size, jnp.int32) + d - 1) // d * d
    return jnp.minimum(rounded, jnp.asarray(canvas, jnp.int32))


def feature_extent(valid: jnp.ndarray, stride: int) -> jnp.ndarray:
    """`[..., 2]` int32 extents at feature stride `stride`: `ceil(valid / stride)`."""
    return (valid + stride - 1) // stride


def extent_mask(valid: jnp.ndarray, height: int, width: int, stride: int) -> jnp.ndarray:
    """`[B, height, width, 1]` bool: True inside each image's extent at feature stride `stride`.

    Args:
      valid: `[B, 2]` int32 (height, width) extents in input pixels (`valid_size`).
      height, width: the feature map's (canvas) size.
    """
    extent = feature_extent(valid, stride)
    rows = jnp.arange(height)[None, :] < extent[:, :1]
    cols = jnp.arange(width)[None, :] < extent[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[..., None]
