"""2-D convolution with fast CPU gradients and Winograd 3x3 layers (every conv layer uses it).

XLA:CPU computes the gradient of `lax.conv_general_dilated` with respect to its kernel as a
convolution whose window is the whole output map, 5-20x slower than the forward convolution on
the project's 2-core CPU (ResNet/FPN/mask-head layer shapes; `scripts/benchmark.py conv`), where
the input gradient costs about one forward. Written out per kernel tap `(i, j)`, the kernel
gradient is a matmul,

    dW[i, j] = sum over (b, y, x) of  X_pad[b, s*y + i, s*x + j, :]^T  dY[b, y, x, :]   ([C, O]),

so `conv_general_dilated` here computes the forward and the input gradient as XLA does and, on
CPU, the kernel gradient as those `kh * kw` matmuls over strided slices of the padded input (one
matmul over all taps, im2col, for maps of at most `_IM2COL_MAX_PIXELS` pixels, where the slices'
overhead dominates).

The 3x3 stride-1 layers (FPN outputs, RPN head, mask head, ResNet's 3x3 convs: float32, at
least `_WINOGRAD_MIN_CHANNELS` channels in and out, `_WINOGRAD_MIN_PIXELS` output pixels, and
below `_WINOGRAD_WIDE_CHANNELS` channels only small inputs; `uses_winograd`) run on CPU as
Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016): each 4x4 input tile `d` (stride 2) and the kernel `g` are transformed,
`V = B^T d B`, `U = G g G^T`, multiplied channel-wise as 16 matmuls `M[r, s] = V[r, s] @ U[r, s]`
(2.25x fewer multiplications than the direct convolution), and each 2x2 output tile is
`A^T M A`. The input gradient is the same algorithm on the cotangent with
the kernel flipped (a stride-1 "same" 3x3 convolution transposed is one), and the kernel
gradient is the algorithm transposed: `dU[r, s] = V[r, s]^T (A dY A^T)[r, s]`, `dW = G^T dU G`.

On other backends (GPU, TPU), whose convolutions and gradients are fast, it is
`lax.conv_general_dilated` itself. The path is chosen per platform when the program is lowered
(`lax.platform_dependent`), so a program exported for several platforms (`scripts/export.py
--platforms=cpu,cuda,tpu`) runs each platform's own. The forward and the backward choose apart
(one custom VJP), so that differentiating a layer never differentiates a conditional: tracing
the R50 train step takes ~0.4 s less (3.7 s instead of 4.1 s on the project's CPU). Results
equal XLA's up to float rounding (summation order; Winograd's transforms add a relative error of
about 2e-6 in float32).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_IM2COL_MAX_PIXELS = 32 * 32  # kernel gradient over all taps in one matmul up to this map size
_WINOGRAD_MIN_CHANNELS = 32  # below, the tile transforms cost more than the matmuls save
_WINOGRAD_WIDE_CHANNELS = 128  # from here on, Winograd wins at any map size above the minimum
_WINOGRAD_NARROW_MAX_INPUT = 2**21  # narrower layers win only up to this many input floats
_WINOGRAD_MIN_PIXELS = 2 * 32 * 32  # output pixels (B * H * W) below which XLA's conv is faster
# F(2x2, 3x3) (Lavin & Gray 2016): input transform B^T [4, 4], kernel G [4, 3], output A^T [2, 4].
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32)
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32)
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: lax.ConvGeneralDilatedDimensionNumbers | None = None,
    feature_group_count: int = 1,
    precision: lax.PrecisionLike = None,
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
    winograd = uses_winograd(lhs.shape, rhs.shape, strides, padding, lhs.dtype, rhs.dtype)
    return _conv_per_platform(lhs, rhs, strides, padding, precision, winograd)


def uses_winograd(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    lhs_dtype: jnp.dtype = jnp.float32,
    rhs_dtype: jnp.dtype = jnp.float32,
) -> bool:
    """Whether a CPU convolution of these shapes runs as Winograd F(2x2, 3x3).

    3x3 kernel, stride 1, padding 1 on every side ("same"), float32, at least
    `_WINOGRAD_MIN_CHANNELS` input and output channels and `_WINOGRAD_MIN_PIXELS` output pixels
    (`B * H * W`); below `_WINOGRAD_WIDE_CHANNELS` channels only for inputs of fewer than
    `_WINOGRAD_NARROW_MAX_INPUT` floats (the ResNet-18 / 64-channel FPN layers of the shapes
    config, not R50's res2 at 512²): where `scripts/benchmark.py conv` measured it faster than
    XLA's convolution, forward and both gradients.
    """
    b, h, w, c = lhs_shape
    channels = min(c, rhs_shape[3])
    return bool(
        tuple(rhs_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(tuple(p) for p in padding) == ((1, 1), (1, 1))
        and jnp.dtype(lhs_dtype) == jnp.float32
        and jnp.dtype(rhs_dtype) == jnp.float32
        and channels >= _WINOGRAD_MIN_CHANNELS
        and b * h * w >= _WINOGRAD_MIN_PIXELS
        and (channels >= _WINOGRAD_WIDE_CHANNELS or b * h * w * c < _WINOGRAD_NARROW_MAX_INPUT)
    )


def _conv(lhs, rhs, strides, padding, precision):
    return lax.conv_general_dilated(
        lhs, rhs, strides, padding, dimension_numbers=_DIMENSION_NUMBERS, precision=precision
    )


def _platform_conv(lhs, rhs, strides, padding, precision, winograd):
    """The convolution: Winograd's on CPU where `winograd`, else XLA's."""
    if not winograd:
        return _conv(lhs, rhs, strides, padding, precision)
    return lax.platform_dependent(
        lhs,
        rhs,
        cpu=lambda lhs, rhs: _winograd_conv(lhs, rhs, precision),
        default=lambda lhs, rhs: _conv(lhs, rhs, strides, padding, precision),
    )


# The path is chosen per platform in the forward and in the backward apart, so that
# differentiating a layer never differentiates a conditional.
_conv_per_platform = jax.custom_vjp(_platform_conv, nondiff_argnums=(2, 3, 4, 5))


def _forward(lhs, rhs, strides, padding, precision, winograd):
    return _platform_conv(lhs, rhs, strides, padding, precision, winograd), (lhs, rhs)


def _backward(strides, padding, precision, winograd, residuals, cotangent):
    lhs, rhs = residuals
    if winograd:
        cpu = lambda lhs, rhs, cotangent: _winograd_backward(lhs, rhs, cotangent, precision)
    else:
        cpu = lambda lhs, rhs, cotangent: _matmul_kernel_grad_backward(
            lhs, rhs, cotangent, strides, padding, precision
        )
    xla = lambda lhs, rhs, cotangent: jax.vjp(
        lambda x, w: _conv(x, w, strides, padding, precision), lhs, rhs
    )[1](cotangent)
    return lax.platform_dependent(lhs, rhs, cotangent, cpu=cpu, default=xla)


_conv_per_platform.defvjp(_forward, _backward)


def _matmul_kernel_grad_backward(lhs, rhs, cotangent, strides, padding, precision):
    """XLA's input gradient and `kernel_gradient`'s (CPU)."""
    _, input_vjp = jax.vjp(lambda x: _conv(x, rhs, strides, padding, precision), lhs)
    (d_lhs,) = input_vjp(cotangent)
    d_rhs = kernel_gradient(lhs, cotangent, rhs.shape[:2], strides, padding, precision)
    return d_lhs, d_rhs.astype(rhs.dtype)


def kernel_gradient(
    lhs: jax.Array,
    cotangent: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    precision: lax.PrecisionLike = None,
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


def _combine(matrix: np.ndarray, terms: list) -> list:
    """`[sum_a matrix[r, a] * terms[a] for each row r]`, skipping zero coefficients."""
    rows = []
    for coefficients in matrix:
        total = None
        for coefficient, term in zip(coefficients.tolist(), terms):
            if coefficient == 0:
                continue
            term = term if coefficient == 1 else -term if coefficient == -1 else coefficient * term
            total = term if total is None else total + term
        rows.append(total)
    return rows


def _winograd_input_tiles(x: jax.Array) -> list[list[jax.Array]]:
    """`V = B^T d B` of every 4x4 tile `d` of `x [B, H, W, C]` padded by 1 (tiles at stride 2).

    Returns `V[r][s]`, each `[B, ceil(H / 2), ceil(W / 2), C]` (odd sizes: one more zero row or
    column at the bottom/right, whose outputs are cropped).
    """
    _, h, w, _ = x.shape
    th, tw = -(-h // 2), -(-w // 2)
    padded = jnp.pad(x, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - w + 1), (0, 0)))
    d = [[padded[:, a : a + 2 * th : 2, b : b + 2 * tw : 2] for b in range(4)] for a in range(4)]
    columns = [_combine(_WINOGRAD_BT, [d[a][b] for a in range(4)]) for b in range(4)]
    return [_combine(_WINOGRAD_BT, [columns[b][r] for b in range(4)]) for r in range(4)]


def _winograd_conv(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    """`x [B, H, W, C]` conv `w [3, 3, C, O]`, stride 1, padding 1: `[B, H, W, O]` (float32)."""
    b, h, width, _ = x.shape
    v = _winograd_input_tiles(x)
    u = jnp.einsum("ra,abco,sb->rsco", _WINOGRAD_G, w, _WINOGRAD_G, precision=precision)
    m = [
        [jnp.einsum("bhwc,co->bhwo", v[r][s], u[r, s], precision=precision) for s in range(4)]
        for r in range(4)
    ]
    columns = [_combine(_WINOGRAD_AT, [m[r][s] for r in range(4)]) for s in range(4)]
    y = [_combine(_WINOGRAD_AT, [columns[s][i] for s in range(4)]) for i in range(2)]
    y = jnp.stack([jnp.stack(y[i], axis=3) for i in range(2)], axis=2)  # [B, th, 2, tw, 2, O]
    return y.reshape(b, 2 * y.shape[1], 2 * y.shape[3], -1)[:, :h, :width]


def _winograd_kernel_gradient(x: jax.Array, cotangent: jax.Array, precision) -> jax.Array:
    """`dW [3, 3, C, O]` of `_winograd_conv(x, w)` for the output cotangent `[B, H, W, O]`."""
    _, h, w, _ = cotangent.shape
    th, tw = -(-h // 2), -(-w // 2)
    padded = jnp.pad(cotangent, ((0, 0), (0, 2 * th - h), (0, 2 * tw - w), (0, 0)))
    phases = [[padded[:, i::2, j::2] for j in range(2)] for i in range(2)]
    columns = [_combine(_WINOGRAD_AT.T, [phases[i][j] for i in range(2)]) for j in range(2)]
    dm = [_combine(_WINOGRAD_AT.T, [columns[j][r] for j in range(2)]) for r in range(4)]
    v = _winograd_input_tiles(x)
    du = jnp.einsum(
        "kbhwc,kbhwo->kco",
        jnp.stack([v[r][s] for r in range(4) for s in range(4)]),
        jnp.stack([dm[r][s] for r in range(4) for s in range(4)]),
        precision=precision,
    ).reshape(4, 4, x.shape[-1], cotangent.shape[-1])
    return jnp.einsum("ra,sb,rsco->abco", _WINOGRAD_G, _WINOGRAD_G, du, precision=precision)


def _winograd_backward(lhs, rhs, cotangent, precision):
    """Both gradients of `_winograd_conv(lhs, rhs)` (CPU)."""
    flipped = rhs[::-1, ::-1].transpose(0, 1, 3, 2)  # a "same" 3x3 conv's transpose
    d_lhs = _winograd_conv(cotangent, flipped, precision)
    return d_lhs, _winograd_kernel_gradient(lhs, cotangent, precision)
