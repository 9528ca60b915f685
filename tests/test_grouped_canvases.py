"""Canvas groups (`data.canvas_groups`, aspect-ratio grouping with static shapes): every batch is
one group in its canvas, each image in the first canvas holding it, sizes read from the encoded
headers; the per-step group is a function of seed and step; `start_step` resumes exactly on 1
and 2 processes; bad groups are clear errors; a short training run compiles its step once per
canvas and resumes on the right one. Groups off: the single-canvas pipeline (tests/
test_pipeline.py), untouched.

tiny_coco's train split (JPEG) at shorter side 64, longer ≤ 96, canvases 64×96 and 96×64:
images 1 (60×80 -> 64×85), 3 (48×64 -> 64×85) and 4 (40×40 -> 64×64, square: the first
canvas) go to the wide canvas, 2 (50×40 -> 80×64) and 5 (64×48 -> 85×64) to the tall one.
"""

import re
import shutil

import cv2
import jax
import numpy as np
import pytest
import tensorflow as tf
import tiny_coco
from conftest import tiny_config
from helpers import resize_config
from test_pipeline import ONE, _concatenated, _config, _eval_rows, _rows, _same, _take
from test_train_loop import assert_trees_equal, final_state

from mrcnn_jax import sharding
from mrcnn_jax.data import canvas_groups, pipeline, shapes
from mrcnn_jax.programs import evaluator, trainer
from mrcnn_jax.train import step as step_lib

WIDE, TALL = (64, 96), (96, 64)


def _grouped(**data):
    """The test_pipeline config resized by shorter side 64 / longer 96 into two canvases (eval:
    96²), every tiny_coco image kept, no flip."""
    defaults = {
        "image_size": (96, 96),
        "resize_short_side": 64,
        "resize_max_long_side": 96,
        "canvas_groups": (WIDE, TALL),
        "skip_empty_train_images": False,
        "hflip": False,
    }
    return _config(**{**defaults, **data})


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return tiny_coco.build(tmp_path_factory.mktemp("coco"))[0]


@pytest.fixture(scope="module")
def shapes_builder(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    return shapes.build_shapes(data_dir, num_train=8, num_val=2, image_size=(40, 60), seed=1)


def _first_canvas_holding(h: int, w: int):
    rounded = (-(-h // 32) * 32, -(-w // 32) * 32)
    return next(c for c in (WIDE, TALL) if c[0] >= rounded[0] and c[1] >= rounded[1])


def test_each_batch_is_one_group_padded_to_its_canvas(coco):
    """Batch s has the canvas of step s's group; every image is in the first canvas holding it
    (landscape and square: wide, portrait: tall) and equals, content, boxes and masks, the same
    image on the square eval canvas: only the padding differs."""
    config = _grouped()
    batches = _take(pipeline.create_train_dataset(config, builder=coco, **ONE), 12)
    expected = canvas_groups.step_groups(config, np.arange(12))
    assert set(expected) == {0, 1}
    assert [b["image"].shape[1:3] for b in batches] == [(WIDE, TALL)[g] for g in expected]
    references = list(_eval_rows(config, coco).values())
    seen = set()
    for batch in batches:
        canvas = batch["image"].shape[1:3]
        for row in _rows([batch]):
            h, w = row["image_size"]
            assert _first_canvas_holding(h, w) == canvas
            assert (canvas == TALL) == (h > w)
            assert not row["image"][h:].any() and not row["image"][:, w:].any()
            (same,) = [
                i
                for i, r in enumerate(references)
                if (r["image_size"] == row["image_size"]).all()
                and np.array_equal(r["image"][:h, :w], row["image"][:h, :w])
            ]
            for key in ("gt_boxes", "gt_classes", "gt_valid", "gt_masks"):
                np.testing.assert_array_equal(row[key], references[same][key], err_msg=key)
            seen.add(same)
    assert len(seen) == 5


def test_objects_beyond_max_instances_are_warned_of_once_for_all_groups(coco, caplog):
    """Images with objects cut in both canvases (1, wide: 3 trainable; 5, tall: 4) give one
    warning, as without groups (each group's stream warned once), and one report at the end
    naming both groups' images."""
    config = _grouped(max_instances=2)
    with caplog.at_level("WARNING"):
        stream = pipeline.create_train_dataset(config, builder=coco, **ONE)
        batches = _take(stream, 12)
        stream.close()
    assert {b["image"].shape[1:3] for b in batches} == {WIDE, TALL}
    warnings = [r.getMessage() for r in caplog.records if "max_instances=2" in r.getMessage()]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("Image id ") and "Warned once" in warnings[0]
    assert warnings[1] == (
        "max_instances=2 cut objects from 2 images read by this process; the largest, image id "
        "5, has 4: config.data.max_instances=4 keeps all of these."
    )


def test_the_group_of_a_step_is_a_function_of_the_seed_and_the_step():
    config = _grouped(canvas_group_weights=(3, 1))
    groups = canvas_groups.step_groups(config, np.arange(4000))
    np.testing.assert_array_equal(
        canvas_groups.step_groups(config, [17, 3999, 5]), groups[[17, 3999, 5]]
    )
    assert 0.72 < np.mean(groups == 0) < 0.78  # weights 3 : 1
    np.testing.assert_array_equal(
        canvas_groups.steps_per_group(config, 1000), np.bincount(groups[:1000])
    )
    config.seed += 1
    assert not np.array_equal(canvas_groups.step_groups(config, np.arange(4000)), groups)
    for weights, only in (((0, 2), 1), ((1.0, 0.0), 0)):
        config.data.canvas_group_weights = weights
        assert (canvas_groups.step_groups(config, np.arange(500)) == only).all()
    config.data.canvas_group_weights = ()
    assert 0.47 < np.mean(canvas_groups.step_groups(config, np.arange(4000))) < 0.53  # equal


def test_start_step_resumes_exactly_on_one_and_two_processes(coco):
    """From step N, the batches (the processes' slices concatenated) are those of an
    uninterrupted iterator, augmentation included; each group's stream is shorter than a batch,
    so its epochs cross every batch."""
    config = _grouped(hflip=True, scale_jitter=(0.8, 1.2), train_short_sides=(48, 64))
    reference = _take(pipeline.create_train_dataset(config, builder=coco, **ONE), 8)
    for start, counts in ((0, (2,)), (5, (1, 2))):
        assert len(set(canvas_groups.step_groups(config, np.arange(start, start + 3)))) == 2
        for count in counts:
            slices = [
                _take(
                    pipeline.create_train_dataset(
                        config, builder=coco, start_step=start, process_index=i, process_count=count
                    ),
                    3,
                )
                for i in range(count)
            ]
            for step, batch in enumerate(_concatenated(slices), start):
                assert _same(batch, reference[step]), (start, count, step)


def test_resuming_reads_headers_and_decodes_only_the_rows_it_yields(coco, monkeypatch):
    """JPEG (and PNG, below) sizes come from the headers: the decoding fallback never runs."""
    decoded, fallback = [], []

    def counting(original, log):
        def wrapped(encoded):
            count = tf.py_function(lambda: log.append(1) or 0, [], tf.int32)
            with tf.control_dependencies([count]):
                return original(encoded)

        return wrapped

    monkeypatch.setattr(pipeline, "_decode_image", counting(pipeline._decode_image, decoded))
    monkeypatch.setattr(
        canvas_groups, "_decoded_size", counting(canvas_groups._decoded_size, fallback)
    )
    config = _grouped()
    far = pipeline.create_train_dataset(config, builder=coco, start_step=100, **ONE)
    next(far)
    assert len(decoded) < 100 and not fallback  # 400 records skipped, 4 yielded (+ prefetch)


def test_image_sizes_from_the_headers_equal_the_decoded_sizes(coco, shapes_builder):
    for builder in (coco, shapes_builder):  # JPEG, PNG
        records = builder.as_dataset(split="train", decoders=pipeline._RAW_IMAGE)
        for example in records:
            size = canvas_groups.encoded_image_size(example["image"]).numpy()
            decoded = tf.io.decode_image(example["image"], channels=3).shape[:2]
            assert size.tolist() == list(decoded) == example["image/size"].numpy().tolist()
    for extension in (".bmp", ".png", ".jpg"):
        image = np.random.default_rng(0).integers(0, 255, (37, 301, 3), np.uint8)
        encoded = cv2.imencode(extension, image)[1].tobytes()
        assert canvas_groups.encoded_image_size(tf.constant(encoded)).numpy().tolist() == [37, 301]


def test_canvas_group_counts_read_the_headers(coco):
    assert pipeline.canvas_group_counts(_grouped(), coco).tolist() == [3, 2]
    skipping = _grouped(skip_empty_train_images=True)  # 3 (empty) and 4 (crowd only) dropped
    assert pipeline.canvas_group_counts(skipping, coco).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"canvas_groups is \(\) \(off\)"):
        pipeline.canvas_group_counts(_config(), coco)


def test_a_group_without_images_is_a_clear_error_unless_never_drawn(shapes_builder):
    """shapes' 40×60 images are all landscape: the tall group is empty."""
    config = _grouped(canvas_group_weights=(1, 0))
    batches = _take(pipeline.create_train_dataset(config, builder=shapes_builder, **ONE), 3)
    assert all(b["image"].shape[1:3] == WIDE for b in batches)
    config.data.canvas_group_weights = ()
    batches = pipeline.create_train_dataset(config, builder=shapes_builder, **ONE)
    with pytest.raises(ValueError, match=r"no example in canvas group 1, \(96, 64\) \(config"):
        _take(batches, 10)


def _groups_config(groups, weights=(), short=800, long=1333, sides=(), divisibility=32):
    config = resize_config(short=short, long=long, divisibility=divisibility)
    config.data.train_short_sides = sides
    config.data.canvas_groups = groups
    config.data.canvas_group_weights = weights
    return config


COCO_SIDES = (640, 672, 704, 736, 768, 800)


@pytest.mark.parametrize(
    "groups, extra, message",
    [
        ((832, 1344), {}, r"canvas_groups=\(832, 1344\) must be \(height, width\) canvases"),
        (((832,),), {}, r"must be \(height, width\) canvases of positive integers"),
        (((832, 1344), (1344, 830)), {}, r"canvas_groups\[1\]=\(1344, 830\) is not a multiple "
         r"of config.model.size_divisibility=32: use \(1344, 832\)"),
        (((800, 1344), (1344, 832)), {"divisibility": 64}, r"canvas_groups\[0\]=\(800, 1344\) is "
         r"not a multiple of config.model.size_divisibility=64: use \(832, 1344\)"),
        (((832, 1344),), {}, r"holds no portrait image resized with shorter side 800 \(config."
         r"data.resize_short_side\) and config.data.resize_max_long_side=1333: they reach \(1344, "
         r"800\) .* add a canvas of at least \(1344, 800\)"),
        (((768, 1344), (1344, 832)), {"sides": COCO_SIDES}, r"holds no landscape image resized "
         r"with shorter side 800 \(the largest of config.data.train_short_sides\)"),
        (((832, 1344), (1344, 832)), {"sides": (800, 864)}, r"reach \(864, 1344\)"),
        (((832, 1344), (1344, 832)), {"short": 0, "long": 0}, r"needs config.data."
         r"resize_short_side > 0 \(got 0"),
        (((832, 1344), (1344, 832), (832, 1344)), {}, r"canvas_groups\[2\]=\(832, 1344\) would "
         r"never get an image: .* earlier groups \(\(832, 1344\), \(1344, 832\)\) hold"),
        (((1344, 1344), (832, 1344), (1344, 832)), {}, r"canvas_groups\[1\]=\(832, 1344\) would "
         r"never get an image"),
        (((832, 1344), (1344, 832)), {"weights": (1,)}, r"canvas_group_weights=\(1,\) must be "
         r"\(\) \(equal\) or 2 non-negative numbers, one per canvas group, with a positive sum"),
        (((832, 1344), (1344, 832)), {"weights": (1, -1)}, r"canvas_group_weights=\(1, -1\)"),
        (((832, 1344), (1344, 832)), {"weights": (0, 0)}, r"canvas_group_weights=\(0, 0\)"),
        (((832, 1344), (1344, 832)), {"weights": ("a", 1)}, r"canvas_group_weights=\('a', 1\)"),
    ],
)  # fmt: skip
def test_bad_canvas_groups_name_the_field_and_the_fix(groups, extra, message):
    config = _groups_config(groups, **extra)
    with pytest.raises(ValueError, match=message):
        pipeline.check_canvas(config)


@pytest.mark.parametrize(
    "groups, extra",
    [
        (((832, 1344), (1344, 832)), {"sides": COCO_SIDES}),  # configs/coco_r50_fpn_1x.py
        (((800, 1344), (1344, 800)), {"weights": (0.7, 0.3)}),  # the tight fit
        (((1344, 832), (832, 1344)), {}),  # portrait first: squares go there
        (((800, 1344), (1344, 1344)), {}),  # a square canvas for the portrait images
        (((832, 1024), (1024, 832)), {"long": 1024}),  # configs/coco_r50_fpn_tpu.py
    ],
)
def test_canvas_groups_that_hold_every_image_are_accepted(groups, extra):
    pipeline.check_canvas(_groups_config(groups, **extra))


# ------------------------------------------------------------------- training


@pytest.mark.slow  # two compiles of the train step: 200-300 s on the 2-core CPU
@pytest.mark.usefixtures("compile_cache")
def test_training_compiles_once_per_canvas_and_resumes_on_the_right_one(
    tmp_path_factory, monkeypatch, capsys
):
    """4 steps on 2 devices over tiny_coco's two orientations, checkpoints at 2 and 4: the
    jitted step has one compiled program per canvas (no recompiles), the batches follow the
    drawn groups, and a run resumed at step 2 takes the canvases of steps 2 and 3 and ends in
    the uninterrupted run's state."""
    root = tmp_path_factory.mktemp("grouped")
    tiny_coco.build(root)
    config = tiny_config(
        **{
            "data.dataset": "coco_instances",
            "data.data_dir": str(root / "tfds"),
            "data.manual_dir": str(root / "manual"),
            "data.image_size": (96, 96),
            "data.resize_short_side": 64,
            "data.resize_max_long_side": 96,
            "data.canvas_groups": (WIDE, TALL),
            "model.num_classes": 0,
            "train.batch_size": 2,
            "eval.batch_size": 2,
            "train.num_steps": 4,
            "train.checkpoint_every": 2,
            "train.log_every": 1,
        }
    )
    # A seed whose steps 0-1 and 2-3 both hold both canvases.
    config.seed = next(
        s
        for s in range(100)
        if {0, 1}
        == set(canvas_groups.step_groups(_with_seed(config, s), [0, 1]))
        == set(canvas_groups.step_groups(_with_seed(config, s), [2, 3]))
    )
    expected = [(WIDE, TALL)[g] for g in canvas_groups.step_groups(config, np.arange(4))]
    steps, canvases = [], []
    make_train_step, create_train_dataset = step_lib.make_train_step, pipeline.create_train_dataset

    def recorded_step(*args, **kwargs):
        steps.append(make_train_step(*args, **kwargs))
        return steps[-1]

    def recorded_batches(*args, **kwargs):
        for batch in create_train_dataset(*args, **kwargs):
            canvases.append(batch["image"].shape[1:3])
            yield batch

    create_mesh = sharding.create_mesh
    monkeypatch.setattr(sharding, "create_mesh", lambda: create_mesh(jax.devices()[:2]))
    monkeypatch.setattr(step_lib, "make_train_step", recorded_step)
    # Evaluation (data.image_size, untouched by the groups) would only add a compile.
    monkeypatch.setattr(evaluator, "evaluate_split", lambda *args, **kwargs: {"segm/AP": 0.0})
    monkeypatch.setattr(pipeline, "create_train_dataset", recorded_batches)
    workdir = root / "run"
    trainer.train_and_evaluate(config, str(workdir))
    assert canvases == expected
    assert steps[0]._cache_size() == 2  # one program per canvas
    said = capsys.readouterr().out
    firsts = [
        (str(i), str(c[0]), str(c[1])) for i, c in enumerate(expected) if c not in expected[:i]
    ]
    assert (
        re.findall(r"step (\d): compiling the train step for the (\d+)x(\d+) canvas", said)
        == firsts
    )

    resumed = shutil.copytree(workdir, root / "resumed")
    shutil.rmtree(resumed / "checkpoints" / "4")
    canvases.clear()
    trainer.train_and_evaluate(config, str(resumed))
    assert "Resumed from" in capsys.readouterr().out
    assert canvases == expected[2:]
    assert steps[1]._cache_size() == 2
    assert_trees_equal(final_state(resumed), final_state(workdir))


def _with_seed(config, seed):
    config = config.copy_and_resolve_references()
    config.seed = seed
    return config
