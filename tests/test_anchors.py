"""Tests for mrcnn_jax.ops.anchors against plain numpy loops and torchvision's AnchorGenerator.

torchvision computes anchors on the image padded to its valid extent; ours live on the canvas
grid with the cells beyond the extent marked invalid. The valid ones, in order, must be
torchvision's exactly, whatever the canvas.
"""

import jax
import numpy as np
import pytest

from mrcnn_jax.ops.anchors import cell_anchors, generate_anchors

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_STRIDES = (4, 8, 16, 32, 64)
RATIOS = (0.5, 1.0, 2.0)


def canvas_shapes(canvas, strides):
    return [(-(-canvas[0] // s), -(-canvas[1] // s)) for s in strides]


# (valid extent (H, W), canvas (H, W), strides, sizes, aspect ratios)
CASES = {
    "800x1344-in-1344": ((800, 1344), (1344, 1344), FPN_STRIDES, FPN_SIZES, RATIOS),
    "128-tight": ((128, 128), (128, 128), FPN_STRIDES, ((8,), (16,), (32,), (64,), (128,)), RATIOS),
    "96x160-multi": (
        (96, 160), (128, 192), (4, 8, 32), ((20, 33, 45),) * 3,
        ((0.25, 1 / 3, 0.7), (1.0,), (0.5, 1.0, 2.0, 3.0)),
    ),
    "32-in-64": ((32, 32), (64, 64), (32,), ((16,),), (1.0,)),
}  # fmt: skip


def numpy_reference(extent, strides, sizes, aspect_ratios) -> list[np.ndarray]:
    """torchvision's anchors of an image padded to `extent`, by explicit loops over (row,
    column, ratio, size): grid ceil(extent / stride), shifts extent // grid."""
    per_level = (
        aspect_ratios if isinstance(aspect_ratios[0], tuple) else [aspect_ratios] * len(sizes)
    )
    out = []
    for stride, level_sizes, ratios in zip(strides, sizes, per_level):
        fh, fw = -(-extent[0] // stride), -(-extent[1] // stride)
        sy, sx = extent[0] // fh, extent[1] // fw
        rows = []
        for i in range(fh):
            for j in range(fw):
                for r in ratios:
                    for s in level_sizes:
                        half_w = np.round(s / np.sqrt(r) / 2)
                        half_h = np.round(s * np.sqrt(r) / 2)
                        rows.append(
                            [j * sx - half_w, i * sy - half_h, j * sx + half_w, i * sy + half_h]
                        )
        out.append(np.asarray(rows, np.float32))
    return out


def ours(extent, canvas, strides, sizes, ratios):
    shapes = canvas_shapes(canvas, strides)
    return jax.jit(lambda e: generate_anchors(e, shapes, strides, sizes, ratios))(
        np.asarray(extent, np.int32)
    )


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_valid_anchors_match_numpy_loops_and_ids_count_them(case):
    extent, canvas, strides, sizes, ratios = case
    levels = ours(*case)
    expected = numpy_reference(extent, strides, sizes, ratios)
    offset = 0
    for level, want, shape in zip(levels, expected, canvas_shapes(canvas, strides)):
        boxes, valid, index = (np.asarray(x) for x in level)
        assert boxes.dtype == np.float32 and boxes.shape[0] % (shape[0] * shape[1]) == 0
        np.testing.assert_array_equal(boxes[valid], want)
        np.testing.assert_array_equal(index[valid], offset + np.arange(len(want)))
        offset += len(want)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_valid_anchors_identical_to_torchvision(case):
    pytest.importorskip("torchvision")
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    extent, _, strides, sizes, ratios = case
    tv_ratios = ratios if isinstance(ratios[0], tuple) else (ratios,) * len(sizes)
    generator = AnchorGenerator(sizes, tv_ratios)
    images = ImageList(torch.zeros(2, 3, *extent), [tuple(extent)] * 2)
    features = [torch.zeros(2, 1, *shape) for shape in canvas_shapes(extent, strides)]
    expected = generator(images, features)[0].numpy()
    levels = ours(*case)
    got = np.concatenate([np.asarray(a.boxes)[np.asarray(a.valid)] for a in levels])
    np.testing.assert_array_equal(got, expected)


def test_the_canvas_does_not_change_the_valid_anchors():
    extent = (800, 1344)
    tight = ours(extent, (800, 1344), FPN_STRIDES, FPN_SIZES, RATIOS)
    square = ours(extent, (1344, 1344), FPN_STRIDES, FPN_SIZES, RATIOS)
    for a, b in zip(tight, square):
        np.testing.assert_array_equal(np.asarray(a.valid).sum(), np.asarray(b.valid).sum())
        for field in ("boxes", "index"):
            np.testing.assert_array_equal(
                np.asarray(getattr(a, field))[np.asarray(a.valid)],
                np.asarray(getattr(b, field))[np.asarray(b.valid)],
            )


def test_cell_anchors_rounding_and_order():
    # Size 33, ratio 1: half extent 16.5 rounds half to even -> 16, like torch.round.
    np.testing.assert_array_equal(cell_anchors((33,), (1.0,)), [[-16, -16, 16, 16]])
    # Ratio-major, size-minor: (r=0.5: s=32, 64), (r=2: s=32, 64).
    got = cell_anchors((32, 64), (0.5, 2.0))
    np.testing.assert_array_equal(
        got, [[-23, -11, 23, 11], [-45, -23, 45, 23], [-11, -23, 11, 23], [-23, -45, 23, 45]]
    )


def test_strides_of_non_divisible_level():
    """P6 of an 800×1344 extent: 13×21 cells with torchvision's strides 800 // 13 and 64."""
    (level,) = ours((800, 1344), (1344, 1344), (64,), ((512,),), (1.0,))
    boxes, valid = np.asarray(level.boxes), np.asarray(level.valid)
    assert valid.sum() == 13 * 21 and boxes.shape == (21 * 21, 4)
    centres = (boxes[valid, :2] + boxes[valid, 2:]) / 2
    np.testing.assert_array_equal(np.unique(centres[:, 1]), np.arange(13) * 61)
    np.testing.assert_array_equal(np.unique(centres[:, 0]), np.arange(21) * 64)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(feature_shapes=[(16, 16)], feature_strides=(4,), sizes=((8,), (16,))), "sizes"),
        (dict(feature_shapes=[(16, 16)], feature_strides=(4, 8), sizes=((8,),)), "strides"),
        (dict(feature_shapes=[(0, 16)], feature_strides=(4,), sizes=((8,),)), "feature_shapes"),
        (dict(feature_shapes=[(16, 16)], feature_strides=(4,), sizes=((),)), "sizes"),
        (
            dict(feature_shapes=[(16, 16)], feature_strides=(4,), sizes=((8,),),
                 aspect_ratios=(0.5, -1.0)),
            "aspect_ratios",
        ),
        (
            dict(feature_shapes=[(16, 16)], feature_strides=(4,), sizes=((8,),),
                 aspect_ratios=((1.0,), (2.0,))),
            "aspect_ratios",
        ),
    ],
)  # fmt: skip
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_anchors(np.array([64, 64]), **kwargs)
