r"""Runs a training checkpoint on image files: draws the detections and saves them as COCO results.

  python scripts/predict.py --workdir=/tmp/mrcnn_shapes photo.jpg more/*.png

For each image, `<out_dir>/<name>.png` (name = the file name without its extension) shows the
detections scoring at least --score_threshold: masks in a semi-transparent colour per instance,
boxes, class names and scores. `<out_dir>/detections.json` lists all of them in the COCO results
format, in original image pixels, with the image's path (as given) as "file_name" in place of
"image_id": `{"file_name", "category_id", "label", "class_name", "score", "bbox": [x, y, w, h],
"segmentation": RLE}`. "category_id" is there when the checkpoint's config records
`data.label_to_category_id` (e.g. configs/torchvision_r50_fpn_v1.py); "label" is the
contiguous class 0..K-1.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from pycocotools import mask as mask_util

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to use (default: the latest)."
)
_SCORE_THRESHOLD = flags.DEFINE_float(
    "score_threshold", 0.5, "Keep detections scoring at least this (0..1)."
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where the drawings and detections.json go (default: <workdir>/predictions)."
)
flags.mark_flag_as_required("workdir")


def coco_results(
    result: dict[str, Any], file_name: str, label_to_category_id: Sequence[int] | None
) -> list[dict[str, Any]]:
    """One image's predictor output (see `mrcnn_jax.predictor`) as COCO result dicts."""
    masks = np.asarray(result["masks"], np.uint8)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    results = []
    for (x1, y1, x2, y2), score, label, name, rle in zip(
        result["boxes"], result["scores"], result["classes"], result["class_names"], rles
    ):
        entry = {"file_name": file_name, "label": int(label), "class_name": name}
        if label_to_category_id:
            entry["category_id"] = int(label_to_category_id[int(label)])
        entry |= {
            "score": float(score),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        }
        results.append(entry)
    return results


def _output_names(paths: list[str]) -> list[str]:
    """`<name>.png` for each input; raises if two inputs would write the same file."""
    names = [os.path.splitext(os.path.basename(p))[0] + ".png" for p in paths]
    seen: dict[str, str] = {}
    for path, name in zip(paths, names):
        if name in seen:
            raise app.UsageError(f"{seen[name]!r} and {path!r} would both be drawn to {name}")
        seen[name] = path
    return names


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files after the flags")
    import mrcnn_jax  # after absl parsed the flags, so XLA_FLAGS etc. set on the command line apply
    from mrcnn_jax.evaluation import visualize

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    names = _output_names(paths)
    images = [visualize.read_image(p) for p in paths]  # bad files fail before the model loads
    predictor = mrcnn_jax.load_checkpoint(_WORKDIR.value, _STEP.value)
    label_to_category_id = predictor.config.data.label_to_category_id or None
    out_dir = _OUT_DIR.value or os.path.join(_WORKDIR.value, "predictions")
    os.makedirs(out_dir, exist_ok=True)
    detections = []
    for path, name, image in zip(paths, names, images):
        result = predictor(image, score_threshold=_SCORE_THRESHOLD.value)
        drawn = visualize.draw_detections(
            image, result["boxes"], result["masks"], result["scores"], result["class_names"]
        )
        visualize.write_image(os.path.join(out_dir, name), drawn)
        detections += coco_results(result, path, label_to_category_id)
        print(f"{path}: {len(result['scores'])} detections -> {os.path.join(out_dir, name)}")
    with open(os.path.join(out_dir, "detections.json"), "w") as f:
        json.dump(detections, f)
    print(
        f"{len(detections)} detections of checkpoint step {predictor.step} -> "
        f"{os.path.join(out_dir, 'detections.json')}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
