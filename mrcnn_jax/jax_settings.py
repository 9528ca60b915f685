"""The JAX settings the library's programs are written for, whatever a session set globally.

A notebook may turn on `jax_enable_x64` or make `jax_numpy_rank_promotion` "raise" and
`jax_numpy_dtype_promotion` "strict" for its own code (or set them through the environment:
`JAX_ENABLE_X64=1`). The model, its losses and the pre- and post-processing are written for
JAX's defaults: under x64 some parameters and random draws became float64 (a checkpoint
refused as "float32, the config needs float64", a training whose draws differ), under the
strict settings the first broadcast failed. Every entry point (`load_checkpoint` and
`read_checkpoint`, the predictor's calls, `train_and_evaluate`, the SavedModel export, the
scripts) runs under `defaults()`, so these three settings do not reach it, and the session's
own are as they were afterwards. Other settings do (`jax_default_prng_impl` changes random draws,
`jax_default_matmul_precision` the arithmetic), and JAX's context settings hold in the calling
thread only: threads that the libraries start (orbax's checkpoint writes) see the session's.
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import jax

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def defaults() -> Iterator[None]:
    """JAX's default numerics inside the block: 32-bit defaults (x64 off), rank promotion
    allowed, standard dtype promotion."""
    with (
        jax.enable_x64(False),
        jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard"),
    ):
        yield


def with_defaults(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """`function` run under `defaults()`."""

    @functools.wraps(function)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with defaults():
            return function(*args, **kwargs)

    return wrapped
