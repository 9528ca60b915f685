"""The input arithmetic equals torchvision's `GeneralizedRCNNTransform` exactly: the resized size of
every image (a sweep of natural photo sizes), the resized pixels, the ground-truth boxes scaled
into the resized image, and the detections scaled back to the original (`postprocess`).

torchvision computes `scale = min(min_size / min(h, w), max_size / max(h, w))` in Python floats and
lets `F.interpolate(scale_factor=scale, recompute_scale_factor=True)` floor `size * scale`; the
resampling then uses the output/input ratio of each axis (bilinear, half-pixel, no antialiasing).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")  # before tensorflow (see conftest.py)
import tensorflow as tf  # noqa: E402
from helpers import resize_config  # noqa: E402
from torchvision.models.detection import transform as tv_transform  # noqa: E402

from mrcnn_jax.data import pipeline  # noqa: E402
from mrcnn_jax.evaluation.coco_eval import boxes_to_original  # noqa: E402

# Natural photo sizes (COCO's most common ones and their transposes) beside the sweeps.
PHOTO_SIZES = (
    (300, 451), (640, 480), (480, 640), (427, 640), (640, 427), (400, 600), (333, 500),
    (500, 333), (612, 612), (375, 500), (480, 360), (424, 640), (512, 683), (1000, 900),
)  # fmt: skip


def _torchvision(min_size: int, max_size: int) -> tv_transform.GeneralizedRCNNTransform:
    return tv_transform.GeneralizedRCNNTransform(
        min_size=min_size, max_size=max_size, image_mean=[0.0] * 3, image_std=[1.0] * 3
    ).eval()


def _torchvision_sizes(transform, sizes) -> np.ndarray:
    """[N, 2] (height, width) torchvision's `resize` gives images of `sizes` (one channel: the
    output size does not depend on the channels, and it is 3× cheaper)."""
    with torch.no_grad():
        return np.array([transform.resize(torch.zeros(1, h, w))[0].shape[-2:] for h, w in sizes])


def _our_sizes(config, sizes) -> np.ndarray:
    """[N, 2] (height, width) of the un-jittered resize of the pipeline for images of `sizes`."""
    seed = tf.zeros([2], tf.int64)

    @tf.function
    def resized(hw):
        return tf.map_fn(
            lambda x: pipeline._augmentation(seed, x[0], x[1], config.data, train=False)[1], hw
        )

    return resized(tf.constant(sizes, tf.int32)).numpy()


def _sweep(step: int) -> list[tuple[int, int]]:
    sides = range(100, 1001, step)
    return [(h, w) for h in sides for w in sides] + list(PHOTO_SIZES)


def _check_sizes(config, transform, sizes) -> None:
    ours, reference = _our_sizes(config, sizes), _torchvision_sizes(transform, sizes)
    differ = np.flatnonzero((ours != reference).any(axis=1))
    print(f"{len(sizes) - len(differ)} of {len(sizes)} resized sizes equal torchvision's")
    assert not len(differ), [(sizes[i], ours[i], reference[i]) for i in differ[:10]]


@pytest.mark.parametrize("step", [30, pytest.param(7, marks=pytest.mark.slow)])
def test_resized_sizes_equal_torchvision(step):
    """h, w in 100..1000 (every 30th; every 7th with -m slow, 16641 sizes) and natural photo
    sizes, at torchvision's min_size=800, max_size=1333. Rounding instead of flooring differs
    on about half of them (300×451: 1203 vs 1202 wide; 640×480: 1067 vs 1066)."""
    sizes = _sweep(step)
    _check_sizes(resize_config(), _torchvision(800, 1333), sizes)
    ours = dict(zip(sizes, map(tuple, _our_sizes(resize_config(), sizes))))
    assert ours[(300, 451)] == (800, 1202) and ours[(640, 480)] == (1066, 800)
    assert ours[(427, 640)] == (800, 1199) and ours[(400, 600)] == (800, 1200)


def test_fit_mode_equals_torchvision_with_the_canvas_as_both_sizes():
    """resize_short_side = 0 into a square canvas C is torchvision's min_size = max_size = C."""
    sizes = [*_sweep(45), (49, 30), (98, 49), (64, 103)]  # (512 / h) * h < 512 for these
    fit = resize_config(image_size=(512, 512), short=0, long=0)
    _check_sizes(fit, _torchvision(512, 512), sizes)


@pytest.mark.parametrize("size", (*PHOTO_SIZES[:8], (1000, 900)))
def test_resized_pixels_equal_torchvision(size):
    """Our eval input (resize the uint8 image, then normalise) is torchvision's (normalise, then
    interpolate), here with mean 0 / std 1: the same output size, sampling grid and weights.

    The pixels agree to float32 rounding of the source coordinate `(x + 0.5) * in / out - 0.5`,
    which torch rounds once (as a fused multiply-add) and tf.image.resize twice: up to 1 ulp of
    the coordinate times the step between neighbours, measured ≤ 7.6e-3 on 0-255 pixels (3e-5
    relative), while each is up to 1.6e-2 from the float64 value. Exact at integer ratios."""
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = pipeline.preprocess_image(image, resize_config())
    h, w = (int(v) for v in ours["image_size"])
    with torch.no_grad():
        tensor = torch.from_numpy(image).permute(2, 0, 1).float()
        images, _ = _torchvision(800, 1333)([tensor])
        direct = torch.nn.functional.interpolate(
            tensor[None],
            scale_factor=min(800 / min(size), 1333 / max(size)),
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
    assert images.image_sizes[0] == (h, w) == tuple(direct.shape[-2:])
    reference = images.tensors[0, :, :h, :w].permute(1, 2, 0).numpy()
    error = np.abs(ours["image"][:h, :w] - reference).max()
    print(f"{size} -> {(h, w)}: max |ours - torchvision| = {error:.2e} (0-255 pixels)")
    assert error <= 1e-2
    np.testing.assert_array_equal(reference, direct.permute(1, 2, 0).numpy())
    assert not ours["image"][h:].any() and not ours["image"][:, w:].any()


@pytest.mark.parametrize("size", PHOTO_SIZES[:6])
def test_boxes_scale_like_torchvision_resize_boxes(size):
    """Ground truth into the resized image (pipeline) and detections back to the original
    (`boxes_to_original`) use torchvision's per-axis float32 ratios: bit-identical boxes."""
    rng = np.random.default_rng(size[0])
    height, width = size
    corners = rng.uniform(0, 1, (50, 2, 2)) * [width, height]
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1).astype(np.float32)
    resized = tuple(int(s) for s in _our_sizes(resize_config(), [size])[0])

    ratios = pipeline._ratios(tf.constant(resized), tf.constant(height), tf.constant(width))
    ours = pipeline._transform_boxes(
        tf.constant(boxes), tf.constant(False), ratios, tf.zeros([2], tf.int32), width, resized
    ).numpy()
    reference = tv_transform.resize_boxes(torch.from_numpy(boxes), size, resized).numpy()
    np.testing.assert_array_equal(ours, np.clip(reference, 0, [*resized[::-1]] * 2))

    detections = (boxes * np.tile([resized[1] / width, resized[0] / height], 2)).astype(np.float32)
    back = _torchvision(800, 1333).postprocess(
        [{"boxes": torch.from_numpy(detections)}], [resized], [size]
    )[0]["boxes"]
    np.testing.assert_array_equal(boxes_to_original(detections, resized, size), back.numpy())
