"""Reading and checking COCO-format annotation json and images, as examples of the shared schema.

The format (as CVAT, Label Studio, labelme converters and COCO itself write it): ``images``
({id, file_name, height, width}), ``annotations`` ({id, image_id, category_id, bbox [x, y, w, h],
segmentation (polygons, RLE or uncompressed RLE), optional iscrowd and area}) and ``categories``
({id, name}). Labels 0..K-1 follow ascending category id; every object keeps its category id.
``iscrowd`` is 0 or 1 (or false/true; absent means 0). ``area`` (COCO evaluation sorts objects into
small, medium and large by it) is the mask's pixel count where absent or null, and where 0 on an
object whose mask is not empty (one warning per file).

JPEG and PNG images are stored as the original bytes and read everywhere as
``tf.io.decode_image(channels=3)`` reads them (JPEGs with libjpeg's accurate DCT, as PIL and
OpenCV); grayscale becomes RGB (the gray value in all three channels), the alpha channel of RGBA and
gray+alpha PNGs is dropped, and 16-bit PNGs become 8-bit (the high byte: value // 256). Images of
any other format OpenCV reads (BMP, GIF, WebP, TIFF, ...) are stored as the PNG of OpenCV's 8-bit
RGB decoding, the pixels ``visualize.read_image`` (scripts/predict.py) reads: TF's own decoders read
a palette BMP's indices as grey and a GIF's first frame without its canvas. Each split logs how
many images were read so. An EXIF orientation (a JPEG's, PNG's or WebP's) is not applied, so
annotations refer to the stored pixel grid: one warning per file lists the images that carry one.
With ``exif_orientation`` (``config.data.exif_orientation``, for annotations drawn on the images
as photo viewers show them) those images are stored as the PNG of OpenCV's decoding turned so.

The json may start with a UTF-8 byte order mark. Bad input raises ValueError naming the json and the
image or annotation id: a missing, empty or undecodable image file, or one whose size differs from
the json (sizes swapped by an EXIF orientation, or by a TIFF's orientation tag, which OpenCV
always applies: the message says what to do); image or annotation ids that are not integers, or
repeat; an image id of magnitude 2**62 or more (``schema.IMAGE_ID_LIMIT``); an image ``height`` or
``width`` that is not a positive integer, or a ``file_name`` that is not a string; a category id not
listed in ``categories``; annotations without ``segmentation`` (all of them are counted: Mask R-CNN
needs a mask for every object); an annotation whose polygons all have fewer than 3 points (its mask
would be empty; optional, COCO 2017 has a few); a malformed box, polygon or RLE, such as a polygon
coordinate that is not a finite number or lies farther outside the image than the image's larger
side (pycocotools' memory grows with the coordinates: NaN or 1e9 would ask it for tens of GB); an
``iscrowd`` other than 0 or 1 (such as "0"); an ``area`` that is not a finite number >= 0. Polygon
parts of fewer than 3 points beside valid ones are dropped (one warning per file), boxes reaching
outside their image are clipped for training and evaluated as given, as pycocotools does (one
warning per file), masks of no pixel (a polygon of points on one line) are kept as empty mask
targets (one warning per file), boxes of zero area or far from their mask (IoU of the box and the
mask's bounding box below 0.5, as a box written [x1, y1, x2, y2] instead of [x, y, width, height]
gives) are kept as given with one warning per file, and images without annotations are kept with
``image/has_annotations`` False. Annotation ids may start at 0 (one warning per file: evaluation
numbers them 1..N, ``coco_json.coco_ground_truth``)."""

import collections
import dataclasses
import json
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow as tf
from absl import logging
from etils import epath
from pycocotools import mask as mask_utils

from mrcnn_jax import image_headers, paths
from mrcnn_jax.data import masks, schema
from mrcnn_jax.image_headers import JPEG_SIGNATURE, PNG_SIGNATURE

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
_LISTED_IDS = 5  # ids quoted in an error or warning about many annotations
_MIN_BOX_MASK_IOU = 0.5  # a box overlapping its mask's bounding box less is reported


@dataclasses.dataclass(frozen=True)
class AnnotationFile:
    """A checked COCO annotation json.

    Attributes:
        path: the file.
        images: its ``images`` entries, file order.
        annotations: image id -> that image's ``annotations`` entries, file order.
        categories: (category id, name) of each label 0..K-1, ascending id.
    """

    path: epath.Path
    images: list[dict[str, Any]]
    annotations: dict[Any, list[dict[str, Any]]]
    categories: tuple[tuple[int, str], ...]


def first_ids(items: Sequence[Any]) -> str:
    """The first few of ``items`` for a message, e.g. '[4, 9, 12, ...]'."""
    head = ", ".join(str(i) for i in items[:_LISTED_IDS])
    return f"[{head}{', ...' if len(items) > _LISTED_IDS else ''}]"


def _load_json(path: epath.Path) -> dict[str, Any]:
    """The json of ``path`` with its three top-level lists checked."""
    try:
        text = path.read_bytes()  # json.loads skips a byte order mark (as Windows tools write)
    except OSError as e:
        name = os.fspath(path)
        relative = "" if os.path.isabs(name) or paths.is_url(name) else f" from {os.getcwd()}"
        raise ValueError(f"{path}: cannot read the annotation file{relative}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: the annotation file is not JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key) if isinstance(data, dict) else None, list):
            raise ValueError(f"{path}: no '{key}' list at the top level")
    return data


def _is_id(value: Any) -> bool:
    """Whether ``value`` is a COCO id: an integer (not a bool), stored as int64."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_whole(value: Any) -> bool:
    """Whether ``value`` is an integer number >= 0 (3 or 3.0; not a bool or a string)."""
    whole = (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer()
    )
    return whole and value >= 0


def _check_images(images: list[dict], path: epath.Path) -> None:
    """Raises ValueError naming the file and image if an image entry lacks a key, has a key of the
    wrong type or repeats."""
    seen = set()
    for i, image in enumerate(images):
        if not isinstance(image, dict):
            raise ValueError(f"{path}: image entry #{i} is not an object: {str(image)[:80]}")
        missing = [k for k in _IMAGE_KEYS if k not in image]
        if missing:
            raise ValueError(f"{path}: image entry #{i} (id {image.get('id')}) lacks {missing}")
        if not _is_id(image["id"]):
            raise ValueError(f"{path}: image entry #{i} has a non-integer id {image['id']!r}")
        if not -schema.IMAGE_ID_LIMIT <= image["id"] < schema.IMAGE_ID_LIMIT:
            raise ValueError(
                f"{path}: image entry #{i} has the id {image['id']}, of magnitude 2**62 or more: "
                "the evaluation takes ids below 2**62 (renumber the images)"
            )
        for key in ("height", "width"):
            if not (_is_whole(image[key]) and image[key] > 0):
                raise ValueError(
                    f"{path}: image id {image['id']}: {key} {image[key]!r} is not a positive "
                    "integer"
                )
        if not (isinstance(image["file_name"], str) and image["file_name"]):
            raise ValueError(
                f"{path}: image id {image['id']}: file_name {image['file_name']!r} is not a "
                "file name (a non-empty string)"
            )
        if image["id"] in seen:
            raise ValueError(f"{path}: image id {image['id']} appears twice")
        seen.add(image["id"])


def _categories(entries: list[dict], path: epath.Path) -> tuple[tuple[int, str], ...]:
    """(id, name) of every category, ascending id; ids and names must be unique."""
    found = []
    for i, category in enumerate(entries):
        cid, name = category.get("id"), category.get("name")
        if not _is_id(cid) or not isinstance(name, str) or not name:
            raise ValueError(
                f"{path}: category entry #{i} needs an integer id (64-bit) and a name: "
                f"{str(category)[:120]}"
            )
        found.append((cid, name))
    for index, what in ((0, "id"), (1, "name")):
        counts = collections.Counter(c[index] for c in found)
        repeated = [v for v, n in counts.items() if n > 1]
        if repeated:
            advice = (
                "each category needs its own name: rename the others, e.g. with their supercategory"
                if index
                else "each category needs its own id"
            )
            raise ValueError(
                f"{path}: category {what}s listed more than once: {repeated} ({advice})"
            )
    return tuple(sorted(found))


def _check_annotation(
    ann: dict, index: int, images: dict, category_ids: list[int], path: epath.Path
) -> None:
    """Raises ValueError naming the file and annotation id (or entry ``index``, where the id is
    bad) if ``ann`` is malformed."""
    if not isinstance(ann, dict):
        raise ValueError(f"{path}: annotation entry #{index} is not an object: {str(ann)[:80]}")
    where = f"{path}: annotation id {ann.get('id')}"
    missing = [k for k in _ANNOTATION_KEYS if k not in ann]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    if not _is_id(ann["id"]):
        raise ValueError(
            f"{path}: annotation entry #{index} has a non-integer id {ann['id']!r} (COCO ids "
            "are integers)"
        )
    if ann["image_id"] not in images:
        raise ValueError(f"{where}: image_id {ann['image_id']} is not in 'images'")
    if ann["category_id"] not in category_ids:
        raise ValueError(
            f"{where}: category_id {ann['category_id']} is not listed in 'categories' "
            f"(ids {category_ids})"
        )
    box = ann["bbox"]
    if not (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
        and box[2] >= 0
        and box[3] >= 0
    ):
        raise ValueError(f"{where}: bbox {box} is not [x, y, w, h] with finite w, h >= 0")
    iscrowd = ann.get("iscrowd", 0)
    if not (isinstance(iscrowd, int) and iscrowd in (0, 1)):  # bool is an int
        raise ValueError(f"{where}: iscrowd {iscrowd!r} is not 0 or 1 (or false/true)")
    area = ann.get("area")
    if area is not None and not (
        isinstance(area, (int, float)) and not isinstance(area, bool) and 0 <= area < math.inf
    ):
        raise ValueError(
            f"{where}: area {area!r} is not a finite number >= 0 (leave it out or null to have it "
            "computed from the mask)"
        )


def _polygon_problem(polygon: list, height: int, width: int) -> str | None:
    """Why a polygon part of a height×width image must not be rasterised, or None.

    pycocotools' memory grows with the coordinates (NaN, inf or 1e9 ask it for tens of GB), so
    each must be a finite number at most the image's larger side outside the image.
    """
    try:
        finite = math.isfinite(sum(polygon))  # NaN or inf anywhere: not finite
    except (TypeError, OverflowError):
        finite = False
    if not finite:
        for v in polygon:
            if not (isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))):
                return f"polygon coordinate {repr(v)[:40]} is not a finite number"
    side = max(height, width)
    low, high = min(polygon, default=0), max(polygon, default=0)
    if low < -side or high > 2 * side:
        far = repr(low if low < -side else high)[:40]
        return (
            f"polygon coordinate {far} lies more than the image's larger side ({side} pixels) "
            f"outside the image of width {width} and height {height}"
        )
    return None


def _polygon_parts(ann: dict, image: dict, path: epath.Path) -> tuple[int, int]:
    """(polygon parts, parts with fewer than 3 points) of an annotation; (0, 0) for RLE.

    Raises ValueError naming the annotation if a part is not a list of an even number of values,
    or has a coordinate that is not a finite number or lies far outside ``image``.
    """
    segmentation = ann["segmentation"]
    if not isinstance(segmentation, list):
        return 0, 0
    if not all(isinstance(p, list) and len(p) % 2 == 0 for p in segmentation):
        raise ValueError(
            f"{path}: annotation id {ann['id']}: a polygon has an odd number of coordinates or is "
            f"not a list: {str(segmentation)[:80]}"
        )
    for polygon in segmentation:
        problem = _polygon_problem(polygon, int(image["height"]), int(image["width"]))
        if problem:
            raise ValueError(f"{path}: annotation id {ann['id']}: {problem}")
    return len(segmentation), sum(1 for p in segmentation if len(p) < 6)


def _check_masks(
    annotations: list[dict], images: dict, path: epath.Path, allow_empty_masks: bool
) -> None:
    """Checks that every annotation has a segmentation that gives a mask; warns on dropped parts.

    Raises ValueError with the count and the first annotation ids of the annotations without
    ``segmentation`` (missing, null or []), or, unless ``allow_empty_masks``, whose polygons all
    have fewer than 3 points.
    """
    unsegmented = [a["id"] for a in annotations if not a.get("segmentation")]
    if unsegmented:
        raise ValueError(
            f"{path}: {len(unsegmented)} of {len(annotations)} annotations have no "
            f"'segmentation' (annotation ids {first_ids(unsegmented)}). Mask R-CNN learns a mask "
            "for every object: export the annotations with polygons or RLE masks, not boxes only."
        )
    parts = {a["id"]: _polygon_parts(a, images[a["image_id"]], path) for a in annotations}
    empty = [i for i, (total, short) in parts.items() if total and short == total]
    if empty and not allow_empty_masks:
        raise ValueError(
            f"{path}: {len(empty)} annotations have only polygons of fewer than 3 points, so an "
            f"empty mask (annotation ids {first_ids(empty)}); fix or delete them."
        )
    partial = [i for i, (total, short) in parts.items() if short and short < total]
    if partial or empty:
        logging.warning(
            "%s: dropped polygon parts of fewer than 3 points from %d annotations (ids %s)",
            path, len(partial) + len(empty), first_ids(partial + empty),
        )  # fmt: skip


def read_annotation_file(path: epath.PathLike, allow_empty_masks: bool = False) -> AnnotationFile:
    """Reads and checks a COCO annotation json (see the module docstring for what is checked).

    Args:
        path: the json.
        allow_empty_masks: keep annotations whose polygons all have fewer than 3 points (with an
            empty mask; their boxes still train) instead of raising. COCO 2017 has a few.

    Raises:
        ValueError: naming the file and the bad image or annotation id.
    """
    path = epath.Path(path)
    data = _load_json(path)
    _check_images(data["images"], path)
    categories = _categories(data["categories"], path)
    images = {image["id"]: image for image in data["images"]}
    category_ids = [c for c, _ in categories]
    by_image = collections.defaultdict(list)
    seen = set()
    for index, ann in enumerate(data["annotations"]):
        _check_annotation(ann, index, images, category_ids, path)
        if ann["id"] in seen:
            raise ValueError(f"{path}: annotation id {ann['id']} appears twice")
        seen.add(ann["id"])
        by_image[ann["image_id"]].append(ann)
    _check_masks(data["annotations"], images, path, allow_empty_masks)
    return AnnotationFile(path, data["images"], dict(by_image), categories)


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> bytes:
    """Compressed-RLE counts of a COCO segmentation (polygons, RLE or uncompressed RLE).

    Polygon parts with fewer than 3 points (which pycocotools would read as boxes) are left out;
    none left gives an empty mask. Raises ValueError on malformed input (checked before
    pycocotools sees it); the caller adds the annotation id.
    """
    if isinstance(segmentation, list):  # of even-length lists (checked by _polygon_parts)
        for polygon in segmentation:
            problem = _polygon_problem(polygon, height, width)
            if problem:
                raise ValueError(problem)
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return masks.encode_mask(np.zeros([height, width], np.uint8))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))["counts"]
    if not isinstance(segmentation, dict) or "counts" not in segmentation:
        raise ValueError(f"segmentation is neither polygons nor RLE: {str(segmentation)[:80]}")
    size = segmentation.get("size")
    if not isinstance(size, list) or size != [height, width]:
        raise ValueError(f"RLE size {size} != image size {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        if not all(_is_whole(c) for c in counts):
            raise ValueError(
                f"RLE counts are not all integers >= 0 (run lengths): {str(counts)[:80]}"
            )
        total = sum(counts)
        if total == height * width:
            counts = mask_utils.frPyObjects(segmentation, height, width)["counts"]
    else:
        given = f"RLE counts {repr(counts)[:80]}"
        counts = counts.encode() if isinstance(counts, str) else counts
        if not isinstance(counts, bytes):
            raise ValueError(f"{given} are neither a list of run lengths nor a string")
        # pycocotools' characters are '0'..'o'; the last one must end its run (bit 0x20 unset).
        if any(not 48 <= c <= 111 for c in counts) or (counts and (counts[-1] - 48) & 0x20):
            raise ValueError(f"{given} are not a valid COCO compressed-RLE string")
        runs = masks.rle_counts(tf.constant([counts])).flat_values
        if int(tf.size(runs)) and int(tf.reduce_min(runs)) < 0:
            raise ValueError(
                f"{given} are not a valid COCO compressed-RLE string (a run length < 0)"
            )
        total = int(tf.reduce_sum(runs))
    if total != height * width:
        raise ValueError(f"RLE runs cover {total} pixels, image has {height * width}")
    return counts


def _conversion(encoded: bytes, channels: int) -> str | None:
    """How ``tf.io.decode_image(channels=3)`` converts this image: None if it is 8-bit RGB."""
    if encoded.startswith(PNG_SIGNATURE) and encoded[24] == 16:  # IHDR bit depth
        return "16-bit"
    return {1: "grayscale", 2: "gray+alpha", 3: None, 4: "RGBA"}[channels]


def _as_png(encoded: bytes, orientation: int = 1) -> bytes | None:
    """The PNG of OpenCV's 8-bit RGB decoding of an image file's bytes (stored pixels, turned as
    EXIF `orientation` says by `image_headers.orient`; a TIFF turned as its orientation tag says,
    which OpenCV always applies; as ``visualize.read_image``, whose flags these are: data/
    cannot import evaluation/, tests/test_contracts.py), or None if OpenCV cannot decode them."""
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(encoded, np.uint8), flags)
    if bgr is None:
        return None
    return cv2.imencode(".png", image_headers.orient(bgr, orientation))[1].tobytes()


def _read_image(
    image: dict, image_dir: epath.Path, path: epath.Path, exif_orientation: bool = False
) -> tuple[bytes, str | None, int]:
    """(encoded bytes, conversion, EXIF orientation of the file) of an image entry (JPEG or PNG:
    as stored; any other format, and with `exif_orientation` a file whose EXIF orientation
    turns it: ``_as_png``); checks it decodes to its stated size."""
    file = image_dir / image["file_name"]
    size = (int(image["height"]), int(image["width"]))
    conversion = None
    try:
        encoded = original = file.read_bytes()
        if not encoded:
            raise ValueError("the file is empty (0 bytes)")
        turned = image_headers.exif_orientation(original)
        if exif_orientation and turned != 1:
            encoded = _as_png(encoded, turned)
            conversion = "turned as its EXIF orientation says"
        elif not encoded.startswith((PNG_SIGNATURE, JPEG_SIGNATURE)):
            encoded, conversion = _as_png(encoded), "stored as PNG"
        if encoded is None:
            raise ValueError("not an image format OpenCV decodes")
        shape = tf.io.decode_image(encoded, channels=0, expand_animations=False).shape
    except (OSError, ValueError, cv2.error, tf.errors.OpError) as e:
        raise ValueError(f"{file}: cannot read or decode image id {image['id']}: {e}") from e
    if tuple(shape[:2]) != size:
        swapped = tuple(shape[1::-1]) == size
        tiff = image_headers.tiff_orientation(original) if swapped else 1
        hint = ""
        if swapped and turned >= 5 and exif_orientation:  # 5-8 swap the axes
            hint = (
                f": config.data.exif_orientation=True turned it as its EXIF orientation "
                f"({turned}) says, but the json gives its stored size: where the annotations "
                "were drawn on the stored pixels, set config.data.exif_orientation=False"
            )
        elif swapped and turned >= 5:
            hint = (
                f": its EXIF orientation ({turned}) turns it in photo viewers and annotation "
                "tools, so its annotations were likely drawn on the turned image. Set "
                "config.data.exif_orientation=True to train on the images turned so, or write "
                "them turned as shown (on copies, e.g. ImageMagick's `mogrify -auto-orient "
                "*.jpg`) and use those"
            )
        elif tiff >= 5:
            hint = (
                f": a TIFF is decoded turned as its orientation tag ({tiff}) says (by OpenCV, "
                "as by PIL and photo viewers), the json gives its stored size. Where the "
                "annotations were drawn on the stored pixels, clear the tag (on copies, e.g. "
                "`exiftool -Orientation=1 -n`); otherwise give the json the turned size"
            )
        raise ValueError(
            f"{file}: image id {image['id']} decodes to {tuple(shape[:2])}, but {path} says "
            f"(height, width) = {size}{hint}"
        )
    return encoded, conversion or _conversion(encoded, shape[2]), turned


def _outside(box: Sequence[float], image: dict) -> bool:
    """Whether a COCO [x, y, w, h] box reaches outside its image."""
    x, y, w, h = box
    return x < 0 or y < 0 or x + w > image["width"] or y + h > image["height"]


def _box_misses_mask(box: Sequence[float], rle: bytes, height: int, width: int) -> bool:
    """Whether a COCO [x, y, w, h] box, clipped to the H×W image, has zero area or overlaps the
    bounding box of its non-empty mask (compressed-RLE ``rle``) with an IoU below
    ``_MIN_BOX_MASK_IOU``; both boxes grown by a pixel on every side first, so that a tiny
    object's box is not reported for a pixel of rasterisation."""
    mx, my, mw, mh = (float(v) for v in mask_utils.toBbox({"size": [height, width], "counts": rle}))
    if not mw:  # an empty mask (allow_empty_masks)
        return False
    x, y, w, h = (float(v) for v in box)
    x1, x2 = (min(max(v, 0.0), width) for v in (x, x + w))
    y1, y2 = (min(max(v, 0.0), height) for v in (y, y + h))
    if x1 == x2 or y1 == y2:
        return True
    overlap_w = max(min(x2, mx + mw) - max(x1, mx) + 2, 0.0)
    overlap_h = max(min(y2, my + mh) - max(y1, my) + 2, 0.0)
    overlap = overlap_w * overlap_h
    union = (x2 - x1 + 2) * (y2 - y1 + 2) + (mw + 2) * (mh + 2) - overlap
    return overlap < _MIN_BOX_MASK_IOU * union


def _empty_mask(rle: bytes, height: int, width: int) -> bool:
    """Whether the compressed-RLE mask ``rle`` of an H×W image has no pixel."""
    return not mask_utils.area({"size": [height, width], "counts": rle})


def _area(ann: dict, rle: bytes, height: int, width: int) -> float:
    """The annotation's ``area`` (checked by ``_check_annotation``); the pixel count of its mask
    (compressed-RLE ``rle`` of H×W) where the area is absent, null or 0."""
    if ann.get("area"):
        return float(ann["area"])
    return float(mask_utils.area({"size": [height, width], "counts": rle}))


def _objects(anns: list[dict], height: int, width: int, label_of: dict, path: epath.Path) -> list:
    """The ``objects`` entries of one image's annotations."""
    objects = []
    for ann in anns:
        try:
            rle = segmentation_to_rle(ann["segmentation"], height, width)
        except Exception as e:  # pycocotools raises bare Exceptions on malformed polygons
            raise ValueError(f"{path}: annotation id {ann['id']}: {e}") from e
        objects.append(
            schema.make_object(
                annotation_id=ann["id"],
                box_xywh=ann["bbox"],
                height=height,
                width=width,
                label=label_of[ann["category_id"]],
                category_id=ann["category_id"],
                is_crowd=bool(ann.get("iscrowd", 0)),
                area=_area(ann, rle, height, width),
                mask_rle=rle,
            )
        )
    return objects


def coco_examples(
    annotation_file: epath.PathLike,
    image_dir: epath.PathLike,
    categories: Sequence[tuple[int, str]],
    allow_empty_masks: bool = False,
    exif_orientation: bool = False,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Yields (image id, example in the shared schema) for every image of a COCO-format split.

    Args:
        annotation_file: COCO instances json (images, annotations, categories).
        image_dir: folder holding each image's ``file_name``.
        categories: (category id, name) of each label 0..K-1; the file's categories must be
            exactly these.
        allow_empty_masks: see ``read_annotation_file``.
        exif_orientation: images whose EXIF orientation turns or mirrors them are stored as
            the PNG of OpenCV's decoding turned so (as photo viewers show them, and as
            ``visualize.read_image(path, exif_orientation=True)`` reads them), for annotations
            drawn on the turned images; the json gives their turned size.
    """
    annotations = read_annotation_file(annotation_file, allow_empty_masks)
    path, image_dir = annotations.path, epath.Path(image_dir)
    if sorted(annotations.categories) != sorted(categories):
        unexpected = sorted(set(annotations.categories) - set(categories))
        absent = sorted(set(categories) - set(annotations.categories))
        raise ValueError(
            f"{path}: categories differ: unexpected {first_ids(unexpected)}, "
            f"absent {first_ids(absent)}"
        )
    label_of = {int(c): label for label, (c, _) in enumerate(categories)}
    clipped, zero_area, off_mask, converted = [], [], [], collections.Counter()
    turned, empty, zero_id = [], [], []
    for image in annotations.images:
        anns = annotations.annotations.get(image["id"], [])
        encoded, conversion, orientation = _read_image(image, image_dir, path, exif_orientation)
        if conversion:
            converted[conversion] += 1
        if orientation != 1 and not exif_orientation:
            turned.append(image["id"])
        height, width = int(image["height"]), int(image["width"])
        clipped += [a["id"] for a in anns if _outside(a["bbox"], image)]
        zero_id += [a["id"] for a in anns if a["id"] == 0]
        objects = _objects(anns, height, width, label_of, path)
        zero_area += [a["id"] for a, o in zip(anns, objects) if a.get("area") == 0 and o["area"]]
        empty += [a["id"] for a, o in zip(anns, objects) if _empty_mask(o["mask"], height, width)]
        off_mask += [
            a["id"]
            for a, o in zip(anns, objects)
            if _box_misses_mask(a["bbox"], o["mask"], height, width)
        ]
        yield (
            image["id"],
            {
                "image": encoded,
                "image/id": image["id"],
                "image/filename": image["file_name"],
                "image/size": [height, width],
                "image/has_annotations": bool(anns),
                "objects": objects,
            },
        )
    total = sum(len(anns) for anns in annotations.annotations.values())
    for ids, message in (  # one warning each, with {n} ids and the first {ids}
        (
            clipped,
            "{n} boxes reach outside their image (annotation ids {ids}): training clips them; "
            "COCO evaluation, as pycocotools on this file, matches detections (inside the "
            "image) against the boxes as given, so their bbox IoU stays below 1",
        ),
        (
            turned,
            "{n} images carry an EXIF orientation that turns or mirrors them in photo viewers "
            "(image ids {ids}): training reads their pixels as stored, as the annotations must "
            "refer to them; annotations drawn on the turned image do not fit (for those: "
            "config.data.exif_orientation=True)",
        ),
        (
            empty,
            "{n} annotations have a mask of no pixel (e.g. a polygon of points on one line, or "
            "smaller than a pixel; annotation ids {ids}): they train their boxes with an empty "
            "mask target, and COCO's segm evaluation cannot match them",
        ),
        (
            zero_area,
            "{n} annotations state an area of 0 but have a non-empty mask; their area was "
            "computed from the mask (annotation ids {ids}), which COCO evaluation here sorts "
            "them by (small, medium, large): pycocotools on this file counts them as small",
        ),
        (
            zero_id,
            "annotation ids start at 0 ({n} annotation, id {ids}): pycocotools takes a match "
            "to id 0 for no match, so a detection of it is a false positive; evaluating this "
            "split, this project numbers its annotations 1..N instead, and scores higher than "
            "pycocotools on this file",
        ),
        (
            off_mask,
            f"{{n}} of {total} annotations have a bbox of zero area or far from their mask (IoU "
            f"with the mask's bounding box below {_MIN_BOX_MASK_IOU}; annotation ids {{ids}}): "
            "is each bbox [x, y, width, height] in pixels of its image? Training and "
            "evaluation use the boxes as given.",
        ),
    ):
        if ids:
            logging.warning("%s: %s", path, message.format(n=len(ids), ids=first_ids(ids)))
    if converted:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(converted.items()))
        logging.info("%s: images read as 8-bit RGB: %s (see coco_format.py)", path, kinds)
