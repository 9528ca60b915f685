"""Tests of mrcnn_jax.evaluation.masks against torchvision's paste_masks_in_image."""

import time

import numpy as np
import pytest
from pycocotools import mask as mask_util

from mrcnn_jax.evaluation import expand_boxes_to_pixels, paste_masks

H, W = 48, 64


def _random_boxes(rng, num, centre_range, log_size_range):
    """[num, 4] float32 boxes with uniform centres and log-uniform sides."""
    centres = rng.uniform(*centre_range, size=(num, 2))
    sizes = np.exp(rng.uniform(*np.log(log_size_range), size=(num, 2)))
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)


def _torchvision_paste(masks, boxes, image_size, threshold=0.5):
    torch = pytest.importorskip("torch")
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    pasted = roi_heads.paste_masks_in_image(
        torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), image_size
    )
    return pasted[:, 0].numpy() > threshold


def _torchvision_pixel_boxes(boxes, mask_size):
    torch = pytest.importorskip("torch")
    roi_heads = pytest.importorskip("torchvision.models.detection.roi_heads")
    scale = (mask_size + 2) / mask_size
    return roi_heads.expand_boxes(torch.from_numpy(boxes), scale).to(torch.int64).numpy()


def _touching_image(boxes, mask_size, image_size):
    """Rows whose pasted region overlaps the image (torchvision's paste fails on the others)."""
    pixel = _torchvision_pixel_boxes(boxes, mask_size)
    height, width = image_size
    return (pixel[:, 2] >= 0) & (pixel[:, 3] >= 0) & (pixel[:, 0] < width) & (pixel[:, 1] < height)


def test_expand_boxes_to_pixels_matches_torchvision():
    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 500, ((-30, -30), (90, 90)), (0.1, 80))
    for mask_size in (28, 14, 5):
        np.testing.assert_array_equal(
            expand_boxes_to_pixels(boxes, mask_size), _torchvision_pixel_boxes(boxes, mask_size)
        )


@pytest.mark.parametrize(
    "case, centre_range, size_range",
    [
        ("inside", ((8, 8), (W - 8, H - 8)), (4, 30)),
        ("partly_outside", ((-10, -10), (W + 10, H + 10)), (5, 60)),
        ("sub_pixel", ((0, 0), (W, H)), (0.01, 1.5)),
        ("huge", ((-20, -20), (W + 20, H + 20)), (100, 400)),
        ("mixed", ((-40, -40), (W + 40, H + 40)), (0.05, 300)),
    ],
)
def test_paste_masks_matches_torchvision(case, centre_range, size_range):
    rng = np.random.default_rng(len(case))
    boxes = _random_boxes(rng, 150, centre_range, size_range)
    boxes = boxes[_touching_image(boxes, 28, (H, W))][:60]
    masks = rng.random((len(boxes), 28, 28), dtype=np.float32)
    out = paste_masks(masks, boxes, (H, W))
    assert out.shape == (len(boxes), H, W) and out.dtype == bool
    np.testing.assert_array_equal(out, _torchvision_paste(masks, boxes, (H, W)))


def test_paste_masks_smooth_masks_other_sizes_and_threshold():
    """Smooth blobs (many pixels near the threshold), non-28 mask sizes and another threshold."""
    rng = np.random.default_rng(1)
    for mask_size, threshold in ((28, 0.5), (14, 0.3), (3, 0.7)):
        grid = (np.arange(mask_size) + 0.5) / mask_size
        centre = rng.uniform(0.3, 0.7, size=(40, 2, 1, 1))
        masks = np.exp(-((grid[None, :, None] - centre[:, 0]) ** 2
                         + (grid[None, None, :] - centre[:, 1]) ** 2) * 8).astype(np.float32)
        boxes = _random_boxes(rng, 40, ((0, 0), (W, H)), (2, 70))
        keep = _touching_image(boxes, mask_size, (H, W))
        masks, boxes = masks[keep], boxes[keep]
        np.testing.assert_array_equal(
            paste_masks(masks, boxes, (H, W), threshold=threshold),
            _torchvision_paste(masks, boxes, (H, W), threshold=threshold),
        )


def test_paste_masks_probability_equal_to_threshold_is_background():
    rng = np.random.default_rng(5)
    masks = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=(30, 28, 28))
    masks[:10] = 0.5
    boxes = _random_boxes(rng, 30, ((10, 10), (W - 10, H - 10)), (10, 40))
    out = paste_masks(masks, boxes, (H, W))
    assert not out[:10].any()
    np.testing.assert_array_equal(out, _torchvision_paste(masks, boxes, (H, W)))


def test_paste_masks_boxes_outside_image_are_empty():
    rng = np.random.default_rng(2)
    boxes = np.array(
        [[W + 5, 10, W + 30, 30], [-40, 5, -10, 20], [5, -50, 30, -8], [10, H + 2, 20, H + 9],
         [10.0, 10.0, 30.0, 30.0]],
        dtype=np.float32,
    )
    masks = np.ones((len(boxes), 28, 28), dtype=np.float32)
    out = paste_masks(masks, boxes, (H, W))
    assert not out[:4].any()
    assert out[4].any() and out[4].sum() == _torchvision_paste(masks[4:], boxes[4:], (H, W)).sum()
    np.testing.assert_array_equal(
        paste_masks(rng.random((4, 28, 28), dtype=np.float32), boxes[:4], (H, W)), out[:4]
    )


def test_paste_masks_full_box_covers_its_pixels():
    """An all-ones mask over a box far larger than the image fills the image, cheaply."""
    masks = np.ones((2, 28, 28), dtype=np.float32)
    boxes = np.array([[-1e6, -1e6, 1e6, 1e6], [10.0, 20.0, 30.0, 40.0]], dtype=np.float32)
    out = paste_masks(masks, boxes, (H, W))
    assert out[0].all()
    # Expanded box [9.29.., 19.29.., 30.71.., 40.71..] -> pixels 9..30 x 19..40; the resized
    # padded map is above 0.5 on all but its outermost ring of pixels.
    expected = np.zeros((H, W), dtype=bool)
    expected[20:40, 10:30] = True
    np.testing.assert_array_equal(out[1], expected)


def test_paste_masks_no_detections():
    out = paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (H, W))
    assert out.shape == (0, H, W) and out.dtype == bool


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
def test_paste_masks_layout_encodes_with_pycocotools():
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 5, ((10, 10), (50, 40)), (5, 30))
    out = paste_masks(rng.random((5, 28, 28), dtype=np.float32), boxes, (H, W))
    assert out.transpose(1, 2, 0).flags.f_contiguous
    rles = mask_util.encode(out.transpose(1, 2, 0).view(np.uint8))
    np.testing.assert_array_equal(mask_util.decode(rles).transpose(2, 0, 1), out)


def test_paste_masks_is_fast_for_100_detections_on_a_large_image():
    rng = np.random.default_rng(4)
    boxes = _random_boxes(rng, 100, ((0, 0), (1333, 800)), (10, 2000))
    masks = rng.random((100, 28, 28), dtype=np.float32)
    start = time.perf_counter()
    out = paste_masks(masks, boxes, (800, 1333))
    assert time.perf_counter() - start < 3.0
    assert out.shape == (100, 800, 1333)


@pytest.mark.parametrize(
    "masks, boxes, image_size, match",
    [
        (np.zeros((2, 28, 14)), np.zeros((2, 4)), (H, W), "masks"),
        (np.zeros((28, 28)), np.zeros((1, 4)), (H, W), "masks"),
        (np.zeros((2, 28, 28)), np.zeros((3, 4)), (H, W), "boxes"),
        (np.zeros((1, 28, 28)), np.array([[0, 0, np.nan, 5]]), (H, W), "finite"),
        (np.zeros((1, 28, 28)), np.zeros((1, 4)), (0, W), "image_size"),
    ],
)
def test_paste_masks_rejects_bad_inputs(masks, boxes, image_size, match):
    with pytest.raises(ValueError, match=match):
        paste_masks(masks, boxes, image_size)
