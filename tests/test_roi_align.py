"""RoIAlign against a plain numpy reference (written from torchvision's CPU kernel rules) and
against torchvision's `roi_align` / `MultiScaleRoIAlign`, on random and edge-case boxes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mrcnn_jax.ops.roi_align import assign_fpn_levels, multilevel_roi_align, roi_align

METHODS = ("gather", "einsum")
MODES = ("avg", "max")
TOL = {"atol": 1e-5, "rtol": 1e-5}

# Feature map [H=9, W=11] at spatial scale 0.5, i.e. an 18 x 22 image.
HEIGHT, WIDTH, SCALE = 9, 11, 0.5
EDGE_BOXES = np.array(
    [
        [-6, -4, 8, 10],  # partly outside, top left
        [15, 12, 30, 25],  # partly outside, bottom right
        [-20, -20, -6, -5],  # wholly outside: every sample above/left of -1
        [30, 30, 40, 44],  # wholly outside: every sample below/right of H, W
        [23.5, 0, 30, 5],  # outside in x only (x > W)
        [5, 5, 5, 9],  # zero width
        [6, 6, 6, 6],  # zero width and height
        [3.2, 4.1, 3.5, 4.3],  # smaller than one feature pixel
        [-1000, -1000, 5000, 5000],  # huge
        [0, 0, 22, 18],  # exactly the whole map
        [0, 0, 0, 0],  # padding row
        [10, 10, 4, 6],  # inverted
    ],
    np.float32,
)


def random_boxes(
    rng: np.random.Generator, n: int, height: float, width: float, max_size: float | None = None
) -> np.ndarray:
    """[n, 4] boxes with centres in (and a bit around) the image and log-uniform sides in
    [0.3, max_size] (default 1.5 times the image)."""
    centre = rng.uniform(-0.2, 1.2, (n, 2)) * [width, height]
    max_size = max_size or 1.5 * max(height, width)
    size = np.exp(rng.uniform(np.log(0.3), np.log(max_size), (n, 2)))
    return np.concatenate([centre - size / 2, centre + size / 2], 1).astype(np.float32)


def bilinear_np(feature: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's `bilinear_interpolate` for one sample of a [H, W, C] map."""
    height, width = feature.shape[:2]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return np.zeros(feature.shape[2])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * feature[y_low, x_low]
        + hy * lx * feature[y_low, x_high]
        + ly * hx * feature[y_high, x_low]
        + ly * lx * feature[y_high, x_high]
    )


def roi_align_np(
    feature, boxes, output_size, spatial_scale, sampling_ratio=2, aligned=False, mode="avg"
):
    """Loop reference: [H, W, C], [R, 4] -> [R, S_h, S_w, C] float64."""
    bins_h, bins_w = (output_size, output_size) if np.isscalar(output_size) else output_size
    feature = np.asarray(feature, np.float64)
    out = np.zeros((len(boxes), bins_h, bins_w, feature.shape[2]))
    offset = 0.5 if aligned else 0.0
    for r, box in enumerate(np.asarray(boxes, np.float64)):
        x1, y1, x2, y2 = box * spatial_scale - offset
        roi_h, roi_w = y2 - y1, x2 - x1
        if not aligned:
            roi_h, roi_w = max(roi_h, 1.0), max(roi_w, 1.0)
        bin_h, bin_w = roi_h / bins_h, roi_w / bins_w
        for p in range(bins_h):
            for q in range(bins_w):
                samples = [
                    bilinear_np(
                        feature,
                        y1 + p * bin_h + (i + 0.5) * bin_h / sampling_ratio,
                        x1 + q * bin_w + (j + 0.5) * bin_w / sampling_ratio,
                    )
                    for i in range(sampling_ratio)
                    for j in range(sampling_ratio)
                ]
                out[r, p, q] = np.mean(samples, 0) if mode == "avg" else np.max(samples, 0)
    return out


def fpn_levels_np(boxes, min_level, max_level, canonical_box_size=224, canonical_level=4):
    """The LevelMapper formula in float32 numpy."""
    boxes = np.asarray(boxes, np.float32)
    area = np.maximum((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]), 0)
    with np.errstate(divide="ignore"):
        level = np.floor(
            np.float32(canonical_level)
            + np.log2(np.sqrt(area) / np.float32(canonical_box_size))
            + np.float32(1e-6)
        )
    return np.clip(level, min_level, max_level).astype(np.int32)


def multilevel_np(
    features,
    boxes,
    output_size,
    min_level=2,
    sampling_ratio=2,
    aligned=False,
    mode="avg",
    canonical_box_size=224,
    canonical_level=4,
):
    """Per-box `roi_align_np` on the box's level: list of [B, H_l, W_l, C], [B, R, 4]."""
    max_level = min_level + len(features) - 1
    levels = fpn_levels_np(boxes, min_level, max_level, canonical_box_size, canonical_level)
    return np.stack(
        [
            np.concatenate(
                [
                    roi_align_np(
                        features[level - min_level][b],
                        boxes[b, r : r + 1],
                        output_size,
                        2.0**-level,
                        sampling_ratio,
                        aligned,
                        mode,
                    )
                    for r, level in enumerate(levels[b])
                ]
            )
            for b in range(len(boxes))
        ]
    )


def jitted(fn, *args, **static):
    """`fn(*args, **static)` through `jax.jit`, with the static keyword arguments bound."""
    return jax.jit(functools.partial(fn, **static))(*args)


@pytest.fixture
def single_level():
    rng = np.random.default_rng(0)
    feature = rng.normal(size=(HEIGHT, WIDTH, 3)).astype(np.float32)
    boxes = np.concatenate([random_boxes(rng, 20, HEIGHT / SCALE, WIDTH / SCALE), EDGE_BOXES])
    return feature, boxes


def torchvision_roi_align(feature, boxes, output_size, spatial_scale, sampling_ratio, aligned):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    out = torchvision.ops.roi_align(
        torch.from_numpy(np.asarray(feature)).permute(2, 0, 1)[None],
        [torch.from_numpy(np.asarray(boxes))],
        output_size,
        spatial_scale,
        sampling_ratio,
        aligned,
    )
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("aligned", [False, True])
def test_numpy_reference_matches_torchvision(single_level, aligned):
    feature, boxes = single_level
    expected = torchvision_roi_align(feature, boxes, (3, 4), SCALE, 2, aligned)
    np.testing.assert_allclose(
        roi_align_np(feature, boxes, (3, 4), SCALE, 2, aligned), expected, **TOL
    )


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_roi_align_matches_numpy(single_level, method, mode, aligned):
    feature, boxes = single_level
    out = jitted(
        roi_align,
        feature,
        boxes,
        output_size=(3, 4),
        spatial_scale=SCALE,
        sampling_ratio=2,
        aligned=aligned,
        mode=mode,
        method=method,
    )
    assert out.shape == (len(boxes), 3, 4, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, roi_align_np(feature, boxes, (3, 4), SCALE, 2, aligned, mode), **TOL
    )


@pytest.mark.parametrize(
    ("output_size", "sampling_ratio", "aligned"), [(7, 1, False), ((2, 3), 3, True)]
)
@pytest.mark.parametrize("method", METHODS)
def test_roi_align_matches_torchvision(single_level, method, aligned, output_size, sampling_ratio):
    feature, boxes = single_level
    out = jitted(
        roi_align,
        feature,
        boxes,
        output_size=output_size,
        spatial_scale=SCALE,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        method=method,
    )
    expected = torchvision_roi_align(feature, boxes, output_size, SCALE, sampling_ratio, aligned)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_samples_on_the_validity_boundary(method):
    """One centred sample per box exactly at y, x = -1 (kept, reads row/col 0), at H, W (kept,
    reads the last row/col) and just beyond either (dropped)."""
    feature = np.random.default_rng(1).normal(size=(HEIGHT, WIDTH, 2)).astype(np.float32)
    centres = np.array([[-1, -1], [WIDTH, HEIGHT], [-1.25, 3], [4, HEIGHT + 0.25]], np.float32)
    boxes = np.concatenate([centres - 1, centres + 1], 1)  # scale 1, size 2: sample at centre
    out = jitted(
        roi_align, feature, boxes, output_size=1, spatial_scale=1.0, sampling_ratio=1, method=method
    )
    expected = np.stack([feature[0, 0], feature[-1, -1], np.zeros(2), np.zeros(2)])
    np.testing.assert_allclose(out[:, 0, 0], expected, **TOL)
    np.testing.assert_allclose(out, torchvision_roi_align(feature, boxes, 1, 1.0, 1, False), **TOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_single_box_and_no_box(single_level, method, mode):
    feature, boxes = single_level
    static = {"output_size": 2, "spatial_scale": SCALE, "mode": mode, "method": method}
    one = jitted(roi_align, feature, boxes[:1], **static)
    np.testing.assert_allclose(one, roi_align_np(feature, boxes[:1], 2, SCALE, mode=mode), **TOL)
    assert jitted(roi_align, feature, boxes[:0], **static).shape == (0, 2, 2, 3)


@pytest.mark.parametrize("method", METHODS)
def test_eager_equals_jit(single_level, multilevel_inputs, method):
    feature, boxes = single_level
    np.testing.assert_allclose(
        roi_align(feature, boxes, 2, SCALE, method=method),
        jitted(roi_align, feature, boxes, output_size=2, spatial_scale=SCALE, method=method),
        atol=1e-6,
        rtol=1e-6,
    )
    features, boxes = multilevel_inputs
    features = features[2:]  # P4, P5
    np.testing.assert_allclose(
        multilevel_roi_align(features, boxes, 2, min_level=4, mode="max", method=method),
        jitted(
            multilevel_roi_align,
            features,
            boxes,
            output_size=2,
            min_level=4,
            mode="max",
            method=method,
        ),
        atol=1e-6,
        rtol=1e-6,
    )


@pytest.mark.parametrize("method", METHODS)
def test_boxes_outside_pool_to_zero(single_level, method):
    """Reference-free check: boxes wholly outside the map, and the huge box whose samples all
    fall outside, give exactly 0; every output is finite."""
    feature, _ = single_level
    out = np.asarray(
        jitted(roi_align, feature, EDGE_BOXES, output_size=3, spatial_scale=SCALE, method=method)
    )
    np.testing.assert_array_equal(out[[2, 3, 4, 8]], 0)
    assert np.isfinite(out).all() and np.all(np.abs(out[[5, 6, 7, 9, 10, 11]]) > 0)


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_features(single_level, method):
    feature, boxes = single_level
    feature16 = jnp.asarray(feature, jnp.bfloat16)
    fn = jax.jit(
        functools.partial(roi_align, boxes=boxes, output_size=3, spatial_scale=SCALE, method=method)
    )
    out = fn(feature16)
    assert out.dtype == jnp.bfloat16
    expected = roi_align_np(np.asarray(feature16, np.float32), boxes, 3, SCALE)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2e-2, rtol=1e-2)
    grad = jax.grad(lambda f: fn(f).sum())(feature16)
    assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()


# ---------------------------------------------------------------------------------------------
# Multilevel

IMAGE = 128  # P2..P5 of a 128 x 128 image: 32, 16, 8, 4 pixels


def pyramid(rng, batch=2, channels=2, min_level=2, num_levels=4, image=IMAGE):
    return [
        rng.normal(size=(batch, image >> level, image >> level, channels)).astype(np.float32)
        for level in range(min_level, min_level + num_levels)
    ]


@pytest.fixture
def multilevel_inputs():
    rng = np.random.default_rng(2)
    features = pyramid(rng)
    edge = EDGE_BOXES * (IMAGE / 22)
    level_edges = np.array(
        [[0, 0, 112, 112], [10, 10, 234, 234], [-50, 20, 398, 468], [0, 0, 111.9, 112]], np.float32
    )  # sqrt(area) 112, 224, 448, <112
    boxes = np.stack(
        [
            np.concatenate([random_boxes(rng, 24, IMAGE, IMAGE, 900), edge, level_edges])
            for _ in range(2)
        ]
    )
    return features, boxes


def torchvision_multiscale(
    features, boxes, output_size, sampling_ratio, canonical_box_size=224, canonical_level=4
):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    names = [f"p{i}" for i in range(len(features))]
    pooler = torchvision.ops.MultiScaleRoIAlign(
        names,
        output_size,
        sampling_ratio,
        canonical_scale=canonical_box_size,
        canonical_level=canonical_level,
    )
    x = {name: torch.from_numpy(f).permute(0, 3, 1, 2) for name, f in zip(names, features)}
    out = pooler(x, [torch.from_numpy(b) for b in boxes], [(IMAGE, IMAGE)] * len(boxes))
    return out.permute(0, 2, 3, 1).numpy().reshape(*boxes.shape[:2], *out.shape[2:4], -1)


@pytest.mark.parametrize("method", METHODS)
def test_multilevel_matches_torchvision(multilevel_inputs, method):
    features, boxes = multilevel_inputs
    assert len(set(fpn_levels_np(boxes, 2, 5).ravel())) == 4  # every level is used
    out = jitted(multilevel_roi_align, features, boxes, output_size=3, method=method)
    assert out.shape == (*boxes.shape[:2], 3, 3, 2)
    np.testing.assert_allclose(out, torchvision_multiscale(features, boxes, 3, 2), **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_multilevel_canonical_constants_match_torchvision(multilevel_inputs, method):
    features, boxes = multilevel_inputs
    out = jitted(
        multilevel_roi_align,
        features,
        boxes / 4,
        output_size=(2, 3),
        sampling_ratio=1,
        canonical_box_size=16,
        canonical_level=3,
        method=method,
    )
    expected = torchvision_multiscale(features, boxes / 4, (2, 3), 1, 16, 3)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize(("mode", "aligned"), [("avg", True), ("max", True)])
@pytest.mark.parametrize("method", METHODS)
def test_multilevel_matches_numpy(multilevel_inputs, method, mode, aligned):
    features, boxes = multilevel_inputs
    features, boxes = [f[:, :, :, :1] for f in features[1:]], boxes[:, ::2]  # P3..P5, 1 channel
    out = jitted(
        multilevel_roi_align,
        features,
        boxes,
        output_size=2,
        min_level=3,
        aligned=aligned,
        mode=mode,
        method=method,
    )
    expected = multilevel_np(features, boxes, 2, min_level=3, aligned=aligned, mode=mode)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_each_box_reads_only_its_level(multilevel_inputs, method):
    features, boxes = multilevel_inputs
    levels = fpn_levels_np(boxes, 2, 5)
    fn = jax.jit(functools.partial(multilevel_roi_align, output_size=2, method=method))
    out = np.asarray(fn(features, boxes))
    for level in range(2, 6):
        changed = [f + 1e3 * (i + 2 != level) for i, f in enumerate(features)]
        on_level = levels == level
        np.testing.assert_array_equal(np.asarray(fn(changed, boxes))[on_level], out[on_level])


def test_assign_fpn_levels_matches_torchvision():
    torch = pytest.importorskip("torch")
    poolers = pytest.importorskip("torchvision.ops.poolers")
    rng = np.random.default_rng(3)
    # In log2 units below a level boundary (float32 sides): 111.9999 and 223.9998 sit ~1.28e-6
    # below, beyond torchvision's epsilon of 1e-6 added after the log, so they stay on the lower
    # level; 111.99996, 223.9999 and 223.99995 sit 4.9e-7, 6.9e-7 and 2.9e-7 below, within it,
    # so torchvision lifts them to the upper level (where Detectron2, whose 1e-8 sits inside the
    # log, and a rule without the epsilon keep them on the lower one).
    below_112, below_224 = [111.99, 111.9999, 111.99996], [223.9998, 223.9999, 223.99995]
    sides = np.array(
        [0, 1e-3, 55.9, 56, *below_112, 112, *below_224, 224, 448, 895, 896, 1e5], np.float32
    )
    exact = np.stack([np.zeros_like(sides), np.zeros_like(sides), sides, sides], 1)
    boxes = np.concatenate([exact, random_boxes(rng, 200, 800, 800)])
    expected = poolers.LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy() + 2
    np.testing.assert_array_equal(assign_fpn_levels(jnp.asarray(boxes), 2, 5), expected)
    np.testing.assert_array_equal(
        expected[: len(sides)], [2, 2, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5]
    )
    np.testing.assert_array_equal(
        assign_fpn_levels(boxes[:, None], 3, 4)[:, 0], np.clip(expected, 3, 4)
    )


# ---------------------------------------------------------------------------------------------
# Gradients


def inside_boxes(rng, n, height, width, scale):
    """Boxes whose samples all lie strictly inside the map (no clamping, so no ties in max)."""
    lo = rng.uniform(0.8, 1.5, (n, 2))
    hi = np.minimum(lo + rng.uniform(0.8, 2.0, (n, 2)), [width - 1.2, height - 1.2])
    return np.concatenate([lo, hi], 1) / scale


@pytest.mark.parametrize(("mode", "aligned"), [("avg", False), ("max", True)])
@pytest.mark.parametrize("method", METHODS)
def test_check_grads(method, mode, aligned):
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        feature = jnp.asarray(rng.normal(size=(5, 6, 2)))
        boxes = jnp.asarray(inside_boxes(rng, 3, 5, 6, 0.5))
        fn = functools.partial(
            roi_align,
            boxes=boxes,
            output_size=2,
            spatial_scale=0.5,
            aligned=aligned,
            mode=mode,
            method=method,
        )
        check_grads(jax.jit(fn), (feature,), order=1, modes=("rev",), eps=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_multilevel_grads_equal_across_methods(multilevel_inputs, mode):
    features, boxes = multilevel_inputs
    rng = np.random.default_rng(5)
    cotangent = rng.normal(size=(*boxes.shape[:2], 3, 3, 2)).astype(np.float32)
    grads = []
    for method in METHODS:
        fn = jax.jit(
            functools.partial(multilevel_roi_align, output_size=3, mode=mode, method=method)
        )
        grads.append(jax.vjp(fn, features, boxes)[1](cotangent))
    (gather_features, gather_boxes), (einsum_features, einsum_boxes) = grads
    for gather_grad, einsum_grad in zip(gather_features, einsum_features):
        np.testing.assert_allclose(gather_grad, einsum_grad, atol=1e-5, rtol=1e-5)
    assert all(np.abs(g).sum() > 0 for g in gather_features)  # every level receives gradient
    # Box gradients flow through the interpolation weights (einsum: plain autodiff).
    np.testing.assert_allclose(gather_boxes, einsum_boxes, atol=1e-4, rtol=1e-4)
    assert np.abs(gather_boxes).sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_multilevel_check_grads(method):
    rng = np.random.default_rng(6)
    with jax.enable_x64(True):
        features = [jnp.asarray(rng.normal(size=(1, 16 >> i, 16 >> i, 1))) for i in range(2)]
        boxes = jnp.asarray([[[1.0, 2.0, 9.0, 8.0], [0.5, 0.5, 3.0, 2.5]]])  # levels 3 and 2
        fn = functools.partial(
            multilevel_roi_align,
            boxes=boxes,
            output_size=2,
            canonical_box_size=4,
            canonical_level=3,
            method=method,
        )
        check_grads(jax.jit(fn), (features,), order=1, modes=("rev",), eps=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad static arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sampling_ratio": 0}, "sampling_ratio"),
        ({"sampling_ratio": -1}, "sampling_ratio"),
        ({"output_size": 0}, "output_size"),
        ({"output_size": (2, 3, 4)}, "output_size"),
        ({"mode": "sum"}, "mode"),
        ({"method": "loop"}, "method"),
    ],
)
def test_bad_static_arguments(single_level, kwargs, match):
    feature, boxes = single_level
    args = {"output_size": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        roi_align(feature, boxes, spatial_scale=SCALE, **args)
    with pytest.raises(ValueError, match=match):
        multilevel_roi_align([feature[None]], boxes[None], **args)


def test_bad_shapes(single_level):
    feature, boxes = single_level
    with pytest.raises(ValueError, match="features"):
        roi_align(feature[None], boxes, 2, SCALE)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(feature, boxes[:, :3], 2, SCALE)
    with pytest.raises(ValueError, match="features"):
        multilevel_roi_align([], boxes[None], 2)
    with pytest.raises(ValueError, match="features"):
        multilevel_roi_align([feature[None], feature[None, ::2, ::2, :2]], boxes[None], 2)
    with pytest.raises(ValueError, match="boxes"):
        multilevel_roi_align([feature[None]], boxes, 2)
    with pytest.raises(ValueError, match="batch"):
        multilevel_roi_align([feature[None]], np.stack([boxes, boxes]), 2)
    with pytest.raises(ValueError, match="canonical_box_size"):
        assign_fpn_levels(boxes, 2, 5, canonical_box_size=0)


# --------------------------------------------------------------------------- valid extents


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_extent_equals_torchvision_on_the_cropped_map(single_level, method, aligned):
    """A map whose valid part is `extent` (anything beyond it) pools exactly what torchvision
    pools from the map cropped to `extent`: samples clamp and vanish at the extent."""
    feature, boxes = single_level
    extent = (6, 8)
    garbage = feature.copy()
    garbage[extent[0] :] = 1e3
    garbage[:, extent[1] :] = -1e3
    out = jitted(
        roi_align,
        garbage,
        boxes,
        output_size=(3, 4),
        spatial_scale=SCALE,
        sampling_ratio=2,
        aligned=aligned,
        method=method,
        extent=np.array(extent),
    )
    cropped = feature[: extent[0], : extent[1]]
    expected = torchvision_roi_align(cropped, boxes, (3, 4), SCALE, 2, aligned)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_an_empty_extent_pools_zeros(multilevel_inputs, method, aligned):
    """An image of valid size (0, 0), as the rows padding an eval batch: every box pools exactly
    0 (nothing is read, not even the map's first pixel), beside a real image, gradients too."""
    features, boxes = multilevel_inputs
    valid = np.array([[64, 96], [0, 0]], np.int32)
    boxes = boxes.copy()
    boxes[1, :2] = 0.0  # the zero box (0, 0, 0, 0) of a padding row, and real boxes
    pool = lambda f: multilevel_roi_align(
        f, boxes, output_size=3, method=method, aligned=aligned, valid_size=valid
    )
    out = np.asarray(jax.jit(pool)(features))
    np.testing.assert_array_equal(out[1], 0)
    assert np.abs(out[0]).max() > 0
    grads = jax.grad(lambda f: jnp.sum(pool(f) ** 2))(features)
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g)[1], 0)


def test_nan_boxes_get_the_lowest_level():
    boxes = jnp.array([[0, 0, np.nan, 10], [np.nan] * 4, [0, 0, 500, 500]], jnp.float32)
    np.testing.assert_array_equal(assign_fpn_levels(boxes, 2, 5), [2, 2, 5])


@pytest.mark.parametrize("method", METHODS)
def test_multilevel_valid_size_equals_torchvision_on_each_image_alone(multilevel_inputs, method):
    """Per image, a valid size of (64, 96) px inside the 128 px canvas: each level clamps at
    ceil(valid / 2**l), as torchvision on that image padded to (64, 96) alone. (A sample that
    lands exactly on the extent, e.g. at row 12.0 of a 12-row map, is kept or dropped by 1-ulp
    rounding differences; these sizes avoid that knife edge.)"""
    features, boxes = multilevel_inputs
    valid = np.array([[64, 96], [128, 32]], np.int32)
    garbage = [f.copy() for f in features]
    for level, f in enumerate(garbage, start=2):
        for b, (h, w) in enumerate(valid):
            f[b, -(-h // 2**level) :] = 50.0
            f[b, :, -(-w // 2**level) :] = -50.0
    out = jitted(
        multilevel_roi_align, garbage, boxes, output_size=3, method=method, valid_size=valid
    )
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    for b, (h, w) in enumerate(valid):
        names = [f"p{i}" for i in range(len(features))]
        pooler = torchvision.ops.MultiScaleRoIAlign(names, 3, 2)
        x = {
            name: torch.from_numpy(f[b : b + 1, : -(-h // 2**lvl), : -(-w // 2**lvl)])
            .permute(0, 3, 1, 2)
            .contiguous()
            for lvl, (name, f) in enumerate(zip(names, features), start=2)
        }
        expected = pooler(x, [torch.from_numpy(boxes[b])], [(int(h), int(w))])
        np.testing.assert_allclose(out[b], expected.permute(0, 2, 3, 1).numpy(), **TOL)


@pytest.mark.parametrize("method", ["gather", "einsum"])
def test_an_extent_beyond_the_map_is_the_whole_map(method):
    """`extent` past `[H, W]` is the map's own size: the gather method read rows past the map
    (clamped or undefined reads: 2.39 off) where einsum weighted them 0."""
    rng = np.random.default_rng(5)
    features = jnp.asarray(rng.normal(size=(13, 17, 2)).astype(np.float32))
    boxes = jnp.asarray([[2.0, 3.0, 19.5, 16.0], [10.0, 8.0, 25.0, 30.0], [0.0, 0.0, 17.0, 13.0]])
    align = functools.partial(roi_align, features, boxes, 4, 1.0, 2, True, method=method)
    np.testing.assert_allclose(align(extent=(20, 20)), align(), atol=1e-6)
    np.testing.assert_allclose(align(extent=(13, 40)), align(), atol=1e-6)
