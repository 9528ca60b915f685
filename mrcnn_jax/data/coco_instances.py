"""COCO 2017 instance segmentation *with masks*, as a TFDS builder over the official files.

TFDS' own ``coco/2017`` has boxes only. ``CocoInstances`` is the COCO-format builder
(``coco_format.py``: reading, checks, storage as compressed RLE in the shared schema) with the
official ``train2017/``, ``val2017/`` and ``annotations/instances_{train,val}2017.json`` of the
manual dir and COCO's fixed 80 categories (labels 0..79 in ``COCO_CATEGORIES`` order). Unlike
other COCO-format data, annotations whose polygons all have fewer than 3 points (a few in the
official files) are kept with an empty mask: their boxes still train (see ``pipeline.py``).
"""

import tensorflow_datasets as tfds
from etils import epath

from mrcnn_jax.data import coco_format

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


def check_manual_dir(manual_dir: str | None, data_dir: epath.Path) -> None:
    """Raises FileNotFoundError, naming `config.data.manual_dir` and what to put there, when
    the folder COCO 2017 is built from (`manual_dir`, `~` expanded; unset: TFDS's default
    `<data_dir>/downloads/manual`) does not exist or is empty."""
    manual = epath.Path(manual_dir).expanduser() if manual_dir else None
    folder = manual or data_dir / "downloads" / "manual"
    if folder.is_dir() and any(folder.iterdir()):
        return
    state = "is empty" if folder.is_dir() else "does not exist"
    where = f"the manual dir {folder} (config.data.manual_dir) {state}"
    if manual is None:
        where = f"config.data.manual_dir is unset and its default {folder} {state}"
    raise FileNotFoundError(
        f"COCO 2017 is not built yet and its files are not there: {where}. "
        + CocoInstances.MANUAL_DOWNLOAD_INSTRUCTIONS
    )


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


class CocoInstances(coco_format.CocoFormat):
    """COCO 2017 train/validation with instance masks, contiguous labels and category ids."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download train2017.zip, val2017.zip and annotations_trainval2017.zip from cocodataset.org and put
them (or their extracted train2017/, val2017/ and annotations/ folders) in the manual dir
(config.data.manual_dir, or <data_dir>/downloads/manual/)."""
    code_path = epath.Path(__file__)  # for TFDS (see coco_format.CocoFormat)
    allow_empty_masks = True

    def categories(self) -> tuple[tuple[int, str], ...]:
        """COCO 2017's 80 (category id, name) pairs."""
        return COCO_CATEGORIES

    def exif_orientation(self) -> bool:
        """COCO's images are read as stored, as every Mask R-CNN trained on them did."""
        return False

    def split_files(self, dl_manager: tfds.download.DownloadManager) -> dict[str, tuple]:
        """split -> (annotation json, image folder) in the manual dir, extracting zips."""
        return _manual_files(dl_manager)
