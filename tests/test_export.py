"""Export to a TensorFlow SavedModel (`programs/exporter.py`, `scripts/export.py`).

One 128² ResNet-18 shapes checkpoint (random weights, so no training) is exported once per
module by scripts/export.py, for cpu, cuda and tpu at once, with full masks. A fresh subprocess
in which jax, jaxlib, flax and mrcnn_jax cannot be imported (TensorFlow imports jax on its own
when it is installed, `tensorflow/lite/python/util.py`, so they are blocked rather than merely
not imported) loads it, runs every signature, the README snippet and the threshold input, an
image with no detection, an empty batch and inputs the functions must refuse, and hands the
results back; they are compared with the JAX predictor on the same images.
"""

import dataclasses
import fcntl
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_config
from helpers import random_variables

import mrcnn_jax
from configs import shapes_r18, torchvision_r50_fpn_v1
from mrcnn_jax.data import shapes
from mrcnn_jax.evaluation.masks import PASTE_METHODS, paste_masks
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN, dummy_inputs
from mrcnn_jax.programs import exporter
from mrcnn_jax.train import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((100, 151), (160, 120), (57, 200))  # (height, width): natural, non-square
CATEGORY_IDS = (3, 5, 7)
BLOCKED = ("jax", "jaxlib", "flax", "mrcnn_jax", "optax", "orbax")
# image_sizes for one image of a 160 x 200 batch: below 1 (a slice [:h, :w] takes -5 as 195),
# and a row too many
BAD_SIZES = ([[-1, -1]], [[100, -5]], [[-100, 151]], [[0, 151]], [[100, 151], [100, 151]])
BAD_THRESHOLDS = (2.0, -0.1, float("nan"))


def random_checkpoint(workdir, config, fc2_offset: float = 0.0, seed: int = 0) -> None:
    """Saves random variables of `config`'s model as checkpoint 0 of `workdir`.

    `fc2_offset` is subtracted from the bias of the box head's last FC: with 4 on the shapes
    model its ReLU features are sparse and vary from RoI to RoI, so scores spread (0.6–0.75)
    and more than one class wins."""
    model = MaskRCNN.from_config(config.model)
    shape = tuple(config.data.image_size)
    variables, _ = random_variables(
        model, np.random.default_rng(seed), dummy_inputs(shape), train=False
    )
    variables = jax.tree_util.tree_map(np.asarray, variables)
    variables["params"]["box_head"]["fc2"]["bias"] -= fc2_offset
    checkpoint.save_variables(workdir, config, variables)


def flat_image() -> np.ndarray:
    """A flat grey `[40, 60, 3]` uint8 image: the random shapes model scores nothing on it
    above 0.3, below the threshold the tests pick (so no detection passes it)."""
    return np.full((40, 60, 3), 100, np.uint8)


def make_images(sizes=SIZES, seed: int = 0) -> list[np.ndarray]:
    """Noise images of `sizes` with a few bright rectangles."""
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        image = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
        for _ in range(3):
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            image[y : y + h // 3, x : x + w // 3] = rng.integers(150, 255, 3, dtype=np.uint8)
        images.append(image)
    return images


def padded_batch(images, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`images [B, Hmax, Wmax, 3]` (noise beyond each image) and `image_sizes [B, 2]`."""
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    batch = np.random.default_rng(seed).integers(0, 255, (len(images), h, w, 3), dtype=np.uint8)
    for b, image in enumerate(images):
        batch[b, : image.shape[0], : image.shape[1]] = image
    return batch, np.array([i.shape[:2] for i in images], np.int32)


def readme_snippet() -> str:
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Export to TensorFlow SavedModel", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


TF_ONLY = """
import importlib.abc, pickle, sys

BLOCKED = {blocked!r}


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked: the SavedModel must run without it")


sys.meta_path.insert(0, Block())
import tensorflow as tf

with open(sys.argv[1], "rb") as f:
    job = pickle.load(f)
loaded = tf.saved_model.load(job["dir"])
numpy = lambda d: {{k: v.numpy() for k, v in d.items()}}


def attempt(call):  # call()'s outputs as numpy, or the message of its TF error
    try:
        return numpy(call())
    except tf.errors.InvalidArgumentError as e:
        return e.message


single = loaded.signatures["serving_default"]
out = {{"default": [numpy(single(image=tf.constant(i))) for i in job["images"]]}}
out["batch"] = numpy(
    loaded.signatures["serving_batch"](
        images=tf.constant(job["batch"]), image_sizes=tf.constant(job["sizes"])
    )
)
out["threshold_0"] = numpy(loaded.detect(tf.constant(job["images"][0]), score_threshold=0.0))
out["batch_threshold_0"] = numpy(
    loaded.detect_batch(tf.constant(job["batch"]), job["sizes"], score_threshold=0.0)
)
if "flat" in job:  # no detection; an empty batch; inputs to refuse
    image, batch = tf.constant(job["images"][0]), tf.constant(job["batch"][:1])
    out["flat"] = attempt(lambda: single(image=tf.constant(job["flat"])))
    out["threshold_1"] = attempt(lambda: loaded.detect(image, score_threshold=1.0))
    out["empty_batch"] = attempt(
        lambda: loaded.detect_batch(
            tf.zeros([0, 50, 70, 3], tf.uint8), tf.zeros([0, 2], tf.int32), score_threshold=0.5
        )
    )
    out["bad_sizes"] = [
        attempt(lambda: loaded.detect_batch(batch, tf.constant(s, tf.int32), 0.5))
        for s in job["bad_sizes"]
    ]
    image = job["images"][0]
    batch_signature = loaded.signatures["serving_batch"]
    out["bad_images"] = [  # grey, RGBA, a batch of one: the signatures do not check shapes
        attempt(lambda: single(image=tf.constant(image[..., 0]))),
        attempt(lambda: single(image=tf.constant(image[..., [0, 1, 2, 2]]))),
        attempt(lambda: single(image=tf.constant(image[None]))),
        attempt(lambda: batch_signature(
            images=tf.constant(job["batch"][:1, ..., [0, 1, 2, 2]]),
            image_sizes=tf.constant(job["sizes"][:1]),
        )),
    ]
    float_image = tf.constant(image.astype("float32") / 255)  # a tensor: checked (not numpy)
    out["float_image"] = [attempt(lambda: single(image=float_image))]
    try:
        loaded.detect(float_image)
        out["float_image"].append("accepted")
    except TypeError as e:
        out["float_image"].append(str(e))
    image = tf.constant(image)
    out["bad_thresholds"] = [
        (
            attempt(lambda: loaded.detect(image, score_threshold=t)),
            attempt(lambda: loaded.detect_batch(batch, job["sizes"][:1], score_threshold=t)),
        )
        for t in job["bad_thresholds"]
    ]
if job["snippet"]:
    namespace = {{"image": job["images"][1]}}
    exec(job["snippet"], namespace)
    out["readme"] = numpy(namespace["result"])
out["class_names"] = [n.decode() for n in loaded.class_names.numpy()]
out["category_ids"] = loaded.category_ids.numpy()
out["step"] = int(loaded.step.numpy())
out["config"] = open(loaded.config_file.asset_path.numpy().decode()).read()
out["imported"] = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
with open(sys.argv[2], "wb") as f:
    pickle.dump(out, f)
"""


def run_tf_only(tmp_path, job: dict) -> dict:
    """Runs TF_ONLY on `job` in a fresh process; returns its outputs."""
    job_path, out_path = tmp_path / "job.pkl", tmp_path / "out.pkl"
    job_path.write_bytes(pickle.dumps(job))
    code = textwrap.dedent(TF_ONLY.format(blocked=BLOCKED))
    result = subprocess.run(
        [sys.executable, "-c", code, str(job_path), str(out_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return pickle.loads(out_path.read_bytes())


def shapes_config():
    config = shapes_r18.get_config()
    config.data.class_names = shapes.CLASS_NAMES
    config.data.label_to_category_id = CATEGORY_IDS
    return config


def pick_threshold(results: list[dict]) -> float:
    """A threshold that keeps about half of the first image's detections, midway in the widest
    gap between consecutive scores there."""
    scores = np.sort(results[0]["scores"])[::-1]
    n = len(scores)
    middle = range(n // 4, 3 * n // 4)
    k = max(middle, key=lambda i: scores[i] - scores[i + 1])
    return float((scores[k] + scores[k + 1]) / 2)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, 4] x [M, 4] -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 for empty boxes
        return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def assert_same_detections(
    tf_result: dict,
    jax_result: dict,
    category_ids=CATEGORY_IDS,
    names=shapes.CLASS_NAMES,
    score_atol: float = 1e-4,
) -> None:
    """Same count; each JAX detection matched one-to-one by the nearest TF one of the same class,
    whose box is within 0.05 px and has IoU ≥ 0.999 (boxes of sides ≥ 1 px: a random model's
    sliver boxes make IoU ill-conditioned), and |Δscore| ≤ `score_atol`; category ids and
    names follow the labels; pasted masks agree but for pixels at the probability threshold
    (≤ 0.2% of each mask's pixels)."""
    n = len(jax_result["scores"])
    assert len(tf_result["scores"]) == n and n > 0
    want_boxes, got_boxes = jax_result["boxes"], tf_result["boxes"]
    distance = np.abs(want_boxes[:, None] - got_boxes[None]).max(axis=-1)  # [N, N] px
    same_class = jax_result["classes"][:, None] == tf_result["labels"][None, :]
    match = np.argmin(np.where(same_class, distance, np.inf), axis=1)
    assert sorted(match) == list(range(n)), "not one-to-one"
    assert distance[np.arange(n), match].max() <= 0.05
    sized = np.min(want_boxes[:, 2:] - want_boxes[:, :2], axis=1) >= 1
    assert sized.any()
    np.testing.assert_array_less(0.999, np.diag(iou(want_boxes, got_boxes[match]))[sized])
    np.testing.assert_allclose(tf_result["scores"][match], jax_result["scores"], atol=score_atol)
    labels = tf_result["labels"]
    np.testing.assert_array_equal(tf_result["classes"], np.take(category_ids, labels))
    np.testing.assert_array_equal(tf_result["classes"][match], jax_result["category_ids"])
    assert [n.decode() for n in tf_result["class_names"]] == [names[label] for label in labels]
    assert tf_result["masks"].shape == (n, 28, 28)
    got, want = tf_result["full_masks"][match], jax_result["masks"]
    assert got.shape == want.shape and got.dtype == bool
    differing = (got != want).reshape(n, -1).mean(axis=1)
    assert differing.max() <= 2e-3, differing


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes_checkpoint")
    random_checkpoint(path, shapes_config(), fc2_offset=4.0)
    return path


@pytest.fixture(scope="module")
def predictor(workdir):
    return mrcnn_jax.load_checkpoint(workdir)


@pytest.fixture(scope="module")
def expected(predictor):
    """(threshold, the predictor's results at it, and at 0) on `make_images()`."""
    images = make_images()
    everything = [predictor(image, score_threshold=0.0) for image in images]
    threshold = pick_threshold(everything)
    kept = [predictor(image, score_threshold=threshold) for image in images]
    return threshold, kept, everything


@pytest.fixture(scope="module")
def saved_model(workdir, expected, tmp_path_factory):
    """scripts/export.py's SavedModel of the checkpoint (cpu, cuda, tpu; full masks)."""
    out = tmp_path_factory.mktemp("export") / "savedmodel"
    args = [
        f"--workdir={workdir}", f"--out={out}", "--platforms=cpu,cuda,tpu", "--full_masks",
        f"--score_threshold={expected[0]!r}",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "export.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"-> {out}" in result.stdout
    return out


@pytest.fixture(scope="module")
def tf_outputs(saved_model, tmp_path_factory):
    images = make_images()
    batch, sizes = padded_batch(images)
    job = {
        "dir": str(saved_model),
        "images": images,
        "batch": batch,
        "sizes": sizes,
        "snippet": readme_snippet().replace(
            '"/tmp/mrcnn_shapes_savedmodel"', repr(str(saved_model))
        ),
        "flat": flat_image(),
        "bad_sizes": BAD_SIZES,
        "bad_thresholds": BAD_THRESHOLDS,
    }
    return run_tf_only(tmp_path_factory.mktemp("tf_only"), job)


# ------------------------------------------------------------------------------- tests


def test_the_saved_model_runs_without_jax_or_mrcnn_jax(tf_outputs):
    assert tf_outputs["imported"] == []


def test_serving_default_equals_the_jax_predictor(tf_outputs, expected):
    threshold, kept, _ = expected
    for tf_result, jax_result in zip(tf_outputs["default"], kept):
        assert np.all(tf_result["scores"] >= threshold)
        assert_same_detections(tf_result, jax_result)
    assert 0 < len(kept[0]["scores"]) < len(expected[2][0]["scores"])  # the threshold cut some
    assert len({label for r in tf_outputs["default"] for label in r["labels"]}) > 1


def test_the_threshold_input_of_detect(tf_outputs, expected):
    assert_same_detections(tf_outputs["threshold_0"], expected[2][0])


def test_serving_batch_equals_serving_default(tf_outputs):
    batch, sizes = tf_outputs["batch"], padded_batch(make_images())[1]
    d = batch["scores"].shape[1]
    for b, single in enumerate(tf_outputs["default"]):
        n = int(batch["num_detections"][b])
        assert n == len(single["scores"])
        for key, value in single.items():
            if key == "full_masks":
                h, w = sizes[b]
                np.testing.assert_array_equal(batch[key][b, :n, :h, :w], value)
                assert not batch[key][b, :, h:].any() and not batch[key][b, :, :, w:].any()
            else:
                np.testing.assert_array_equal(batch[key][b, :n], value, err_msg=key)
        assert np.all(batch["labels"][b, n:] == -1) and np.all(batch["classes"][b, n:] == -1)
        assert np.all(batch["scores"][b, n:] == 0) and not batch["full_masks"][b, n:].any()
        assert set(batch["class_names"][b, n:]) <= {b""}
    assert d == shapes_config().model.roi_heads.detections_per_image
    everything = tf_outputs["batch_threshold_0"]
    np.testing.assert_array_equal(
        everything["num_detections"][0], len(tf_outputs["threshold_0"]["scores"])
    )


def assert_empty(result: dict, batch: tuple[int, ...], height: int, width: int) -> None:
    """`result` holds no detection: every output `[*batch, 0, ...]` (`full_masks` `[..., 0,
    height, width]`) of its dtype; `batch` is () for `serving_default`."""
    assert isinstance(result, dict), result  # not an error message
    shapes = {
        "boxes": ((4,), np.float32),
        "scores": ((), np.float32),
        "labels": ((), np.int32),
        "classes": ((), np.int32),
        "class_names": ((), object),
        "masks": ((28, 28), np.float32),
        "full_masks": ((height, width), bool),
    }
    for key, (shape, dtype) in shapes.items():
        assert result[key].shape == (*batch, 0, *shape), key
        assert result[key].dtype == dtype, key


def test_no_detection_gives_empty_results_with_full_masks(tf_outputs, predictor, expected):
    """An image on which no detection passes the threshold (the export's, or 1.0 given to
    `detect`) gives empty outputs, as the predictor gives none."""
    assert len(predictor(flat_image(), score_threshold=expected[0])["scores"]) == 0
    assert_empty(tf_outputs["flat"], (), *flat_image().shape[:2])
    assert_empty(tf_outputs["threshold_1"], (), *SIZES[0])


def test_an_empty_batch_gives_outputs_of_batch_0(tf_outputs):
    result = tf_outputs["empty_batch"]
    d = shapes_config().model.roi_heads.detections_per_image
    assert isinstance(result, dict), result
    for key, shape in (("boxes", (d, 4)), ("masks", (d, 28, 28)), ("full_masks", (d, 50, 70))):
        assert result[key].shape == (0, *shape), key
    for key in ("scores", "labels", "classes", "class_names", "num_detections"):
        assert result[key].shape == ((0, d) if key != "num_detections" else (0,)), key


def test_bad_image_sizes_are_refused(tf_outputs):
    for size, message in zip(BAD_SIZES, tf_outputs["bad_sizes"]):
        assert isinstance(message, str) and "image_sizes" in message, (size, message)


def test_images_of_another_shape_are_refused_naming_the_input(tf_outputs):
    images = make_images()
    shapes = [images[0].shape[:2], (*images[0].shape[:2], 4), (1, *images[0].shape)]
    for shape, message in zip([*shapes, None], tf_outputs["bad_images"], strict=True):
        assert isinstance(message, str), (shape, message)
        if shape is None:  # serving_batch, [1, H, W, 4]
            assert "images must be [B, H, W, 3] uint8 RGB" in message, message
        else:
            assert "image must be [H, W, 3] uint8 RGB" in message, (shape, message)
            assert " ".join(map(str, shape)) in message, (shape, message)


def test_float_image_tensors_are_refused(tf_outputs):
    """(The module docstring and README say that numpy arguments are cast to uint8 unchecked.)"""
    signature, function = tf_outputs["float_image"]
    assert "expected to be a uint8 tensor but is a float tensor" in signature, signature
    assert "tf.uint8" in function and "tf.float32" in function, function


def test_score_thresholds_outside_0_1_are_refused(tf_outputs):
    for threshold, messages in zip(BAD_THRESHOLDS, tf_outputs["bad_thresholds"]):
        for message in messages:  # detect, detect_batch
            assert isinstance(message, str), (threshold, message)
            assert "score_threshold" in message, (threshold, message)


def test_readme_snippet_runs_in_the_tf_only_process(tf_outputs):
    np.testing.assert_array_equal(
        tf_outputs["readme"]["scores"], tf_outputs["default"][1]["scores"]
    )
    assert tf_outputs["readme"]["full_masks"].shape[1:] == SIZES[1]


def test_class_names_config_and_step_are_saved(tf_outputs, predictor):
    assert tf_outputs["class_names"] == list(shapes.CLASS_NAMES)
    assert tuple(tf_outputs["category_ids"]) == CATEGORY_IDS
    assert tf_outputs["step"] == predictor.step == 0
    saved = json.loads(tf_outputs["config"])
    assert saved == json.loads(predictor.config.to_json())
    assert saved["data"]["image_size"] == [128, 128]


@pytest.mark.slow
def test_a_batched_model_runs_any_batch_in_chunks(tmp_path):
    """`batch_size=2`: 3 images (the second chunk padded) through `serving_batch` give what
    `serving_default` gives each (its batch-1 model) and the predictor; a config without class
    names or category ids names labels "0".."K-1" and uses them as ids. Slow (1–2 minutes):
    the batch-2 program compiles too."""
    config = tiny_config()
    random_checkpoint(tmp_path / "workdir", config)
    predictor = mrcnn_jax.load_checkpoint(tmp_path / "workdir")
    out = exporter.export_saved_model(
        predictor, tmp_path / "savedmodel", batch_size=2, score_threshold=0.0
    )
    loaded = tf.saved_model.load(str(out))
    images = make_images(((50, 70), (64, 40), (30, 64)))
    batch, sizes = padded_batch(images)
    got = loaded.signatures["serving_batch"](images=batch, image_sizes=sizes)
    assert "full_masks" not in got
    for b, image in enumerate(images):
        single = loaded.signatures["serving_default"](image=image)
        n = int(got["num_detections"][b])
        assert n == len(single["scores"]) > 0
        for key in ("labels", "classes", "class_names"):
            np.testing.assert_array_equal(got[key][b, :n], single[key], err_msg=key)
        for key, atol in (("boxes", 1e-3), ("scores", 1e-5), ("masks", 1e-5)):
            # Another program (batch 2): other rounding.
            np.testing.assert_allclose(got[key][b, :n], single[key], atol=atol, err_msg=key)
        want = predictor(image, score_threshold=0.0)
        np.testing.assert_array_equal(single["labels"], want["classes"])
        np.testing.assert_array_equal(single["classes"], want["category_ids"])
        assert [c.decode() for c in single["class_names"].numpy()] == want["class_names"]
        np.testing.assert_allclose(single["boxes"], want["boxes"], atol=0.01)
        np.testing.assert_allclose(single["scores"], want["scores"], atol=1e-4)


@pytest.mark.parametrize("method", PASTE_METHODS)
def test_paste_masks_tf_equals_paste_masks(method):
    """On boxes inside, across and outside the image, sub-pixel and empty ones, and masks with
    values exactly at the threshold (0.5 is foreground for detectron2, not for torchvision);
    no masks give `[0, Hc, Wc]`."""
    rng = np.random.default_rng(0)
    n, m, (h, w) = 40, 28, (70, 97)
    xy = rng.uniform(-30, 110, (n, 2))
    wh = rng.uniform(0, 70, (n, 2))
    wh[:4] = rng.uniform(0, 0.6, (4, 2))
    wh[4] = 0
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    masks = (rng.integers(0, 9, (n, m, m)) / 8).astype(np.float32)
    want = paste_masks(masks, boxes, (h, w), method=method)
    paste = tf.function(lambda *args, **kwargs: exporter.paste_masks_tf(*args, **kwargs))
    got = paste(masks, boxes, tf.constant([h, w]), method).numpy()
    np.testing.assert_array_equal(got, want)
    assert want.any()
    wider = paste(masks, boxes, tf.constant([h, w]), method, canvas=tf.constant([80, 120]))
    wider = wider.numpy()
    np.testing.assert_array_equal(wider[:, :h, :w], want)
    assert not wider[:, h:].any() and not wider[:, :, w:].any()
    none = paste(masks[:0], boxes[:0], tf.constant([h, w]), method, canvas=tf.constant([80, 120]))
    assert none.shape == (0, 80, 120) and none.dtype == tf.bool


def test_configs_it_cannot_represent_are_refused(predictor, tmp_path, monkeypatch):
    config = predictor.config
    cases = {
        "data.class_names": ("class_names", ("a", "b")),
        "data.label_to_category_id": ("label_to_category_id", (1, 2)),
    }
    for field, (name, value) in cases.items():
        bad = config.copy_and_resolve_references()
        bad.data[name] = value
        with pytest.raises(ValueError, match=re.escape(f"config.{field}")):
            exporter.check_exportable(bad, full_masks=False)
    bad = config.copy_and_resolve_references()
    bad.data.label_to_category_id = (-7, 2, 2**31)  # only the ids that do not fit, named
    with pytest.raises(ValueError) as error:
        exporter.check_exportable(bad, full_masks=False)
    assert str(error.value).startswith(
        "config.data.label_to_category_id holds 2 category id(s) a SavedModel cannot output: "
        "[-7, 2147483648] (its `classes` are int32 ids in [0, 2147483647], -1 beyond"
    )
    bad = config.copy_and_resolve_references()
    bad.model.roi_heads.mask_paste = "nearest"
    exporter.check_exportable(bad, full_masks=False)  # not pasted: fine
    with pytest.raises(ValueError, match=r"config\.model\.roi_heads\.mask_paste"):
        exporter.export_saved_model(
            dataclasses.replace(predictor, config=bad), tmp_path / "a", full_masks=True
        )
    bad = config.copy_and_resolve_references()
    bad.data.image_size = (100, 128)
    with pytest.raises(ValueError, match=r"config\.data\.image_size"):
        exporter.check_exportable(bad, full_masks=False)
    with pytest.raises(ValueError, match="platforms"):
        exporter.export_saved_model(predictor, tmp_path / "b", platforms=("metal",))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))  # `~` expanded (scripts/export.py --out=~/c)
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'c'} is not empty")):
        exporter.export_saved_model(predictor, "~/c")
    (tmp_path / "k" / "variables").mkdir(parents=True)  # a SIGKILL's, midway: says so
    killed = f"{tmp_path / 'k'} is not empty: it holds the variables/ of an export killed midway"
    with pytest.raises(FileExistsError, match=re.escape(killed)):
        exporter.export_saved_model(predictor, tmp_path / "k")
    with pytest.raises(FileExistsError, match=re.escape(f"{tmp_path / 'c' / 'x'} is a file")):
        exporter.export_saved_model(predictor, tmp_path / "c" / "x")  # NotADirectoryError


@pytest.mark.parametrize("stop", ["full disk", "Ctrl-C"])
def test_a_failed_write_leaves_the_out_dir_as_it_was_and_says_why(
    stop, predictor, tmp_path, monkeypatch
):
    """A SavedModel write that fails midway (here TF's `SaveV2` on a full disk, after the
    variables folder exists) is an `ExportWriteError` naming the folder and TF's reason; the
    folder is removed, or emptied when it existed empty, so the same export can run again (an
    `out_dir` that is not empty is refused). So after a Ctrl-C (it was left half-written)."""

    def save_stopped_midway(module, out, signatures):
        os.makedirs(os.path.join(out, "variables"))
        with open(os.path.join(out, "variables", "part-00000"), "wb") as f:
            f.write(b"partial")
        if stop == "Ctrl-C":
            raise KeyboardInterrupt
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2}} part-00000; No space left on device"
        )

    monkeypatch.setattr(tf.saved_model, "save", save_stopped_midway)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out, left in ((tmp_path / "absent", None), (empty, [])):
        expected = (
            f"writing the SavedModel to {out} failed (part-00000; No space left on device); "
            "what it had written is removed"
        )
        with pytest.raises(
            KeyboardInterrupt if stop == "Ctrl-C" else exporter.ExportWriteError,
            match=None if stop == "Ctrl-C" else re.escape(expected),
        ):
            exporter.export_saved_model(predictor, out)
        assert (sorted(out.iterdir()) if out.exists() else None) == left


def test_an_export_into_a_folder_another_export_writes_is_refused(predictor, tmp_path):
    """Two exports into one --out both passed the emptiness check (made before the model is
    read and converted, tens of seconds), both wrote there and both said so: one SavedModel
    was silently lost. The folder is locked while an export writes it; a second one is refused
    at once and leaves it alone; once the first is done, the folder is not empty."""
    out = tmp_path / "out"
    out.mkdir()
    folder = os.open(out, os.O_RDONLY)
    fcntl.flock(folder, fcntl.LOCK_EX)  # as an export writing there holds it
    try:
        (out / "variables").mkdir()  # what that export has written so far
        with pytest.raises(FileExistsError, match=re.escape(f"{out} is being written by another")):
            exporter.export_saved_model(predictor, out)
        assert sorted(p.name for p in out.iterdir()) == ["variables"]  # untouched
    finally:
        os.close(folder)
    (out / "saved_model.pb").write_bytes(b"")  # that export done
    with pytest.raises(FileExistsError, match=re.escape(f"{out} is not empty")):
        exporter.export_saved_model(predictor, out)
    assert sorted(p.name for p in out.iterdir()) == ["saved_model.pb", "variables"]


def test_an_export_whose_folder_is_replaced_meanwhile_stops_and_leaves_it(
    predictor, tmp_path, monkeypatch
):
    """Another export that made the same absent --out, refused, removed it as empty; made
    again, it is no longer the folder this export locked: it stops before writing, and leaves
    the new folder (another export's) alone."""
    out = tmp_path / "out"
    module = exporter._module

    def replaced_meanwhile(*args, **kwargs):
        out.rmdir()
        out.mkdir()
        (out / "theirs").write_text("")
        return module(*args, **kwargs)

    monkeypatch.setattr(exporter, "_module", replaced_meanwhile)
    with pytest.raises(FileExistsError, match=re.escape(f"{out} was removed or replaced")):
        exporter.export_saved_model(predictor, out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]


@pytest.mark.slow
def test_torchvision_r50_config_exports(tmp_path):
    """configs/torchvision_r50_fpn_v1.py (1344² canvas, 91-way COCO labels, torchvision paste)
    with random weights: the SavedModel's detections are the predictor's, batch = single.

    Scores agree to 5e-4 here, not 1e-4: the two XLA builds (jaxlib's, TensorFlow's) round the
    1344² convolutions differently, and 50 random layers behind frozen BatchNorm that does not
    normalise amplify it (measured 2.1e-4 at worst on these images; the raw model outputs on
    one canvas differ by 2e-5)."""
    config = torchvision_r50_fpn_v1.get_config()
    random_checkpoint(tmp_path / "workdir", config)
    predictor = mrcnn_jax.load_checkpoint(tmp_path / "workdir")
    images = make_images(((480, 640), (427, 320)))
    want = [predictor(image, score_threshold=0.0) for image in images]
    out = exporter.export_saved_model(
        predictor, tmp_path / "savedmodel", full_masks=True, score_threshold=0.0
    )
    batch, sizes = padded_batch(images)
    job = {"dir": str(out), "images": images, "batch": batch, "sizes": sizes, "snippet": ""}
    got = run_tf_only(tmp_path, job)
    assert got["imported"] == []
    for tf_result, jax_result in zip(got["default"], want):
        assert_same_detections(
            tf_result,
            jax_result,
            config.data.label_to_category_id,
            config.data.class_names,
            score_atol=5e-4,
        )
    for b, single in enumerate(got["default"]):
        n = int(got["batch"]["num_detections"][b])
        np.testing.assert_array_equal(got["batch"]["boxes"][b, :n], single["boxes"])
