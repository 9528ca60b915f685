"""Tests of mrcnn_jax.evaluation.coco_eval on a tiny COCO ground truth written here."""

import contextlib
import copy
import io
import json
import sys
import threading

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax import sharding
from mrcnn_jax.evaluation import (
    IOU_TYPES,
    STAT_NAMES,
    CocoEvaluator,
    detections_to_coco,
    evaluate_coco,
    paste_masks,
)
from mrcnn_jax.evaluation.coco_eval import boxes_to_original
from mrcnn_jax.programs import evaluator as eval_program

pytestmark = pytest.mark.filterwarnings(  # pycocotools' decode under numpy 2
    "ignore:__array__ implementation:DeprecationWarning"
)

LABEL_TO_CATEGORY = {0: 3, 1: 17, 2: 42}
CATEGORY_TO_LABEL = {c: label for label, c in LABEL_TO_CATEGORY.items()}
MASK_SIZE = 28
BATCH, DETECTIONS = 3, 5
# image id -> (height, width, (height, width) of the resized input): the axes' ratios differ, as
# with torchvision's floored resize.
IMAGES = {
    1: (200, 240, (300, 359)),
    2: (100, 90, (80, 71)),
    3: (80, 80, (80, 80)),
    4: (64, 96, (128, 191)),
    5: (50, 50, (50, 50)),
}
FED_IMAGES = (1, 2, 4, 3)  # image 5 has annotations but is never fed


def _polygon(centre, radius, sides, phase=0.0):
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    points = np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1)
    return [float(v) for v in points.ravel()]


def _rectangle_rle(height, width, x0, y0, x1, y1, compressed):
    mask = np.zeros((height, width), np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    # Uncompressed RLE, as COCO stores crowd regions: run lengths in column-major order.
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    counts = ([0] if flat[0] else []) + runs.tolist()
    return {"size": [height, width], "counts": counts}


def _ground_truth():
    """(image id, category id, segmentation, iscrowd) of a small but varied COCO set."""
    return [
        (1, 3, [[20.0, 20.0, 90.0, 24.0, 86.0, 80.0, 24.0, 76.0]], 0),  # quadrilateral, medium
        (1, 17, [_polygon((150, 110), 65, 6, 0.3)], 0),  # hexagon, large
        (1, 42, _rectangle_rle(200, 240, 30, 120, 80, 170, compressed=True), 0),
        (1, 3, _rectangle_rle(200, 240, 180, 5, 235, 40, compressed=False), 1),  # crowd
        (2, 42, [_polygon((45, 50), 30, 16)], 0),  # circle-ish
        (2, 17, [[5.0, 5.0, 27.0, 5.0, 27.0, 28.0, 5.0, 28.0]], 0),  # small rectangle
        (2, 3, _rectangle_rle(100, 90, 60, 60, 88, 98, compressed=False), 0),
        (4, 3, [[10.0, 10.0, 85.0, 14.0, 50.0, 58.0]], 0),  # triangle
        (5, 17, [[5.0, 5.0, 40.0, 5.0, 40.0, 40.0, 5.0, 40.0]], 0),  # on the never-fed image
    ]


def _annotation(ann_id, image_id, category_id, segmentation, iscrowd):
    height, width, _ = IMAGES[image_id]
    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_util.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": iscrowd,
        "area": float(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
    }


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    dataset = {
        "images": [
            {"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"}
            for i, (h, w, _) in IMAGES.items()
        ],
        "categories": [{"id": c, "name": f"cat{c}"} for c in (3, 17, 42)],
        "annotations": [_annotation(k + 1, *gt) for k, gt in enumerate(_ground_truth())],
    }
    path = tmp_path_factory.mktemp("coco") / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


@pytest.fixture(scope="module")
def coco_gt(gt_path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_path))


def _bilinear_crop(mask, box, size=MASK_SIZE):
    """[size, size] float32 bilinear samples of ``mask`` at the crop's pixel centres in ``box``.

    Pixel (i, j) of the crop samples the point (x1 + (j + 0.5) w / S, y1 + (i + 0.5) h / S);
    image pixel (r, c) has its centre at (c + 0.5, r + 0.5); outside the image is 0.
    """
    x1, y1, x2, y2 = box
    padded = np.pad(mask.astype(np.float64), 1)

    def taps(start, length, limit):
        coords = start + (np.arange(size) + 0.5) * length / size - 0.5 + 1  # +1: the padding
        coords = np.clip(coords, 0, limit - 1)
        low = np.minimum(np.floor(coords).astype(int), limit - 2)
        return low, coords - low

    rows, wy = taps(y1, y2 - y1, padded.shape[0])
    cols, wx = taps(x1, x2 - x1, padded.shape[1])
    top = padded[rows][:, cols] * (1 - wx) + padded[rows][:, cols + 1] * wx
    bottom = padded[rows + 1][:, cols] * (1 - wx) + padded[rows + 1][:, cols + 1] * wx
    return (top * (1 - wy[:, None]) + bottom * wy[:, None]).astype(np.float32)


def _xyxy(bbox):
    x, y, w, h = bbox
    return np.array([x, y, x + w, y + h], np.float64)


def _perfect_detections(coco_gt):
    """image id -> list of (label, score, original-pixel xyxy box, 28x28 mask) for non-crowd GT."""
    detections = {i: [] for i in FED_IMAGES}
    for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(FED_IMAGES), iscrowd=False)):
        box = _xyxy(ann["bbox"])
        detections[ann["image_id"]].append(
            (
                CATEGORY_TO_LABEL[ann["category_id"]],
                0.9 - 0.1 * len(detections[ann["image_id"]]),
                box,
                _bilinear_crop(coco_gt.annToMask(ann), box),
            )
        )
    return detections


def _batches(detections, rng):
    """Padded (batch, outputs) numpy dicts as the eval pipeline and model give them.

    Padding detection rows and padding images are filled with plausible garbage, so that any
    use of them would change the metrics.
    """
    image_ids = list(FED_IMAGES)
    image_ids += [None] * (-len(image_ids) % BATCH)
    batches = []
    for start in range(0, len(image_ids), BATCH):
        batch = {
            "image_id": np.full(BATCH, 999, np.int64),
            "image_size": np.full((BATCH, 2), 32, np.int32),
            "orig_size": np.full((BATCH, 2), 64, np.int32),
            "valid": np.zeros(BATCH, bool),
        }
        outputs = {
            "boxes": np.tile(np.array([5, 5, 40, 40], np.float32), (BATCH, DETECTIONS, 1)),
            "scores": np.full((BATCH, DETECTIONS), 0.99, np.float32),
            "classes": rng.integers(0, 3, (BATCH, DETECTIONS)).astype(np.int32),
            "masks": rng.random((BATCH, DETECTIONS, MASK_SIZE, MASK_SIZE), dtype=np.float32),
            "valid": np.zeros((BATCH, DETECTIONS), bool),
        }
        for b, image_id in enumerate(image_ids[start : start + BATCH]):
            if image_id is None:
                continue
            height, width, resized = IMAGES[image_id]
            batch["image_id"][b], batch["valid"][b] = image_id, True
            batch["image_size"][b], batch["orig_size"][b] = resized, (height, width)
            ratio_h, ratio_w = np.float32(resized) / np.float32([height, width])
            for d, (label, score, box, mask) in enumerate(detections[image_id]):
                outputs["boxes"][b, d] = box * [ratio_w, ratio_h, ratio_w, ratio_h]
                outputs["scores"][b, d], outputs["classes"][b, d] = score, label
                outputs["masks"][b, d], outputs["valid"][b, d] = mask, True
        batches.append((batch, outputs))
    return batches


def _evaluator(detections, rng):
    evaluator = CocoEvaluator(LABEL_TO_CATEGORY)
    for batch, outputs in _batches(detections, rng):
        evaluator.add_batch(batch, outputs)
    return evaluator


def _direct_stats(coco_gt, results, iou_type):
    """pycocotools' 12 stats on ``results`` over the fed images (segm: area from the mask)."""
    dropped = "bbox" if iou_type == "segm" else "segmentation"
    detections = [{k: v for k, v in r.items() if k != dropped} for r in copy.deepcopy(results)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), iou_type)
        coco_eval.params.imgIds = sorted(FED_IMAGES)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(STAT_NAMES, coco_eval.stats))


def _dilate(mask):
    """3x3 binary dilation."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    return np.any(
        [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)], 0
    )


def test_crops_of_ground_truth_paste_back_near_the_boundary(coco_gt):
    """The premise of the perfect-detection test: pasted GT crops err only at the GT boundary.

    The paste's legacy integer-box convention (torchvision, Detectron) stretches the map over
    about one pixel more than its expanded box, after truncating its corners, so even a perfect
    crop grows by up to one to two pixels; it never loses interior pixels.
    """
    for image_id, dets in _perfect_detections(coco_gt).items():
        if not dets:
            continue
        height, width, _ = IMAGES[image_id]
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image_id], iscrowd=False))
        pasted = paste_masks(
            np.stack([d[3] for d in dets]), np.stack([d[2] for d in dets]), (height, width)
        )
        for ann, mask in zip(anns, pasted):
            gt = coco_gt.annToMask(ann).astype(bool)
            assert not (mask & ~_dilate(_dilate(gt))).any()
            assert not (~mask & ~_dilate(~gt)).any()
            assert (gt & mask).sum() / (gt | mask).sum() > 0.85


def test_perfect_detections_give_perfect_ap(coco_gt, gt_path):
    rng = np.random.default_rng(0)
    detections = _perfect_detections(coco_gt)
    # A detection on the crowd region is ignored, not a false positive.
    crowd = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[1], iscrowd=True))[0]
    detections[1].append(
        (
            0,
            0.05,
            _xyxy(crowd["bbox"]),
            _bilinear_crop(coco_gt.annToMask(crowd), _xyxy(crowd["bbox"])),
        )
    )
    evaluator = _evaluator(detections, rng)
    assert evaluator.image_ids == list(FED_IMAGES)
    assert len(evaluator.results) == sum(len(d) for d in detections.values())

    metrics = evaluator.evaluate(gt_path)  # loads the json itself
    assert sorted(metrics) == sorted(f"{t}/{n}" for t in ("bbox", "segm") for n in STAT_NAMES)
    for name in STAT_NAMES:
        assert metrics[f"bbox/{name}"] == pytest.approx(1.0), name
    # Masks grown by a pixel or so (see above) miss some IoU >= 0.95 matches, never IoU >= 0.75.
    assert metrics["segm/AP50"] == metrics["segm/AP75"] == pytest.approx(1.0)
    assert 0.95 <= metrics["segm/AP"] <= 1.0
    assert metrics == evaluator.evaluate(coco_gt)  # the same with a COCO object


def test_metrics_equal_direct_pycocotools_on_imperfect_results(coco_gt, tmp_path):
    rng = np.random.default_rng(1)
    detections = _perfect_detections(coco_gt)
    perfect = _evaluator(detections, rng).evaluate(coco_gt)
    dropped = detections[4].pop(0)  # one of category 3's three instances: recall 2/3 there
    assert dropped[0] == 0
    label, score, box, mask = detections[2][0]
    detections[2][0] = (label, score, box + np.array([6.0, 4.0, 6.0, 4.0]), mask)
    # A false positive on the empty image whose box is medium (2000 px) but mask small (< 32^2):
    # segm counts it among the small detections only, as its area is taken from the mask.
    blob = np.zeros((MASK_SIZE, MASK_SIZE), np.float32)
    blob[9:19, 9:19] = 1.0
    detections[3].append((1, 0.97, np.array([10.0, 10.0, 60.0, 50.0]), blob))
    evaluator = _evaluator(detections, rng)
    metrics = evaluator.evaluate(coco_gt)

    evaluator.write_results(tmp_path / "results.json")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results == evaluator.results
    for iou_type in ("bbox", "segm"):
        direct = _direct_stats(coco_gt, results, iou_type)
        for name in STAT_NAMES:
            assert metrics[f"{iou_type}/{name}"] == pytest.approx(direct[name], abs=1e-12)
        assert metrics[f"{iou_type}/AP"] < perfect[f"{iou_type}/AP"] - 0.1
    # Dropping one of category 3's three instances alone caps its AP at 67 of 101 recall points.
    only_dropped = _perfect_detections(coco_gt)
    only_dropped[4].pop(0)
    bbox_ap = _evaluator(only_dropped, rng).evaluate(coco_gt, iou_types=("bbox",))["bbox/AP"]
    assert bbox_ap == pytest.approx((67 / 101 + 1 + 1) / 3)


def test_detections_to_coco_maps_boxes_labels_and_masks_back():
    rng = np.random.default_rng(2)
    image_size, (height, width) = (80, 140), (50, 70)  # y * 50/80 = 0.625, x * 70/140 = 0.5
    boxes = np.array(
        [[8, 16, 48, 64], [-8, 20, 40, 100], [100, 0, 140, 30], [0, 0, 1, 1]], np.float32
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([2, 0, 1, 7], np.int32)  # label 7 is padding: not looked up
    valid = np.array([True, True, True, False])
    masks = rng.random((4, MASK_SIZE, MASK_SIZE), dtype=np.float32)
    results = detections_to_coco(
        11, boxes, scores, classes, masks, valid, image_size, (height, width), LABEL_TO_CATEGORY
    )
    json.dumps(results)
    assert [r["category_id"] for r in results] == [42, 3, 17]
    assert [r["image_id"] for r in results] == [11, 11, 11]
    np.testing.assert_allclose([r["score"] for r in results], scores[:3])
    # x * 0.5, y * 0.625: [4, 10, 24, 40], [-4, 12.5, 20, 62.5], [50, 0, 70, 18.75]; clipped.
    expected_xywh = [[4, 10, 20, 30], [0, 12.5, 20, 37.5], [50, 0, 20, 18.75]]
    np.testing.assert_allclose([r["bbox"] for r in results], expected_xywh, atol=1e-5)
    original = boxes_to_original(boxes[:3], image_size, (height, width))
    np.testing.assert_array_equal(original, boxes[:3] * np.float32([0.5, 0.625, 0.5, 0.625]))
    pasted = paste_masks(masks[:3], original, (height, width))
    for result, mask in zip(results, pasted):
        assert result["segmentation"]["size"] == [height, width]
        np.testing.assert_array_equal(mask_util.decode(result["segmentation"]), mask)

    no_masks = detections_to_coco(
        11, boxes, scores, classes, None, valid, image_size, (height, width), LABEL_TO_CATEGORY
    )
    assert [{k: v for k, v in r.items() if k != "segmentation"} for r in results] == no_masks


def _stats_with_a_stray_detection(coco_gt: COCO, image_id: int, iou_type: str) -> list[float]:
    """COCOeval's 12 numbers over `image_id` for one 2×2 detection in its corner, which matches
    no ground truth: 0 where the ground truth has objects, -1 where it has none."""
    image = coco_gt.imgs[image_id]
    corner = np.zeros((image["height"], image["width"]), np.uint8)
    corner[:2, :2] = 1
    stray = {
        "image_id": image_id,
        "category_id": coco_gt.getCatIds()[0],
        "bbox": [0, 0, 2, 2],
        "score": 1.0,
        "segmentation": mask_util.encode(np.asfortranarray(corner)),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(coco_gt, coco_gt.loadRes([stray]), iou_type)
        reference.params.imgIds = [image_id]
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return [float(v) for v in reference.stats]


def test_no_detections_warn_and_give_cocoevals_zeros_and_minus_ones(coco_gt):
    """With no detection at all every value was 0, also for the size ranges without ground
    truth, where COCOeval gives -1 as soon as there is one detection."""
    detections = {i: [] for i in FED_IMAGES}
    evaluator = _evaluator(detections, np.random.default_rng(3))
    assert evaluator.results == [] and evaluator.image_ids == list(FED_IMAGES)
    with pytest.warns(UserWarning, match="No detections"):
        metrics = evaluator.evaluate(coco_gt)
    assert len(metrics) == 24 and set(metrics.values()) == {0.0}  # objects of every size
    small = COCO()  # one 10×10 object: no medium or large ones
    square = [20.0, 20.0, 30.0, 20.0, 30.0, 30.0, 20.0, 30.0]
    small.dataset = {
        "images": [{"id": 7, "height": 100, "width": 120}],
        "categories": [{"id": 3, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [20, 20, 10, 10],
             "area": 100.0, "iscrowd": 0, "segmentation": [square]},
        ],
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        small.createIndex()
    with pytest.warns(UserWarning, match="No detections"):
        metrics = evaluate_coco(small, [], [7])
    for iou_type in IOU_TYPES:
        got = [metrics[f"{iou_type}/{name}"] for name in STAT_NAMES]
        assert got == _stats_with_a_stray_detection(small, 7, iou_type), iou_type
        assert got[3:6] == [0.0, -1.0, -1.0] and got[9:] == [0.0, -1.0, -1.0], got


def test_unknown_label_raises(coco_gt):
    detections = _perfect_detections(coco_gt)
    detections[1][0] = (5, *detections[1][0][1:])
    with pytest.raises(ValueError, match=r"labels \[5\] are not in label_to_category_id"):
        _evaluator(detections, np.random.default_rng(4))


def test_bad_label_mappings_raise(coco_gt):
    with pytest.raises(ValueError, match="several labels to one category"):
        CocoEvaluator({0: 3, 1: 3})
    # 99 is no category of the ground truth: its results are left out, named in a warning.
    evaluator = CocoEvaluator({0: 3, 1: 17, 2: 99})
    for batch, outputs in _batches(_perfect_detections(coco_gt), np.random.default_rng(5)):
        evaluator.add_batch(batch, outputs)
    with pytest.warns(UserWarning, match=r"category ids absent from the ground truth .*\{99: "):
        assert evaluator.evaluate(coco_gt)["bbox/AP"] < 1.0


def test_input_errors(coco_gt):
    rng = np.random.default_rng(6)
    (batch, outputs), _ = _batches(_perfect_detections(coco_gt), rng)
    evaluator = CocoEvaluator(LABEL_TO_CATEGORY)
    with pytest.raises(ValueError, match=r"outputs lacks keys \['valid'\]"):
        evaluator.add_batch(batch, {k: v for k, v in outputs.items() if k != "valid"})
    evaluator.add_batch(batch, outputs)
    with pytest.raises(ValueError, match="fed twice"):
        evaluator.add_batch(batch, outputs)
    with pytest.raises(ValueError, match="iou_types"):
        evaluator.evaluate(coco_gt, iou_types=("keypoints",))

    no_masks = CocoEvaluator(LABEL_TO_CATEGORY)
    no_masks.add_batch(batch, {k: v for k, v in outputs.items() if k != "masks"})
    assert no_masks.evaluate(coco_gt, iou_types=("bbox",))["bbox/AP"] > 0
    with pytest.raises(ValueError, match="'segm' evaluation needs a 'segmentation'"):
        no_masks.evaluate(coco_gt)

    unknown_image = {**batch, "image_id": np.array([1, 2, 12345])}
    stray = CocoEvaluator(LABEL_TO_CATEGORY)
    stray.add_batch(unknown_image, outputs)
    with pytest.raises(ValueError, match=r"image ids \[12345\] are not in the ground truth"):
        stray.evaluate(coco_gt)
    with pytest.raises(ValueError, match="not in image_ids"):
        evaluate_coco(coco_gt, no_masks.results, [1], iou_types=("bbox",))
    # Categories absent from the ground truth (torchvision's "N/A" ids) are left out, as COCOeval
    # leaves them; results none of whose categories it has mean a wrong label map.
    ids = no_masks.image_ids
    extra = [dict(r, category_id=99) for r in no_masks.results[:3]]
    with pytest.warns(UserWarning, match=r"3 results of category ids absent .*\{99: 3\}"):
        got = evaluate_coco(coco_gt, no_masks.results + extra, ids, iou_types=("bbox",))
    assert got == evaluate_coco(coco_gt, no_masks.results, ids, iou_types=("bbox",))
    with pytest.raises(ValueError, match=r"none of the results' category ids \[99\]"):
        evaluate_coco(coco_gt, extra, ids, iou_types=("bbox",))
    from_zero = copy.deepcopy(coco_gt.dataset)
    for annotation in from_zero["annotations"]:
        annotation["id"] -= 1
    with pytest.raises(ValueError, match="annotation with id 0"):
        gt = eval_program.coco_from_dict(from_zero)
        evaluate_coco(gt, no_masks.results, [1, 2], iou_types=("bbox",))
    with pytest.raises(ValueError, match=r"batch lacks keys \['image_size'\]"):
        CocoEvaluator(LABEL_TO_CATEGORY).add_batch(
            {k: v for k, v in batch.items() if k != "image_size"}, outputs
        )
    for image_size, orig_size, name in (
        ((0, 10), (10, 10), "image_size"),
        ((10, 10), (10, -3), "orig_size"),
        ((10, np.nan), (10, 10), "image_size"),
        ((10, 10.5), (10, 10), "image_size"),
        ((10, 10, 3), (10, 10), "image_size"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be a positive \\(height, width\\)"):
            detections_to_coco(
                1,
                np.zeros((1, 4)),
                np.ones(1),
                np.zeros(1, int),
                None,
                np.ones(1, bool),
                image_size,
                orig_size,
                LABEL_TO_CATEGORY,
            )
        with pytest.raises(ValueError, match=f"{name} must be a positive"):
            boxes_to_original(np.zeros((1, 4)), image_size, orig_size)
    with pytest.raises(ValueError, match=r"boxes must have shape \[\.\.\., 4\]"):
        boxes_to_original(np.zeros((1, 3)), (10, 10), (10, 10))
    with pytest.raises(ValueError, match="scores"):
        detections_to_coco(
            1,
            np.zeros((2, 4)),
            np.ones(1),
            np.zeros(2, int),
            None,
            np.ones(2, bool),
            (10, 10),
            (10, 10),
            LABEL_TO_CATEGORY,
        )


def test_image_ids_of_any_size_survive_the_gather():
    """Eval gathers image ids through JAX (int32): ids of 2**31 or more come back whole."""
    ids = np.array([0, 7, 2**31 - 1, 2**31, 20230101120000, -5, 2**62 - 1], np.int64)
    mesh = sharding.create_mesh(jax.devices()[:1])
    sharded = sharding.shard_batch({"image_id": eval_program.image_id_parts(ids)}, mesh)
    gathered = multihost_utils.process_allgather(sharded, tiled=True)["image_id"]
    np.testing.assert_array_equal(eval_program.image_id_of(gathered), ids)
    with pytest.raises(ValueError, match=r"below 2\*\*62 in magnitude, got \[4611686018427387904"):
        eval_program.image_id_parts(np.array([1, 2**62]))


def _builder_with(names, ids):
    """A stand-in for a TFDS builder: the parts `schema.class_names` and
    `schema.label_to_category_id` read."""
    from types import SimpleNamespace

    label = SimpleNamespace(names=list(names))
    info = SimpleNamespace(
        features={"objects": {"label": label}},
        metadata={"category_ids": list(ids)},
        full_name="my_coco/1.0.0",
    )
    return SimpleNamespace(info=info, data_dir="/data/my_coco")


def _classes_config(num_classes, names=(), ids=()):
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "model": {"num_classes": num_classes},
            "data": {"class_names": tuple(names), "label_to_category_id": tuple(ids)},
        }
    )


def test_check_dataset_classes_refuses_categories_the_model_lacks(caplog):
    """A model trained on categories 1, 3 ("cat", "dog") scored on the dataset rebuilt with a
    category 7 added: refused, naming it (the metrics would count it as never detected)."""
    builder = _builder_with(["cat", "dog", "bird"], [1, 3, 7])
    config = _classes_config(2, ["cat", "dog"], [1, 3])
    with pytest.raises(ValueError, match=r"does not predict: \[\(7, 'bird'\)\]"):
        eval_program.check_dataset_classes(config, builder)
    config = _classes_config(3, ["cat", "hound", "bird"], [1, 2, 7])  # ids renumbered
    with pytest.raises(ValueError, match=r"\[\(3, 'dog'\)\].*label_to_category_id=\[1, 2, 7\]"):
        eval_program.check_dataset_classes(config, builder)
    with pytest.raises(ValueError, match=r"the model has 2 classes but dataset my_coco/1\.0\.0"):
        eval_program.check_dataset_classes(_classes_config(2), builder)  # ids from the dataset
    eval_program.check_dataset_classes(_classes_config(3), builder)
    # More labels than the dataset's categories (torchvision's 90 on COCO's 80) is fine, and
    # names that differ in case or '_' only are not reported.
    caplog.set_level("WARNING")
    config = _classes_config(4, ["Cat", "x", "dog", "wild_bird"], [1, 2, 3, 7])
    eval_program.check_dataset_classes(
        config, _builder_with(["cat", "dog", "wild bird"], [1, 3, 7])
    )
    assert not caplog.records
    config = _classes_config(3, ["cat", "hound", "bird"], [1, 3, 7])
    eval_program.check_dataset_classes(config, builder)
    assert "(3, 'hound', 'dog')" in caplog.text


def test_a_category_the_model_lacks_that_no_annotation_uses_only_warns(caplog):
    """eval.py --json on a json that lists every label of a project: a category the model does
    not predict and no annotation uses cannot change COCO's numbers (COCOeval leaves out a
    category without ground truth or detections); one that annotations use is refused."""
    builder = _builder_with(["cat", "dog", "bird", "fish"], [1, 3, 7, 9])
    config = _classes_config(2, ["cat", "dog"], [1, 3])
    asked = []

    def annotated_ids():
        asked.append(True)
        return {1, 3, 9}

    with pytest.raises(ValueError, match=r"does not predict: \[\(9, 'fish'\)\]"):
        eval_program.check_dataset_classes(config, builder, annotated_ids=annotated_ids)
    assert "which no annotation uses (not scored): [(7, 'bird')]" in caplog.text
    caplog.clear()
    eval_program.check_dataset_classes(config, builder, annotated_ids=lambda: {1})
    assert "[(7, 'bird'), (9, 'fish')] (id, name)" in caplog.text
    asked.clear()
    eval_program.check_dataset_classes(
        config, _builder_with(["cat"], [1]), annotated_ids=annotated_ids
    )
    assert not asked  # read only when the model lacks a category


def test_check_dataset_classes_refuses_other_names_for_every_id_when_strict(caplog):
    """eval.py --json: a json whose ids all name other classes than the model's (in its
    `label_to_category_id`, or label by label without one) is refused; one name in common
    (case and '_' aside) leaves warnings; without `strict_names` only warnings."""
    builder = _builder_with(["leaf", "stone", "cup"], [1, 2, 3])
    for ids in ([1, 2, 3], []):
        config = _classes_config(3, ["circle", "square", "triangle"], ids)
        message = r"\(id, model's, dataset's\): \[\(1, 'circle', 'leaf'\), \(2, 'square', "
        with pytest.raises(ValueError, match=message):
            eval_program.check_dataset_classes(config, builder, strict_names=True)
        caplog.clear()
        eval_program.check_dataset_classes(config, builder)
        assert "3 categories of dataset my_coco/1.0.0 in /data/my_coco have other" in caplog.text
        config.data.class_names = ("Leaf", "square", "triangle")  # one the same
        eval_program.check_dataset_classes(config, builder, strict_names=True)
    eval_program.check_dataset_classes(_classes_config(3), builder, strict_names=True)  # no names


@pytest.mark.parametrize("strict_names", [False, True])
def test_check_dataset_classes_refuses_the_models_names_under_other_ids(strict_names):
    """Another export of the same labels, numbered otherwise (two ids swapped; all renumbered
    from 1): refused, naming each moved class, strict or not; names repeated in the model
    (torchvision's "N/A") match nothing."""
    config = _classes_config(4, ["circle", "square", "triangle", "N/A"], [1, 5, 9, 11])
    swapped = _builder_with(["square", "circle", "triangle"], [1, 5, 9])
    message = (
        r"other ids \(name, dataset's id, model's id\): \[\('square', 1, 5\), \('circle', 5, 1\)\]"
    )
    with pytest.raises(ValueError, match=message):
        eval_program.check_dataset_classes(config, swapped, strict_names=strict_names)
    renumbered = _builder_with(["Circle", "square", "triangle"], [1, 2, 3])
    message = r"\[\('square', 2, 5\), \('triangle', 3, 9\)\]: each would be scored"
    with pytest.raises(ValueError, match=message):
        eval_program.check_dataset_classes(config, renumbered, strict_names=strict_names)
    config.data.class_names = ("circle", "square", "N/A", "N/A")
    eval_program.check_dataset_classes(  # "triangle" is 9 in both, "N/A" is no name
        config, _builder_with(["circle", "square", "N/A"], [1, 5, 9]), strict_names=strict_names
    )


def test_evaluations_in_threads_give_stdout_back(coco_gt):
    """pycocotools prints; its output went to a `contextlib.redirect_stdout` of the whole
    process, and two evaluations in threads left `sys.stdout` a StringIO (7 of 10 tries), every
    later print lost. Each evaluation's print block now runs alone."""
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(iscrowd=False))
    results = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in anns
    ]
    image_ids = sorted({a["image_id"] for a in anns})
    want = evaluate_coco(coco_gt, results, image_ids, iou_types=("bbox",))
    stdout, got = sys.stdout, []
    for _ in range(6):
        threads = [
            threading.Thread(
                target=lambda: got.append(
                    evaluate_coco(coco_gt, results, image_ids, iou_types=("bbox",))
                )
            )
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sys.stdout is stdout
    assert got == [want] * 12
