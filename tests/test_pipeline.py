"""The tf.data pipeline: batch keys, shapes and dtypes (docs/CONTRACTS.md), geometry against
numpy/pycocotools references, flip and jitter consistency, bad input, determinism, resumption,
the same global batches on any number of processes, eval shards and the canvas checks. Parity
with torchvision's resize: tests/test_pipeline_torchvision.py."""

import math

import cv2
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import tiny_coco
from helpers import resize_config
from pycocotools.coco import COCO
from references import box_crop, visible_extent

from configs import shapes_r18
from mrcnn_jax.data import masks, pipeline, shapes
from mrcnn_jax.evaluation import visualize

ONE = {"process_index": 0, "process_count": 1}


def _resized(height: int, width: int, scale: float) -> list[int]:
    """torchvision's resized size: floor(size * scale) in float64, at least 1."""
    return [max(math.floor(height * scale), 1), max(math.floor(width * scale), 1)]


def _ratios(resized, original) -> np.ndarray:
    """Per-axis (h, w) float32 scale of the resampled image, torchvision's resize_boxes."""
    return np.float32(resized) / np.float32(original)


def _crop(mask, box, size: int, ratios, offset_xy=(0.0, 0.0)) -> np.ndarray:
    """``box_crop`` for an image scaled per axis by ``ratios`` (h, w), then shifted by -offset."""
    ratio_h, ratio_w = (float(r) for r in ratios)
    shifted = np.asarray(box, np.float64) + np.tile(np.asarray(offset_xy, np.float64), 2)
    return box_crop(mask, shifted / [ratio_w, ratio_h, ratio_w, ratio_h], size, 1.0)


def _config(**data):
    config = shapes_r18.get_config()
    config.data.image_size = (64, 64)
    config.data.max_instances = 6
    config.data.mask_size = 16
    config.data.shuffle_buffer = 16
    config.train.batch_size = 4
    config.eval.batch_size = 4
    config.model.num_classes = 0  # the dataset's: shapes' 3, tiny_coco's 80
    config.data.update(data)
    return config


def _spec(config, train: bool) -> dict:
    """Expected per-row (shape, dtype) of every batch key."""
    m, s = config.data.max_instances, config.data.mask_size
    spec = {
        "image": ((*config.data.image_size, 3), np.float32),
        "image_size": ((2,), np.int32),
        "gt_boxes": ((m, 4), np.float32),
        "gt_classes": ((m,), np.int32),
        "gt_valid": ((m,), np.bool_),
        "gt_masks": ((m, s, s), np.uint8),
    }
    if not train:
        spec["image_id"] = ((), np.int64)
        spec["orig_size"] = ((2,), np.int32)
        spec["valid"] = ((), np.bool_)
    return spec


@pytest.fixture(scope="module")
def shapes_builder(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    return shapes.build_shapes(data_dir, num_train=8, num_val=5, image_size=(40, 60), seed=1)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    builder, jsons = tiny_coco.build(tmp_path_factory.mktemp("coco"))
    index = COCO()
    index.dataset = jsons["train"]
    index.createIndex()
    return builder, index


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _rows(batches: list[dict]) -> list[dict]:
    """Batches -> one dict per example."""
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["image"]))]


def _check_batches(batches: list[dict], config, train: bool, rows: int) -> None:
    spec = _spec(config, train)
    for batch in batches:
        assert set(batch) == set(spec)
        for key, (shape, dtype) in spec.items():
            assert batch[key].shape == (rows, *shape), key
            assert batch[key].dtype == dtype, key


def _unnormalised(row: dict, config) -> np.ndarray:
    """The content of a batch image, back in 0-255 RGB."""
    h, w = row["image_size"]
    return row["image"][:h, :w] * np.array(config.data.std) + np.array(config.data.mean)


def _eval_rows(config, builder, split: str = "train") -> dict[int, dict]:
    batches = list(pipeline.create_eval_dataset(config, builder=builder, split=split, **ONE))
    return {int(r["image_id"]): r for r in _rows(batches) if r["valid"]}


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches_follow_the_contract(shapes_builder):
    config = _config()
    batches = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    _check_batches(batches, config, train=True, rows=4)
    for row in _rows(batches):
        h, w = row["image_size"]
        assert (h, w) == (42, 64)  # 40x60 fitted into 64x64: floor(40 * 64 / 60)
        assert not row["image"][h:].any() and not row["image"][:, w:].any()
        valid = row["gt_valid"]
        assert 1 <= valid.sum() <= 4 and not valid[valid.sum() :].any()
        assert ((row["gt_classes"] >= 0) == valid).all()  # shapes has no crowd
        assert not row["gt_boxes"][~valid].any() and not row["gt_masks"][~valid].any()
        assert (row["gt_boxes"] >= 0).all() and (row["gt_boxes"][:, 2:] <= [w, h]).all()
        assert all(row["gt_masks"][k].any() for k in np.flatnonzero(valid))


def _kept(anns: list[dict], max_instances: int) -> list[dict]:
    """Reference selection: trainable objects first, then crowd / zero-area, file order."""
    trainable = [not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in anns]
    first = [a for a, t in zip(anns, trainable) if t]
    return (first + [a for a, t in zip(anns, trainable) if not t])[:max_instances]


def _opencv_rgb(encoded: bytes) -> np.ndarray:
    """[H, W, 3] uint8 RGB as OpenCV decodes the file (libjpeg's accurate DCT, as PIL)."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), flags), cv2.COLOR_BGR2RGB)


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """The JPEG with an EXIF APP1 segment holding only an Orientation tag (0x0112)."""
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + b"\x00\x01"  # big-endian header, one IFD entry
    tiff += b"\x01\x12\x00\x03\x00\x00\x00\x01" + orientation.to_bytes(2, "big") + b"\x00" * 6
    segment = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment + jpeg[2:]


@pytest.mark.parametrize("orientation", [1, 6])
def test_jpeg_pixels_are_those_of_libjpeg_and_predict(orientation, tmp_path):
    """The pipeline decodes a JPEG to the pixels OpenCV/PIL give (accurate DCT, not TF's fast
    default) and that `visualize.read_image` (scripts/predict.py) gives: the stored grid, an EXIF
    rotation (6: 90 degrees, as phones write) not applied by either."""
    rng = np.random.default_rng(0)
    rgb = (rng.normal(128, 40, (48, 64, 3)) + np.mgrid[:48, :64, :3][1]).clip(0, 255)
    _, jpeg = cv2.imencode(".jpg", rgb.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    encoded = _with_exif_orientation(jpeg.tobytes(), orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(encoded)
    decoded = pipeline._decode_image(tf.constant(encoded)).numpy()
    assert decoded.shape == (48, 64, 3)
    np.testing.assert_array_equal(decoded, _opencv_rgb(encoded))
    np.testing.assert_array_equal(decoded, visualize.read_image(path))
    assert (tf.io.decode_jpeg(encoded, channels=3).numpy() != decoded).mean() > 0.1


def test_eval_batches_match_pycocotools_references(coco):
    builder, index = coco
    config = _config(max_instances=4)  # image 5 has 5 annotations
    batches = list(pipeline.create_eval_dataset(config, builder=builder, split="train", **ONE))
    _check_batches(batches, config, train=False, rows=4)
    rows = {int(r["image_id"]): r for r in _rows(batches) if r["valid"]}
    assert sorted(rows) == [1, 2, 3, 4, 5] and len(batches) == 2
    raw = {"image": tfds.decode.SkipDecoding()}
    originals = builder.as_dataset(split="train", decoders=raw).as_numpy_iterator()
    for image_id, image in ((int(ex["image/id"]), _opencv_rgb(ex["image"])) for ex in originals):
        row = rows[image_id]
        height, width = image.shape[:2]
        size = _resized(height, width, min(64 / height, 64 / width))
        ratios = _ratios(size, [height, width])
        assert row["orig_size"].tolist() == [height, width]
        assert row["image_size"].tolist() == size
        reference = tf.image.resize(image, size).numpy()
        np.testing.assert_allclose(_unnormalised(row, config), reference, atol=1e-3)
        assert not row["image"][size[0] :].any() and not row["image"][:, size[1] :].any()

        kept = _kept(index.imgToAnns[image_id], 4)
        assert (row["gt_classes"][len(kept) :] == -1).all()
        assert not row["gt_valid"][len(kept) :].any()
        for k, ann in enumerate(kept):
            x, y, w, h = ann["bbox"]
            box = np.clip([x, y, x + w, y + h], 0, [width, height, width, height])
            box = box * np.tile(ratios[::-1], 2)  # x by the width ratio, y by the height ratio
            np.testing.assert_allclose(row["gt_boxes"][k], box, atol=1e-3)
            assert row["gt_classes"][k] == {1: 0, 18: 16, 90: 79}[ann["category_id"]]
            assert row["gt_valid"][k] == (not ann["iscrowd"] and w > 0 and h > 0)
            if not row["gt_valid"][k]:
                assert not row["gt_masks"][k].any()
                continue
            values = _crop(index.annToMask(ann), row["gt_boxes"][k], 16, ratios)
            decided = np.abs(values - 0.5) > 1e-4  # skip points that sit on the threshold
            assert decided.mean() > 0.8
            np.testing.assert_array_equal(row["gt_masks"][k][decided], (values >= 0.5)[decided])


def test_gt_mask_crop_counts_a_value_of_exactly_one_half_as_foreground():
    """The crop thresholds with ``>= 0.5`` (the checks above skip such ties): a 4×4 mask with two
    of its columns on, box (0, 0, 4, 4), one sample at (2, 2), halfway between the centres of
    columns 1 and 2, reads exactly 0.5 and gives 1, whichever half is on."""
    # Column-major run lengths (pycocotools order): columns 0-1 on, or columns 2-3 on.
    counts = tf.ragged.constant([[0, 8, 8], [8, 8]], dtype=tf.int64)
    crops = pipeline._crop_masks(
        counts,
        tf.constant(4),
        tf.constant(4),
        tf.constant([[0.0, 0.0, 4.0, 4.0]] * 2),
        tf.constant(False),
        tf.constant([1.0, 1.0]),
        tf.constant([0, 0]),
        1,
    )
    values = masks.sample_masks(counts, 4, 4, tf.fill([2, 1], 2.0), tf.fill([2, 1], 2.0))
    np.testing.assert_array_equal(values.numpy(), 0.5)
    np.testing.assert_array_equal(crops.numpy(), np.ones((2, 1, 1), np.uint8))


def test_empty_images_crowd_only_images_and_empty_masks(coco):
    builder, _ = coco
    rows = _eval_rows(_config(), builder)
    empty = rows[3]  # no annotations at all
    assert not empty["gt_valid"].any() and (empty["gt_classes"] == -1).all()
    assert not empty["gt_boxes"].any() and not empty["gt_masks"].any()
    crowd_only = rows[4]
    assert not crowd_only["gt_valid"].any() and not crowd_only["gt_masks"].any()
    assert crowd_only["gt_classes"].tolist() == [0, -1, -1, -1, -1, -1]  # the crowd row stays
    assert (crowd_only["gt_boxes"][0, 2:] > crowd_only["gt_boxes"][0, :2]).all()
    validation = _eval_rows(_config(), builder, split="validation")
    assert not validation[8]["gt_valid"].any()  # no annotations
    with_empty_mask = validation[7]  # 702: positive box, empty mask: stays valid, zero target
    assert with_empty_mask["gt_valid"].tolist()[:3] == [True, True, False]
    assert with_empty_mask["gt_masks"][0].any() and not with_empty_mask["gt_masks"][1].any()


def test_objects_beyond_max_instances_are_cut_deterministically_with_one_warning(coco, caplog):
    """Training warns once; the evaluation does not (it scores the annotations' own objects,
    all of them: its warning said "Raise max_instances to keep all" of nothing lost)."""
    builder, index = coco
    config = _config(max_instances=2)  # images 1 and 5 have 3 and 4 trainable objects
    config.train.batch_size = 8  # the whole train split in every batch
    with caplog.at_level("WARNING"):
        rows = _eval_rows(config, builder)
        assert not [r for r in caplog.records if "max_instances=2" in r.getMessage()]
        batches = pipeline.create_train_dataset(config, builder=builder, **ONE)
        _take(batches, 3)
        warnings = [r for r in caplog.records if "max_instances=2" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].getMessage().startswith("Image id 5 has 2 objects more than")  # most
        # Its end names every image cut and the largest count (one warning could not know it).
        batches.close()
    reports = [r.getMessage() for r in caplog.records if "max_instances=2" in r.getMessage()][1:]
    assert reports == [
        "max_instances=2 cut objects from 2 images read by this process; the largest, image id "
        "5, has 4: config.data.max_instances=4 keeps all of these."
    ]
    for image_id, expected in ((1, [101, 102]), (5, [501, 502]), (2, [202, 201])):
        kept = _kept(index.imgToAnns[image_id], 2)
        assert [a["id"] for a in kept] == expected
        height = index.imgs[image_id]["height"]
        width = index.imgs[image_id]["width"]
        for k, ann in enumerate(kept):
            x, y, w, h = ann["bbox"]
            box = np.clip([x, y, x + w, y + h], 0, [width, height, width, height])
            ratios = _ratios(rows[image_id]["image_size"], rows[image_id]["orig_size"])
            np.testing.assert_allclose(
                rows[image_id]["gt_boxes"][k] / np.tile(ratios[::-1], 2), box, atol=1e-3
            )


def test_eval_pads_the_last_batch_and_honours_max_images(shapes_builder):
    config = _config()
    batches = list(pipeline.create_eval_dataset(config, builder=shapes_builder, **ONE))
    assert len(batches) == pipeline.eval_num_batches(config, shapes_builder, process_count=1) == 2
    assert batches[1]["valid"].tolist() == [True, False, False, False]
    padding = _rows(batches)[5:]
    assert all(not any(v.any() for v in row.values()) for row in padding)
    config.eval.max_images = 3
    rows = _eval_rows(config, shapes_builder, split="validation")
    assert len(rows) == 3 and pipeline.eval_split(config, shapes_builder, None) == "validation[0:3]"


@pytest.mark.parametrize(
    "split, max_images, expected",
    [
        ("validation[1:4]", 2, "validation[1:3]"),
        ("validation[1:4]", 9, "validation[1:4]"),
        ("validation[:60%]", 2, "validation[0:2]"),
        ("train+validation", 10, "train[0:8]+validation[0:2]"),
        ("validation[3:]+train[:2]", 3, "validation[3:5]+train[0:1]"),
        ("validation[2:4]", 0, "validation[2:4]"),
    ],
)
def test_max_images_limits_any_split_spec_to_its_first_images(
    shapes_builder, split, max_images, expected
):
    """`eval.max_images` on a sliced or summed split (8 train, 5 validation images): the first
    images of the whole spec; appending `[:N]` made 'validation[1:4][:2]', which TFDS refuses
    after training, and limited only the last part of a sum."""
    config = _config()
    config.eval.max_images = max_images
    limited = pipeline.eval_split(config, shapes_builder, split)
    assert limited == expected
    batches = pipeline.create_eval_dataset(config, builder=shapes_builder, split=split, **ONE)
    ids = [int(r["image_id"]) for r in _rows(list(batches)) if r["valid"]]
    reference = shapes_builder.as_dataset(split=split, shuffle_files=False)
    first = [int(e["image/id"]) for e in reference.take(max_images or 100).as_numpy_iterator()]
    assert sorted(ids) == sorted(first)


def test_split_names_and_why_a_split_spec_cannot_be_read(shapes_builder):
    """An unknown split name says which splits there are; a slice out of range or a spec that
    does not parse gives the split sizes and TFDS's reason (8 train, 5 validation images); an
    empty slice is said (it failed after training, in TFDS's words)."""
    assert pipeline.split_names("validation[:5%]+train [2:]") == ["validation", "train"]
    for spec in ("validation", "validation[1:3]", "train[:50%]+validation"):
        assert pipeline.split_error(shapes_builder, spec) is None, spec
    name = shapes_builder.info.full_name
    for spec in ("validation[:0]", "train[3:3]+validation[5:]"):
        assert pipeline.split_error(shapes_builder, spec) == f"selects no image of {name}", spec
    unknown = f"is not a split of {name} (its splits: ['train', 'validation'])"
    for spec in ("val", "train+val[:2]"):
        assert pipeline.split_error(shapes_builder, spec) == unknown, spec
    sizes = f"does not select images of {name} (train: 8, validation: 5 images): "
    out_of_range = pipeline.split_error(shapes_builder, "validation[9:]")
    assert out_of_range == sizes + "Requested slice [9:5] incompatible with 5 examples."
    assert pipeline.split_error(shapes_builder, "train[:10").startswith(sizes)


def test_horizontal_flip_moves_image_boxes_and_masks_together(shapes_builder):
    config = _config(train_split="train[:1]", hflip=True)
    plain = next(iter(_eval_rows(config, shapes_builder, split="train[:1]").values()))
    plain.pop("image_id")
    train_rows = _rows(
        _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 4)
    )
    width = plain["image_size"][1]
    mirrored = dict(plain)
    mirrored["image"] = plain["image"].copy()
    mirrored["image"][:, :width] = plain["image"][:, width - 1 :: -1]
    boxes = plain["gt_boxes"].copy()
    boxes[:, [0, 2]] = np.where(plain["gt_valid"][:, None], width - boxes[:, [2, 0]], 0)
    mirrored["gt_boxes"] = boxes
    mirrored["gt_masks"] = plain["gt_masks"][:, :, ::-1]
    flips = []
    for row in train_rows:
        close = {k: np.allclose(row[k], plain[k], atol=1e-4) for k in row}
        close_mirrored = {k: np.allclose(row[k], mirrored[k], atol=1e-4) for k in row}
        assert all(close.values()) or all(close_mirrored.values()), (close, close_mirrored)
        flips.append(not all(close.values()))
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize(
    "flip, jitter, fraction",
    [
        (True, 1.0, (0.0, 0.0)),
        (False, 1.5, (0.5, 0.3)),
        (True, 1.7, (0.9, 0.6)),
        (True, 0.7, (0, 0)),
    ],
)
def test_augmented_geometry_matches_numpy_references(
    shapes_builder, monkeypatch, flip, jitter, fraction
):
    """With the random draws fixed, image, boxes and masks equal references computed from the
    stored original (flip, resize, crop at the offset, GT-box crop of the original mask)."""
    config = _config(train_split="train[:1]")
    example = next(shapes_builder.as_dataset(split="train[:1]").as_numpy_iterator())
    original = example["image"]
    height, width = original.shape[:2]
    resized = np.array(_resized(height, width, min(64 / height, 64 / width) * jitter), np.int32)
    ratios = _ratios(resized, [height, width])
    offset = np.floor(np.array(fraction) * np.maximum(resized - 64, 0)).astype(np.int32)

    def fixed_augmentation(seed, h, w, data, train):
        return tf.constant(flip), tf.constant(resized), tf.constant(offset)

    monkeypatch.setattr(pipeline, "_augmentation", fixed_augmentation)
    row = _rows(_take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 1))[0]

    flipped = original[:, ::-1] if flip else original
    image = tf.image.resize(flipped, resized).numpy()[offset[0] : offset[0] + 64, offset[1] :][
        :, :64
    ]
    assert row["image_size"].tolist() == list(image.shape[:2])
    np.testing.assert_allclose(_unnormalised(row, config), image, atol=1e-3)

    objects = example["objects"]
    n = len(objects["label"])
    ymin, xmin, ymax, xmax = (objects["bbox"][:, i] for i in range(4))
    boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1)
    if flip:
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    boxes = boxes * np.tile(ratios[::-1], 2) - np.tile(offset[::-1], 2)
    content_h, content_w = image.shape[:2]
    limit = [content_w, content_h, content_w, content_h]
    clipped = np.clip(boxes, 0, limit)
    cropped = resized > 64  # (h, w)
    window = np.array([offset[1], offset[0], offset[1] + content_w, offset[0] + content_h])
    window = window / np.tile(ratios[::-1], 2)  # the crop in the (flipped) original's pixels
    cut_objects = 0
    for k in range(n):  # a box the crop cuts: its visible mask's (pixel squares), within the box
        mask = masks.decode_mask(objects["mask"][k], height, width)
        mask = mask[:, ::-1] if flip else mask
        outside = (boxes[k, :2] < 0) | (boxes[k, 2:] > limit[:2])  # (x, y)
        if not (outside & cropped[::-1]).any() or not mask.any():
            continue
        cut_objects += 1
        extent = visible_extent(mask, window)
        if extent is None:
            clipped[k] = 0.0
            continue
        extent = extent * np.tile(ratios[::-1], 2) - np.tile(offset[::-1], 2)
        clipped[k, :2] = np.maximum(clipped[k, :2], extent[:2])
        clipped[k, 2:] = np.maximum(np.minimum(clipped[k, 2:], extent[2:]), clipped[k, :2])
    boxes = clipped
    visible = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    assert row["gt_valid"][:n].tolist() == visible.tolist()
    np.testing.assert_allclose(row["gt_boxes"][:n][visible], boxes[visible], atol=1e-3)
    assert row["gt_classes"][:n].tolist() == objects["label"].tolist()
    assert cut_objects > 0 or not cropped.any(), "no object cut: the case tests nothing"
    for k in np.flatnonzero(visible):
        mask = masks.decode_mask(objects["mask"][k], height, width)
        mask = mask[:, ::-1] if flip else mask
        values = _crop(mask, row["gt_boxes"][k], 16, ratios, offset[::-1])
        decided = np.abs(values - 0.5) > 1e-4
        np.testing.assert_array_equal(row["gt_masks"][k][decided], (values >= 0.5)[decided])


@pytest.mark.parametrize("max_instances", [4, 2])
@pytest.mark.parametrize("flip", [False, True])
def test_a_cut_object_gets_its_visible_masks_box_and_one_with_nothing_visible_is_dropped(
    monkeypatch, flip, max_instances
):
    """A disc and a thin diagonal band in a 200² photo, ×2 (400²) into a 128² canvas, the crop
    window the photo's x ∈ [135, 199), y ∈ [120, 184): the disc's box is that of its visible part
    (its clipped box would reach over background to the disc's bounding corner), the band, whose
    box the crop still overlaps but whose pixels it leaves out, is no longer a valid object
    (Detectron2's LSJ recompute_boxes), and an object inside the crop keeps its box. With room
    for two objects, the band (before the crop the second trainable one) gives its place to the
    visible third, and nothing counts as dropped; the rows keep the file's order."""
    size = 200
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disc = (xx - 100) ** 2 + (yy - 100) ** 2 <= 50**2
    band = (np.abs(xx + yy - 200) <= 3) & (xx > 20) & (xx < 180)
    uncut = (xx > 150) & (xx < 170) & (yy > 140) & (yy < 160)
    objects = [disc, band, uncut]

    def tight(mask):
        rows, cols = np.nonzero(mask)
        return np.array([cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0])

    boxes = np.array([tight(m) for m in objects]) / size
    image = np.zeros((size, size, 3), np.uint8)
    for k, mask in enumerate(objects):
        image[mask] = 60 * (k + 1)
    example = {
        "image": tf.io.encode_png(image),
        "image/id": tf.constant(1, tf.int64),
        "objects": {
            "bbox": tf.constant(boxes[:, [1, 0, 3, 2]], tf.float32),
            "is_crowd": tf.constant([False] * 3),
            "mask": tf.constant([masks.encode_mask(m) for m in objects]),
            "label": tf.constant([0, 1, 2], tf.int64),
        },
    }
    ratio, offset = 2.0, np.array([240, 270])  # (y, x) in the 400² resized photo
    offset_x = 400 - 128 - offset[1] if flip else offset[1]  # the same window of the photo
    monkeypatch.setattr(
        pipeline,
        "_augmentation",
        lambda *_: (tf.constant(flip), tf.constant([400, 400]), tf.constant([offset[0], offset_x])),
    )
    config = _config(image_size=(128, 128), mask_size=28, max_instances=max_instances)
    row = pipeline._preprocess(example, tf.zeros([2], tf.int64), config.data, train=True)

    def final(box):  # photo pixels -> the canvas
        box = box * ratio - np.tile(offset[::-1], 2)
        return np.array([128 - box[2], box[1], 128 - box[0], box[3]]) if flip else box

    kept = [0, 1, 2] if max_instances == 4 else [0, 2]  # in the file's order
    assert row["gt_classes"].numpy().tolist() == kept + [-1] * (max_instances - len(kept))
    assert row["gt_valid"].numpy().tolist()[: len(kept)] == [k != 1 for k in kept]
    assert int(row["_num_dropped"]) == 0
    window = np.concatenate([offset[::-1], offset[::-1] + 128]) / ratio
    expected = final(visible_extent(disc, window))
    np.testing.assert_allclose(row["gt_boxes"][0].numpy(), expected, atol=1e-3)
    clipped = np.clip(final(tight(disc)), 0, 128)
    assert expected[3] < clipped[3] - 20  # the visible part ends far above the clipped box
    at = kept.index(2)
    np.testing.assert_allclose(row["gt_boxes"][at].numpy(), final(tight(uncut)), atol=1e-3)
    assert row["gt_masks"][at].numpy().any()
    assert not row["gt_masks"][len(kept) :].numpy().any()
    if max_instances == 4:
        assert not row["gt_masks"][1].numpy().any()


@pytest.mark.parametrize("size", [(48, 64), (130, 173), (960, 1280)])
def test_resize_antialias_shrinks_as_pils_bilinear_resize(size):
    """`data.resize_antialias` (the LSJ recipe): shrinking a noise photo matches PIL's bilinear
    resize (Detectron2's) to rounding; without it, torchvision's F.interpolate arithmetic
    (plain bilinear: at ×0.1 each pixel averages ~2×2 source pixels, so the noise stays);
    enlarging is the same either way."""
    image_module = pytest.importorskip("PIL.Image")
    photo = np.random.default_rng(0).integers(0, 256, (480, 640, 3)).astype(np.uint8)
    reference = np.asarray(image_module.fromarray(photo).resize(size[::-1], image_module.BILINEAR))
    ours = {}
    for antialias in (False, True):
        data = resize_config(image_size=(960, 1280)).data
        data.resize_antialias = antialias
        image, content = pipeline._transform_image(
            tf.constant(photo), tf.constant(False), tf.constant(size), tf.zeros([2], tf.int32), data
        )
        assert content.numpy().tolist() == list(size)
        ours[antialias] = image.numpy()[: size[0], : size[1]]
    del data["resize_antialias"]  # the config of a checkpoint saved before the field existed
    old, _ = pipeline._transform_image(
        tf.constant(photo), tf.constant(False), tf.constant(size), tf.zeros([2], tf.int32), data
    )
    plain = tf.image.resize(photo, size, method="bilinear").numpy()
    np.testing.assert_allclose(ours[False], plain, atol=1e-3)
    np.testing.assert_array_equal(old.numpy()[: size[0], : size[1]], ours[False])
    assert np.abs(ours[True] - reference).mean() < 0.5
    if size[0] < 480:
        assert np.abs(ours[False] - reference).mean() > 10  # aliased
    else:
        np.testing.assert_allclose(ours[True], ours[False], atol=1e-3)


@pytest.mark.parametrize("field", ["hflip", "resize_antialias"])
def test_flags_of_the_data_must_be_bools(field):
    config = _config()
    with config.ignore_type():
        config.data[field] = "yes"
    with pytest.raises(ValueError, match=rf"config\.data\.{field}='yes' must be True or False"):
        pipeline.check_data(config)


@pytest.mark.parametrize("jitter", [(1.3, 1.8), (0.6, 0.8)])
def test_scale_jitter_varies_the_size_and_keeps_boxes_inside(shapes_builder, jitter):
    config = _config(scale_jitter=jitter)
    rows = _rows(_take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3))
    sizes = np.array([r["image_size"] for r in rows])
    for row in rows:
        h, w = row["image_size"]
        assert (row["gt_boxes"][:, 2:] <= [w, h]).all()
        assert not row["image"][h:].any() and not row["image"][:, w:].any()
    if jitter[0] > 1:
        assert (sizes[:, 1] == 64).all()  # wider than 64 after scaling: cropped
        assert len(set(sizes[:, 0])) > 1
    else:
        assert (sizes < [42, 64]).all() and len(set(sizes[:, 1])) > 1


def _short_side_config(**data):
    """40×60 shapes images, shorter side 64 at eval (64×96 in a 96² canvas)."""
    return _config(image_size=(96, 96), resize_short_side=64, resize_max_long_side=96, **data)


def test_multi_scale_training_draws_each_shorter_side_uniformly(shapes_builder):
    config = _short_side_config(train_short_sides=(32, 48, 64), hflip=False)
    config.train.batch_size = 8
    batches = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 30)
    rows = _rows(batches)
    sizes = [tuple(r["image_size"]) for r in rows]
    counts = {size: sizes.count(size) for size in set(sizes)}
    assert set(counts) == {(32, 48), (48, 72), (64, 96)}  # floor(40·s/40), floor(60·s/40)
    assert all(60 <= c <= 100 for c in counts.values()), counts  # 240 draws, ~80 each
    for row in rows:  # boxes follow the drawn scale: inside the content, the canvas zero beyond
        h, w = row["image_size"]
        assert (row["gt_boxes"][row["gt_valid"]][:, 2:] <= [w, h]).all()
        assert not row["image"][h:].any() and not row["image"][:, w:].any()
    evaluated = _eval_rows(config, shapes_builder)
    assert {tuple(r["image_size"]) for r in evaluated.values()} == {(64, 96)}  # eval: 64


def test_one_training_shorter_side_equal_to_the_eval_side_changes_nothing(shapes_builder):
    """The side draw uses its own seed: flips and crops are those of a config without it."""
    config = _short_side_config(scale_jitter=(0.8, 1.3))
    plain = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    config.data.train_short_sides = (64,)
    drawn = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    assert all(_same(a, b) for a, b in zip(plain, drawn))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"resize_short_side": 0}, r"train_short_sides=\(640, 800\) must be .*got 0"),
        ({"train_short_sides": (640, 0)}, r"train_short_sides=\(640, 0\) must be positive"),
        ({"train_short_sides": (640.5,)}, r"train_short_sides=\(640.5,\) must be positive"),
    ],
)
def test_bad_training_shorter_sides_are_refused(data, message):
    config = resize_config(short=800)
    config.data.train_short_sides = (640, 800)
    config.data.update(data)
    with pytest.raises(ValueError, match=message):
        pipeline.check_canvas(config)


@pytest.mark.parametrize("skip", [True, False])
def test_training_skips_images_without_a_non_crowd_object(coco, skip):
    """tiny_coco's train split: images 3 (no annotations) and 4 (crowd only) train as
    all-negative images unless skipped; the other three always train."""
    builder, _ = coco
    config = _config(skip_empty_train_images=skip)
    rows = _rows(_take(pipeline.create_train_dataset(config, builder=builder, **ONE), 10))
    negative = sum(not r["gt_valid"].any() for r in rows)
    if skip:
        assert negative == 0
    else:
        assert 40 * 2 / 5 * 0.5 < negative < 40 * 2 / 5 * 1.5  # 2 of 5 images, 40 rows


def test_a_training_split_of_only_empty_images_is_a_clear_error(coco):
    builder, _ = coco
    config = _config(train_split="train[1:3]")  # the crowd-only and the unannotated image
    batches = pipeline.create_train_dataset(config, builder=builder, **ONE)
    with pytest.raises(
        ValueError,
        match=r"'train\[1:3\]' of 'shapes' has no example with a "
        r"non-crowd object \(config.data.skip_empty_train_images=True",
    ):
        next(batches)


def test_train_order_and_augmentation_are_seeded(shapes_builder):
    config = _config()
    first = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    again = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    assert all(_same(a, b) for a, b in zip(first, again))
    config.seed += 1
    other = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    assert not all(_same(a, b) for a, b in zip(first, other))


def test_start_step_resumes_exactly_without_decoding_the_skipped_examples(
    shapes_builder, monkeypatch
):
    config = _config(scale_jitter=(0.8, 1.2))
    fresh = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 7)
    decoded = []
    decode = pipeline._decode_image

    def counting_decode(encoded):
        count = tf.py_function(lambda: decoded.append(1) or 0, [], tf.int32)
        with tf.control_dependencies([count]):
            return decode(encoded)

    monkeypatch.setattr(pipeline, "_decode_image", counting_decode)
    resumed = pipeline.create_train_dataset(config, builder=shapes_builder, start_step=5, **ONE)
    assert _same(next(resumed), fresh[5])  # 2 batches per epoch: crosses epoch boundaries
    assert _same(next(resumed), fresh[6])
    far = pipeline.create_train_dataset(config, builder=shapes_builder, start_step=100, **ONE)
    decoded.clear()
    next(far)
    assert len(decoded) < 100


def _concatenated(slices: list[list[dict]]) -> list[dict]:
    """Per step, the batches of the processes (``slices[p][step]``) concatenated in process
    order."""
    return [
        {k: np.concatenate([s[step][k] for s in slices]) for k in slices[0][step]}
        for step in range(len(slices[0]))
    ]


def test_global_batches_are_the_same_on_any_number_of_processes(shapes_builder):
    """Process p of n yields rows [p·b, (p+1)·b) of the global batches that one process yields,
    bit for bit (augmentation included), from step 0 and when resuming at step 3 (the 8-image
    split is 2 batches of 4: the steps cross epochs)."""
    config = _config(scale_jitter=(0.8, 1.2))
    reference = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 8)
    assert not all(_same(reference[0], b) for b in reference[1:])
    for start in (0, 3):
        for count in (1, 2, 4):
            slices = [
                _take(
                    pipeline.create_train_dataset(
                        config,
                        builder=shapes_builder,
                        start_step=start,
                        process_index=index,
                        process_count=count,
                    ),
                    5,
                )
                for index in range(count)
            ]
            _check_batches(slices[-1], config, train=True, rows=4 // count)
            for step, batch in enumerate(_concatenated(slices), start):
                assert _same(batch, reference[step]), (count, start, step)


@pytest.mark.parametrize(
    "count, max_images, num_batches",
    [
        (2, 0, 2),  # shards of 3 + 2 images, 2 rows a batch
        (4, 0, 2),  # 2 + 1 + 1 + 1, 1 row a batch
        (4, 3, 1),  # 1 + 1 + 1 + 0: the last process yields only padding
        (2, 1, 1),  # 1 + 0
    ],
)
def test_eval_shards_cover_every_image_once(shapes_builder, count, max_images, num_batches):
    config = _config(hflip=False)
    config.eval.max_images = max_images
    ids = []
    assert pipeline.eval_num_batches(config, shapes_builder, process_count=count) == num_batches
    for index in range(count):
        place = {"process_index": index, "process_count": count}
        batches = list(pipeline.create_eval_dataset(config, builder=shapes_builder, **place))
        _check_batches(batches, config, train=False, rows=4 // count)
        assert len(batches) == num_batches  # the same count on every process
        ids.extend(int(r["image_id"]) for r in _rows(batches) if r["valid"])
    alone = list(pipeline.create_eval_dataset(config, builder=shapes_builder, **ONE))
    expected = [int(r["image_id"]) for r in _rows(alone) if r["valid"]]
    assert len(expected) == (max_images or 5)
    assert sorted(ids) == sorted(expected)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_batch_size_must_split_over_processes(shapes_builder, split):
    """The message names the field (it said "batch size 5", which of the two unsaid)."""
    config = _config()
    config[split].batch_size = 5
    create = {"train": pipeline.create_train_dataset, "eval": pipeline.create_eval_dataset}[split]
    message = rf"config\.{split}\.batch_size=5 is not divisible by the 2 processes"
    with pytest.raises(ValueError, match=message):
        create(config, builder=shapes_builder, process_index=0, process_count=2)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("data.max_instances", 0, r"config\.data\.max_instances=0 must be at least 1"),
        ("data.mask_size", 0, r"config\.data\.mask_size=0 must be at least 1"),
        ("data.mean", (0.0, 0.0), r"config\.data\.mean=\(0\.0, 0\.0\) must have 3"),
        ("train.batch_size", 0, r"config\.train\.batch_size=0 must be at least 1 image"),
        ("model.num_classes", 2, r"num_classes=2 but dataset shapes.* has 3 classes: set it to 3"),
    ],
)
def test_the_train_dataset_refuses_settings_that_fail_later(shapes_builder, field, value, message):
    """A notebook calls `create_train_dataset` without train.py's `check_train_config`: these
    gave empty ground truth (max_instances, mask_size 0), a TF graph error (mean), a tf.data
    error (batch 0) or labels beyond the model's classes, whose loss is NaN (num_classes)."""
    config = _config()
    section, name = field.split(".")
    with config[section].ignore_type():
        config[section][name] = value
    with pytest.raises(ValueError, match=message):
        pipeline.create_train_dataset(config, builder=shapes_builder, **ONE)
    if field == "model.num_classes":  # the dataset's count (3), or 0 for it, are taken
        for num_classes in (3, 0):
            config.model.num_classes = num_classes
            next(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE))


@pytest.mark.parametrize(
    "shape, short, long, expected_size",
    [
        ((480, 640), 800, 1333, (800, 1066)),  # torchvision's rule: shorter side to 800, floor
        ((640, 480), 800, 1333, (1066, 800)),
        ((300, 451), 800, 1333, (800, 1202)),
        ((400, 1200), 800, 1333, (444, 1333)),  # ... unless the longer side passes 1333
        ((1200, 400), 800, 1333, (1333, 444)),  # in either orientation
        ((480, 640), 0, 0, (1008, 1344)),  # resize_short_side 0: the largest fitting image_size
        ((2, 5000), 0, 0, (1, 1344)),  # at least one pixel (floor gives 0)
    ],
)
def test_resize_short_side_rule(shape, short, long, expected_size):
    config = resize_config(short=short, long=long)
    inputs = pipeline.preprocess_image(np.full((*shape, 3), 7, np.uint8), config)
    assert set(inputs) == {"image", "image_size"}
    assert tuple(inputs["image_size"]) == expected_size
    assert inputs["image"].shape == (1344, 1344, 3)
    assert (inputs["image"][: expected_size[0], : expected_size[1]] == 7).all()
    assert (inputs["image"][expected_size[0] :] == 0).all()
    assert (inputs["image"][:, expected_size[1] :] == 0).all()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"image_size": (100, 100)},
            r"config.data.image_size=\(100, 100\) is not a multiple of "
            r"config.model.size_divisibility=32: use \(128, 128\)",
        ),
        (
            {"image_size": (1344, 1000), "divisibility": 64},
            r"config.data.image_size=\(1344, 1000\) is not a multiple of "
            r"config.model.size_divisibility=64: use \(1344, 1024\)",
        ),
        (
            {"divisibility": 48},
            r"config.model.size_divisibility=48 is not a positive multiple of 32 .*use 64",
        ),
        ({"divisibility": 0}, r"config.model.size_divisibility=0 is not a positive .*use 32"),
        ({"divisibility": 16}, r"config.model.size_divisibility=16 is not a positive .*use 32"),
        ({"image_size": (0, 64)}, r"config.data.image_size=\(0, 64\) must be two positive"),
        ({"image_size": (64,)}, r"config.data.image_size=\(64,\) must be two positive"),
        (
            {"image_size": (1024, 1024)},
            r"config.data.image_size=\(1024, 1024\) cannot hold every image resized with "
            r"config.data.resize_short_side=800 and config.data.resize_max_long_side=1333: the "
            r"longer side reaches 1333 in either orientation, 1344 once rounded up to "
            r"config.model.size_divisibility=32; use image_size \(1344, 1344\) or "
            r"resize_max_long_side <= 1024",
        ),
        (  # a landscape canvas is not enough: portrait images reach 1333 in height
            {"image_size": (800, 1344)},
            r"image_size=\(800, 1344\) cannot hold .* use image_size \(1344, 1344\) or "
            r"resize_max_long_side <= 800",
        ),
        (
            {"image_size": (1344, 1344), "long": 1345},
            r"reaches 1345 .* 1376 once rounded up .* use image_size \(1376, 1376\)",
        ),
        (
            {"long": 0},
            r"config.data.resize_short_side=800 with config.data.resize_max_long_side=0 .*"
            r"\(at most 1344 for config.data.image_size=\(1344, 1344\)\), or resize_short_side=0",
        ),
        ({"short": -1}, r"config.data.resize_short_side=-1 is negative"),
        ({"short": 0, "long": -5}, r"config.data.resize_max_long_side=-5 is negative"),
    ],
)
def test_canvas_checks_name_the_field_and_the_fix(overrides, message):
    config = resize_config(**overrides)
    with pytest.raises(ValueError, match=message):
        pipeline.check_canvas(config)
    with pytest.raises(ValueError, match=message):
        pipeline.preprocess_image(np.zeros((40, 60, 3), np.uint8), config)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # the defaults: 800 / 1333 in 1344²
        {"image_size": (1344, 1376)},
        {"image_size": (640, 640), "short": 512, "long": 640},
        {"image_size": (96, 160), "short": 0, "long": 0},  # fit mode: any multiple of 32
        {"image_size": (128, 128), "short": 0, "long": 0, "divisibility": 64},
    ],
)
def test_canvas_checks_accept_canvases_that_hold_every_image(overrides):
    pipeline.check_canvas(resize_config(**overrides))


def test_datasets_check_the_canvas_before_reading_data(monkeypatch):
    """create_train_dataset / create_eval_dataset refuse a bad canvas before building anything."""

    def no_builder(data):
        raise AssertionError("the builder was asked for before the check")

    monkeypatch.setattr(pipeline, "get_builder", no_builder)
    config = _config(image_size=(100, 100))
    for create in (pipeline.create_train_dataset, pipeline.create_eval_dataset):
        with pytest.raises(ValueError, match=r"image_size=\(100, 100\) is not a multiple"):
            create(config, **ONE)
