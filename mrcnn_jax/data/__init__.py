"""Datasets (TFDS builders with instance masks) and the tf.data input pipeline.

- ``shapes``: synthetic circles/squares/triangles generated from a seed (``build_shapes``).
- ``coco_format``: any COCO-format dataset (annotation json + image folder per split), e.g. your
  own data exported from an annotation tool; ``coco_reader`` reads and checks the files.
- ``coco_instances``: COCO 2017 with instance masks, from the official files in a manual dir.
- ``schema``: the feature schema they share, and the label <-> category-id maps.
- ``coco_json``: a split as a COCO ground-truth json for pycocotools.
- ``pipeline``: fixed-shape numpy batches for training and evaluation.
"""

from collections.abc import Collection

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from mrcnn_jax import paths
from mrcnn_jax.data import coco_format, coco_instances, shapes

# The `config.data` fields that name files or folders.
PATH_FIELDS = ("data_dir", "manual_dir", "train_json", "train_images", "val_json", "val_images")


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose `config.data` paths (`PATH_FIELDS`) are absolute: `~` is
    expanded (as TFDS does for `data_dir`) and a relative path is taken from the current folder,
    as this process reads it, so that the config stored with the checkpoints names the same
    files from any folder (eval.py, notebooks). Empty fields and URLs (`gs://...`) are kept.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for field in PATH_FIELDS:
        config.data[field] = paths.absolute(config.data[field])
    return config


def get_builder(
    data: ml_collections.ConfigDict, splits: Collection[str] | None = None
) -> tfds.core.DatasetBuilder:
    """Returns the prepared builder of ``config.data``, building it first if needed.

    "shapes" (``data.shapes_num_train`` / ``data.shapes_num_val`` images of 128×128) is generated
    into ``data.data_dir`` on first use (seconds); "coco_instances" is built from the official
    files in ``data.manual_dir`` on first use (an hour or so); "coco_format" is built from
    ``data.train_json``/``train_images`` and ``data.val_json``/``val_images`` on first use and
    again whenever one of those files changes.

    ``splits``: the split names that will be read (default: all). A "coco_format" split not
    among them is left out, with a warning, when its files cannot be read (the train files of
    a run evaluated on another machine); the build of both is used while they can.

    Raises:
      ValueError: a field that does not name a dataset's files; ``data.data_dir`` where TFDS
        cannot make or read its folders (e.g. below a file), naming the field.
    """
    try:
        return _builder(data, splits)
    except OSError as error:
        data_dir = paths.absolute(data.data_dir).rstrip("/") if data.data_dir else ""
        filename = str(error.filename or "")
        if not (data_dir and (filename == data_dir or filename.startswith(data_dir + "/"))):
            raise
        raise ValueError(
            f"config.data.data_dir={data.data_dir!r} cannot hold the built datasets: "
            f"{error.strerror or error}: {error.filename} (name a folder that can be made and "
            "written, or leave it empty for ~/tensorflow_datasets)"
        ) from error


def _builder(
    data: ml_collections.ConfigDict, splits: Collection[str] | None
) -> tfds.core.DatasetBuilder:
    data_dir = data.data_dir or None
    exif_orientation = data.get("exif_orientation", False)  # a field added later
    if exif_orientation and data.dataset != "coco_format":
        raise ValueError(
            f"config.data.exif_orientation=True turns the images of a coco_format dataset (your "
            f"json) as they are built; {data.dataset!r} is built as it is: leave it False"
        )
    if data.dataset == "shapes":
        return shapes.build_shapes(
            data_dir, num_train=data.shapes_num_train, num_val=data.shapes_num_val
        )
    if data.dataset == "coco_instances":
        builder = coco_instances.CocoInstances(data_dir=data_dir)
        manual_dir = data.manual_dir or None
        if not builder.data_path.exists():  # to be built: TFDS's check is an AssertionError
            coco_instances.check_manual_dir(manual_dir, epath.Path(builder.data_dir_root))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
        return builder
    if data.dataset == "coco_format":
        fields = {"train": ("train_json", "train_images"), "validation": ("val_json", "val_images")}
        needed = set(fields).intersection(splits or ())  # none known: all of them
        for split in sorted(needed or fields):
            if unset := [f"config.data.{name}" for name in fields[split] if not data[name]]:
                raise ValueError(
                    f"config.data.dataset='coco_format' needs {' and '.join(unset)} (the "
                    f"{split} split's annotation json and image folder)"
                )
        files = {  # a split not needed and not given at all is left out without a word
            split: (data[ann], data[images])
            for split, (ann, images) in fields.items()
            if split in (needed or fields) or data[ann] or data[images]
        }
        optional = set(files) - needed if needed else ()
        return coco_format.build_coco_format(files, data_dir, optional, exif_orientation)
    raise ValueError(
        f"config.data.dataset is {data.dataset!r}; "
        "expected 'shapes', 'coco_instances' or 'coco_format'"
    )
