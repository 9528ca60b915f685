"""Tests for mrcnn_jax.ops.anchors against plain numpy loops and torchvision's AnchorGenerator."""

import numpy as np
import pytest

from mrcnn_jax.ops.anchors import cell_anchors, generate_anchors

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = (0.5, 1.0, 2.0)

# (image (H, W), feature shapes per level, sizes, aspect ratios)
CASES = [
    ((800, 1344), [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)], FPN_SIZES, RATIOS),
    (
        (128, 128),
        [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)],
        ((8,), (16,), (32,), (64,), (128,)),
        RATIOS,
    ),
    (
        (96, 160),
        [(24, 40), (12, 20), (5, 7)],
        ((20, 33, 45),) * 3,
        ((0.25, 1 / 3, 0.7), (1.0,), (0.5, 1.0, 2.0, 3.0)),
    ),
    ((1, 1), [(1, 1)], ((1,),), (1.0,)),
]


def numpy_reference(image_shape, feature_shapes, sizes, aspect_ratios) -> list[np.ndarray]:
    """Anchors by explicit loops over (row, column, ratio, size), float64 then rounded."""
    per_level = (
        aspect_ratios if isinstance(aspect_ratios[0], tuple) else [aspect_ratios] * len(sizes)
    )
    out = []
    for (fh, fw), level_sizes, ratios in zip(feature_shapes, sizes, per_level):
        sy, sx = image_shape[0] // fh, image_shape[1] // fw
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


@pytest.mark.parametrize("case", CASES, ids=["800x1344", "128", "96x160-multi", "1x1"])
def test_generate_anchors_matches_numpy_loops(case):
    anchors = generate_anchors(*case)
    expected = numpy_reference(*case)
    assert len(anchors) == len(expected)
    for got, want in zip(anchors, expected):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", CASES, ids=["800x1344", "128", "96x160-multi", "1x1"])
def test_generate_anchors_identical_to_torchvision(case):
    pytest.importorskip("torchvision")
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    image_shape, feature_shapes, sizes, ratios = case
    tv_ratios = ratios if isinstance(ratios[0], tuple) else (ratios,) * len(sizes)
    generator = AnchorGenerator(sizes, tv_ratios)
    images = ImageList(torch.zeros(2, 3, *image_shape), [tuple(image_shape)] * 2)
    features = [torch.zeros(2, 1, h, w) for h, w in feature_shapes]
    expected = generator(images, features)[0].numpy()
    np.testing.assert_array_equal(np.concatenate(generate_anchors(*case)), expected)


def test_cell_anchors_rounding_and_order():
    # Size 33, ratio 1: half extent 16.5 rounds half to even -> 16, like torch.round.
    np.testing.assert_array_equal(cell_anchors((33,), (1.0,)), [[-16, -16, 16, 16]])
    # Ratio-major, size-minor: (r=0.5: s=32, 64), (r=2: s=32, 64).
    got = cell_anchors((32, 64), (0.5, 2.0))
    np.testing.assert_array_equal(
        got, [[-23, -11, 23, 11], [-45, -23, 45, 23], [-11, -23, 11, 23], [-23, -45, 23, 45]]
    )


def test_strides_of_non_divisible_level():
    anchors = generate_anchors((800, 1344), [(13, 21)], ((512,),), (1.0,))[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert anchors.shape == (13 * 21, 4)
    np.testing.assert_array_equal(np.unique(centres[:, 1]), np.arange(13) * 61)  # 800 // 13
    np.testing.assert_array_equal(np.unique(centres[:, 0]), np.arange(21) * 64)  # 1344 // 21


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image_shape=(64,), feature_shapes=[(16, 16)], sizes=((8,),)), "image_shape"),
        (dict(image_shape=(64, 64), feature_shapes=[(16, 16)], sizes=((8,), (16,))), "sizes"),
        (dict(image_shape=(64, 64), feature_shapes=[(128, 16)], sizes=((8,),)), "feature_shapes"),
        (dict(image_shape=(64, 64), feature_shapes=[(0, 16)], sizes=((8,),)), "feature_shapes"),
        (dict(image_shape=(64, 64), feature_shapes=[(16, 16)], sizes=((),)), "sizes"),
        (
            dict(
                image_shape=(64, 64),
                feature_shapes=[(16, 16)],
                sizes=((8,),),
                aspect_ratios=(0.5, -1.0),
            ),
            "aspect_ratios",
        ),
        (
            dict(
                image_shape=(64, 64),
                feature_shapes=[(16, 16)],
                sizes=((8,),),
                aspect_ratios=((1.0,), (2.0,)),
            ),
            "aspect_ratios",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_anchors(**kwargs)
