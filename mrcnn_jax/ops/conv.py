"""2-D convolution whose kernel gradient is a sum of matmuls on CPU (every conv layer uses it).

XLA:CPU computes the gradient of `lax.conv_general_dilated` with respect to its kernel as a
convolution whose window is the whole output map, 5-20x slower than the forward convolution on
the project's 2-core CPU (ResNet/FPN/mask-head layer shapes; `scripts/benchmark.py conv`), where
the input gradient costs about one forward. Written out per kernel tap `(i, j)`, the kernel
gradient is a matmul,

    dW[i, j] = sum over (b, y, x) of  X_pad[b, s*y + i, s*x + j, :]^T  dY[b, y, x, :]   ([C, O]),

so `conv_general_dilated` here computes the forward and the input gradient as XLA does and, on
CPU, the kernel gradient as those `kh * kw` matmuls over strided slices of the padded input (one
matmul over all taps, im2col, for maps of at most `_IM2COL_MAX_PIXELS` pixels, where the slices'
overhead dominates). On other backends (GPU, TPU), whose convolution gradients are fast, it is
`lax.conv_general_dilated` itself. Results equal XLA's up to float rounding (summation order).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_IM2COL_MAX_PIXELS = 32 * 32  # kernel gradient over all taps in one matmul up to this map size
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
) -> jax.Array:
    """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`, 2-D NHWC only.

    Args:
      lhs: `[B, H, W, C]` inputs.
      rhs: `[kh, kw, C, O]` kernel.
      window_strides: `(sh, sw)`.
      padding: `((top, bottom), (left, right))` non-negative, or `"SAME"` / `"VALID"`.
      lhs_dilation, rhs_dilation, feature_group_count: must be the defaults (no dilation, one
        group): the layers of this project use none.
      dimension_numbers: NHWC / HWIO / NHWC (what `nn.Conv` passes for 4-D inputs).
      precision: as `lax.conv_general_dilated`'s.

    Returns:
      `[B, H', W', O]`, as `lax.conv_general_dilated`.
    """
    if lhs.ndim != 4 or rhs.ndim != 4:
        raise ValueError(f"conv_general_dilated is 2-D: got lhs {lhs.shape}, rhs {rhs.shape}")
    dimension_numbers = lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, dimension_numbers or _DIMENSION_NUMBERS
    )
    if dimension_numbers != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS):
        raise ValueError(f"conv_general_dilated needs NHWC/HWIO/NHWC, got {dimension_numbers}")
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        raise ValueError("conv_general_dilated supports no dilation")
    if feature_group_count != 1:
        raise ValueError(f"conv_general_dilated supports one group, got {feature_group_count}")
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if any(p < 0 for pair in padding for p in pair):
        raise ValueError(f"conv_general_dilated needs non-negative padding, got {padding}")
    strides = tuple(int(s) for s in window_strides)
    if jax.default_backend() != "cpu":
        return _conv(lhs, rhs, strides, padding, precision)
    return _conv_matmul_kernel_grad(lhs, rhs, strides, padding, precision)


def _conv(lhs, rhs, strides, padding, precision):
    return lax.conv_general_dilated(
        lhs, rhs, strides, padding, dimension_numbers=_DIMENSION_NUMBERS, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_kernel_grad(lhs, rhs, strides, padding, precision):
    return _conv(lhs, rhs, strides, padding, precision)


def _forward(lhs, rhs, strides, padding, precision):
    return _conv(lhs, rhs, strides, padding, precision), (lhs, rhs)


def _backward(strides, padding, precision, residuals, cotangent):
    lhs, rhs = residuals
    _, input_vjp = jax.vjp(lambda x: _conv(x, rhs, strides, padding, precision), lhs)
    (d_lhs,) = input_vjp(cotangent)
    d_rhs = kernel_gradient(lhs, cotangent, rhs.shape[:2], strides, padding, precision)
    return d_lhs, d_rhs.astype(rhs.dtype)


_conv_matmul_kernel_grad.defvjp(_forward, _backward)


def kernel_gradient(
    lhs: jax.Array,
    cotangent: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    precision=None,
) -> jax.Array:
    """The gradient `[kh, kw, C, O]` of a conv's kernel, as matmuls (see the module docstring).

    `lhs [B, H, W, C]` the conv's input, `cotangent [B, H', W', O]` that of its output. Float32
    accumulation and result (the caller casts it to the kernel's dtype).
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    _, ho, wo, _ = cotangent.shape
    padded = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    taps = [
        padded[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    product = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)
    if len(taps) == 1 or ho * wo > _IM2COL_MAX_PIXELS:
        grad = jnp.stack([product("bhwc,bhwo->co", tap, cotangent) for tap in taps])
    else:
        grad = product("bhwkc,bhwo->kco", jnp.stack(taps, axis=3), cotangent)
    return grad.reshape(kh, kw, *grad.shape[1:])
