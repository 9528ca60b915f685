"""Training on your own COCO-format data: a set written here with category ids 3, 17 and 42,
JPEG and PNG images (RGB, grayscale, RGBA, 16-bit), built, trained and evaluated; the cache key;
and every bad input's error, with nothing left half-built."""

import copy
import functools
import io
import json
import logging
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zlib

import cv2
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import tiny_config
from etils import epath
from pycocotools.coco import COCO

from configs import coco_format as coco_format_config
from mrcnn_jax import image_headers
from mrcnn_jax.data import (
    coco_format,
    coco_json,
    coco_reader,
    get_builder,
    masks,
    pipeline,
    schema,
    shapes,
    with_absolute_paths,
)
from mrcnn_jax.evaluation import evaluate_coco, visualize
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs import evaluator, trainer
from mrcnn_jax.train import checkpoint as ckpt_lib
from mrcnn_jax.train import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Listed out of id order: labels follow ascending id (apple 0, fig 1, kiwi 2).
CATEGORIES = [{"id": 42, "name": "kiwi"}, {"id": 3, "name": "apple"}, {"id": 17, "name": "fig"}]
COLOURS = {3: (220, 40, 40), 17: (40, 200, 60), 42: (50, 60, 230)}
# image id -> (file name, (height, width), kind, [(annotation id, category id, x, y, w, h)]).
TRAIN = {
    1: ("rgb.jpg", (48, 64), "rgb", [(11, 3, 4, 6, 20, 30), (12, 42, 34, 10, 24, 28)]),
    2: ("rgb.png", (64, 48), "rgb", [(21, 17, 6, 4, 30, 22), (22, 3, 10, 34, 28, 24)]),
    3: ("gray.jpg", (40, 40), "gray", [(31, 42, 8, 8, 24, 24)]),
    4: ("rgba.png", (40, 56), "rgba", [(41, 17, 20, 4, 30, 30)]),
    5: ("deep.png", (32, 32), "gray16", [(51, 3, 4, 4, 20, 22)]),
    6: ("empty.png", (32, 40), "rgb", []),
}
TIMESTAMP_ID = 20230101120008  # an image id of 2**31 or more, beyond JAX's int32
VAL = {
    7: ("val1.jpg", (48, 48), "rgb", [(71, 3, 4, 4, 20, 20), (72, 17, 26, 24, 18, 20)]),
    TIMESTAMP_ID: ("val2.png", (40, 64), "rgb", [(81, 42, 10, 6, 40, 28)]),
}


def _pixels(size: tuple[int, int], objects: list, seed: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB: a gradient background with each object's box filled in its colour."""
    ys, xs = np.mgrid[: size[0], : size[1]]
    background = [90 + 2 * ys + seed % 256, 140 - xs, 100 + xs + ys]
    image = np.stack(background, axis=-1).clip(0, 255).astype(np.uint8)
    for _, category_id, x, y, w, h in objects:
        image[y : y + h, x : x + w] = COLOURS[category_id]
    return image


def stored_pixels(kind: str, rgb: np.ndarray) -> np.ndarray:
    """The array written to disk for ``kind`` (RGB order; gray16 is uint16)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if kind == "gray":
        return gray
    if kind == "gray16":
        low_byte = np.arange(gray.size).reshape(gray.shape) % 256
        return (gray.astype(np.uint16) * 256 + low_byte).astype(np.uint16)
    if kind == "rgba":
        return np.dstack([rgb, np.full(rgb.shape[:2], 77, np.uint8)])
    return rgb


def expected_rgb(kind: str, stored: np.ndarray) -> np.ndarray:
    """What the dataset should decode ``stored`` to: 8-bit RGB (coco_reader's documented rules)."""
    if kind == "gray16":
        stored = (stored // 256).astype(np.uint8)
    if stored.ndim == 2:
        return np.repeat(stored[..., None], 3, axis=2)
    return stored[..., :3]


def _annotation(ann_id: int, image_id: int, category_id: int, x, y, w, h) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": float(w * h),
        "iscrowd": 0,
        "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
    }


def split_json(images: dict) -> dict:
    return {
        "images": [
            {"id": i, "file_name": name, "height": size[0], "width": size[1]}
            for i, (name, size, _, _) in images.items()
        ],
        "annotations": [
            _annotation(a, i, *rest) for i, (_, _, _, objs) in images.items() for a, *rest in objs
        ],
        "categories": copy.deepcopy(CATEGORIES),
    }


def write_dataset(root: epath.Path) -> dict[str, tuple[epath.Path, epath.Path]]:
    """Writes images/ and train.json, val.json under ``root``; returns the builder's splits."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image_id, (name, size, kind, objects) in {**TRAIN, **VAL}.items():
        stored = stored_pixels(kind, _pixels(size, objects, image_id))
        if stored.ndim == 3:
            stored = cv2.cvtColor(
                stored, cv2.COLOR_RGBA2BGRA if kind == "rgba" else cv2.COLOR_RGB2BGR
            )
        assert cv2.imwrite(str(root / "images" / name), stored)
    for split, images in (("train", TRAIN), ("val", VAL)):
        (root / f"{split}.json").write_text(json.dumps(split_json(images)))
    return {
        "train": (root / "train.json", root / "images"),
        "validation": (root / "val.json", root / "images"),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = epath.Path(tmp_path_factory.mktemp("mydata"))
    splits = write_dataset(root)
    builder = coco_format.build_coco_format(splits, str(root / "tfds"))
    return root, splits, builder


def _examples(builder, split: str, decode_images: bool = False) -> dict[int, dict]:
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    examples = builder.as_dataset(split=split, decoders=decoders).as_numpy_iterator()
    return {int(ex["image/id"]): ex for ex in examples}


def test_categories_come_from_the_json_in_ascending_id_order(dataset):
    info = dataset[2].info
    assert schema.class_names(info) == ["apple", "fig", "kiwi"]
    assert schema.label_to_category_id(info).tolist() == [3, 17, 42]
    assert schema.categories(info) == [
        {"id": 3, "name": "apple"},
        {"id": 17, "name": "fig"},
        {"id": 42, "name": "kiwi"},
    ]


@pytest.mark.parametrize("split, images", [("train", TRAIN), ("validation", VAL)])
def test_objects_keep_category_ids_and_masks(dataset, split, images):
    builder = dataset[2]
    coco = COCO()
    coco.dataset = split_json(images)
    coco.createIndex()
    label = {3: 0, 17: 1, 42: 2}
    examples = _examples(builder, split)
    assert sorted(examples) == sorted(images)
    for image_id, ex in examples.items():
        anns = coco.imgToAnns[image_id]
        objects = ex["objects"]
        assert ex["image/filename"].decode() == images[image_id][0]
        assert ex["image/has_annotations"] == bool(anns)
        assert objects["id"].tolist() == [a["id"] for a in anns]
        assert objects["category_id"].tolist() == [a["category_id"] for a in anns]
        assert objects["label"].tolist() == [label[a["category_id"]] for a in anns]
        height, width = ex["image/size"]
        for k, ann in enumerate(anns):
            mask = masks.decode_mask(objects["mask"][k], height, width)
            np.testing.assert_array_equal(mask, coco.annToMask(ann))


def test_grayscale_rgba_and_16_bit_images_are_read_as_8_bit_rgb(dataset):
    examples = _examples(dataset[2], "train", decode_images=True)
    for image_id, (name, size, kind, objects) in TRAIN.items():
        image = examples[image_id]["image"]
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        stored = stored_pixels(kind, _pixels(size, objects, image_id))
        if kind == "gray16":  # the low bytes vary: truly 16-bit
            assert stored.dtype == np.uint16 and len(np.unique(stored % 256)) > 100
        expected = expected_rgb(kind, stored)
        if name.endswith(".jpg"):  # lossy, and most at the colour edges (chroma subsampling)
            assert np.abs(image.astype(int) - expected).mean() < 5
        else:
            np.testing.assert_array_equal(image, expected)
        if kind == "gray":
            np.testing.assert_array_equal(image[..., 0], image[..., 2])


@pytest.mark.slow
def test_trains_and_evaluates_with_the_original_category_ids(
    dataset, tmp_path, monkeypatch, compile_cache, capsys
):
    """...starting from a checkpoint of other classes (`model.init_from`, fine-tuning), and
    scripts/eval.py gives the final evaluation's numbers again where the train json is gone (a
    run evaluated on another machine)."""
    root, splits, _ = dataset
    train_json = tmp_path / "train.json"  # a copy, deleted before eval.py
    train_json.write_bytes(splits["train"][0].read_bytes())
    config = coco_format_config.get_config()  # with tiny_config's sizes, on 8 CPU devices
    tiny = tiny_config(**{"train.batch_size": 8, "train.num_steps": 2, "train.log_every": 1})
    for field in ("image_size", "max_instances", "mask_size"):
        config.data[field] = tiny.data[field]
    config.model, config.train, config.eval = tiny.model, tiny.train, tiny.eval
    config.model.num_classes = 0  # from the json, as configs/coco_format.py has it
    config.model.roi_heads.score_threshold = 0.0  # an untrained model still detects
    config.data.data_dir = str(root / "tfds")
    config.data.train_json, config.data.train_images = str(train_json), str(splits["train"][1])
    config.data.val_json, config.data.val_images = (str(p) for p in splits["validation"])
    source = ml_collections.ConfigDict(config.to_dict())  # the same model on other classes
    source.model.num_classes = 4
    source.data.class_names = ("fig", "pear", "apple", "plum")
    source.data.label_to_category_id = (1, 2, 3, 4)
    model = MaskRCNN.from_config(source.model)
    source_variables = state_lib.init_variables(model, jax.random.key(7), (64, 64))
    ckpt_lib.save_variables(tmp_path / "source", source, source_variables)
    config.model.init_from = str(tmp_path / "source")
    results_path = tmp_path / "results.json"  # the final evaluation's detections, written
    evaluate_split = functools.partial(evaluator.evaluate_split, results_path=str(results_path))
    monkeypatch.setattr(evaluator, "evaluate_split", evaluate_split)

    metrics = trainer.train_and_evaluate(config, str(tmp_path / "run"))
    assert {"bbox/AP", "segm/AP"} <= set(metrics)
    assert (
        f"Initialised from config.model.init_from='{tmp_path / 'source'}' (step 0): every "
        "variable; the class predictors of 2 of 3 classes (apple, fig), fresh for (kiwi)"
    ) in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["num_classes"] == 3
    assert saved["data"]["class_names"] == ["apple", "fig", "kiwi"]
    results = json.loads(results_path.read_text())
    assert results and {r["category_id"] for r in results} <= {3, 17, 42}
    assert {r["image_id"] for r in results} == set(VAL)

    train_json.unlink()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "eval.py"), f"--workdir={tmp_path / 'run'}"],
        env={**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache)},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"The train split is left out (not needed here): {train_json}" in result.stderr
    evaluated = json.loads((tmp_path / "run" / "eval_2.json").read_text())
    assert {k: evaluated[k] for k in metrics} == metrics


def test_tfds_warnings_about_tfds_itself_are_dropped_and_only_there(tmp_path, caplog):
    """Building prints no "Using custom data configuration: CocoFormatConfig(<every field>)"
    (a build per set of files is the design) and reading none of TFDS's "`FeatureConnector.dtype`
    is deprecated. Please change your code ..." (its own code reads it; TFDS prints it only the
    first 10 times in a process). The filter is gone afterwards."""
    splits = write_dataset(epath.Path(tmp_path))
    config = coco_format_config.get_config()
    config.data.image_size, config.eval.batch_size = (64, 64), 2
    config.data.val_json, config.data.val_images = (str(p) for p in splits["validation"])
    with caplog.at_level("WARNING"):
        builder = coco_format.build_coco_format(splits, str(tmp_path / "tfds"))
        coco_json.coco_ground_truth(builder, "validation")
        next(iter(pipeline.create_eval_dataset(config, builder=builder)))
    notices = ("custom data configuration", "is deprecated")
    assert not [r.getMessage() for r in caplog.records if any(n in r.getMessage() for n in notices)]
    with caplog.at_level("WARNING"):
        tfds_logger = logging.getLogger("absl")
        tfds_logger.warning("Using custom data configuration: %s", builder.builder_config.name)
        tfds_logger.warning("`FeatureConnector.dtype` is deprecated. Please change your code")
    messages = [r.getMessage() for r in caplog.records]
    assert f"Using custom data configuration: {builder.builder_config.name}" in messages
    assert "`FeatureConnector.dtype` is deprecated. Please change your code" in messages


def test_data_paths_are_made_absolute_for_the_stored_config(tmp_path, monkeypatch):
    """Relative paths are taken from the current folder and `~` is expanded (TFDS expands it in
    data_dir); empty fields and URLs stay as given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    config = coco_format_config.get_config()
    config.data.train_json, config.data.train_images = "mydata/train.json", "../images"
    config.data.val_json, config.data.val_images = "gs://bucket/val.json", str(tmp_path / "v")
    config.data.data_dir, config.data.manual_dir = "~/tensorflow_datasets", ""
    resolved = with_absolute_paths(config).data
    assert resolved.train_json == str(tmp_path / "mydata" / "train.json")
    assert resolved.train_images == str(tmp_path.parent / "images")
    assert (resolved.val_json, resolved.val_images) == ("gs://bucket/val.json", str(tmp_path / "v"))
    assert (resolved.data_dir, resolved.manual_dir) == ("/home/someone/tensorflow_datasets", "")
    assert config.data.train_json == "mydata/train.json"  # a copy


def test_building_a_set_leaves_nothing_in_the_temporary_folder(tmp_path, monkeypatch, caplog):
    """TFDS looks every new builder up in its public bucket and leaves an empty `tmp*tfds`
    folder behind (one per train.py or eval.py run that builds a set); ours skip the lookup.
    A shapes set of a custom size is no "custom data configuration" warning either."""
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    splits = write_dataset(epath.Path(tmp_path))
    coco_format.build_coco_format(splits, str(tmp_path / "tfds"))
    with caplog.at_level("WARNING"):
        builder = shapes.build_shapes(str(tmp_path / "tfds"), num_train=2, num_val=1)
    assert sorted(p.name for p in system_tmp.iterdir()) == []
    assert not [r for r in caplog.records if "custom data configuration" in r.getMessage()]
    # What TFDS's own DatasetInfo does there (so the check above can fail):
    tfds.core.DatasetInfo.initialize_from_bucket(builder.info)
    assert [p.name for p in system_tmp.iterdir()] != []


def test_annotation_ids_from_0_are_renumbered_for_pycocotools(tmp_path, caplog):
    """Exports that number annotations from 0: pycocotools' matching reads id 0 as "unmatched",
    so the eval ground truth numbers them 1..N; the ground truth as detections scores AP 1. One
    warning says so (the numbers differ from pycocotools' on the file: it was silent)."""
    splits = write_dataset(epath.Path(tmp_path))

    def from_zero(dataset):
        for number, annotation in enumerate(dataset["annotations"]):
            annotation["id"] = number

    _edit_json(splits, "validation", from_zero)
    with caplog.at_level("WARNING"):
        builder = coco_format.build_coco_format(splits, str(tmp_path / "tfds"))
    warnings = [r.getMessage() for r in caplog.records if "start at 0" in r.getMessage()]
    assert warnings == [
        f"{splits['validation'][0]}: annotation ids start at 0 (1 annotation, id [0]): "
        "pycocotools takes a match to id 0 for no match, so a detection of it is a false "
        "positive; evaluating this split, this project numbers its annotations 1..N instead, "
        "and scores higher than pycocotools on this file"
    ]
    ground_truth = coco_json.coco_ground_truth(builder, "validation")
    annotations = ground_truth["annotations"]
    assert sorted(a["id"] for a in annotations) == list(range(1, len(annotations) + 1))
    results = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 0.9}
        for a in annotations
    ]
    metrics = evaluate_coco(evaluator.coco_from_dict(ground_truth), results, list(VAL))
    assert metrics["bbox/AP"] == pytest.approx(1.0) and metrics["segm/AP"] == pytest.approx(1.0)


def test_the_cache_key_follows_the_jsons_and_the_image_files(tmp_path):
    splits = write_dataset(epath.Path(tmp_path))
    name = coco_format.coco_format_config(splits).name
    assert name.startswith("train_")
    assert coco_format.coco_format_config(splits).name == name

    train_json = splits["train"][0]
    dataset = json.loads(train_json.read_text())
    dataset["annotations"][0]["bbox"][0] += 1
    train_json.write_text(json.dumps(dataset))
    edited_json = coco_format.coco_format_config(splits).name
    assert edited_json != name

    image = tmp_path / "images" / "gray.jpg"
    image.write_bytes(image.read_bytes() + b"\0")  # still decodes; a different file
    edited_image = coco_format.coco_format_config(splits).name
    assert edited_image not in (name, edited_json)

    (tmp_path / "images" / "unlisted.png").write_bytes(b"not listed in any json")
    assert coco_format.coco_format_config(splits).name == edited_image


def test_a_build_says_why_and_names_the_earlier_builds_it_keeps(tmp_path, caplog):
    """Building is announced with its reason; a json edited since an earlier build names that
    build, left on disk, as deletable; another dataset's builds are not named (its json has the
    same file name, in another folder); a reuse is silent."""
    splits = write_dataset(epath.Path(tmp_path))
    data_dir = tmp_path / "tfds"
    (tmp_path / "other").mkdir()
    other = {"train": (tmp_path / "other" / "train.json", splits["train"][1])}
    other["train"][0].write_bytes(splits["train"][0].read_bytes())
    with caplog.at_level("WARNING"):
        coco_format.build_coco_format(other, str(data_dir))
        caplog.clear()
        first = coco_format.build_coco_format(splits, str(data_dir))
    folder = epath.Path(first.data_dir).parent
    files = f"train: {splits['train'][0]}, validation: {splits['validation'][0]}"
    assert [r.getMessage() for r in caplog.records] == [
        f"Building {folder} from {files}: the first use of these files"
    ]
    caplog.clear()
    with caplog.at_level("WARNING"):
        coco_format.build_coco_format(splits, str(data_dir))
    assert not caplog.records
    _edit_json(splits, "train", lambda d: d["annotations"][0]["bbox"].__setitem__(0, 5))
    with caplog.at_level("WARNING"):
        second = coco_format.build_coco_format(splits, str(data_dir))
    assert [r.getMessage() for r in caplog.records] == [
        f"Building {epath.Path(second.data_dir).parent} from {files}: its files changed since "
        f"the builds in {folder.name} (not deleted: delete them when no run needs them)"
    ]


def test_a_second_build_reuses_the_first(dataset, monkeypatch):
    root, splits, builder = dataset

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(coco_format.CocoFormat, "_generate_examples", fail)
    again = coco_format.build_coco_format(splits, str(root / "tfds"))
    assert again.data_dir == builder.data_dir


def test_a_split_not_needed_is_left_out_when_its_files_are_gone(tmp_path, caplog):
    """eval.py on a machine without the train files: the validation split is built alone, with
    the joint build's examples and a warning naming what is missing; where the train split is
    read (training: every split), the error names its file, as before."""
    splits = write_dataset(epath.Path(tmp_path))
    config = coco_format_config.get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    (config.data.train_json, config.data.train_images) = map(str, splits["train"])
    (config.data.val_json, config.data.val_images) = map(str, splits["validation"])
    joint = get_builder(config.data, pipeline.split_names("validation[:2]"))
    assert sorted(joint.info.splits) == ["train", "validation"]  # both there: the joint build
    assert get_builder(config.data).data_dir == joint.data_dir
    train_json = splits["train"][0]
    train_json.unlink()
    with caplog.at_level("WARNING"):
        alone = get_builder(config.data, ["validation"])
    assert sorted(alone.info.splits) == ["validation"] and alone.data_dir != joint.data_dir
    warning = f"The train split is left out (not needed here): {train_json}: cannot read the"
    assert any(r.getMessage().startswith(warning) for r in caplog.records)
    want, got = _examples(joint, "validation"), _examples(alone, "validation")
    assert sorted(got) == sorted(want) == sorted(VAL)
    for image_id, example in want.items():
        tf.nest.map_structure(np.testing.assert_array_equal, got[image_id], example)
    for needed in (None, ["train"], ["train", "validation"], ["no_such_split"]):
        with pytest.raises(ValueError, match=re.escape(f"{train_json}: cannot read the")):
            get_builder(config.data, needed)
    config.data.val_json = config.data.val_images = ""  # fields left unset: named
    message = "config.data.dataset='coco_format' needs config.data.val_json and "
    with pytest.raises(ValueError, match=re.escape(message + "config.data.val_images (the vali")):
        get_builder(config.data, ["validation"])


def _edit_json(splits: dict, split: str, edit) -> None:
    path = splits[split][0]
    dataset = json.loads(path.read_text())
    edit(dataset)
    path.write_text(json.dumps(dataset))


def _ann(dataset: dict, ann_id: int) -> dict:
    return next(a for a in dataset["annotations"] if a["id"] == ann_id)


def _drop_segmentations(dataset: dict) -> None:
    del _ann(dataset, 11)["segmentation"]
    _ann(dataset, 22)["segmentation"] = []
    _ann(dataset, 41)["segmentation"] = None


BAD_INPUT = {
    "missing image file": (
        "train",
        lambda d: d["images"][3].update(file_name="nowhere.png"),
        "nowhere.png: no such image file for image id 4 of .*train.json \\(annotation ids \\[41\\]",
    ),
    "duplicate image ids": (
        "validation",
        lambda d: d["images"][1].update(id=7),
        "val.json: image id 7 appears twice",
    ),
    "unlisted category": (
        "train",
        lambda d: _ann(d, 22).update(category_id=5),
        "train.json: annotation id 22: category_id 5 is not listed in 'categories' "
        "\\(ids \\[3, 17, 42\\]\\)",
    ),
    "no segmentation": (
        "train",
        _drop_segmentations,
        "train.json: 3 of 7 annotations have no 'segmentation' \\(annotation ids \\[11, 22, 41\\]"
        "\\). Mask R-CNN learns a mask for every object",
    ),
    "polygons of < 3 points": (
        "train",
        lambda d: _ann(d, 31).update(segmentation=[[8, 8, 32, 8], [8, 8]]),
        "train.json: 1 annotations have only polygons of fewer than 3 points, so an empty mask "
        "\\(annotation ids \\[31\\]\\)",
    ),
    "empty val split": (
        "validation",
        lambda d: d.update(images=[], annotations=[]),
        "val.json: the validation split has no annotations \\(0 images\\)",
    ),
    "unannotated val split": (
        "validation",
        lambda d: d.update(annotations=[]),
        "val.json: the validation split has no annotations \\(2 images\\)",
    ),
    "different categories": (
        "validation",
        lambda d: d["categories"][0].update(name="kiwifruit"),
        "val.json lists categories .* but .*train.json lists .*same categories",
    ),
    "string annotation id": (
        "train",
        lambda d: _ann(d, 22).update(id="a1"),
        "train.json: annotation entry #3 has a non-integer id 'a1' \\(COCO ids are integers\\)",
    ),
    "null annotation id": (
        "train",
        lambda d: _ann(d, 41).update(id=None),
        "train.json: annotation entry #5 has a non-integer id None",
    ),
    "null image id": (
        "validation",
        lambda d: d["images"][1].update(id=None),
        "val.json: image entry #1 has a non-integer id None",
    ),
    "height 'abc'": (
        "train",
        lambda d: d["images"][0].update(height="abc"),
        "train.json: image id 1: height 'abc' is not a positive integer",
    ),
    "width 0": (
        "validation",
        lambda d: d["images"][0].update(width=0),
        "val.json: image id 7: width 0 is not a positive integer",
    ),
    "file_name 5": (
        "train",
        lambda d: d["images"][3].update(file_name=5),
        "train.json: image id 4: file_name 5 is not a file name",
    ),
    "image id of 2**62": (
        "validation",
        lambda d: d["images"][1].update(id=2**62),
        "val.json: image entry #1 has the id 4611686018427387904, of magnitude 2\\*\\*62 or more",
    ),
    "category id of 2**70": (
        "train",
        lambda d: d["categories"][0].update(id=2**70),
        "train.json: category entry #0 needs an integer id \\(64-bit\\) and a name",
    ),
    "repeated category name": (
        "train",
        lambda d: d["categories"][1].update(name=d["categories"][0]["name"]),
        "train.json: category names listed more than once: .* \\(each category needs its own "
        "name: rename the others",
    ),
    "garbage RLE counts": (  # refused while building: the build leaves nothing either
        "train",
        lambda d: _ann(d, 31).update(segmentation={"size": [40, 40], "counts": "hello world"}),
        "train.json: annotation id 31: RLE counts 'hello world' are not a valid COCO "
        "compressed-RLE string",
    ),
}


def _leftovers(data_dir: pathlib.Path) -> list[str]:
    """Files and folders under ``data_dir`` but TFDS's empty `downloads/extracted/` (made for
    every build) and the builder's `coco_format/`: no folder that looks like a build."""
    ignored = {"downloads", "downloads/extracted", "coco_format"}
    paths = (p.relative_to(data_dir).as_posix() for p in pathlib.Path(data_dir).rglob("*"))
    return sorted(set(paths) - ignored)


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_errors_name_the_file_and_id_and_leave_nothing(case, tmp_path):
    split, edit, message = BAD_INPUT[case]
    splits = write_dataset(epath.Path(tmp_path))
    _edit_json(splits, split, edit)
    with pytest.raises(ValueError, match=message):
        coco_format.build_coco_format(splits, str(tmp_path / "tfds"))
    assert _leftovers(tmp_path / "tfds") == []


def _fail_on_wild_polygons(monkeypatch) -> None:
    """Makes pycocotools' polygon rasteriser fail the test where it would allocate tens of GB (and
    the process be killed): at a coordinate that is not a finite number or is far outside."""
    rasterise = coco_reader.mask_utils.frPyObjects

    def guarded(objects, height, width):
        if isinstance(objects, list):
            for v in (v for polygon in objects for v in polygon):
                if not (isinstance(v, (int, float)) and math.isfinite(v)) or abs(v) > 1e4:
                    pytest.fail(f"pycocotools was given the polygon coordinate {v!r}")
        return rasterise(objects, height, width)

    monkeypatch.setattr(coco_reader.mask_utils, "frPyObjects", guarded)


@pytest.mark.parametrize(
    "value, problem",
    [
        (float("nan"), "is not a finite number"),
        (float("inf"), "is not a finite number"),
        (float("-inf"), "is not a finite number"),
        ("12", "is not a finite number"),
        (None, "is not a finite number"),
        (1e9, "lies more than the image's larger side \\(40 pixels\\) outside the image"),
        (-41, "lies more than the image's larger side \\(40 pixels\\) outside the image"),
    ],
)
def test_polygon_coordinates_are_finite_and_near_the_image_before_rasterising(
    value, problem, tmp_path, monkeypatch
):
    """NaN, inf or 1e9 made pycocotools allocate ~23 GB (the process was killed, no message):
    each is refused, naming the json and annotation, when the json is read (before the build
    starts), and by ``segmentation_to_rle`` itself, before pycocotools sees it."""
    _fail_on_wild_polygons(monkeypatch)
    splits = write_dataset(epath.Path(tmp_path))
    _edit_json(splits, "train", lambda d: _ann(d, 31)["segmentation"][0].__setitem__(2, value))
    message = f"train.json: annotation id 31: polygon coordinate {re.escape(repr(value))} {problem}"
    with pytest.raises(ValueError, match=message):
        coco_format.coco_format_config(splits)
    with pytest.raises(ValueError, match=problem):
        coco_reader.segmentation_to_rle([[8, 8, value, 8, 32, 32]], 40, 40)
    coco_reader.segmentation_to_rle([[-40, 8, 80, 8, 32, 80]], 40, 40)  # at the limit


@pytest.mark.parametrize(
    "counts, problem",
    [
        ("hello world", "are not a valid COCO compressed-RLE string"),
        ("5:0P", "are not a valid COCO compressed-RLE string"),  # the last run unfinished
        ("zzzz", "are not a valid COCO compressed-RLE string"),  # beyond pycocotools' '0'..'o'
        ("\u00e9", "are not a valid COCO compressed-RLE string"),
        ("OQb1", "are not a valid COCO compressed-RLE string \\(a run length < 0\\)"),  # -1, 1601
        (5, "are neither a list of run lengths nor a string"),
        ([1, -1, 1600], "RLE counts are not all integers >= 0"),
    ],
)
def test_malformed_rle_counts_are_refused_with_a_plain_reason(counts, problem):
    with pytest.raises(ValueError, match=problem):
        coco_reader.segmentation_to_rle({"size": [40, 40], "counts": counts}, 40, 40)


def test_an_undecodable_image_fails_the_build_and_leaves_nothing(tmp_path):
    root = epath.Path(tmp_path)
    splits = write_dataset(root)
    image = root / "images" / "rgb.png"
    good = image.read_bytes()
    image.write_bytes(good[: len(good) // 3])  # truncated
    with pytest.raises(ValueError, match=r"rgb.png: cannot read or decode image id 2") as error:
        coco_format.build_coco_format(splits, str(root / "tfds"))
    assert str(image) in str(error.value)
    assert _leftovers(root / "tfds") == []
    image.write_bytes(good)
    builder = coco_format.build_coco_format(splits, str(root / "tfds"))
    assert builder.info.splits["train"].num_examples == len(TRAIN)


def test_an_empty_image_file_fails_the_build_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    root = epath.Path(tmp_path)
    splits = write_dataset(root)
    (root / "images" / "gray.jpg").write_bytes(b"")
    message = r"gray\.jpg: cannot read or decode image id 3: the file is empty \(0 bytes\)"
    with pytest.raises(ValueError, match=message):
        coco_format.build_coco_format(splits, str(root / "tfds"))
    assert _leftovers(root / "tfds") == []

    def refuse(*args):
        raise cv2.error("OpenCV(4) error: (-215:Assertion failed)")

    monkeypatch.setattr(coco_reader.cv2, "imdecode", refuse)  # as for a zero-byte file
    (root / "images" / "notes.bmp").write_bytes(b"BM not really an image")
    entry = {"id": 9, "file_name": "notes.bmp", "height": 50, "width": 80}
    with pytest.raises(ValueError, match=r"notes\.bmp: cannot read or decode image id 9: OpenCV"):
        coco_reader._read_image(entry, root / "images", root / "a.json")


def test_boxes_of_zero_area_or_far_from_their_mask_get_one_warning(tmp_path, caplog):
    """A bbox [0, 0, 0, 0] or of zero width makes an object untrainable; one written [x1, y1, x2,
    y2] is too large: one warning counts them (the boxes are kept as given). True boxes, even of a
    two-pixel object, are not reported."""
    splits = write_dataset(epath.Path(tmp_path))

    def misplace(dataset):
        _ann(dataset, 11)["bbox"] = [0, 0, 0, 0]
        _ann(dataset, 21)["bbox"][2] = 0
        square = [[30, 20, 40, 20, 40, 30, 30, 30]]  # written [x1, y1, x2, y2], read 40×30
        _ann(dataset, 41).update(bbox=[30, 20, 40, 30], segmentation=square)
        tiny = [[10.4, 10.4, 12.6, 10.4, 12.6, 12.6, 10.4, 12.6]]  # its bbox as tools write it
        _ann(dataset, 31).update(bbox=[10.4, 10.4, 2.2, 2.2], segmentation=tiny)

    _edit_json(splits, "train", misplace)
    categories = sorted((c["id"], c["name"]) for c in CATEGORIES)
    with caplog.at_level("WARNING"):
        for split in ("train", "validation"):
            list(coco_reader.coco_examples(*splits[split], categories))
    warnings = [r.getMessage() for r in caplog.records if "far from their mask" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{splits['train'][0]}: 3 of 7 annotations have a bbox of zero")
    assert "annotation ids [11, 21, 41]" in warnings[0]
    assert "is each bbox [x, y, width, height] in pixels of its image?" in warnings[0]


def _exif_tiff(orientation: int, byte_order: str) -> bytes:
    """An EXIF block's TIFF layout (in ``byte_order``, "II" or "MM") holding only the orientation
    tag."""
    order = {"II": "little", "MM": "big"}[byte_order]
    entry = (
        (0x0112).to_bytes(2, order)  # tag: orientation
        + (3).to_bytes(2, order)  # type SHORT
        + (1).to_bytes(4, order)  # count
        + orientation.to_bytes(2, order)
        + bytes(2)
    )
    tiff = byte_order.encode() + (42).to_bytes(2, order) + (8).to_bytes(4, order)
    return tiff + (1).to_bytes(2, order) + entry + bytes(4)  # one entry, no next directory


def jpeg_with_orientation(image: np.ndarray, orientation: int, byte_order: str) -> bytes:
    """A JPEG of RGB ``image`` with an EXIF block holding only the orientation tag (``_exif_tiff``),
    inserted after the start-of-image marker."""
    app1 = b"Exif\0\0" + _exif_tiff(orientation, byte_order)
    encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    return encoded[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + encoded[2:]


@pytest.mark.parametrize("byte_order", ["II", "MM"])
def test_the_exif_orientation_read_is_the_one_opencv_applies(byte_order):
    """OpenCV turns the image as the tag says unless told not to: the reference."""
    image = _pixels((24, 40), [(1, 3, 4, 2, 10, 6)], seed=0)
    for orientation in range(1, 9):
        encoded = jpeg_with_orientation(image, orientation, byte_order)
        assert image_headers.exif_orientation(encoded) == orientation
        buffer = np.frombuffer(encoded, np.uint8)
        stored = cv2.imdecode(buffer, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        shown = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        turned = shown.shape != stored.shape or not np.array_equal(shown, stored)
        assert turned == (orientation != 1)
        assert (shown.shape[:2] == stored.shape[1::-1]) == (orientation >= 5)
    plain = cv2.imencode(".jpg", image)[1].tobytes()
    for encoded in (plain, cv2.imencode(".png", image)[1].tobytes(), plain[:3] + b"\xe1\xff"):
        assert image_headers.exif_orientation(encoded) == 1  # no tag, a PNG, a truncated segment


def png_with_orientation(image: np.ndarray, orientation: int, prefix: bytes = b"") -> bytes:
    """A PNG of RGB ``image`` with an eXIf chunk (``prefix`` + ``_exif_tiff``) after its IHDR."""
    exif = prefix + _exif_tiff(orientation, "MM")
    chunk = b"eXIf" + exif
    chunk = len(exif).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
    encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()
    return encoded[:33] + chunk + encoded[33:]  # the signature (8) and IHDR (25) first


def webp_with_orientation(image: np.ndarray, orientation: int) -> bytes:
    """A lossless WebP of RGB ``image`` with an EXIF chunk holding only the orientation tag."""
    from PIL import Image

    buffer = io.BytesIO()
    exif = b"Exif\0\0" + _exif_tiff(orientation, "II")  # PIL writes it without the prefix
    Image.fromarray(image).save(buffer, "WEBP", lossless=True, exif=exif)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "png", "webp"])
def test_an_exif_orientation_is_read_and_applied_as_pil_shows_it(kind, tmp_path):
    """JPEGs (APP1), PNGs (eXIf) and extended WebPs (EXIF) carry it: `exif_orientation` reads it,
    `orient` and `read_image(exif_orientation=True)` turn the stored pixels as PIL's
    `exif_transpose` shows them (the reference; OpenCV's versions differ: 4.10 leaves a WebP as
    stored). Blocks OpenCV and PIL ignore read as 1: a PNG's with a JPEG's "Exif" prefix
    (libpng: invalid), a WebP's EXIF chunk without the VP8X flag announcing it."""
    from PIL import Image, ImageOps

    image = _pixels((24, 40), [(1, 3, 4, 2, 10, 6)], seed=0)
    write = {
        "jpeg": functools.partial(jpeg_with_orientation, byte_order="II"),
        "png": png_with_orientation,
        "webp": webp_with_orientation,
    }[kind]
    for orientation in range(1, 9):
        encoded = write(image, orientation)
        assert image_headers.exif_orientation(encoded) == orientation
        (tmp_path / "a").write_bytes(encoded)
        stored = visualize.read_image(tmp_path / "a")
        shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "a")).convert("RGB"))
        np.testing.assert_array_equal(image_headers.orient(stored, orientation), shown)
        np.testing.assert_array_equal(
            visualize.read_image(tmp_path / "a", exif_orientation=True), shown
        )
        if kind != "jpeg":  # lossless
            np.testing.assert_array_equal(stored, image)
        assert image_headers.exif_orientation(encoded[: len(encoded) // 2]) in (1, orientation)
    if kind == "png":
        encoded = png_with_orientation(image, 6, prefix=b"Exif\0\0")
        assert image_headers.exif_orientation(encoded) == 1
        shown = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(shown[..., ::-1], image)
    if kind == "webp":
        simple = io.BytesIO()
        Image.fromarray(image).save(simple, "WEBP", lossless=True)  # VP8L, no VP8X
        exif = _exif_tiff(6, "II")
        body = simple.getvalue()[12:] + b"EXIF" + len(exif).to_bytes(4, "little") + exif
        riff = b"RIFF" + (len(body) + 4).to_bytes(4, "little") + b"WEBP" + body
        assert image_headers.exif_orientation(riff) == 1
        flagged = bytearray(webp_with_orientation(image, 6))
        assert flagged[12:16] == b"VP8X" and flagged[20] & 0x08
        flagged[20] &= ~0x08
        assert image_headers.exif_orientation(bytes(flagged)) == 1


def test_turned_photos_empty_masks_and_boxes_outside_get_one_warning_each(tmp_path, caplog):
    """Legitimate exports that train otherwise than a user may think are each said once per
    file: JPEGs with an EXIF orientation (read as stored; on square images their sizes agree
    with the json), a polygon of points on one line (an empty mask) and a box past the image's
    edge (clipped for training, evaluated as given). A json with a UTF-8 byte order mark (as
    some Windows tools write) is read."""
    splits = write_dataset(epath.Path(tmp_path))
    for name, orientation in (("gray.jpg", 3), ("val1.jpg", 6)):  # both square
        path = tmp_path / "images" / name
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        path.write_bytes(jpeg_with_orientation(image, orientation, "II"))
    path = tmp_path / "images" / "rgb.png"  # image id 2: a mirror keeps its size
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    path.write_bytes(png_with_orientation(image, 2))

    def edit(dataset):
        _ann(dataset, 31)["segmentation"] = [[8, 8, 20, 20, 32, 32]]
        _ann(dataset, 12).update(
            bbox=[50, 10, 24, 28], segmentation=[[50, 10, 74, 10, 74, 38, 50, 38]]
        )

    _edit_json(splits, "train", edit)
    train_json = splits["train"][0]
    train_json.write_bytes(b"\xef\xbb\xbf" + train_json.read_bytes())
    categories = sorted((c["id"], c["name"]) for c in CATEGORIES)
    with caplog.at_level("WARNING"):
        examples = {
            split: dict(coco_reader.coco_examples(*splits[split], categories))
            for split in ("train", "validation")
        }
    assert len(examples["train"]) == len(TRAIN) and len(examples["validation"]) == len(VAL)
    messages = [r.getMessage() for r in caplog.records]

    def said(text: str) -> list[str]:
        return [m for m in messages if text in m]

    turned = said("carry an EXIF orientation")
    assert [m.split(":")[0] for m in turned] == [str(p) for p, _ in splits.values()], messages
    assert "2 images" in turned[0] and "(image ids [2, 3])" in turned[0]
    assert "(image ids [7])" in turned[1]
    (empty,) = said("have a mask of no pixel")
    assert empty.startswith(f"{train_json}: 1 annotations") and "annotation ids [31]" in empty
    (outside,) = said("boxes reach outside their image")
    assert outside.startswith(f"{train_json}: 1 boxes") and "annotation ids [12]" in outside
    assert not said("far from their mask")  # the box past the edge still fits its mask


@pytest.mark.parametrize("kind,orientation", [("jpeg", 6), ("jpeg", 1), ("webp", 6)])
def test_sizes_swapped_by_an_exif_orientation_say_how_to_turn_the_images(
    kind, orientation, tmp_path
):
    """A tool that showed a JPEG (or a WebP, stored as the PNG of its pixels) turned by its EXIF
    orientation (5-8 swap the axes) wrote the turned size, and drew the annotations on the turned
    image: refused, saying how to write the images turned. Swapped sizes without such a tag say
    only what the json and the file say."""
    if kind == "webp":
        pytest.importorskip("PIL.Image")
    splits = write_dataset(epath.Path(tmp_path))
    path = tmp_path / "images" / "rgb.jpg"  # image id 1, 48×64 (a WebP under this name)
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    if kind == "webp":
        path.write_bytes(webp_with_orientation(image, orientation))
    else:
        path.write_bytes(jpeg_with_orientation(image, orientation, "MM"))
    _edit_json(splits, "train", lambda d: d["images"][0].update(height=64, width=48))
    message = f"{path}: image id 1 decodes to (48, 64), but {splits['train'][0]} says (height, "
    message += "width) = (64, 48)"
    turned = ": its EXIF orientation (6) turns it in photo viewers and annotation tools, so its "
    turned += "annotations were likely drawn on the turned image. Set config.data.exif_orientat"
    turned += "ion=True to train on the images turned so, or write them turned as shown (on "
    turned += "copies, e.g. ImageMagick's `mogrify -auto-orient *.jpg`) and use those"
    categories = sorted((c["id"], c["name"]) for c in CATEGORIES)
    with pytest.raises(ValueError) as refused:
        dict(coco_reader.coco_examples(*splits["train"], categories))
    assert str(refused.value) == message + (turned if orientation == 6 else "")


def test_exif_orientation_option_trains_on_the_images_as_annotation_tools_show_them(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6), annotated on the upright image the
    tool showed: refused by default, naming config.data.exif_orientation; with it, the example
    holds the upright pixels exactly (a PNG: lossless) under the json's annotations, and the
    build is a dataset of its own. A json giving the stored size with the option set is refused,
    saying to unset it."""
    splits = write_dataset(epath.Path(tmp_path))
    path = tmp_path / "images" / "rgb.png"  # image id 2, 64x48, annotated as it is
    upright = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    path.write_bytes(png_with_orientation(np.rot90(upright), 6))  # stored 48x64, shown upright
    categories = sorted((c["id"], c["name"]) for c in CATEGORIES)
    message = r"\(64, 48\): its EXIF orientation \(6\) turns it .* Set config\.data\."
    with pytest.raises(ValueError, match=message + "exif_orientation=True to train on the images"):
        dict(coco_reader.coco_examples(*splits["train"], categories))
    examples = dict(coco_reader.coco_examples(*splits["train"], categories, exif_orientation=True))
    decoded = pipeline._decode_image(tf.constant(examples[2]["image"])).numpy()
    np.testing.assert_array_equal(decoded, upright)
    for image_id in (1, 3, 4):  # without a tag: stored as they were
        assert (
            examples[image_id]["image"] == (tmp_path / "images" / TRAIN[image_id][0]).read_bytes()
        )
    plain = coco_format.coco_format_config(splits).name
    builder = coco_format.build_coco_format(splits, str(tmp_path / "tfds"), exif_orientation=True)
    assert builder.builder_config.name != plain and "EXIF" in builder.builder_config.description
    (example,) = (
        builder.as_dataset("train").filter(lambda x: x["image/id"] == 2).as_numpy_iterator()
    )
    np.testing.assert_array_equal(example["image"], upright)
    _edit_json(splits, "train", lambda d: d["images"][1].update(height=48, width=64))
    message = (
        r"config\.data\.exif_orientation=True turned it as its EXIF orientation \(6\) says, but "
    )
    message += r"the json gives its stored size: .* set config\.data\.exif_orientation=False"
    with pytest.raises(ValueError, match=message):
        dict(coco_reader.coco_examples(*splits["train"], categories, exif_orientation=True))
    data = ml_collections.ConfigDict(
        {"dataset": "shapes", "exif_orientation": True, "data_dir": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="exif_orientation=True turns the images of a coco_f"):
        get_builder(data)


def test_sizes_swapped_by_a_tiff_orientation_tag_say_that_opencv_applies_it(tmp_path):
    """OpenCV decodes a TIFF turned as its orientation tag says, whatever
    IMREAD_IGNORE_ORIENTATION asks (PIL too): a json giving the stored size got only "decodes
    to (64, 48), but ... says (48, 64)", though the file's header says 48×64."""
    from PIL import Image

    splits = write_dataset(epath.Path(tmp_path))
    path = tmp_path / "images" / "rgb.jpg"  # image id 1, 48×64, written as a TIFF under its name
    stored = Image.open(path)
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="TIFF", exif=exif)
    path.write_bytes(buffer.getvalue())
    assert image_headers.tiff_orientation(buffer.getvalue()) == 6
    decoded = cv2.imdecode(
        np.frombuffer(buffer.getvalue(), np.uint8),
        cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION,
    )
    assert decoded.shape == (64, 48, 3)  # the fact the message states: turned all the same
    categories = sorted((c["id"], c["name"]) for c in CATEGORIES)
    with pytest.raises(ValueError) as refused:
        dict(coco_reader.coco_examples(*splits["train"], categories))
    assert str(refused.value) == (
        f"{path}: image id 1 decodes to (64, 48), but {splits['train'][0]} says (height, "
        "width) = (48, 64): a TIFF is decoded turned as its orientation tag (6) says (by "
        "OpenCV, as by PIL and photo viewers), the json gives its stored size. Where the "
        "annotations were drawn on the stored pixels, clear the tag (on copies, e.g. `exiftool "
        "-Orientation=1 -n`); otherwise give the json the turned size"
    )
    assert image_headers.tiff_orientation(cv2.imencode(".png", decoded)[1].tobytes()) == 1


def test_polygon_parts_of_fewer_than_3_points_beside_valid_ones_are_dropped(tmp_path):
    root = epath.Path(tmp_path)
    splits = write_dataset(root)
    _edit_json(splits, "validation", lambda d: _ann(d, 81)["segmentation"].append([1, 1, 60, 30]))
    builder = coco_format.build_coco_format(splits, str(root / "tfds"))
    example = _examples(builder, "validation")[TIMESTAMP_ID]
    mask = masks.decode_mask(example["objects"]["mask"][0], 40, 64)
    coco = COCO()
    coco.dataset = split_json(VAL)  # without the 2-point part
    coco.createIndex()
    assert mask.any()
    np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[81]))


def test_formats_other_than_jpeg_and_png_are_stored_as_the_pixels_predict_reads(tmp_path):
    """A palette BMP (TF's decoder read its colour indices as grey: 0 and 1 for red and blue),
    a GIF whose canvas is larger than its first frame (TF: the frame, 37×61; annotation tools
    and OpenCV: the canvas, 50×80), a 1-bit BMP (TF refuses it) and a WebP: the stored image,
    as the input pipeline decodes it, equals `visualize.read_image` of the file, whose size the
    json states. JPEG and PNG keep their bytes; a file OpenCV cannot read is an error naming it."""
    image_module = pytest.importorskip("PIL.Image")
    rgb = np.zeros((50, 80, 3), np.uint8)
    rgb[:, :40] = (255, 0, 0)
    rgb[:, 40:] = (0, 0, 255)
    image_module.fromarray(rgb).quantize(2).save(tmp_path / "palette.bmp")
    image_module.fromarray(rgb).convert("1").save(tmp_path / "one_bit.bmp")
    image_module.fromarray(rgb).save(tmp_path / "lossless.webp", lossless=True)
    image_module.fromarray(rgb[:37, :61]).save(tmp_path / "canvas.gif")
    gif = bytearray((tmp_path / "canvas.gif").read_bytes())
    gif[6:10] = (80).to_bytes(2, "little") + (50).to_bytes(2, "little")  # the logical screen
    (tmp_path / "canvas.gif").write_bytes(bytes(gif))
    cv2.imwrite(str(tmp_path / "photo.png"), rgb[..., ::-1])
    for k, name in enumerate(["palette.bmp", "one_bit.bmp", "lossless.webp", "canvas.gif"]):
        entry = {"id": k, "file_name": name, "height": 50, "width": 80}
        stored, conversion, _ = coco_reader._read_image(entry, tmp_path, tmp_path / "a.json")
        assert conversion == "stored as PNG"
        decoded = pipeline._decode_image(tf.constant(stored)).numpy()
        np.testing.assert_array_equal(decoded, visualize.read_image(tmp_path / name), err_msg=name)
    entry = {"id": 9, "file_name": "photo.png", "height": 50, "width": 80}
    stored, conversion, _ = coco_reader._read_image(entry, tmp_path, tmp_path / "a.json")
    assert stored == (tmp_path / "photo.png").read_bytes() and conversion is None
    (tmp_path / "notes.bmp").write_bytes(b"BM not really an image")
    entry = {"id": 7, "file_name": "notes.bmp", "height": 50, "width": 80}
    with pytest.raises(ValueError, match=r"notes\.bmp: cannot read or decode image id 7"):
        coco_reader._read_image(entry, tmp_path, tmp_path / "a.json")
