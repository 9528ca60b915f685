"""Any COCO-format instance-segmentation dataset as a TFDS builder: your own data, or COCO 2017.

``build_coco_format({"train": (json, image folder), "validation": (json, image folder)})`` builds
each split with ``coco_reader`` into the shared schema (``schema.py``) and returns the builder;
``coco_instances.CocoInstances`` is this builder with COCO 2017's files and fixed categories.

Categories, their number and names come from the json (any ids, any count); labels 0..K-1 follow
ascending category id and the original ids are kept in every object and in the dataset info
(``schema.label_to_category_id``), so evaluation reports them. All splits must list the same
categories, and each needs at least one annotation.

Caching: the builder config's name is the first split's json name plus a hash of every split's
json bytes, of the (file name, size, modification time in seconds) of every image it lists and
of ``exif_orientation`` where set (images turned as their EXIF orientation says: ``coco_reader``),
so the built dataset (``<data_dir>/coco_format/<name>/``) is reused while nothing changed and a
new one is built as soon as a json or an image file changes. Each json and the presence of every
image file are checked before anything is written (see ``coco_reader`` for the checks); an image
that does not decode stops the TFDS build, which leaves nothing behind. Old builds stay until
deleted: a build logs why it runs and names them (``earlier_builds``). A split the caller
does not need (``optional``: eval.py reads one split) is left out when its files cannot be
read, which makes a build of the other splits alone.
"""

import dataclasses
import hashlib
import json
import re
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from mrcnn_jax.data import coco_reader, schema


def _image_files_digest(annotations: coco_reader.AnnotationFile, image_dir: epath.Path) -> bytes:
    """Hash of (file name, size, mtime) of every listed image; a missing file raises ValueError."""
    digest = hashlib.sha256()
    for image in annotations.images:
        file = image_dir / image["file_name"]
        try:
            stat = file.stat()
        except OSError as e:
            anns = [a["id"] for a in annotations.annotations.get(image["id"], [])]
            raise ValueError(
                f"{file}: no such image file for image id {image['id']} of {annotations.path} "
                f"(annotation ids {coco_reader.first_ids(anns)}): {e}"
            ) from e
        digest.update(f"{image['file_name']}\0{stat.length}\0{stat.mtime}\0".encode())
    return digest.digest()


@dataclasses.dataclass
class CocoFormatConfig(tfds.core.BuilderConfig):
    """One COCO-format dataset: ``split_files`` are (split, annotation json, image folder)."""

    split_files: tuple[tuple[str, str, str], ...] = ()
    categories: tuple[tuple[int, str], ...] = ()
    exif_orientation: bool = False


def _read_split(
    split: str, annotation_file: epath.PathLike, image_dir: epath.PathLike
) -> tuple[coco_reader.AnnotationFile, bytes]:
    """The checked annotations of one split and the hash of its image files (ValueError)."""
    if not str(annotation_file) or not str(image_dir):
        raise ValueError(f"split {split!r}: both its annotation json and image folder must be set")
    annotations = coco_reader.read_annotation_file(annotation_file)
    if not annotations.annotations:
        raise ValueError(
            f"{annotations.path}: the {split} split has no annotations "
            f"({len(annotations.images)} images); it needs at least one annotated image"
        )
    return annotations, _image_files_digest(annotations, epath.Path(image_dir))


def coco_format_config(
    splits: Mapping[str, tuple[epath.PathLike, epath.PathLike]],
    optional: Collection[str] = (),
    exif_orientation: bool = False,
) -> CocoFormatConfig:
    """Reads and checks every split's json and image list; names the config by their hash.

    Args:
        splits: split name -> (annotation json, image folder), e.g. {"train": (...),
            "validation": (...)}.
        optional: splits left out, with a warning saying why, when their files cannot be read
            or fail the checks: eval.py needs only the split it evaluates (the train files may
            stay on the machine that trained). The config then names the other splits only, a
            dataset of its own.
        exif_orientation: turn images as their EXIF orientation says (``coco_reader``); a
            dataset of its own.

    Raises:
        ValueError: on any bad input the module docstring lists in a split not `optional`, on a
            split without annotations and on splits with different categories, naming the file
            and image or annotation id.
    """
    digest = hashlib.sha256()
    categories, split_files, left_out = None, [], []
    for split, (annotation_file, image_dir) in sorted(splits.items()):
        try:
            annotations, image_files_digest = _read_split(split, annotation_file, image_dir)
        except ValueError as error:
            if split not in optional:
                raise
            logging.warning("The %s split is left out (not needed here): %s", split, error)
            left_out.append(str(error))
            continue
        if categories is None:
            categories, first = annotations.categories, annotations.path
        elif annotations.categories != categories:
            raise ValueError(
                f"{annotations.path} lists categories {list(annotations.categories)} but {first} "
                f"lists {list(categories)}; all splits need the same categories"
            )
        digest.update(split.encode() + b"\0" + annotations.path.read_bytes() + b"\0")
        digest.update(image_files_digest)
        split_files.append((split, str(annotations.path), str(image_dir)))
    if not split_files:
        raise ValueError(f"no split can be read: {'; '.join(left_out)}")
    if exif_orientation:  # unset, the names of the builds made before the option
        digest.update(b"exif_orientation\0")
    stem = re.sub(r"[^a-z0-9]+", "_", epath.Path(split_files[0][1]).stem.lower()).strip("_")
    return CocoFormatConfig(
        name=f"{stem or 'coco'}_{digest.hexdigest()[:16]}",
        description=f"Built from {', '.join(f'{s}: {j}' for s, j, _ in split_files)}"
        + (", images turned as their EXIF orientation says." if exif_orientation else "."),
        split_files=tuple(split_files),
        categories=categories,
        exif_orientation=exif_orientation,
    )


class CocoFormat(tfds.core.GeneratorBasedBuilder):
    """A COCO-format dataset given by its config (``coco_format_config``): masks, category ids."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {  # noqa: RUF012 (TFDS class attribute)
        "1.0.0": "Initial release.",
        "1.1.0": "objects/coco_bbox (the unclipped box, for COCO evaluation); area in float64.",
        "1.2.0": "Images neither JPEG nor PNG stored as the PNG of OpenCV's decoding.",
    }
    # TFDS 4.9's own lookup of the code path needs importlib_resources on Python >= 3.9.
    code_path = epath.Path(__file__)
    # Keep annotations whose polygons all have < 3 points, with an empty mask, instead of failing.
    allow_empty_masks = False

    def categories(self) -> tuple[tuple[int, str], ...]:
        """(category id, name) of each label 0..K-1."""
        return self.builder_config.categories

    def split_files(self, dl_manager: tfds.download.DownloadManager) -> dict[str, tuple]:
        """split -> (annotation json, image folder)."""
        del dl_manager  # local files
        return {split: (ann, images) for split, ann, images in self.builder_config.split_files}

    def exif_orientation(self) -> bool:
        """Whether images are stored turned as their EXIF orientation says."""
        return self.builder_config.exif_orientation

    def _info(self) -> tfds.core.DatasetInfo:
        return schema.LocalDatasetInfo(
            builder=self,
            description=type(self).__doc__,
            features=schema.instance_features([n for _, n in self.categories()], None),
            metadata=schema.category_metadata([c for c, _ in self.categories()]),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {
            split: self._generate_examples(annotation_file, image_dir)
            for split, (annotation_file, image_dir) in self.split_files(dl_manager).items()
        }

    def _generate_examples(
        self, annotation_file: epath.Path, image_dir: epath.Path
    ) -> Iterator[tuple[Any, dict]]:
        yield from coco_reader.coco_examples(
            annotation_file,
            image_dir,
            self.categories(),
            self.allow_empty_masks,
            self.exif_orientation(),
        )


def earlier_builds(folder: epath.Path, description: str) -> list[epath.Path]:
    """The other builds beside ``folder`` (``<data_dir>/coco_format/<name>``) built from the same
    json paths (their dataset info's ``description``): earlier versions of these files."""
    others = []
    for build in sorted(folder.parent.iterdir()) if folder.parent.is_dir() else ():
        for info in build.glob("*/dataset_info.json"):
            try:
                same = json.loads(info.read_text()).get("configDescription") == description
            except (OSError, ValueError):  # unreadable: not ours to judge
                same = False
            if same and build.name != folder.name:
                others.append(build)
                break
    return others


def build_coco_format(
    splits: Mapping[str, tuple[epath.PathLike, epath.PathLike]],
    data_dir: str | None = None,
    optional: Collection[str] = (),
    exif_orientation: bool = False,
) -> CocoFormat:
    """Builds ``splits`` (split -> (annotation json, image folder)) into ``data_dir`` unless a
    build of exactly these files is there already, and returns the prepared builder; the
    ``optional`` splits are left out when their files cannot be read, images are turned as their
    EXIF orientation says with ``exif_orientation`` (``coco_format_config``)."""
    with schema.tfds_notices_dropped():
        config = coco_format_config(splits, optional, exif_orientation)
        builder = CocoFormat(data_dir=data_dir, config=config)
    if not (epath.Path(builder.data_dir) / "dataset_info.json").exists():  # not built yet
        folder = epath.Path(builder.data_dir).parent  # (`is_prepared` logs a false alarm)
        others = earlier_builds(folder, builder.builder_config.description)
        logging.warning(
            "Building %s from %s: %s",
            folder,
            builder.builder_config.description.removeprefix("Built from ").rstrip("."),
            f"its files changed since the builds in {', '.join(p.name for p in others)} (not "
            "deleted: delete them when no run needs them)"
            if others
            else "the first use of these files",
        )
    try:
        builder.download_and_prepare()
    except BaseException:  # TFDS removes its unfinished files but keeps this build's folder
        folder = epath.Path(builder.data_dir).parent  # <data_dir>/coco_format/<config name>
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    return builder
