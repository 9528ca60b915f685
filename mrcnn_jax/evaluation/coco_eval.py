"""COCO evaluation of fixed-size, padded model outputs with pycocotools.

Per eval batch, call ``CocoEvaluator.add_batch(batch, outputs)`` with numpy (or jax) arrays:
``batch`` holds ``image_id [B]``, ``image_size [B, 2]`` (height, width of the resized content),
``orig_size [B, 2]`` and ``valid [B]`` (False on rows padding the last batch), ``outputs`` the
model's ``boxes [B, D, 4]``, ``scores [B, D]``, ``classes [B, D]``, optionally
``masks [B, D, M, M]``, and ``valid [B, D]`` (see docs/CONTRACTS.md). Each real detection becomes
one COCO result (boxes mapped back to the original image per axis as torchvision's
``transform.postprocess``, masks pasted there and RLE-encoded). ``evaluate(coco_gt)`` runs
``COCOeval`` on exactly the images fed and returns its 12 summary numbers per IoU type under
Detectron2's names (``bbox/AP``, ``segm/AP50``...), on pycocotools' 0..1 scale (-1 where
pycocotools finds a metric undefined, e.g. no ground truth).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn_jax.evaluation.masks import PASTE_METHODS, paste_masks
from mrcnn_jax.evaluation.output import write_file

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)
IOU_TYPES = ("bbox", "segm")


def _positive_size(name: str, size) -> tuple[int, int]:
    """``(height, width)`` as ints; ValueError unless two positive finite whole numbers."""
    values = np.asarray(size, dtype=np.float64)
    whole = values.shape == (2,) and (np.isfinite(values) & (values == np.round(values))).all()
    if not (whole and (values > 0).all()):
        raise ValueError(f"{name} must be a positive (height, width), got {size!r}")
    return int(values[0]), int(values[1])


def boxes_to_original(
    boxes: np.ndarray, image_size: tuple[int, int], orig_size: tuple[int, int]
) -> np.ndarray:
    """Boxes in resized-input pixels -> original-image pixels, torchvision's ``resize_boxes``.

    Args:
      boxes: ``[..., 4]`` ``(x1, y1, x2, y2)`` in the resized image.
      image_size: ``(height, width)`` of the resized content (the batch's ``image_size``).
      orig_size: ``(height, width)`` of the original image.

    Returns:
      ``[..., 4]`` float32: x times ``orig_w / resized_w``, y times ``orig_h / resized_h`` (ratios
      in float32, as torchvision), not clipped.

    Raises:
      ValueError: unless both sizes are positive ``(height, width)`` pairs and boxes ``[..., 4]``.
    """
    resized_h, resized_w = _positive_size("image_size", image_size)
    orig_h, orig_w = _positive_size("orig_size", orig_size)
    boxes = np.asarray(boxes, dtype=np.float32)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4], got {boxes.shape}")
    ratio_h = np.float32(orig_h) / np.float32(resized_h)
    ratio_w = np.float32(orig_w) / np.float32(resized_w)
    return boxes * np.array([ratio_w, ratio_h, ratio_w, ratio_h], np.float32)


def detections_to_coco(
    image_id: int,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    masks: np.ndarray | None,
    valid: np.ndarray,
    image_size: tuple[int, int],
    orig_size: tuple[int, int],
    label_to_category_id: Mapping[int, int],
    mask_paste: str = "torchvision",
) -> list[dict[str, Any]]:
    """One image's padded detections as COCO result dicts (JSON-serialisable).

    Args:
      image_id: the COCO image id.
      boxes: ``[D, 4]`` float ``(x1, y1, x2, y2)`` in resized-input pixels.
      scores: ``[D]`` float confidence.
      classes: ``[D]`` int contiguous labels ``0..K-1``.
      masks: ``[D, M, M]`` float probabilities of each detection's class over its box, or None.
      valid: ``[D]`` bool; False rows are padding and are skipped.
      image_size: ``(height, width)`` of the resized image content the boxes are in.
      orig_size: ``(height, width)`` of the original image.
      label_to_category_id: contiguous label -> original COCO ``category_id``.
      mask_paste: ``paste_masks`` method, ``"detectron2"`` or ``"torchvision"`` (the model's
        ``roi_heads.mask_paste``).

    Returns:
      For each valid row, in order: ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}``
      with the box mapped back per axis (``boxes_to_original``) and clipped to the original image,
      plus, when masks are given, ``"segmentation"``: the COCO RLE (``counts`` as str) of the mask
      pasted with the unclipped original-pixel box (see ``paste_masks``).

    Raises:
      ValueError: on mismatched shapes, a size that is not a positive (height, width), or a valid
        row whose label is not in ``label_to_category_id``.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    classes = np.asarray(classes)
    valid = np.asarray(valid, dtype=bool)
    num = boxes.shape[0]
    if boxes.shape != (num, 4):
        raise ValueError(f"boxes must have shape [D, 4], got {boxes.shape}")
    for name, array in (("scores", scores), ("classes", classes), ("valid", valid)):
        if array.shape != (num,):
            raise ValueError(f"{name} must have shape [D] = {(num,)}, got {array.shape}")
    if masks is not None and np.shape(masks)[:1] != (num,):
        raise ValueError(f"masks must have shape [D, M, M] with D = {num}, got {np.shape(masks)}")
    _positive_size("image_size", image_size)
    height, width = _positive_size("orig_size", orig_size)

    labels = [int(label) for label in classes[valid]]
    unknown = sorted(set(labels) - set(label_to_category_id))
    if unknown:
        raise ValueError(
            f"image {image_id}: labels {unknown} are not in label_to_category_id "
            f"(known labels: {sorted(label_to_category_id)})"
        )
    orig_boxes = boxes_to_original(boxes[valid], image_size, orig_size)
    clipped = np.clip(orig_boxes, 0.0, [width, height, width, height])
    results = [
        {
            "image_id": int(image_id),
            "category_id": int(label_to_category_id[label]),
            "score": float(score),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
        }
        for label, score, (x1, y1, x2, y2) in zip(labels, scores[valid], clipped)
    ]
    if masks is not None:
        pasted = paste_masks(
            np.asarray(masks)[valid], orig_boxes, (height, width), method=mask_paste
        )
        rles = mask_util.encode(pasted.transpose(1, 2, 0).view(np.uint8))
        for result, rle in zip(results, rles):
            result["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return results


_STDOUT_LOCK = threading.RLock()


@contextlib.contextmanager
def pycocotools_output() -> Iterator[io.StringIO]:
    """Sends what pycocotools prints (its index messages, its tables) into a new buffer during
    the block. `sys.stdout` is one for the whole process: the blocks of several threads run
    one at a time (two evaluations in threads left it redirected for good, every later print
    lost)."""
    with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()) as buffer:
        yield buffer


def load_coco_gt(coco_gt: COCO | str | os.PathLike) -> COCO:
    """Returns ``coco_gt`` if it is a ``COCO``, else loads the annotation json at that path."""
    if isinstance(coco_gt, COCO):
        return coco_gt
    with pycocotools_output():
        return COCO(os.fspath(coco_gt))


def evaluate_coco(
    coco_gt: COCO | str | os.PathLike,
    results: Sequence[Mapping[str, Any]],
    image_ids: Iterable[int],
    iou_types: Sequence[str] = IOU_TYPES,
) -> dict[str, float]:
    """Runs ``COCOeval`` on ``results`` over exactly ``image_ids``.

    Args:
      coco_gt: ground truth, a ``COCO`` object or the path of an ``instances_*.json``.
      results: COCO result dicts (as from ``detections_to_coco``); "segm" needs "segmentation"
        in every one. For "segm" the "bbox" field is dropped before loading, so that pycocotools
        takes each detection's area (which decides small/medium/large) from its mask, as Detectron2.
      image_ids: the images evaluated (``params.imgIds``), including those without detections.
      iou_types: any of "bbox", "segm".

    Returns:
      ``{f"{iou_type}/{name}": value}`` for ``name`` in ``STAT_NAMES``: COCOeval's, -1 where
      the ground truth has no object of a size range. With no results at all, a warning (and
      COCOeval's 0s and -1s: pycocotools' ``loadRes`` cannot load an empty list).

    Raises:
      ValueError: on an unknown IoU type, image ids absent from ``coco_gt``, results none of
        whose category ids is in ``coco_gt`` (a wrong label map), an annotation id 0 in
        ``coco_gt`` (pycocotools would count its matches as misses), or "segm" requested for
        results without masks. Results of other categories absent from ``coco_gt`` (e.g.
        torchvision's "N/A" classes) are left out with a warning, as COCOeval leaves them out.
    """
    unknown_types = [t for t in iou_types if t not in IOU_TYPES]
    if unknown_types:
        raise ValueError(f"iou_types must be among {IOU_TYPES}, got {list(iou_types)}")
    coco_gt = load_coco_gt(coco_gt)
    if 0 in coco_gt.anns:
        raise ValueError(
            "the ground truth has an annotation with id 0, which pycocotools' matching takes for "
            "'no ground truth matched' (its detections would count as misses): number the "
            "annotations from 1"
        )
    image_ids = sorted({int(i) for i in image_ids})
    missing_images = sorted(set(image_ids) - set(coco_gt.getImgIds()))
    if missing_images:
        raise ValueError(f"image ids {missing_images[:10]} are not in the ground truth")
    known = set(coco_gt.getCatIds())
    missing = collections.Counter(
        r["category_id"] for r in results if r["category_id"] not in known
    )
    if missing and len(missing) == len({r["category_id"] for r in results}):
        raise ValueError(
            f"none of the results' category ids {sorted(missing)} is in the ground truth "
            f"({sorted(known)[:10]}...): is the label -> category id map the dataset's?"
        )
    if missing:  # COCOeval scores only the ground truth's categories: these would not count
        warnings.warn(
            f"{sum(missing.values())} results of category ids absent from the ground truth are "
            f"left out, as COCOeval leaves them: {dict(sorted(missing.items()))} (results per id)",
            stacklevel=2,
        )
        results = [r for r in results if r["category_id"] in known]
    result_images = {r["image_id"] for r in results}
    if not result_images <= set(image_ids):
        raise ValueError(
            f"results for images {sorted(result_images - set(image_ids))[:10]} "
            "that are not in image_ids"
        )

    metrics = {}
    for iou_type in iou_types:
        names = [f"{iou_type}/{name}" for name in STAT_NAMES]
        if not results:
            warnings.warn(
                f"No detections to evaluate: {iou_type} metrics are 0 (-1 where the ground "
                "truth has no object of that size).",
                stacklevel=2,
            )
        elif iou_type == "segm" and not all("segmentation" in r for r in results):
            raise ValueError("'segm' evaluation needs a 'segmentation' in every result")
        dropped = "bbox" if iou_type == "segm" else "segmentation"
        # New dicts: loadRes adds keys ("id", "area", ...) to the ones it is given.
        detections = [{k: v for k, v in r.items() if k != dropped} for r in results]
        with pycocotools_output() as summary:
            coco_dt = coco_gt.loadRes(detections) if detections else _no_results(coco_gt)
            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
            coco_eval.params.imgIds = image_ids
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        logging.info("COCO %s evaluation:\n%s", iou_type, summary.getvalue())
        metrics.update({name: float(v) for name, v in zip(names, coco_eval.stats)})
    return metrics


class CocoEvaluator:
    """Accumulates COCO results over eval batches and evaluates them with pycocotools."""

    def __init__(self, label_to_category_id: Mapping[int, int], mask_paste: str = "torchvision"):
        """``label_to_category_id``: contiguous label ``0..K-1`` -> original COCO ``category_id``;
        ``mask_paste``: how masks are pasted (``paste_masks`` method).

        Raises:
          ValueError: if two labels map to the same category id.
        """
        categories = list(label_to_category_id.values())
        if len(set(categories)) != len(categories):
            raise ValueError(
                f"label_to_category_id maps several labels to one category id: "
                f"{dict(label_to_category_id)}"
            )
        if mask_paste not in PASTE_METHODS:
            raise ValueError(f"mask_paste must be one of {PASTE_METHODS}, got {mask_paste!r}")
        self.label_to_category_id = dict(label_to_category_id)
        self.mask_paste = mask_paste
        self._results: list[dict[str, Any]] = []
        self._image_ids: dict[int, None] = {}  # an insertion-ordered set

    @property
    def results(self) -> list[dict[str, Any]]:
        """The COCO result dicts accumulated so far (a shallow copy of the list)."""
        return list(self._results)

    @property
    def image_ids(self) -> list[int]:
        """The ids of the real (non-padding) images fed so far, in order."""
        return list(self._image_ids)

    def add_batch(self, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Adds one eval batch.

        Args:
          batch: ``image_id [B]`` int, ``image_size [B, 2]`` int (height, width of the resized
            content), ``orig_size [B, 2]`` int (height, width of the original image), ``valid [B]``
            bool (False on rows padding the batch; skipped).
          outputs: ``boxes [B, D, 4]`` (x1, y1, x2, y2) resized-input pixels, ``scores [B, D]``,
            ``classes [B, D]`` contiguous labels, optionally ``masks [B, D, M, M]`` probabilities,
            ``valid [B, D]`` bool.

        Raises:
          ValueError: on a missing key, an image id fed twice, or an unknown label (see
            ``detections_to_coco``).
        """
        arrays = {}
        for name, source, keys in (
            ("batch", batch, ("image_id", "image_size", "orig_size", "valid")),
            ("outputs", outputs, ("boxes", "scores", "classes", "valid")),
        ):
            missing = [k for k in keys if k not in source]
            if missing:
                raise ValueError(f"{name} lacks keys {missing}")
            arrays |= {f"{name}/{k}": np.asarray(source[k]) for k in keys}
        masks = None if outputs.get("masks") is None else np.asarray(outputs["masks"])
        for b in np.flatnonzero(arrays["batch/valid"]):
            image_id = int(arrays["batch/image_id"][b])
            if image_id in self._image_ids:
                raise ValueError(f"image_id {image_id} was fed twice")
            self._results += detections_to_coco(
                image_id,
                arrays["outputs/boxes"][b],
                arrays["outputs/scores"][b],
                arrays["outputs/classes"][b],
                None if masks is None else masks[b],
                arrays["outputs/valid"][b],
                tuple(arrays["batch/image_size"][b]),
                tuple(arrays["batch/orig_size"][b]),
                self.label_to_category_id,
                mask_paste=self.mask_paste,
            )
            self._image_ids[image_id] = None

    def write_results(self, path: str | os.PathLike) -> None:
        """Writes the accumulated results as a COCO results json (loadable by ``COCO.loadRes``).

        Raises:
          OSError: it cannot be written, naming `path` (``output.write_file``).
        """
        write_file(path, lambda f: json.dump(self._results, f))

    def evaluate(
        self, coco_gt: COCO | str | os.PathLike, iou_types: Sequence[str] = IOU_TYPES
    ) -> dict[str, float]:
        """COCO metrics of the accumulated results over the images fed; see ``evaluate_coco``."""
        return evaluate_coco(coco_gt, self._results, self._image_ids, iou_types)


def _no_results(coco_gt: COCO) -> COCO:
    """An empty results set over `coco_gt`'s images and categories, for COCOeval (pycocotools'
    `loadRes([])` fails on the empty list)."""
    empty = COCO()
    empty.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    empty.createIndex()
    return empty
