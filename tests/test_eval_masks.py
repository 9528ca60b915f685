"""Tests of mrcnn_jax.evaluation.masks: both pastes against numpy ports of their references
(torchvision's `paste_masks_in_image`, Detectron2's `_do_paste_mask` with `F.grid_sample`) and, when
torch is installed, against the references themselves."""

import numpy as np
import pytest
from pycocotools import mask as mask_util

from mrcnn_jax.evaluation import expand_boxes_to_pixels, paste_masks
from mrcnn_jax.evaluation.masks import PASTE_METHODS

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
        masks = np.exp(
            -((grid[None, :, None] - centre[:, 0]) ** 2 + (grid[None, None, :] - centre[:, 1]) ** 2)
            * 8
        ).astype(np.float32)
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
        [
            [W + 5, 10, W + 30, 30],
            [-40, 5, -10, 20],
            [5, -50, 30, -8],
            [10, H + 2, 20, H + 9],
            [10.0, 10.0, 30.0, 30.0],
        ],
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


@pytest.mark.parametrize("method", PASTE_METHODS)
def test_paste_masks_no_detections(method):
    out = paste_masks(
        np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (H, W), method=method
    )
    assert out.shape == (0, H, W) and out.dtype == bool


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools
@pytest.mark.parametrize("method", PASTE_METHODS)
def test_paste_masks_layout_encodes_with_pycocotools(method):
    rng = np.random.default_rng(3)
    boxes = _random_boxes(rng, 5, ((10, 10), (50, 40)), (5, 30))
    out = paste_masks(rng.random((5, 28, 28), dtype=np.float32), boxes, (H, W), method=method)
    assert out.transpose(1, 2, 0).flags.f_contiguous
    rles = mask_util.encode(out.transpose(1, 2, 0).view(np.uint8))
    np.testing.assert_array_equal(mask_util.decode(rles).transpose(2, 0, 1), out)


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
@pytest.mark.parametrize("method", PASTE_METHODS)
def test_paste_masks_rejects_bad_inputs(masks, boxes, image_size, match, method):
    with pytest.raises(ValueError, match=match):
        paste_masks(masks, boxes, image_size, method=method)


def test_paste_masks_rejects_an_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \('detectron2', 'torchvision'\)"):
        paste_masks(np.zeros((1, 28, 28)), np.zeros((1, 4)), (H, W), method="detectron")


# ------------------------------------------------------------------ numpy ports of the references


def _torchvision_resize_numpy(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """`F.interpolate(image[None, None], (out_h, out_w), mode="bilinear", align_corners=False)`
    as PyTorch's CPU kernel computes it (float32): per axis, source index
    `max((in / out) * (d + 0.5) - 0.5, 0)`, lower tap `i0 = int(src)`, upper `min(i0 + 1, in - 1)`,
    weight `l1 = src - i0`; output `h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11)`."""

    def taps(n_in, n_out):
        scale = np.float32(n_in) / np.float32(n_out)
        src = scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
        src = np.maximum(src, np.float32(0))
        i0 = np.minimum(src.astype(np.int64), n_in - 1)
        i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
        l1 = np.minimum(np.maximum(src - i0.astype(np.float32), np.float32(0)), np.float32(1))
        return i0, i1, np.float32(1) - l1, l1

    r0, r1, h0, h1 = taps(image.shape[0], out_h)
    c0, c1, w0, w1 = taps(image.shape[1], out_w)
    h0, h1 = h0[:, None], h1[:, None]
    top = w0 * image[r0][:, c0] + w1 * image[r0][:, c1]
    bottom = w0 * image[r1][:, c0] + w1 * image[r1][:, c1]
    return h0 * top + h1 * bottom


def torchvision_paste_numpy(masks, boxes, image_size, threshold=0.5):
    """A numpy port of torchvision's `paste_masks_in_image(masks[:, None], boxes, image_size,
    padding=1) > threshold`: `expand_masks`, `expand_boxes` (float32) then `.to(int64)`, and
    `paste_mask_in_image` (resize the padded map to the whole integer box, copy its visible part).
    Boxes whose pasted region misses the image (where torchvision fails) give empty masks."""
    masks, boxes = np.asarray(masks, np.float32), np.asarray(boxes, np.float32)
    height, width = image_size
    m = masks.shape[-1]
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    scale = np.float32((m + 2) / m)
    w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5) * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5) * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    expanded = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    out = np.zeros((len(masks), height, width), bool)
    for i, (x1, y1, x2, y2) in enumerate(expanded.astype(np.int64).tolist()):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        x_0, x_1 = max(x1, 0), min(x2 + 1, width)
        y_0, y_1 = max(y1, 0), min(y2 + 1, height)
        if x_1 <= x_0 or y_1 <= y_0:
            continue
        resized = _torchvision_resize_numpy(padded[i], h, w)
        out[i, y_0:y_1, x_0:x_1] = resized[y_0 - y1 : y_1 - y1, x_0 - x1 : x_1 - x1] > threshold
    return out


def grid_sample_numpy(image: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """`F.grid_sample(image[None, None], grid[None], mode="bilinear", padding_mode="zeros",
    align_corners=False)[0, 0]` for `image [H, W]`, `grid [h, w, 2]` (x, y in [-1, 1]), as
    PyTorch's CPU kernel computes it (float32): `x = (gx + 1) * (W / 2) - 0.5`, corners
    `floor(x)`, `floor(x) + 1` with weights `e = 1 - (x - floor(x))`, `w = x - floor(x)` (the same
    for y: `s`, `n`), out-of-map corners read 0, and `nw*s*e + ne*s*w + sw*n*e + se*n*w` summed
    in that order. Non-finite coordinates give NaN."""
    image = np.asarray(image, np.float32)
    size_h, size_w = image.shape
    with np.errstate(invalid="ignore", over="ignore"):
        x = (grid[..., 0] + np.float32(1)) * np.float32(size_w / 2) - np.float32(0.5)
        y = (grid[..., 1] + np.float32(1)) * np.float32(size_h / 2) - np.float32(0.5)
        x_w, y_n = np.floor(x), np.floor(y)
        w, n = x - x_w, y - y_n
        e, s = np.float32(1) - w, np.float32(1) - n
        out = np.zeros(x.shape, np.float32)
        for dy, dx, weight in ((0, 0, s * e), (0, 1, s * w), (1, 0, n * e), (1, 1, n * w)):
            cols, rows = x_w + dx, y_n + dy
            inside = (cols >= 0) & (cols < size_w) & (rows >= 0) & (rows < size_h)
            r = np.where(inside, rows, 0).astype(np.int64)
            c = np.where(inside, cols, 0).astype(np.int64)
            out = out + np.where(inside, image[r, c], np.float32(0)) * weight
    return out


def detectron2_paste_numpy(masks, boxes, image_size, threshold=0.5, grid_sample=None):
    """A literal numpy port of Detectron2's `paste_masks_in_image(masks, boxes, image_size,
    threshold)` on CPU: one box per chunk, `_do_paste_mask(skip_empty=True)` over the region
    `[max(floor(x0) - 1, 0), min(ceil(x1) + 1, W))` (rows alike), pixel centres mapped into the
    box to [-1, 1], sampled with `grid_sample` (default: `grid_sample_numpy`), `>= threshold`.
    Boxes whose region is empty (Detectron2 raises there) give empty masks."""
    grid_sample = grid_sample or grid_sample_numpy
    masks, boxes = np.asarray(masks, np.float32), np.asarray(boxes, np.float32)
    height, width = image_size
    out = np.zeros((len(masks), height, width), bool)
    for i in range(len(masks)):
        x0, y0, x1, y1 = boxes[i]
        x0_int, y0_int = (max(int(np.floor(v)) - 1, 0) for v in (x0, y0))
        x1_int, y1_int = min(int(np.ceil(x1)) + 1, width), min(int(np.ceil(y1)) + 1, height)
        if x1_int <= x0_int or y1_int <= y0_int:
            continue
        img_y = np.arange(y0_int, y1_int, dtype=np.float32) + np.float32(0.5)
        img_x = np.arange(x0_int, x1_int, dtype=np.float32) + np.float32(0.5)
        with np.errstate(divide="ignore", invalid="ignore"):
            img_y = (img_y - y0) / (y1 - y0) * np.float32(2) - np.float32(1)
            img_x = (img_x - x0) / (x1 - x0) * np.float32(2) - np.float32(1)
        gx = np.broadcast_to(img_x[None, :], (len(img_y), len(img_x)))
        gy = np.broadcast_to(img_y[:, None], (len(img_y), len(img_x)))
        sampled = grid_sample(masks[i], np.stack([gx, gy], axis=-1))
        with np.errstate(invalid="ignore"):
            out[i, y0_int:y1_int, x0_int:x1_int] = sampled >= threshold
    return out


def _torch_grid_sample(image, grid):
    """`F.grid_sample` exactly as Detectron2's `_do_paste_mask` calls it."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    sampled = functional.grid_sample(
        torch.from_numpy(np.ascontiguousarray(image))[None, None],
        torch.from_numpy(np.ascontiguousarray(grid))[None],
        align_corners=False,
    )
    return sampled[0, 0].numpy()


PASTE_CASES = [
    ("inside", ((8, 8), (W - 8, H - 8)), (4, 30)),
    ("partly_outside", ((-10, -10), (W + 10, H + 10)), (5, 60)),
    ("sub_pixel", ((0, 0), (W, H)), (0.01, 1.5)),
    ("huge", ((-20, -20), (W + 20, H + 20)), (100, 400)),
    ("mixed", ((-40, -40), (W + 40, H + 40)), (0.05, 300)),
]


def _case_inputs(case, centre_range, size_range, mask_size=28):
    """Random boxes of a case plus zero-area ones (zero width, zero height, both), and masks
    mixing uniform noise with maps of only 0, 0.5 and 1 (values at the threshold)."""
    rng = np.random.default_rng(100 + len(case))
    boxes = _random_boxes(rng, 60, centre_range, size_range)
    zero = boxes[:6].copy()
    zero[0:2, 2] = zero[0:2, 0]
    zero[2:4, 3] = zero[2:4, 1]
    zero[4:6, 2:] = zero[4:6, :2]
    boxes = np.concatenate([boxes, zero])
    masks = rng.random((len(boxes), mask_size, mask_size), dtype=np.float32)
    masks[::4] = rng.choice(np.array([0.0, 0.5, 1.0], np.float32), size=masks[::4].shape)
    return masks, boxes


@pytest.mark.parametrize("case, centre_range, size_range", PASTE_CASES)
def test_paste_masks_detectron2_matches_its_reference(case, centre_range, size_range):
    masks, boxes = _case_inputs(case, centre_range, size_range)
    out = paste_masks(masks, boxes, (H, W), method="detectron2")
    assert out.shape == (len(boxes), H, W) and out.dtype == bool
    np.testing.assert_array_equal(out, detectron2_paste_numpy(masks, boxes, (H, W)))
    assert not out[-6:].any()  # zero-area boxes: NaN/inf sampling positions, as PyTorch
    if case == "inside":
        assert out.any(axis=(1, 2))[:-6].all()


@pytest.mark.parametrize("case, centre_range, size_range", PASTE_CASES)
def test_paste_masks_detectron2_matches_torch_grid_sample(case, centre_range, size_range):
    masks, boxes = _case_inputs(case, centre_range, size_range)
    expected = detectron2_paste_numpy(masks, boxes, (H, W), grid_sample=_torch_grid_sample)
    np.testing.assert_array_equal(paste_masks(masks, boxes, (H, W), method="detectron2"), expected)


@pytest.mark.parametrize("case, centre_range, size_range", PASTE_CASES)
def test_paste_masks_torchvision_matches_its_numpy_port(case, centre_range, size_range):
    masks, boxes = _case_inputs(case, centre_range, size_range)
    out = paste_masks(masks, boxes, (H, W), method="torchvision")
    np.testing.assert_array_equal(out, paste_masks(masks, boxes, (H, W)))  # the default
    np.testing.assert_array_equal(out, torchvision_paste_numpy(masks, boxes, (H, W)))


@pytest.mark.parametrize("method", PASTE_METHODS)
def test_paste_masks_other_mask_sizes_and_thresholds_match_the_references(method):
    reference = {"detectron2": detectron2_paste_numpy, "torchvision": torchvision_paste_numpy}
    for mask_size, threshold in ((14, 0.3), (3, 0.7), (28, 0.5)):
        masks, boxes = _case_inputs("mixed", ((-10, -10), (W + 10, H + 10)), (0.5, 80), mask_size)
        masks = masks**2 if threshold < 0.5 else masks
        np.testing.assert_array_equal(
            paste_masks(masks, boxes, (H, W), threshold, method=method),
            reference[method](masks, boxes, (H, W), threshold),
            err_msg=f"{mask_size=} {threshold=}",
        )


def test_paste_masks_detectron2_threshold_is_inclusive():
    """A map of 0.5 over an interior box: pixel centres well inside sample exactly 0.5, which is
    foreground for Detectron2 (>=) and background for torchvision (>)."""
    masks = np.full((1, 28, 28), 0.5, np.float32)
    boxes = np.array([[8.0, 8.0, 36.0, 36.0]], np.float32)  # one map cell per pixel
    d2 = paste_masks(masks, boxes, (H, W), method="detectron2")[0]
    assert d2[9:35, 9:35].all() and not d2[:7].any() and not d2[:, 37:].any()
    assert not paste_masks(masks, boxes, (H, W), method="torchvision").any()


def test_paste_masks_detectron2_region_has_a_one_pixel_margin():
    """Detectron2 samples one pixel beyond the box's rounded-out edges: with box [10, 10, 60, 30]
    and an all-ones 28×28 map, the centre of column 9 maps to x = -0.78 in map cells, whose east
    tap (map column 0) weighs 0.22 ≥ 0.2, so column 9 is foreground (column 60 alike), while
    row 9 (y = -1.2, both taps off the map) is not; columns and rows 8 and below lie outside the
    region."""
    masks = np.ones((1, 28, 28), np.float32)
    boxes = np.array([[10.0, 10.0, 60.0, 30.0]], np.float32)
    expected = detectron2_paste_numpy(masks, boxes, (H, W), threshold=0.2)
    assert expected[0, 10:30, 9].all() and expected[0, 10:30, 60].all()
    assert not expected[0, :, :9].any() and not expected[0, 9].any()
    out = paste_masks(masks, boxes, (H, W), 0.2, method="detectron2")
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------ pasting small objects


def _ellipse(rng, diameter, size=64, mask_size=28):
    """A random ellipse (major axis `diameter` px, axis ratio 0.6-1, any orientation, centre
    anywhere in the middle of a `size`² image): its pixel-centre raster, its tight float box and
    its own binary `mask_size`² rasterisation over that box (cell centres, as the mask targets)."""
    a = diameter / 2
    b = a * rng.uniform(0.6, 1.0)
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(size / 2 - 12, size / 2 + 12, 2)

    def inside(x, y):
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        return (u / a) ** 2 + (v / b) ** 2 <= 1

    half_w = np.hypot(a * np.cos(theta), b * np.sin(theta))
    half_h = np.hypot(a * np.sin(theta), b * np.cos(theta))
    box = np.array([cx - half_w, cy - half_h, cx + half_w, cy + half_h], np.float32)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cells = (np.arange(mask_size) + 0.5) / mask_size
    mask = inside(
        box[0] + cells[None, :] * (box[2] - box[0]), box[1] + cells[:, None] * (box[3] - box[1])
    )
    return inside(xx, yy), box, mask.astype(np.float32)


@pytest.mark.parametrize("diameter", [6, 10, 16])
def test_detectron2_paste_recovers_small_ellipses(diameter):
    """Pasting an ellipse's own 28×28 rasterisation back over its box: Detectron2's paste keeps
    the mean IoU with the ellipse's pixel raster >= 0.95 even at 6 px; torchvision's legacy paste
    (integer, expanded box) loses much more on small objects."""
    rng = np.random.default_rng(diameter)
    ious = {method: [] for method in PASTE_METHODS}
    for _ in range(100):
        raster, box, mask = _ellipse(rng, diameter)
        for method in PASTE_METHODS:
            pasted = paste_masks(mask[None], box[None], raster.shape, method=method)[0]
            ious[method].append((pasted & raster).sum() / (pasted | raster).sum())
    mean = {method: float(np.mean(values)) for method, values in ious.items()}
    assert mean["detectron2"] >= 0.95, mean
    assert mean["torchvision"] < mean["detectron2"], mean
