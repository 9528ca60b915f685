"""The COCO-with-masks builder on a tiny COCO-format dataset: round trip against pycocotools'
annToMask, category maps both ways, the COCO json export, and clear errors on bad input."""

import copy
import json
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tiny_coco
from pycocotools.coco import COCO

from mrcnn_jax.data import coco_instances, coco_json, coco_reader, masks, schema
from mrcnn_jax.evaluation import coco_eval


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_coco.build(tmp_path_factory.mktemp("coco"))


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    coco.createIndex()
    return coco


def _reference_mask(coco: COCO, ann: dict) -> np.ndarray:
    """annToMask, without the polygon parts of < 3 points that pycocotools would read as boxes."""
    ann = dict(ann)
    if isinstance(ann["segmentation"], list):
        ann["segmentation"] = [p for p in ann["segmentation"] if len(p) >= 6]
        if not ann["segmentation"]:
            image = coco.imgs[ann["image_id"]]
            return np.zeros((image["height"], image["width"]), np.uint8)
    return coco.annToMask(ann)


def _clipped_xyxy(box: list, height: int, width: int) -> np.ndarray:
    x, y, w, h = box
    return np.clip([x, y, x + w, y + h], 0, [width, height, width, height])


def _examples(builder, split: str) -> dict[int, dict]:
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return {int(ex["image/id"]): ex for ex in dataset.as_numpy_iterator()}


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_image_is_kept_with_its_fields(built, split):
    builder, jsons = built
    examples = _examples(builder, split)
    assert sorted(examples) == sorted(image["id"] for image in jsons[split]["images"])
    annotated = {ann["image_id"] for ann in jsons[split]["annotations"]}
    for image in jsons[split]["images"]:
        ex = examples[image["id"]]
        assert ex["image/filename"].decode() == image["file_name"]
        assert ex["image/size"].tolist() == [image["height"], image["width"]]
        assert ex["image/has_annotations"] == (image["id"] in annotated)
    unannotated = {"train": 3, "validation": 8}[split]
    assert not examples[unannotated]["image/has_annotations"]
    assert len(examples[unannotated]["objects"]["id"]) == 0


@pytest.mark.parametrize("split", ["train", "validation"])
def test_objects_round_trip_to_pycocotools(built, split):
    builder, jsons = built
    coco = _coco(jsons[split])
    order = [c for c, _ in coco_instances.COCO_CATEGORIES]
    for image_id, ex in _examples(builder, split).items():
        anns = coco.imgToAnns[image_id]
        objects = ex["objects"]
        height, width = ex["image/size"]
        assert objects["id"].tolist() == [a["id"] for a in anns]
        for k, ann in enumerate(anns):
            assert objects["category_id"][k] == ann["category_id"]
            assert objects["label"][k] == order.index(ann["category_id"])
            assert objects["is_crowd"][k] == bool(ann["iscrowd"])
            assert objects["area"][k] == pytest.approx(ann["area"])
            mask = masks.decode_mask(objects["mask"][k], height, width)
            np.testing.assert_array_equal(mask, _reference_mask(coco, ann))
            ymin, xmin, ymax, xmax = objects["bbox"][k]
            box = [xmin * width, ymin * height, xmax * width, ymax * height]
            np.testing.assert_allclose(box, _clipped_xyxy(ann["bbox"], height, width), atol=1e-3)


def test_crowd_rle_polygon_and_clipping_cases_are_present(built):
    """Guards the fixture: the cases the other tests rely on really are in the data."""
    examples = _examples(built[0], "train")
    assert examples[2]["objects"]["is_crowd"].tolist() == [True, False, False]
    assert examples[4]["objects"]["is_crowd"].tolist() == [True]
    assert examples[1]["objects"]["bbox"][1][3] == 1.0  # box 102 clipped at the right border
    assert examples[2]["objects"]["bbox"][2][1] == examples[2]["objects"]["bbox"][2][3]
    empty = _examples(built[0], "validation")[7]["objects"]["mask"][1]
    assert not masks.decode_mask(empty, 30, 50).any()


def test_category_maps_both_ways(built):
    info = built[0].info
    ids = schema.label_to_category_id(info)
    assert ids.shape == (80,) and len(set(ids.tolist())) == 80
    assert (ids[0], ids[16], ids[79]) == (1, 18, 90)
    to_label = schema.category_id_to_label(info)
    assert all(to_label[int(c)] == label for label, c in enumerate(ids))
    names = schema.class_names(info)
    assert (names[0], names[16], names[79]) == ("person", "dog", "toothbrush")
    assert schema.categories(info)[16] == {"id": 18, "name": "dog"}


def test_coco_ground_truth_matches_the_annotation_file(built, tmp_path):
    builder, jsons = built
    path = coco_json.write_coco_ground_truth(builder, "train", tmp_path / "gt.json")
    exported = COCO(str(path))
    original = _coco(jsons["train"])
    assert sorted(exported.imgs.values(), key=lambda i: i["id"]) == jsons["train"]["images"]
    assert sorted(exported.anns) == sorted(original.anns)
    for ann_id, ann in original.anns.items():
        got = exported.anns[ann_id]
        for key in ("image_id", "category_id", "iscrowd"):
            assert got[key] == ann[key]
        assert got["area"] == ann["area"] and got["bbox"] == ann["bbox"]  # exactly, unclipped
        np.testing.assert_array_equal(exported.annToMask(got), _reference_mask(original, ann))
    assert len(exported.cats) == 80 and exported.cats[90]["name"] == "toothbrush"


def test_coco_eval_on_the_builders_ground_truth_equals_it_on_the_annotation_file(built):
    """The 12 COCOeval numbers per IoU type, for detections clipped to their image (as ours are),
    are those pycocotools gives on the annotation file itself: against annotation 102, whose box
    reaches outside its image, a clipped box is not a perfect match there (a ground truth clipped
    at build time made it one), and annotation 504's area 1023.99999 stays small-only."""
    builder, jsons = built
    dataset = copy.deepcopy(jsons["train"])
    for ann in dataset["annotations"]:  # pycocotools fails on polygon parts of < 3 points
        if isinstance(ann["segmentation"], list):
            ann["segmentation"] = [p for p in ann["segmentation"] if len(p) >= 6]
    original = _coco(dataset)
    results = []
    for rank, ann in enumerate(a for a in jsons["train"]["annotations"] if not a["iscrowd"]):
        image = original.imgs[ann["image_id"]]
        x1, y1, x2, y2 = _clipped_xyxy(ann["bbox"], image["height"], image["width"])
        rle = masks.encode_mask(_reference_mask(original, ann).astype(bool))
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "score": 1.0 - 0.01 * rank,
                "segmentation": {"size": [image["height"], image["width"]],
                                 "counts": rle.decode("ascii")},
            }
        )  # fmt: skip
    image_ids = [image["id"] for image in jsons["train"]["images"]]
    ground_truth = _coco(coco_json.coco_ground_truth(builder, "train"))
    ours = coco_eval.evaluate_coco(ground_truth, results, image_ids)
    reference = coco_eval.evaluate_coco(original, results, image_ids)
    assert ours == reference
    assert reference["bbox/AP"] < 1.0 and reference["segm/AP"] == 1.0


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("manual")
    tiny_coco.write_manual_dir(root)
    return root


def _examples_of(dataset: dict, manual_dir, tmp_path) -> list:
    path = tmp_path / "instances.json"
    path.write_text(dataset if isinstance(dataset, str) else json.dumps(dataset))
    image_dir = manual_dir / "train2017"
    return list(coco_reader.coco_examples(path, image_dir, coco_instances.COCO_CATEGORIES))


def _mutated(edit) -> dict:
    dataset = tiny_coco.train_json()
    edit(dataset)
    return dataset


def _ann(dataset: dict, ann_id: int) -> dict:
    return next(a for a in dataset["annotations"] if a["id"] == ann_id)


BAD_ANNOTATIONS = {
    "no bbox": (lambda d: _ann(d, 102).pop("bbox"), "annotation id 102: missing \\['bbox'\\]"),
    "negative width": (lambda d: _ann(d, 101)["bbox"].__setitem__(2, -1.0), "annotation id 101"),
    "nan box": (lambda d: _ann(d, 101)["bbox"].__setitem__(0, float("nan")), "annotation id 101"),
    "unknown category": (
        lambda d: _ann(d, 202).update(category_id=12),
        "id 202: category_id 12 is not listed",
    ),
    "unknown image": (lambda d: _ann(d, 202).update(image_id=99), "id 202: image_id 99"),
    "odd polygon": (lambda d: _ann(d, 102)["segmentation"][0].pop(), "id 102: a polygon has an"),
    "rle size": (lambda d: _ann(d, 103)["segmentation"].update(size=[5, 5]), "id 103: RLE size"),
    "rle total": (lambda d: _ann(d, 201)["segmentation"]["counts"].append(3), "id 201: RLE runs"),
    "compressed total": (
        lambda d: _ann(d, 103)["segmentation"].update(counts="5:0"),
        "id 103: RLE runs cover",
    ),
    "duplicate id": (lambda d: _ann(d, 202).update(id=201), "annotation id 201 appears twice"),
    "duplicate image": (lambda d: d["images"][1].update(id=1), "image id 1 appears twice"),
    "not a segmentation": (lambda d: _ann(d, 202).update(segmentation=7), "id 202: segmentation"),
    "iscrowd '0'": (lambda d: _ann(d, 202).update(iscrowd="0"), "id 202: iscrowd '0' is not 0"),
    "iscrowd '1'": (lambda d: _ann(d, 201).update(iscrowd="1"), "id 201: iscrowd '1' is not 0"),
    "iscrowd 2": (lambda d: _ann(d, 202).update(iscrowd=2), "id 202: iscrowd 2 is not 0 or 1"),
    "iscrowd null": (lambda d: _ann(d, 202).update(iscrowd=None), "id 202: iscrowd None is not"),
    "area 'abc'": (lambda d: _ann(d, 202).update(area="abc"), "id 202: area 'abc' is not a"),
    "negative area": (lambda d: _ann(d, 202).update(area=-1), "id 202: area -1 is not a finite"),
    "nan area": (lambda d: _ann(d, 103).update(area=float("nan")), "id 103: area nan is not a"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_malformed_annotation_errors_name_the_file_and_annotation(case, manual_dir, tmp_path):
    edit, message = BAD_ANNOTATIONS[case]
    with pytest.raises(ValueError, match=message) as error:
        _examples_of(_mutated(edit), manual_dir, tmp_path)
    assert str(tmp_path / "instances.json") in str(error.value)


@pytest.mark.parametrize("iscrowd, is_crowd", [(True, True), (False, False), (0, False), (1, True)])
def test_iscrowd_is_0_or_1_as_integer_or_boolean(iscrowd, is_crowd, manual_dir, tmp_path):
    dataset = _mutated(lambda d: _ann(d, 202).update(iscrowd=iscrowd))
    objects = _examples_of(dataset, manual_dir, tmp_path)[1][1]["objects"]
    assert [o["is_crowd"] for o in objects if o["id"] == 202] == [is_crowd]


def _areas(dataset: dict, manual_dir, tmp_path) -> dict[int, float]:
    """Annotation id -> the area the reader stores."""
    examples = _examples_of(dataset, manual_dir, tmp_path)
    return {o["id"]: o["area"] for _, example in examples for o in example["objects"]}


def test_a_null_area_is_computed_from_the_mask_as_an_absent_one(manual_dir, tmp_path):
    absent = _areas(_mutated(lambda d: _ann(d, 202).pop("area")), manual_dir, tmp_path)
    null = _areas(_mutated(lambda d: _ann(d, 202).update(area=None)), manual_dir, tmp_path)
    dataset = tiny_coco.train_json()
    mask = _coco(dataset).annToMask(_ann(dataset, 202))
    assert null == absent and null[202] == float(mask.sum()) > 0


def test_an_area_of_0_on_a_non_empty_mask_is_computed_with_one_warning(
    manual_dir, tmp_path, caplog
):
    def zero_areas(dataset):
        for ann_id in (101, 202, 203):  # 203's mask is non-empty (one polygon of 3 points)
            _ann(dataset, ann_id)["area"] = 0

    with caplog.at_level("WARNING"):
        areas = _areas(_mutated(zero_areas), manual_dir, tmp_path)
    stated = {a["id"]: a["area"] for a in tiny_coco.train_json()["annotations"]}
    assert areas == pytest.approx(stated) and min(areas[i] for i in (101, 202, 203)) > 0
    warnings = [r.getMessage() for r in caplog.records if "area of 0" in r.getMessage()]
    assert len(warnings) == 1
    assert str(tmp_path / "instances.json") in warnings[0] and "[101, 202, 203]" in warnings[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "the annotation file is not JSON"),
        ('{"images": [], "annotations": []}', "no 'categories' list"),
        ('{"images": [{"id": 4}], "annotations": [], "categories": []}', "image entry #0 \\(id 4"),
        ('{"images": [], "annotations": [], "categories": []}', "categories differ"),
    ],
)
def test_malformed_annotation_file_names_the_file(content, message, manual_dir, tmp_path):
    with pytest.raises(ValueError, match=message) as error:
        _examples_of(content, manual_dir, tmp_path)
    assert str(tmp_path / "instances.json") in str(error.value)


def test_a_missing_annotation_file_is_named_with_the_folder_it_was_looked_for_in(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ValueError,
        match=f"^mydata/train.json: cannot read the annotation file "
        f"from {re.escape(str(tmp_path))}: .*No such file",
    ):
        coco_reader.read_annotation_file("mydata/train.json")
    with pytest.raises(
        ValueError,
        match=f"^{re.escape(str(tmp_path))}/a.json: cannot read the "
        "annotation file: .*No such file",
    ):
        coco_reader.read_annotation_file(tmp_path / "a.json")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong size", "missing"])
def test_bad_image_errors_name_the_file_and_image_id(damage, manual_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(manual_dir / "train2017", images)
    victim = images / "000000000003.jpg"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:200])
    elif damage == "garbage":
        victim.write_bytes(b"not an image at all")
    elif damage == "wrong size":
        shutil.copy(images / "000000000001.jpg", victim)
    else:
        victim.unlink()
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(tiny_coco.train_json()))
    with pytest.raises(ValueError, match="image id 3") as error:
        list(coco_reader.coco_examples(path, images, coco_instances.COCO_CATEGORIES))
    assert str(victim) in str(error.value)


def test_missing_manual_files_are_all_listed(tmp_path):
    manual = tmp_path / "manual"
    (manual / "annotations").mkdir(parents=True)
    (manual / "annotations" / "instances_train2017.json").write_text("{}")
    builder = coco_instances.CocoInstances(data_dir=str(tmp_path / "tfds"))
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    with pytest.raises(FileNotFoundError) as error:
        builder.download_and_prepare(download_config=config)
    message = str(error.value)
    for missing in ("train2017/ (or train2017.zip)", "val2017/", "instances_val2017.json"):
        assert missing in message
    assert "instances_train2017.json" not in message.split("Download")[0]


@pytest.mark.parametrize("manual", ["absent", "empty", "unset"])
def test_a_manual_dir_without_files_is_named_before_tfds_builds(manual, built, tmp_path):
    """TFDS checks the folder with an `assert` (a 57-line AssertionError traceback through
    train.py, and an empty dataset folder left behind); a COCO already built needs none."""
    from mrcnn_jax.data import get_builder

    data = ml_collections.ConfigDict({"dataset": "coco_instances", "data_dir": str(tmp_path)})
    data.manual_dir = {"absent": str(tmp_path / "nope"), "empty": str(tmp_path), "unset": ""}[
        manual
    ]
    where = {
        "absent": tmp_path / "nope",
        "empty": tmp_path,
        "unset": tmp_path / "downloads" / "manual",
    }
    state = "is empty" if manual == "empty" else "does not exist"
    where = f"the manual dir {where[manual]} (config.data.manual_dir) {state}"
    if manual == "unset":
        where = (
            f"config.data.manual_dir is unset and its default {tmp_path}/downloads/manual {state}"
        )
    with pytest.raises(FileNotFoundError) as error:
        get_builder(data)
    assert str(error.value).startswith(
        f"COCO 2017 is not built yet and its files are not there: {where}. Download train2017.zip"
    )
    assert list(tmp_path.iterdir()) == []
    builder, _ = built  # built: the manual dir is not read
    data.data_dir = os.path.dirname(os.path.dirname(builder.data_dir))
    assert get_builder(data).info.splits["train"].num_examples > 0
