"""A synthetic instance-segmentation set: circles, squares and triangles, generated from a seed.

Every image has a plain random background and 1–4 objects of random class, colour, size,
position and rotation, painted in order so later objects occlude earlier ones. Each object's mask
is its *visible* pixels only, and a new object is placed only where it leaves every earlier
object at least half visible (up to 20 tries; after that the image has fewer objects). Image i of
a split depends only on (seed, split, i), so a split is reproducible piece by piece.

Labels: 0 circle, 1 square, 2 triangle (category ids 1, 2, 3). Boxes are the tight boxes of the
visible masks; ``area`` is the visible pixel count. The default config (2000 train / 200
validation images of 128×128) builds in seconds; ``build_shapes`` builds any size into any
``data_dir``.
"""

import dataclasses
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mrcnn_jax.data import masks, schema

CLASS_NAMES = ("circle", "square", "triangle")
CATEGORY_IDS = (1, 2, 3)
_SPLIT_CODES = {"train": 0, "validation": 1}
_MAX_OBJECTS = 4
_MIN_VISIBLE_FRACTION = 0.5
_PLACEMENT_TRIES = 20


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    """Size of the generated set. image_size is (height, width) in pixels."""

    num_train: int = 2000
    num_val: int = 200
    image_size: tuple[int, int] = (128, 128)
    seed: int = 0


def _shape_mask(
    kind: int, centre: np.ndarray, size: float, angle: float, shape: tuple[int, int]
) -> np.ndarray:
    """[H, W] bool mask of one circle (diameter=size) / square (side) / triangle (side)."""
    canvas = np.zeros(shape, np.uint8)
    if kind == 0:
        cx, cy = np.round(centre).astype(int)
        cv2.circle(canvas, (int(cx), int(cy)), round(size / 2), 1, thickness=-1)
    else:
        sides = 4 if kind == 1 else 3
        radius = size / (2 * np.sin(np.pi / sides))  # circumradius of a regular polygon
        angles = angle + 2 * np.pi * np.arange(sides) / sides
        corners = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], 1)
    return canvas.astype(bool)


def _distinct_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random RGB colour at L1 distance >= 120 from the background."""
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() >= 120:
            return colour


def generate_image(
    seed: int, split: str, index: int, image_size: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Generates image ``index`` of ``split``.

    Returns:
        image: [H, W, 3] uint8 RGB.
        objects: 1–4 (label, visible mask [H, W] bool) pairs in painting order; no two masks
        overlap and every mask is non-empty.
    """
    height, width = image_size
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    background = rng.integers(0, 256, 3)
    owner = np.full(image_size, -1, np.int32)  # index of the object that shows at each pixel
    full_areas, labels, colours = [], [], []
    smallest = min(height, width)
    for k in range(rng.integers(1, _MAX_OBJECTS + 1)):
        for _ in range(_PLACEMENT_TRIES):
            kind = int(rng.integers(len(CLASS_NAMES)))
            size = rng.uniform(0.12, 0.4) * smallest
            margin = size / 2
            centre = rng.uniform([margin, margin], [width - margin, height - margin])
            shape_mask = _shape_mask(kind, centre, size, rng.uniform(0, 2 * np.pi), image_size)
            candidate = np.where(shape_mask, k, owner)
            visible = [np.count_nonzero(candidate == j) for j in range(k)]
            if all(v >= _MIN_VISIBLE_FRACTION * a for v, a in zip(visible, full_areas)):
                break
        else:
            break
        owner = candidate
        full_areas.append(np.count_nonzero(shape_mask))
        labels.append(kind)
        colours.append(_distinct_colour(rng, background))
    image = np.empty((height, width, 3), np.uint8)
    image[:] = background
    for k, colour in enumerate(colours):
        image[owner == k] = colour
    return image, [(label, owner == k) for k, label in enumerate(labels)]


def _example(seed: int, split: str, index: int, image_size: tuple[int, int]) -> dict[str, Any]:
    """The TFDS example (shared schema) of image ``index`` of ``split``."""
    image, objects = generate_image(seed, split, index, image_size)
    height, width = image_size
    image_id = index + 1
    entries = []
    for k, (label, mask) in enumerate(objects):
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())
        entries.append(
            schema.make_object(
                annotation_id=image_id * 10 + k,
                box_xywh=box,
                height=height,
                width=width,
                label=label,
                category_id=CATEGORY_IDS[label],
                is_crowd=False,
                area=float(mask.sum()),
                mask_rle=masks.encode_mask(mask),
            )
        )
    png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    return {
        "image": png,
        "image/id": image_id,
        "image/filename": f"{split}/{image_id:06d}.png",
        "image/size": np.asarray(image_size, np.int32),
        "image/has_annotations": True,
        "objects": entries,
    }


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic circles / squares / triangles with visible-pixel instance masks."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS class attribute)
        "1.0.0": "Initial release.",
        "1.1.0": "objects/coco_bbox (the unclipped box, for COCO evaluation); area in float64.",
    }
    BUILDER_CONFIGS = [ShapesConfig(name="default", description="2000/200 images of 128x128.")]  # noqa: RUF012
    # TFDS 4.9's own lookup of the code path needs importlib_resources on Python >= 3.9.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return schema.LocalDatasetInfo(
            builder=self,
            description=__doc__,
            features=schema.instance_features(CLASS_NAMES, "png"),
            metadata=schema.category_metadata(CATEGORY_IDS),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # generated locally
        return {
            "train": self._generate_examples("train", self.builder_config.num_train),
            "validation": self._generate_examples("validation", self.builder_config.num_val),
        }

    def _generate_examples(self, split: str, num_images: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for index in range(num_images):
            yield index, _example(cfg.seed, split, index, tuple(cfg.image_size))


def build_shapes(
    data_dir: str | None = None,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    image_size: tuple[int, int] = (128, 128),
    seed: int = 0,
) -> Shapes:
    """Builds (once; later calls just open it) a shapes set in ``data_dir`` and returns its builder.

    The defaults give the "default" config; other values get their own config name, so sets of
    different sizes or seeds live side by side in one data_dir.
    """
    params = {"num_train": num_train, "num_val": num_val, "image_size": tuple(image_size)}
    params["seed"] = seed
    default = Shapes.BUILDER_CONFIGS[0]
    if all(getattr(default, k) == v for k, v in params.items()):
        config = default
    else:
        name = f"train{num_train}_val{num_val}_{image_size[0]}x{image_size[1]}_seed{seed}"
        config = ShapesConfig(name=name, description="Custom size.", **params)
    with schema.tfds_notices_dropped():  # a custom size is a "custom data configuration"
        builder = Shapes(data_dir=data_dir, config=config)
    builder.download_and_prepare()
    return builder
