"""COCO 2017 instance segmentation *with masks*, as a TFDS builder over the official files.

TFDS' own ``coco/2017`` has boxes only. This builder reads the official images and
``instances_{train,val}2017.json`` from the manual dir and stores every annotation's mask as
compressed RLE (the shared schema in ``schema.py``). ``coco_examples`` holds the reading code and
takes just an annotation file and an image folder, so any COCO-format dataset can reuse it.

Handling of imperfect input (all at build time, so training never meets it):
- images without annotations are kept, with ``image/has_annotations`` False;
- a missing, undecodable or wrongly sized image raises an error naming the file and image id;
- an annotation file that is not valid JSON, lacks a required field, has a non-finite or
  negative-size bbox, an unknown category or image id, a duplicate id, an odd-length polygon, or
  an RLE whose size or total length does not match its image raises an error naming the file and
  the annotation id;
- a box reaching outside its image is clipped to it (one warning per file with the count and
  the first ids); polygon parts with fewer than 3 points (which pycocotools reads as boxes) are
  dropped with a warning, and an annotation left without any polygon keeps an empty mask (its
  box still trains; see ``pipeline.py``).
"""

import collections
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from pycocotools import mask as mask_utils

from mrcnn_jax.data import masks, schema

# The 80 COCO 2017 categories (id, name); labels 0..79 follow this order.
COCO_CATEGORIES = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

# split -> (image folder, annotation file); each folder may also come as "<folder>.zip".
_SPLIT_FILES = {
    "train": ("train2017", "instances_train2017.json"),
    "validation": ("val2017", "instances_val2017.json"),
}
_ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")


def load_annotation_file(path: epath.PathLike) -> dict[str, Any]:
    """Reads a COCO annotation json; errors name the file and the bad entry."""
    path = epath.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the annotation file as JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise ValueError(f"{path}: no '{key}' list at the top level")
    seen = set()
    for i, image in enumerate(data["images"]):
        missing = [k for k in _IMAGE_KEYS if k not in image]
        if missing:
            raise ValueError(f"{path}: image entry #{i} (id {image.get('id')}) lacks {missing}")
        if image["id"] in seen:
            raise ValueError(f"{path}: image id {image['id']} appears twice")
        seen.add(image["id"])
    return data


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> tuple[bytes, int]:
    """Compressed-RLE counts of a COCO segmentation (polygons, RLE or uncompressed RLE).

    Returns:
        (counts, number of polygon parts dropped for having fewer than 3 points).

    Raises ValueError on malformed input; the caller adds the annotation id.
    """
    if isinstance(segmentation, list):
        if any(len(p) % 2 for p in segmentation):
            raise ValueError("a polygon has an odd number of coordinates")
        polygons = [p for p in segmentation if len(p) >= 6]
        dropped = len(segmentation) - len(polygons)
        if not polygons:
            return masks.encode_mask(np.zeros([height, width], np.uint8)), dropped
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))["counts"], dropped
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise ValueError(f"segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")
    if list(segmentation.get("size", [])) != [height, width]:
        raise ValueError(f"RLE size {segmentation.get('size')} != image size {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        total = sum(counts)
        counts = mask_utils.frPyObjects(segmentation, height, width)["counts"]
    else:
        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        total = int(tf.reduce_sum(masks.rle_counts(tf.constant([counts]))))
    if total != height * width:
        raise ValueError(f"RLE runs cover {total} pixels, image has {height * width}")
    return counts, 0


def _check_annotation(ann: dict, images: dict, category_ids: set, path: epath.Path) -> None:
    """Raises ValueError naming the file and annotation id if ``ann`` is malformed."""
    where = f"{path}: annotation id {ann.get('id')}"
    missing = [k for k in _ANNOTATION_KEYS if k not in ann]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    if ann["image_id"] not in images:
        raise ValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
    if ann["category_id"] not in category_ids:
        raise ValueError(f"{where}: unknown category_id {ann['category_id']}")
    box = ann["bbox"]
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        and box[2] >= 0
        and box[3] >= 0
    ):
        raise ValueError(f"{where}: bbox {box} is not [x, y, w, h] with finite w, h >= 0")


def coco_examples(
    annotation_file: epath.PathLike,
    image_dir: epath.PathLike,
    categories: Sequence[tuple[int, str]],
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (image id, example in the shared schema) for every image of a COCO-format dataset.

    Args:
        annotation_file: COCO instances json (images, annotations, categories).
        image_dir: folder holding each image's ``file_name``.
        categories: (category id, name) of each label 0..K-1; the file's categories must be
            exactly these.
    """
    path = epath.Path(annotation_file)
    image_dir = epath.Path(image_dir)
    data = load_annotation_file(path)
    found = sorted((c.get("id"), c.get("name")) for c in data["categories"])
    if found != sorted(categories):
        unexpected = sorted(set(found) - set(categories))[:5]
        absent = sorted(set(categories) - set(found))[:5]
        raise ValueError(f"{path}: categories differ: unexpected {unexpected}, absent {absent}")
    images = {image["id"]: image for image in data["images"]}
    label_of = {int(c): label for label, (c, _) in enumerate(categories)}
    by_image = collections.defaultdict(list)
    seen_ids = set()
    for ann in data["annotations"]:
        _check_annotation(ann, images, set(label_of), path)
        if ann["id"] in seen_ids:
            raise ValueError(f"{path}: annotation id {ann['id']} appears twice")
        seen_ids.add(ann["id"])
        by_image[ann["image_id"]].append(ann)
    clipped = []
    for image in data["images"]:
        example = _image_example(image, by_image[image["id"]], image_dir, label_of, path)
        clipped += [a["id"] for a in by_image[image["id"]] if _outside(a["bbox"], image)]
        yield image["id"], example
    if clipped:
        logging.warning(
            "%s: %d boxes reach outside their image and were clipped (annotation ids %s...)",
            path, len(clipped), clipped[:5],
        )  # fmt: skip


def _outside(box: Sequence[float], image: dict) -> bool:
    """Whether a COCO [x, y, w, h] box reaches outside its image."""
    x, y, w, h = box
    return x < 0 or y < 0 or x + w > image["width"] or y + h > image["height"]


def _image_example(
    image: dict, anns: list[dict], image_dir: epath.Path, label_of: dict, path: epath.Path
) -> dict[str, Any]:
    """One example of the shared schema; checks that the image decodes to its stated size."""
    file = image_dir / image["file_name"]
    height, width = int(image["height"]), int(image["width"])
    try:
        encoded = file.read_bytes()
        shape = tf.io.decode_image(encoded, channels=3, expand_animations=False).shape
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"{file}: cannot read or decode image id {image['id']}: {e}") from e
    if tuple(shape[:2]) != (height, width):
        raise ValueError(
            f"{file}: image id {image['id']} decodes to {tuple(shape[:2])}, "
            f"but {path} says (height, width) = {(height, width)}"
        )
    objects = []
    for ann in anns:
        try:
            rle, dropped = segmentation_to_rle(ann["segmentation"], height, width)
        except Exception as e:  # pycocotools raises bare Exceptions on malformed polygons
            raise ValueError(f"{path}: annotation id {ann['id']}: {e}") from e
        if dropped:
            logging.warning("%s: annotation id %s: dropped polygons of < 3 points", path, ann["id"])
        area = ann.get("area", mask_utils.area({"size": [height, width], "counts": rle}))
        objects.append(
            schema.make_object(
                annotation_id=ann["id"],
                box_xywh=ann["bbox"],
                height=height,
                width=width,
                label=label_of[ann["category_id"]],
                category_id=ann["category_id"],
                is_crowd=bool(ann.get("iscrowd", 0)),
                area=float(area),
                mask_rle=rle,
            )
        )
    return {
        "image": encoded,
        "image/id": image["id"],
        "image/filename": image["file_name"],
        "image/size": [height, width],
        "image/has_annotations": bool(anns),
        "objects": objects,
    }


def _manual_files(dl_manager: tfds.download.DownloadManager) -> dict[str, tuple]:
    """split -> (annotation file, image folder), extracting zips; lists every missing file."""
    manual = epath.Path(dl_manager.manual_dir)
    ann_dir = manual / "annotations"
    if not ann_dir.is_dir() and (manual / _ANNOTATIONS_ZIP).exists():
        ann_dir = epath.Path(dl_manager.extract(manual / _ANNOTATIONS_ZIP)) / "annotations"
    files, missing = {}, []
    for split, (folder, json_name) in _SPLIT_FILES.items():
        image_dir = manual / folder
        if not image_dir.is_dir() and (manual / f"{folder}.zip").exists():
            image_dir = epath.Path(dl_manager.extract(manual / f"{folder}.zip")) / folder
        if not image_dir.is_dir():
            missing.append(f"{folder}/ (or {folder}.zip)")
        if not (ann_dir / json_name).exists():
            missing.append(f"annotations/{json_name} (or {_ANNOTATIONS_ZIP})")
        files[split] = (ann_dir / json_name, image_dir)
    if missing:
        raise FileNotFoundError(
            f"COCO 2017 files missing from manual_dir {manual}: {', '.join(missing)}. "
            + CocoInstances.MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    return files


class CocoInstances(tfds.core.GeneratorBasedBuilder):
    """COCO 2017 train/validation with instance masks, contiguous labels and category ids."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (TFDS class attribute)
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download train2017.zip, val2017.zip and annotations_trainval2017.zip from cocodataset.org and put
them (or their extracted train2017/, val2017/ and annotations/ folders) in the manual dir
(config.data.manual_dir, or <data_dir>/downloads/manual/)."""
    # TFDS 4.9's own lookup of the code path needs importlib_resources on Python >= 3.9.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=schema.instance_features([n for _, n in COCO_CATEGORIES], "jpeg"),
            metadata=schema.category_metadata([c for c, _ in COCO_CATEGORIES]),
            homepage="https://cocodataset.org",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {
            split: self._generate_examples(annotation_file, image_dir)
            for split, (annotation_file, image_dir) in _manual_files(dl_manager).items()
        }

    def _generate_examples(
        self, annotation_file: epath.Path, image_dir: epath.Path
    ) -> Iterator[tuple[int, dict]]:
        yield from coco_examples(annotation_file, image_dir, COCO_CATEGORIES)
