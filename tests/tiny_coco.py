"""A tiny COCO-2017-format dataset written by the tests, in the layout of the manual dir.

train2017/ (a folder, 5 images) and val2017.zip (2 images) and annotations/instances_*.json.
Train covers: polygons (one object in two parts), compressed RLE, uncompressed-RLE crowd, a box
reaching outside the image, a degenerate polygon with a zero-width box, an image without
annotations, a crowd-only image and an image with four objects and a crowd. Category ids 1
(person, label 0), 18 (dog, label 16) and 90 (toothbrush, label 79) exercise the id map.
"""

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import tensorflow_datasets as tfds
from pycocotools import mask as mask_utils
from references import mask_runs

from mrcnn_jax.data import coco_instances

CATEGORIES = [
    {"id": c, "name": n, "supercategory": "thing"} for c, n in coco_instances.COCO_CATEGORIES
]


def _rle_of(mask: np.ndarray) -> dict:
    """Compressed RLE with str counts, as json files hold it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    return {"size": list(mask.shape), "counts": mask_runs(mask).tolist()}


def _annotation(ann_id, image_id, category_id, segmentation, height, width, **extra) -> dict:
    """A COCO annotation whose bbox and area come from its mask, as in the official files."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]  # pycocotools reads 4 as a box
        if polygons:
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
        else:
            rle = mask_utils.encode(np.zeros((height, width), np.uint8, order="F"))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    ann = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }
    ann.update(extra)
    return ann


def _blob(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    return ((ys - cy) / (0.3 * height)) ** 2 + ((xs - cx) / (0.25 * width)) ** 2 < 1


def train_json() -> dict:
    sizes = {1: (60, 80), 2: (50, 40), 3: (48, 64), 4: (40, 40), 5: (64, 48)}
    images = [
        {"id": i, "file_name": f"{i:012d}.jpg", "height": h, "width": w}
        for i, (h, w) in sizes.items()
    ]
    crowd = _blob(50, 40, 1)
    crowd_only = _blob(40, 40, 2)
    annotations = [
        _annotation(101, 1, 1, [[5, 5, 30, 5, 30, 40, 5, 40], [40, 10, 60, 12, 50, 30]], 60, 80),
        _annotation(102, 1, 18, [[10.5, 45.2, 70.1, 44.0, 66.0, 58.9]], 60, 80),
        _annotation(103, 1, 90, _rle_of(_blob(60, 80, 3)), 60, 80),
        _annotation(201, 2, 1, _uncompressed(crowd), 50, 40, iscrowd=1),
        _annotation(202, 2, 18, [[20, 30, 39, 30, 39, 49, 20, 49]], 50, 40),
        _annotation(203, 2, 18, [[3, 3, 3, 9], [10, 10, 12, 10, 11, 14]], 50, 40),
        _annotation(401, 4, 1, _uncompressed(crowd_only), 40, 40, iscrowd=1),
    ]
    annotations[1]["bbox"][2] += 30.0  # reaches outside the 80-pixel-wide image: gets clipped
    annotations[5]["bbox"] = [11.0, 10.0, 0.0, 4.0]  # zero width: kept but not trainable
    for ann_id, category_id in ((501, 1), (502, 18), (503, 1), (504, 90), (505, 1)):
        if ann_id == 503:  # a crowd between trainable objects: sorted last on overflow
            crowd = _uncompressed(_blob(64, 48, 4))
            annotations.append(_annotation(ann_id, 5, category_id, crowd, 64, 48, iscrowd=1))
            continue
        x, k = 4 + 10 * (ann_id - 501), ann_id - 501
        poly = [[x, 8, x + 8, 8, x + 8, 20 + 5 * k, x, 20 + 5 * k]]
        annotations.append(_annotation(ann_id, 5, category_id, poly, 64, 48))
    # The area as stated, not float32's 1024.0: COCO's small/medium boundary is 32² inclusive.
    next(a for a in annotations if a["id"] == 504)["area"] = 1023.99999
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def val_json() -> dict:
    images = [
        {"id": 7, "file_name": "000000000007.jpg", "height": 30, "width": 50},
        {"id": 8, "file_name": "000000000008.jpg", "height": 40, "width": 30},
    ]
    annotations = [
        _annotation(701, 7, 90, [[5, 5, 45, 8, 25, 28]], 30, 50),
        _annotation(702, 7, 1, [[30, 20, 34, 24]], 30, 50, bbox=[30.0, 20.0, 4.0, 4.0]),
    ]  # 702: its only polygon has 2 points, so an empty mask with a positive box
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _jpeg(height: int, width: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8), (width, height))
    return cv2.imencode(".jpg", image)[1].tobytes()


def write_manual_dir(root) -> dict[str, dict]:
    """Writes the dataset under ``root``; returns {"train": json, "validation": json}."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train2017").mkdir(exist_ok=True)
    jsons = {"train": train_json(), "validation": val_json()}
    for image in jsons["train"]["images"]:
        data = _jpeg(image["height"], image["width"], image["id"])
        (root / "train2017" / image["file_name"]).write_bytes(data)
    with zipfile.ZipFile(root / "val2017.zip", "w") as archive:
        for image in jsons["validation"]["images"]:
            data = _jpeg(image["height"], image["width"], image["id"])
            archive.writestr(f"val2017/{image['file_name']}", data)
    for split, name in (("train", "train2017"), ("validation", "val2017")):
        (root / "annotations" / f"instances_{name}.json").write_text(json.dumps(jsons[split]))
    return jsons


def build(tmp_dir) -> tuple[coco_instances.CocoInstances, dict[str, dict]]:
    """Writes the manual dir and builds the dataset under ``tmp_dir``."""
    tmp_dir = Path(tmp_dir)
    jsons = write_manual_dir(tmp_dir / "manual")
    builder = coco_instances.CocoInstances(data_dir=str(tmp_dir / "tfds"))
    config = tfds.download.DownloadConfig(manual_dir=str(tmp_dir / "manual"))
    builder.download_and_prepare(download_config=config)
    return builder, jsons
