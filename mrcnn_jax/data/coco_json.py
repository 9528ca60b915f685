"""A dataset split as a COCO-format ground-truth json, for pycocotools evaluation.

Works for every builder of the shared schema. Boxes and areas are the annotation file's own
(``objects/coco_bbox``, unclipped, and ``area``, both float64), masks the stored compressed RLE,
so COCOeval gives the numbers it gives on the annotation file itself. For COCO 2017 the official
``annotations/instances_val2017.json`` in the manual dir is equivalent and can be used instead.
"""

import json
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from mrcnn_jax.data import schema


def coco_ground_truth(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, Any]:
    """Returns {"images", "annotations", "categories"} of ``split`` in COCO json form.

    Images: {id, file_name, height, width}; annotations: {id, image_id, category_id (the
    dataset's own ids), bbox [x, y, w, h] in original pixels, area, iscrowd, segmentation
    (compressed RLE {size: [h, w], counts: str})}; categories: {id, name} in label order.
    Annotations keep their ids, unless one of them is 0 (as in exports numbered from 0):
    pycocotools' matching takes 0 for "no ground truth matched", so the split's annotations are
    then numbered 1..N in order instead.
    """
    with schema.tfds_notices_dropped():
        dataset = builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
    images, annotations = [], []
    for example in dataset.as_numpy_iterator():
        height, width = (int(v) for v in example["image/size"])
        image_id = int(example["image/id"])
        images.append(
            {
                "id": image_id,
                "file_name": example["image/filename"].decode(),
                "height": height,
                "width": width,
            }
        )
        objects = example["objects"]
        for k, annotation_id in enumerate(objects["id"]):
            annotations.append(
                {
                    "id": int(annotation_id),
                    "image_id": image_id,
                    "category_id": int(objects["category_id"][k]),
                    "bbox": [float(v) for v in objects["coco_bbox"][k]],
                    "area": float(objects["area"][k]),
                    "iscrowd": int(objects["is_crowd"][k]),
                    "segmentation": {
                        "size": [height, width],
                        "counts": objects["mask"][k].decode("ascii"),
                    },
                }
            )
    if any(annotation["id"] == 0 for annotation in annotations):
        for number, annotation in enumerate(annotations, start=1):
            annotation["id"] = number
    return {
        "images": images,
        "annotations": annotations,
        "categories": schema.categories(builder.info),
    }


def write_coco_ground_truth(
    builder: tfds.core.DatasetBuilder, split: str, path: epath.PathLike
) -> epath.Path:
    """Writes ``coco_ground_truth(builder, split)`` as json to ``path``; returns the path."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco_ground_truth(builder, split)))
    return path
