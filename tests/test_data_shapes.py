"""The synthetic shapes builder: determinism for a seed, visible-pixel masks, schema and maps."""

import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from configs import shapes_r18
from mrcnn_jax.data import coco_json, get_builder, masks, schema, shapes

SIZE = (48, 64)


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("shapes")
    return shapes.build_shapes(str(data_dir), num_train=12, num_val=4, image_size=SIZE, seed=3)


def _records(builder: tfds.core.DatasetBuilder, split: str) -> dict[int, dict]:
    dataset = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return {int(ex["image/id"]): ex for ex in dataset.as_numpy_iterator()}


def _same(a, b) -> bool:
    flat_a, flat_b = tf.nest.flatten(a), tf.nest.flatten(b)
    return len(flat_a) == len(flat_b) and all(np.array_equal(x, y) for x, y in zip(flat_a, flat_b))


def test_building_is_deterministic_for_a_seed(builder, tmp_path):
    again = shapes.build_shapes(
        str(tmp_path / "a"), num_train=12, num_val=4, image_size=SIZE, seed=3
    )
    other = shapes.build_shapes(
        str(tmp_path / "b"), num_train=12, num_val=4, image_size=SIZE, seed=4
    )
    for split in ("train", "validation"):
        first, second, third = (_records(b, split) for b in (builder, again, other))
        assert sorted(first) == list(range(1, len(first) + 1))
        assert all(_same(first[i], second[i]) for i in first)
        assert not any(_same(first[i]["image"], third[i]["image"]) for i in first)


def test_an_image_depends_only_on_seed_split_and_index():
    image, objects = shapes.generate_image(5, "train", 7, SIZE)
    again, objects_again = shapes.generate_image(5, "train", 7, SIZE)
    assert np.array_equal(image, again)
    assert all(a == b and np.array_equal(m, n) for (a, m), (b, n) in zip(objects, objects_again))
    assert not np.array_equal(image, shapes.generate_image(5, "validation", 7, SIZE)[0])


@pytest.mark.parametrize("index", range(40))
def test_masks_are_the_visible_pixels_of_each_object(index):
    image, objects = shapes.generate_image(0, "train", index, SIZE)
    assert 1 <= len(objects) <= 4
    owner = np.zeros(SIZE, int)
    for _, mask in objects:
        owner += mask
    assert owner.max() == 1  # no pixel belongs to two objects
    background = image[owner == 0]
    assert (background == background[0]).all()  # one plain background colour...
    for label, mask in objects:
        assert label in (0, 1, 2) and mask.any()
        colours = image[mask]
        assert (colours == colours[0]).all()  # ...each object one colour, unlike the background
        assert np.abs(colours[0].astype(int) - background[0]).sum() >= 120


def test_stored_examples_match_the_generator(builder):
    for split in ("train", "validation"):
        for image_id, ex in _records(builder, split).items():
            image, objects = shapes.generate_image(3, split, image_id - 1, SIZE)
            assert np.array_equal(tf.io.decode_png(ex["image"]).numpy(), image)
            assert ex["image/size"].tolist() == list(SIZE) and ex["image/has_annotations"]
            stored = ex["objects"]
            assert stored["label"].tolist() == [label for label, _ in objects]
            assert stored["category_id"].tolist() == [label + 1 for label, _ in objects]
            assert not stored["is_crowd"].any()
            for k, (_, mask) in enumerate(objects):
                assert np.array_equal(masks.decode_mask(stored["mask"][k], *SIZE), mask)
                assert stored["area"][k] == mask.sum()
                ys, xs = np.nonzero(mask)
                tight = [ys.min() / 48, xs.min() / 64, (ys.max() + 1) / 48, (xs.max() + 1) / 64]
                np.testing.assert_allclose(stored["bbox"][k], tight, atol=1e-6)


def test_category_maps_and_names(builder):
    info = builder.info
    assert schema.class_names(info) == ["circle", "square", "triangle"]
    assert schema.label_to_category_id(info).tolist() == [1, 2, 3]
    assert schema.category_id_to_label(info) == {1: 0, 2: 1, 3: 2}
    assert info.splits["train"].num_examples == 12 and info.splits["validation"].num_examples == 4


def test_coco_ground_truth_loads_in_pycocotools_with_the_same_masks(builder):
    coco = COCO()
    coco.dataset = coco_json.coco_ground_truth(builder, "validation")
    coco.createIndex()
    assert sorted(coco.imgs) == [1, 2, 3, 4]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["circle", "square", "triangle"]
    for image_id in coco.imgs:
        _, objects = shapes.generate_image(3, "validation", image_id - 1, SIZE)
        anns = coco.imgToAnns[image_id]
        assert len(anns) == len(objects)
        for ann, (label, mask) in zip(anns, objects):
            assert ann["category_id"] == label + 1
            assert np.array_equal(coco.annToMask(ann), mask)
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]


@pytest.mark.slow
def test_default_set_builds_with_its_split_sizes(tmp_path):
    default = shapes.build_shapes(str(tmp_path))
    assert default.info.splits["train"].num_examples == 2000
    assert default.info.splits["validation"].num_examples == 200


def test_a_data_dir_tfds_cannot_make_is_named_as_the_config_field(tmp_path):
    """`data.data_dir` below a file (or where no folder can be made): TFDS's bare OSError from
    deep in its download manager ("[Errno 20] Not a directory: ...") now names the field."""
    (tmp_path / "a_file").write_text("x")
    data = shapes_r18.get_config().data
    data.data_dir = str(tmp_path / "a_file" / "data")
    message = (
        f"config.data.data_dir='{data.data_dir}' cannot hold the built datasets: Not a "
        f"directory: {data.data_dir} (name a folder that can be made and written, or leave it "
        "empty for ~/tensorflow_datasets)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_builder(data)
