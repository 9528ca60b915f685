"""The feature schema shared by every instance-segmentation builder, and its category maps.

One example = one image:
- ``image``: uint8 [H, W, 3] (JPEG for COCO, PNG for shapes, the files as given for other
  COCO-format data; all decode with ``tf.io.decode_image(channels=3)``).
- ``image/id`` int64 (the COCO image id, of magnitude below ``IMAGE_ID_LIMIT``),
  ``image/filename`` text, ``image/size`` int32 [2] (height, width).
- ``image/has_annotations`` bool: False for images the annotation file lists without any
  annotation (kept: they are real images, and train as all-background).
- ``objects``: a sequence, one entry per annotation, in annotation-file order:
  ``id`` int64 (annotation id), ``bbox`` normalised (ymin, xmin, ymax, xmax) clipped to the image
  (TFDS ``BBoxFeature``; what training reads), ``coco_bbox`` float64 [4] (the annotation's own
  [x, y, w, h] in original pixels, unclipped: what COCO evaluation matches detections against),
  ``label`` contiguous class 0..K-1, ``category_id`` int64 (the dataset's own id), ``is_crowd``
  bool, ``area`` float64 (the annotation's area in original pixels, exactly as given: COCO
  evaluation sorts objects into small/medium/large by it), ``mask`` string (pycocotools
  compressed-RLE counts of the image-sized mask, see ``masks.py``).

The label ↔ category-id map and the class names are in the dataset info (``info.metadata`` and
the ``label`` ClassLabel), so evaluation and prediction read them from any builder.
"""

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Image ids lie in [-IMAGE_ID_LIMIT, IMAGE_ID_LIMIT): the evaluation gathers them across hosts as
# two int32 halves (`evaluator.image_id_parts`).
IMAGE_ID_LIMIT = 2**62


class _TfdsNotices(logging.Filter):
    """Drops TFDS's warnings about TFDS itself: decoding the byte-encoded features (`_float64`)
    reads TFDS's own deprecated `FeatureConnector.dtype` ("Please change your code to use
    ...", twice per pipeline), and each coco_format build (one per set of files) or shapes set of
    a custom size is a "custom data configuration" by design (the message prints the whole
    config)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (
            message.startswith(("`FeatureConnector.dtype` is deprecated", "`TensorInfo.dtype`"))
            or message == "Using custom data configuration: %s"
        )


@contextlib.contextmanager
def tfds_notices_dropped() -> Iterator[None]:
    """Within it, `_TfdsNotices`' warnings are dropped (around `as_dataset` and building)."""
    notices, absl_logger = _TfdsNotices(), logging.getLogger("absl")
    absl_logger.addFilter(notices)
    try:
        yield
    finally:
        absl_logger.removeFilter(notices)


class LocalDatasetInfo(tfds.core.DatasetInfo):
    """The dataset info of a set built on this machine (shapes, COCO-format files).

    TFDS looks up every builder whose data is not prepared yet in its public bucket
    (`initialize_from_bucket`); for these sets it can find nothing, and it leaves an empty
    `tmp*tfds` folder in the system's temporary folder each time. Here the lookup is skipped.
    """

    def initialize_from_bucket(self) -> None:
        """Nothing to look up: the set exists only where it is built."""


def _float64(shape: tuple[int, ...]) -> tfds.features.Tensor:
    """A float64 feature stored as raw bytes: a ``tf.train.Example`` float list is float32."""
    return tfds.features.Tensor(
        shape=shape, dtype=np.float64, encoding=tfds.features.Encoding.BYTES
    )


def instance_features(
    class_names: Sequence[str], image_format: str | None
) -> tfds.features.FeaturesDict:
    """The shared feature schema for ``class_names`` (label order).

    image_format: "jpeg" or "png", or None where the encoded files are stored as they come.
    """
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
            "image/id": tfds.features.Scalar(dtype=np.int64),
            "image/filename": tfds.features.Text(),
            "image/size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "image/has_annotations": tfds.features.Scalar(dtype=np.bool_),
            "objects": tfds.features.Sequence(
                {
                    "id": tfds.features.Scalar(dtype=np.int64),
                    "bbox": tfds.features.BBoxFeature(),
                    "coco_bbox": _float64((4,)),
                    "label": tfds.features.ClassLabel(names=list(class_names)),
                    "category_id": tfds.features.Scalar(dtype=np.int64),
                    "is_crowd": tfds.features.Scalar(dtype=np.bool_),
                    "area": _float64(()),
                    "mask": tfds.features.Tensor(shape=(), dtype=tf.string),
                }
            ),
        }
    )


def category_metadata(category_ids: Sequence[int]) -> tfds.core.MetadataDict:
    """Returns the info metadata recording the dataset category id of each label (label order)."""
    return tfds.core.MetadataDict(category_ids=[int(c) for c in category_ids])


def make_object(
    annotation_id: int,
    box_xywh: Sequence[float],
    height: int,
    width: int,
    label: int,
    category_id: int,
    is_crowd: bool,
    area: float,
    mask_rle: bytes,
) -> dict[str, Any]:
    """Builds one ``objects`` entry from a COCO-style box [x, y, w, h] in pixels of a H×W image.

    ``bbox`` is the box clipped to the image (a box entirely outside becomes a zero-area box at
    the border); ``coco_bbox`` keeps it as given.
    """
    x, y, w, h = (float(v) for v in box_xywh)
    xmin, xmax = np.clip([x, x + w], 0.0, width) / width
    ymin, ymax = np.clip([y, y + h], 0.0, height) / height
    return {
        "id": int(annotation_id),
        "bbox": tfds.features.BBox(ymin=ymin, xmin=xmin, ymax=ymax, xmax=xmax),
        "coco_bbox": np.array([x, y, w, h], np.float64),
        "label": int(label),
        "category_id": int(category_id),
        "is_crowd": bool(is_crowd),
        "area": float(area),
        "mask": mask_rle,
    }


def class_names(info: tfds.core.DatasetInfo) -> list[str]:
    """Class names in label order (label l is the model's logit l + 1)."""
    return list(info.features["objects"]["label"].names)


def label_to_category_id(info: tfds.core.DatasetInfo) -> np.ndarray:
    """[K] int64: the dataset category id of each contiguous label."""
    return np.asarray(info.metadata["category_ids"], dtype=np.int64)


def category_id_to_label(info: tfds.core.DatasetInfo) -> dict[int, int]:
    """Maps each dataset category id to its contiguous label."""
    return {int(c): label for label, c in enumerate(label_to_category_id(info))}


def categories(info: tfds.core.DatasetInfo) -> list[dict[str, Any]]:
    """COCO-json ``categories``: [{"id": category_id, "name": name}] in label order."""
    ids = label_to_category_id(info)
    return [{"id": int(c), "name": n} for c, n in zip(ids, class_names(info), strict=True)]
