"""Generic test-data makers shared by the tests (numpy references live in `references.py`)."""

import contextlib
import functools
import importlib.util
import math
import os
import types
from collections.abc import Iterator

import jax
import numpy as np
import pytest


def random_boxes(
    rng: np.random.Generator, n: int, extent=64.0, min_wh=2.0, max_wh=30.0
) -> np.ndarray:
    """[n, 4] float32 (x1, y1, x2, y2) boxes: top-left uniform in [0, extent), width and height
    uniform in [min_wh, max_wh) (two draws of `rng`: the corners, then the sizes)."""
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(min_wh, max_wh, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def synthetic_batch(config, rng: np.random.Generator, num_objects) -> dict:
    """A train batch (CONTRACTS.md keys) with `num_objects[b]` random boxes+masks in image b."""
    b, (h, w) = len(num_objects), config.data.image_size
    m, s = config.data.max_instances, config.data.mask_size
    batch = {
        "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "image_size": np.tile(np.array([h, w], np.int32), (b, 1)),
        "gt_boxes": np.zeros((b, m, 4), np.float32),
        "gt_classes": np.full((b, m), -1, np.int32),
        "gt_valid": np.zeros((b, m), bool),
        "gt_masks": np.zeros((b, m, s, s), np.uint8),
    }
    for i, n in enumerate(num_objects):
        for j in range(n):
            x1, y1 = rng.uniform(0, 0.6 * w), rng.uniform(0, 0.6 * h)
            bw, bh = rng.uniform(6, 0.4 * w), rng.uniform(6, 0.4 * h)
            batch["gt_boxes"][i, j] = [x1, y1, x1 + bw, y1 + bh]
            batch["gt_classes"][i, j] = rng.integers(config.model.num_classes)
            batch["gt_valid"][i, j] = True
            batch["gt_masks"][i, j] = rng.uniform(size=(s, s)) > 0.3
    return batch


def loss_gradient_fn(model, model_config, batch_stats, roi_keys, rpn_keys):
    """Jitted `(params, batch) -> (grads, (losses, new batch_stats, outputs.mask_valid))` of
    `mask_rcnn_losses` over `model` in training (fixed RoI-sampling and RPN-sampling keys)."""
    from mrcnn_jax.train.losses import mask_rcnn_losses

    def loss_fn(params, batch):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch, train=True, keys=roi_keys, mutable=["batch_stats"],
        )  # fmt: skip
        losses = mask_rcnn_losses(outputs, batch, rpn_keys, model_config)
        return losses["loss"], (losses, updates["batch_stats"], outputs.mask_valid)

    return jax.jit(jax.grad(loss_fn, has_aux=True))


def random_variables(module, rng: np.random.Generator, *args, **kwargs):
    """Variables of `module.init(key, *args, **kwargs)` filled from numpy, plus their abstract
    shapes/dtypes as `init` makes them.

    Jitting `init` mostly compiles the threefry draws (tens of seconds on 2 CPU cores), so the
    structure comes from `jax.eval_shape` and the values from `rng`: LeCun-normal kernels, small
    random biases/offsets/means, scales and variances around 1."""
    abstract = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("kernel", "predictor_kernel"):
            std = math.sqrt(1 / math.prod(leaf.shape[:-1]))
            return rng.normal(0, std, leaf.shape).astype(leaf.dtype)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        return rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract), abstract


def oihw_to_hwio(weight) -> np.ndarray:
    """A torch conv weight [out, in, h, w] as a Flax kernel [h, w, in, out]."""
    return weight.detach().numpy().transpose(2, 3, 1, 0)


def to_torch_nchw(x):
    """An NHWC array as an NCHW torch tensor (skips the test without torch)."""
    torch = pytest.importorskip("torch")
    return torch.as_tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())


def from_torch_nchw(x) -> np.ndarray:
    """An NCHW torch tensor as an NHWC numpy array."""
    return x.detach().numpy().transpose(0, 2, 3, 1)


def resize_config(image_size=(1344, 1344), short=800, long=1333, divisibility=32):
    """A config of just what the resize rule reads: torchvision's (short, long) rule into an
    `image_size` canvas, identity normalisation, no augmentation."""
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "data": {
                "image_size": image_size,
                "mean": (0.0, 0.0, 0.0),
                "std": (1.0, 1.0, 1.0),
                "resize_short_side": short,
                "resize_max_long_side": long,
                "train_short_sides": (),
                "hflip": False,
                "scale_jitter": (1.0, 1.0),
                "resize_antialias": False,
            },
            "model": {"size_divisibility": divisibility},
        }
    )


def write_sideways_jpeg(path, image: np.ndarray) -> None:
    """`image` as a JPEG whose EXIF orientation (6) tells viewers to turn it 90° clockwise, as
    phones store photos taken upright."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the 0th row is the visual right-hand side
    Image.fromarray(image).save(path, exif=exif, quality=95)


@contextlib.contextmanager
def backend_compiles() -> Iterator[list[float]]:
    """The durations of the XLA compilations in the block, as JAX reports them (a list that
    grows during the block)."""
    compiles = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@contextlib.contextmanager
def imported_script(name: str) -> Iterator[types.ModuleType]:
    """scripts/<name> imported (it defines its absl flags; nothing runs); its flags are removed
    from absl's global FLAGS afterwards, so that another script defining a flag of the same
    name (`batch_size`) can be imported later in the same process."""
    from absl import flags

    before = set(flags.FLAGS)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, "scripts", name)
    spec = importlib.util.spec_from_file_location(f"script_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
