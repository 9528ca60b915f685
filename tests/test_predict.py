"""`Predictor.predict_batch` (batched, data-parallel over local devices) and scripts/predict.py
over files, folders and globs; the inputs the predictor, `load_checkpoint` and the predict and
eval scripts refuse (predict.py: an --out_dir among its inputs); the predictor's variables kept
on the devices; where the scripts write given a checkpoint folder as --workdir.

A tiny ResNet-18-FPN on a 128² canvas with random weights stands in for a trained model (its
class scores spread out so that detections are not near-tied); the script reads it from a
step-0 checkpoint. A persistent XLA cache lets the script's subprocesses (the same 8 CPU devices)
reuse what this process compiled.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from helpers import backend_compiles, imported_script, random_variables, write_sideways_jpeg
from pycocotools import mask as mask_utils

import mrcnn_jax
from mrcnn_jax import paths, sharding
from mrcnn_jax.data import shapes
from mrcnn_jax.evaluation import visualize
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN, dummy_inputs
from mrcnn_jax.programs.predictor import (
    Predictor,
    load_checkpoint,
    locate_checkpoint,
    read_checkpoint,
)
from mrcnn_jax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(100, 151), (160, 120), (128, 128), (77, 200)]  # natural (height, width), none 128²-fit


@pytest.fixture(scope="module")
def model_setup(compile_cache):
    """(config, variables) of the small model: 128² canvas, every detection kept."""
    config = tiny_config(
        **{
            "data.image_size": (128, 128),
            "data.class_names": shapes.CLASS_NAMES,
            "model.roi_heads.score_threshold": 0.0,
        }
    )
    model = MaskRCNN.from_config(config.model)
    variables, _ = random_variables(
        model, np.random.default_rng(0), dummy_inputs((128, 128)), train=False
    )
    kernel = variables["params"]["box_head"]["cls_score"]["kernel"]
    variables["params"]["box_head"]["cls_score"]["kernel"] = kernel * 40
    return config, variables


def natural_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` smooth random uint8 RGB images cycling through SIZES."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        height, width = SIZES[i % len(SIZES)]
        coarse = rng.uniform(0, 255, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
        images.append(cv2.resize(coarse, (width, height)).astype(np.uint8))
    return images


def assert_same_detections(got: dict, want: dict, what: str):
    assert len(want["scores"]) > 0, what
    assert got["classes"].tolist() == want["classes"].tolist(), what
    assert got["class_names"] == want["class_names"], what
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-6, err_msg=what)
    np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-3, err_msg=what)
    assert got["masks"].shape == want["masks"].shape, what
    assert np.mean(got["masks"] != want["masks"]) < 1e-3, what


@pytest.mark.parametrize(
    "num_devices, batch_size, image_counts",
    [(1, 2, (4, 3)), (8, 8, (8, 12))],
    ids=["1_device", "8_devices"],
)
def test_predict_batch_equals_calls_one_image_at_a_time(
    model_setup, num_devices, batch_size, image_counts
):
    """Image counts that `batch_size` divides and that it does not (the last batch padded; the
    same compiled program), on 1 device and on the 8 CPU devices conftest.py forces."""
    config, variables = model_setup
    assert jax.local_device_count() == 8
    predictor = Predictor(config, variables, step=0, devices=jax.local_devices()[:num_devices])
    assert predictor.num_devices == num_devices
    images = natural_images(max(image_counts))
    want = [predictor(image, score_threshold=0.0) for image in images]
    for count in image_counts:
        got = predictor.predict_batch(images[:count], score_threshold=0.0, batch_size=batch_size)
        assert len(got) == count
        for index, (g, w, image) in enumerate(zip(got, want, images)):
            assert g["masks"].shape[1:] == image.shape[:2]
            assert g["boxes"].dtype == w["boxes"].dtype == np.float32  # not float64
            assert_same_detections(g, w, f"{count} images, image {index}")
    threshold = float(np.median(want[0]["scores"]))
    (kept,) = predictor.predict_batch(images[:1], threshold, batch_size=batch_size)
    assert kept["scores"].tolist() == [s for s in want[0]["scores"].tolist() if s >= threshold]
    assert predictor.predict_batch([], batch_size=batch_size) == []
    with pytest.raises(ValueError, match="multiple of the"):
        predictor.predict_batch(images, batch_size=num_devices + 1 if num_devices > 1 else 0)
    # Refused with the conversion of torch's habits: floats in [0, 1], channels first.
    message = r"uint8 array \[H, W, 3\].*float32.*: floats in \[0, 1\]\? \(image \* 255\)"
    with pytest.raises(ValueError, match=message):
        predictor.predict_batch([images[0].astype(np.float32) / 255], batch_size=batch_size)
    message = r"float64.*: floats in \[0, 255\]\? image.round\(\).clip\(0, 255\)"
    with pytest.raises(ValueError, match=message):  # not told to multiply by 255 again
        predictor(images[0] * 1.0)
    message = r"got uint8 \(3, \d+, \d+\): channels first\? image.transpose\(1, 2, 0\)"
    with pytest.raises(ValueError, match=message):
        predictor(images[0].transpose(2, 0, 1))
    with pytest.raises(ValueError, match=r"16 bits\? \(image >> 8\)"):
        predictor(images[0].astype(np.uint16) * 257)


def test_predictor_refuses_a_score_threshold_outside_0_1_and_an_empty_image(model_setup):
    """Both entry points name the bad input instead of silently returning 0 (or every)
    detections, or crashing in the resize; nothing is compiled."""
    config, variables = model_setup
    predictor = Predictor(config, variables, step=0, devices=jax.local_devices()[:1])
    image = natural_images(1)[0]
    for threshold in (50, 1.5, -0.1, float("nan"), "0.5", None, True):
        message = re.escape(f"score_threshold={threshold!r} must be a number in [0, 1]")
        with pytest.raises(ValueError, match=message):
            predictor(image, score_threshold=threshold)
        with pytest.raises(ValueError, match=message):
            predictor.predict_batch([image], score_threshold=threshold)
        with pytest.raises(ValueError, match=message):
            predictor.predict_batch([], score_threshold=threshold)
    for shape in [(0, 0, 3), (0, 50, 3), (50, 0, 3)]:
        message = re.escape(f"image must be at least 1x1 pixels [H, W, 3], got {shape}")
        with pytest.raises(ValueError, match=message):
            predictor(np.zeros(shape, np.uint8))
        with pytest.raises(ValueError, match=re.escape("images[1]: ") + message):  # before
            predictor.predict_batch([image, np.zeros(shape, np.uint8)], batch_size=2)  # the run


def test_predictor_takes_numbers_and_one_image_of_other_libraries_as_numpy_ones(model_setup):
    """A JAX, numpy or torch scalar threshold is a number (JAX's was "score_threshold=Array(0.5)
    must be a number"); one torch or TF image given to predict_batch is refused as numpy's is
    (its rows were taken for 300 grey images); integer images in [0, 255] and one image as
    nested lists get the conversion."""
    torch = pytest.importorskip("torch")
    import tensorflow as tf

    config, variables = model_setup
    predictor = Predictor(config, variables, step=0, devices=jax.local_devices()[:1])
    image = natural_images(1)[0]
    want = predictor(image, score_threshold=0.25)
    for threshold in (jnp.float32(0.25), np.float16(0.25), torch.tensor(0.25), tf.constant(0.25)):
        assert_same_detections(predictor(image, score_threshold=threshold), want, repr(threshold))
    for one in (torch.from_numpy(image), tf.constant(image), jnp.asarray(image)):
        message = re.escape(f"got an array {image.shape}: use predictor(image) or predict_batch")
        with pytest.raises(ValueError, match=message):
            predictor.predict_batch(one)
    message = r"int32 \(\d+, \d+, 3\): integers in \[0, 255\]\? image.astype\(np.uint8\)"
    with pytest.raises(ValueError, match=message):
        predictor(image.astype(np.int32))
    with pytest.raises(
        ValueError, match=r"one image as nested lists: np.asarray\(image, np.uint8\)"
    ):
        predictor(image.tolist())


def test_predictor_gives_a_default_sessions_detections_under_strict_jax_settings(workdir):
    """A notebook's `jax_enable_x64` made `load_checkpoint` refuse a valid checkpoint ("float32,
    the config needs float64"); `jax_numpy_rank_promotion="raise"` and
    `jax_numpy_dtype_promotion="strict"` failed in the first broadcast. The library runs under
    JAX's defaults (`jax_settings`) and leaves the session's settings as they were."""
    image = natural_images(1)[0]
    want = load_checkpoint(workdir)(image, score_threshold=0.0)
    names = ("jax_enable_x64", "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion")
    before = [getattr(jax.config, name) for name in names]
    strict = [True, "raise", "strict"]
    try:
        for name, value in zip(names, strict):
            jax.config.update(name, value)
        predictor = load_checkpoint(workdir)
        got = predictor(image, score_threshold=0.0)
        (batched,) = predictor.predict_batch([image], score_threshold=0.0)
        read = read_checkpoint(workdir)[1]  # it failed in a broadcast
        assert [getattr(jax.config, name) for name in names] == strict
    finally:
        for name, value in zip(names, before):
            jax.config.update(name, value)
    assert_same_detections(got, want, "strict settings")
    assert_same_detections(batched, want, "strict settings, predict_batch")
    assert got["boxes"].dtype == np.float32 and got["scores"].dtype == np.float32
    jax.tree_util.tree_map(np.testing.assert_array_equal, read, read_checkpoint(workdir)[1])


def test_a_checkpoint_loaded_again_compiles_nothing(workdir):
    """A server reloading its model compiled both programs at every `load_checkpoint` (4-8 s
    each time); predictors of equal models now share them."""
    image = natural_images(1)[0]
    first = load_checkpoint(workdir)
    first(image)
    first.predict_batch([image])
    with backend_compiles() as compiled:
        again = load_checkpoint(workdir)
        assert_same_detections(again(image, 0.0), first(image, 0.0), "loaded again")
        again.predict_batch([image])
    assert compiled == []


def test_predictor_places_the_variables_once_and_again_when_one_is_replaced(
    model_setup, monkeypatch
):
    """Both entry points use the variables placed on the devices once (not copied from host
    memory at every call), placed again after an array of `variables` was replaced in place in
    its dict (the same results from both), or `variables` itself; an in-place write into an
    array, which the placed copy would not see, raises."""
    config, variables = model_setup
    placed = []  # the trees sharding.replicate put on the devices
    replicate = sharding.replicate

    def counting_replicate(tree, mesh):
        placed.append(tree)
        return replicate(tree, mesh)

    monkeypatch.setattr(sharding, "replicate", counting_replicate)
    copy = jax.tree_util.tree_map(np.array, variables)  # the fixture's arrays stay as they are
    predictor = Predictor(config, copy, step=0, devices=jax.local_devices()[:1])
    image = natural_images(1)[0]
    before = predictor(image, score_threshold=0.0)
    assert len(placed) == 1
    (batched,) = predictor.predict_batch([image], 0.0, batch_size=2)
    assert_same_detections(batched, before, "batched")
    assert_same_detections(predictor(image, 0.0), before, "again")
    assert len(placed) == 1
    cls_score = predictor.variables["params"]["box_head"]["cls_score"]
    with pytest.raises(ValueError, match="read-only"):
        cls_score["bias"] += 20
    cls_score["bias"] = cls_score["bias"] + np.float32([0, 0, 0, 1000])  # all triangles
    (batched,) = predictor.predict_batch([image], 0.0, batch_size=2)
    after = predictor(image, 0.0)
    assert len(placed) == 2
    assert_same_detections(batched, after, "new bias")
    assert set(after["class_names"]) == {"triangle"} != set(before["class_names"])
    predictor.variables = jax.tree_util.tree_map(np.array, variables)
    assert_same_detections(predictor(image, 0.0), before, "old variables")
    assert len(placed) == 3


def test_a_model_field_changed_takes_effect_and_variables_of_another_model_are_named(
    model_setup,
):
    """`predictor.config.model.roi_heads.detections_per_image = 5` was ignored (the model was
    built once, while data fields apply at each call); variables of another model failed deep
    in Flax at the first call."""
    config, variables = model_setup
    predictor = Predictor(config.copy_and_resolve_references(), variables, step=0)
    image = natural_images(1)[0]
    before = predictor(image, 0.0)
    assert len(before["scores"]) > 5
    predictor.config.model.roi_heads.detections_per_image = 5
    after = predictor(image, 0.0)
    for key in ("boxes", "scores", "classes"):
        np.testing.assert_array_equal(after[key], before[key][:5])
    (batched,) = predictor.predict_batch([image], 0.0, batch_size=len(jax.local_devices()))
    assert_same_detections(batched, after, "batched")
    ids = (3_000_000_000, 7, 2**40)  # category ids of any size (int32 overflowed)
    predictor.config.data.label_to_category_id = ids
    np.testing.assert_array_equal(
        predictor(image, 0.0)["category_ids"], np.take(ids, after["classes"])
    )
    predictor.config.model.num_classes += 2
    message = r"^predictor\.variables do not fit the model predictor\.config\.model describes: "
    with pytest.raises(ValueError, match=message + r".*cls_score"):
        predictor(image)
    with pytest.raises(ValueError, match=message):
        predictor.predict_batch([image])


def test_predictor_takes_grey_and_rgba_images_and_refers_batches_to_predict_batch(model_setup):
    """Grey and RGBA converted as `visualize.read_image` converts such files; float32 boxes and
    scores; a batch given to `__call__` (or one image to `predict_batch`) names the other."""
    config, variables = model_setup
    predictor = Predictor(config, variables, step=0, devices=jax.local_devices()[:1])
    image = natural_images(1)[0]  # [100, 151, 3]
    for batch, got in [(np.stack([image, image]), "(2, 100, 151, 3)"), ([image] * 2, "list of 2")]:
        message = f"got a batch of images ({got}): use predictor.predict_batch(images)"
        with pytest.raises(ValueError, match=re.escape(message)):
            predictor(batch)
    message = "got an array (100, 151, 3): use predictor(image) or predict_batch([image])"
    with pytest.raises(ValueError, match=re.escape(message)):
        predictor.predict_batch(image)
    with pytest.raises(ValueError, match=re.escape("uint8 array [H, W, 3] (or grey [H, W]")):
        predictor(image[..., :2])
    grey = image[..., 1]
    want = predictor(np.repeat(grey[..., None], 3, axis=-1), score_threshold=0.0)
    assert_same_detections(predictor(grey, 0.0), want, "[H, W]")
    assert_same_detections(predictor(grey[..., None], 0.0), want, "[H, W, 1]")
    (batched,) = predictor.predict_batch([grey], 0.0, batch_size=2)
    assert_same_detections(batched, want, "[H, W], batched")
    rgba = np.dstack([image, np.full(image.shape[:2], 9, np.uint8)])
    assert_same_detections(predictor(rgba, 0.0), predictor(image, 0.0), "RGBA")
    stacked = predictor.predict_batch(np.stack([image, image]), 0.0, batch_size=2)
    assert_same_detections(stacked[1], predictor(image, 0.0), "[B, H, W, 3]")
    for result in (want, batched):
        assert (result["boxes"].dtype, result["scores"].dtype) == (np.float32, np.float32)


def test_predictor_converts_pil_images_of_8_bit_modes_and_refuses_others(model_setup):
    """`np.asarray` of a PIL image is its stored values: a palette image's indices ([H, W], read
    as grey), CMYK's four channels (read as RGBA). Such images are converted to RGB by PIL; a
    16-bit one is refused, naming its mode."""
    image_module = pytest.importorskip("PIL.Image")
    config, variables = model_setup
    predictor = Predictor(config, variables, step=0, devices=jax.local_devices()[:1])
    image = natural_images(1)[0]
    want = predictor(image, 0.0)
    cmyk = image_module.fromarray(image).convert("CMYK")  # 255 - RGB, K = 0: exact both ways
    assert np.asarray(cmyk).shape[-1] == 4
    assert_same_detections(predictor(cmyk, 0.0), want, "CMYK")
    colours = (image // 64 * 64 + 32).astype(np.uint8)  # 64 colours: a palette holds them
    table, indices = np.unique(colours.reshape(-1, 3), axis=0, return_inverse=True)
    palette = image_module.fromarray(indices.reshape(image.shape[:2]).astype(np.uint8), "P")
    palette.putpalette(table.flatten().tolist())
    assert np.asarray(palette).ndim == 2  # colour indices
    (batched,) = predictor.predict_batch([palette], 0.0, batch_size=2)
    assert_same_detections(batched, predictor(colours, 0.0), "palette")
    grey16 = image_module.fromarray(image[..., 0].astype(np.uint16) * 257)
    with pytest.raises(ValueError, match="PIL image of mode 'I;16'") as refused:
        predictor(grey16)
    assert str(refused.value).endswith("(16-bit grey: np.asarray(image) >> 8 as uint8)")
    with pytest.raises(ValueError, match=re.escape("one image? predictor(image) or predict_")):
        predictor.predict_batch(cmyk)  # was "got a Image"


def test_predict_batch_takes_iterables_and_names_bad_arguments(model_setup):
    config, variables = model_setup
    predictor = Predictor(config, variables, step=0, devices=jax.local_devices()[:1])
    images = natural_images(2)
    want = predictor.predict_batch(images, 0.0, batch_size=2)
    for got in (predictor.predict_batch(iter(images), 0.0, batch_size=2),
                predictor.predict_batch(tuple(images), 0.0, batch_size=2)):  # fmt: skip
        for a, b in zip(got, want, strict=True):
            assert_same_detections(a, b, "iterable")
    with pytest.raises(ValueError, match=re.escape("got a dict: pass list(images.values())")):
        predictor.predict_batch({"a": images[0]})
    with pytest.raises(ValueError, match="got a int"):
        predictor.predict_batch(3)
    path = "photos/a.jpg"  # a file name, not pixels: said so, with the function that reads it
    message = re.escape(f"image is a file name ({path!r}), not its pixels: read it first")
    with pytest.raises(ValueError, match=message):
        predictor(path)
    with pytest.raises(ValueError, match=re.escape("images[2]: ") + message):
        predictor.predict_batch([*images, pathlib.Path(path)], batch_size=2)
    with pytest.raises(ValueError, match=re.escape(f"takes images, got a file name ({path!r})")):
        predictor.predict_batch(path)  # was read letter by letter: "images[0]: ... ('p')"
    for bad, got in ((None, "got a NoneType"), ({"image": images[0]}, "got a dict")):
        with pytest.raises(ValueError, match=re.escape(f"uint8 array [H, W, 3], {got}")):
            predictor(bad)  # was "got object ()"
    with pytest.raises(ValueError) as refused:  # uint8 already: no conversion to advise
        predictor(np.zeros((40, 50, 5), np.uint8))
    assert str(refused.value).endswith("got uint8 (40, 50, 5)"), refused.value
    with pytest.raises(ValueError, match=re.escape("(40, 50, 2): grey+alpha? image[..., 0] is")):
        predictor(np.zeros((40, 50, 2), np.uint8))  # np.asarray of a PIL "LA" image
    with pytest.raises(ValueError) as refused:  # not an image: no hint about its values
        predictor(np.int64(5))
    assert str(refused.value).endswith("got int64 ()"), refused.value
    # The bytes of a JPEG (requests.get(url).content) were "a file name" shown whole.
    jpeg = cv2.imencode(".jpg", images[0])[1].tobytes() + bytes(10**6)
    with pytest.raises(ValueError) as refused:
        predictor(jpeg)
    height, width = images[0].shape[:2]
    assert str(refused.value) == (
        f"image is the {len(jpeg):,} bytes of an encoded image file ({height}x{width}), not its "
        "pixels: decode them first, e.g. np.asarray(PIL.Image.open(io.BytesIO(data))"
        ".convert('RGB'))"
    )
    with pytest.raises(ValueError) as refused:
        predictor.predict_batch("x" * 10**6)
    assert len(str(refused.value)) < 250 and "xxx...), not its" in str(refused.value), refused.value
    for batch_size in ("2", 2.0, True):
        with pytest.raises(ValueError, match=re.escape(f"batch_size={batch_size!r} must be")):
            predictor.predict_batch(images, batch_size=batch_size)


def test_load_checkpoint_refuses_variables_of_another_dtype(model_setup, tmp_path):
    """Right names and shapes, int32 values: refused, naming the variable and both dtypes."""
    config, variables = model_setup
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["box_head"]["cls_score"]["bias"] = params["box_head"]["cls_score"]["bias"].astype(
        np.int32
    )
    state = types.SimpleNamespace(
        step=np.int32(0), params=params, batch_stats=variables["batch_stats"], opt_state={}
    )
    manager = ckpt_lib.create_manager(tmp_path)
    ckpt_lib.save(manager, state, config)
    manager.wait_until_finished()
    manager.close()
    message = (
        r"checkpoint .*/0 params: \['box_head'\]\['cls_score'\]\['bias'\] has dtype int32, "
        r"the config needs float32"
    )
    with pytest.raises(ValueError, match=message):
        mrcnn_jax.load_checkpoint(tmp_path)


def _save_state(path, config, params, batch_stats) -> None:
    state = types.SimpleNamespace(
        step=np.int32(0), params=params, batch_stats=batch_stats, opt_state={}
    )
    manager = ckpt_lib.create_manager(path)
    ckpt_lib.save(manager, state, config)
    manager.wait_until_finished()
    manager.close()


def test_load_checkpoint_refuses_untrusted_content_naming_it(model_setup, tmp_path, monkeypatch):
    """A downloaded checkpoint: a NaN weight or a negative BatchNorm variance (no detection and
    no error otherwise), a stored array of another shape (refused before any data is read: a
    file of a few KB may declare many GB), a stored config of another shape."""
    config, variables = model_setup

    def fresh():  # a writable copy
        return jax.tree_util.tree_map(np.array, variables)

    bad = fresh()
    bad["params"]["box_head"]["cls_score"]["bias"][2] = np.nan
    _save_state(tmp_path / "nan", config, bad["params"], bad["batch_stats"])
    message = r"checkpoint .*/0: \['params'\]\['box_head'\]\['cls_score'\]\['bias'\] has 1 NaN"
    with pytest.raises(ValueError, match=message):
        mrcnn_jax.load_checkpoint(tmp_path / "nan")
    bad = fresh()
    var = bad["batch_stats"]["backbone"]["res2_0"]["bn1"]["var"]
    var[0] = -1.0
    _save_state(tmp_path / "var", config, bad["params"], bad["batch_stats"])
    with pytest.raises(ValueError, match=r"\['bn1'\]\['var'\] has values below -1e-05"):
        mrcnn_jax.load_checkpoint(tmp_path / "var")
    bad = fresh()
    bad["params"]["box_head"]["cls_score"]["kernel"] = np.zeros((1000, 1000), np.float32)
    _save_state(tmp_path / "shape", config, bad["params"], bad["batch_stats"])

    def no_read(*args):
        raise AssertionError("array data read before the shapes were checked")

    with monkeypatch.context() as patch:
        patch.setattr(ckpt_lib, "_restore_arrays", no_read)
        message = r"\['box_head'\]\['cls_score'\]\['kernel'\] has shape \(1000, 1000\)"
        with pytest.raises(ValueError, match=message):
            mrcnn_jax.load_checkpoint(tmp_path / "shape")
    good = fresh()
    _save_state(tmp_path / "config", config, good["params"], good["batch_stats"])
    stored = tmp_path / "config" / "checkpoints" / "0" / "config" / "metadata"
    edited = json.loads(stored.read_text())
    del edited["model"]["num_classes"]
    stored.write_text(json.dumps(edited))
    message = r"checkpoint .*/0: its stored config is not a config of this project \(KeyError"
    with pytest.raises(ValueError, match=message):
        mrcnn_jax.load_checkpoint(tmp_path / "config")
    edited["model"]["num_classes"], edited["data"]["class_names"] = 3, ["a", "b"]
    stored.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"its stored config: config\.data\.class_names has 2"):
        mrcnn_jax.load_checkpoint(tmp_path / "config")


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "ram://runs/a",
            "ram://runs/a: ram:// URLs are not supported; give a local path or a gs://",
        ),
        ("file:///tmp/a", "file:///tmp/a: file:// URLs are not supported"),
        ("gs:/bucket/a", "gs:/bucket/a: a URL takes two slashes (gs://...)"),
        ("hf:/org/a", "hf:/org/a: a URL takes two slashes (hf://...)"),
    ],
)
def test_urls_etils_cannot_open_are_refused_naming_them(path, message):
    """A KeyError deep in etils (`ram://`), or a local folder `gs:` in the current one."""
    with pytest.raises(ValueError, match=re.escape(message)):
        paths.absolute(path)
    with pytest.raises(ValueError, match=re.escape(message)):
        locate_checkpoint(path)
    assert paths.absolute("gs://bucket/a") == "gs://bucket/a"
    assert paths.absolute("runs/gs:/a") == os.path.abspath("runs/gs:/a")


def test_a_leading_double_slash_is_the_root_and_an_empty_path_is_refused(workdir):
    """`//tmp/x` is /tmp/x (os.path.abspath keeps exactly two leading slashes, which
    TensorStore refused: every checkpoint read and write failed, a training at its first save).
    An empty path (an unset shell variable) was the current folder."""
    assert paths.absolute("//tmp/a//b/") == paths.absolute("///tmp/a/b") == "/tmp/a/b"
    assert mrcnn_jax.load_checkpoint(f"/{workdir}").step == 0
    with pytest.raises(ValueError, match=r"^the checkpoint path is empty: give a workdir"):
        locate_checkpoint("")


def test_a_storage_that_does_not_answer_is_named_not_called_no_workdir(monkeypatch):
    """etils.epath's `is_dir()` says no when the storage cannot be asked (no network, no
    credentials): the error was "gs://... is neither a workdir with checkpoints/ nor ...", for
    a real checkpoint in a bucket out of reach (also `model.init_from`)."""
    from etils import epath
    from tensorflow import errors

    def unreachable(self):
        raise errors.FailedPreconditionError(None, None, f"Could not resolve host\n\t {self}")

    monkeypatch.setattr(epath.gpath.PosixGPath, "exists", unreachable)
    monkeypatch.setattr(epath.gpath.PosixGPath, "is_dir", lambda self: False)
    assert paths.unreachable("gs://bucket/runs/a") == "Could not resolve host gs://bucket/runs/a"
    assert paths.unreachable("/nowhere") == ""
    with pytest.raises(
        FileNotFoundError, match=r"^cannot reach gs://bucket/runs/a: Could not resolve host gs:"
    ):
        locate_checkpoint("gs://bucket/runs/a")


def test_locate_checkpoint_names_the_workdir_of_a_checkpoint_folder(workdir):
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "0"):
        assert locate_checkpoint(path) == (workdir, 0)
        assert locate_checkpoint(str(path), step=0) == (workdir, 0)
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint 7 .*\[0\]"):
        locate_checkpoint(workdir, step=7)


def test_a_step_folder_copied_out_of_its_workdir_says_where_it_goes(workdir, tmp_path):
    """A complete step folder outside `<workdir>/checkpoints/` (copied, or renamed) is named as
    such with the layout that loads it; was "neither a workdir with checkpoints/ nor ..."."""
    for name, step in (("0", "0"), ("model_best", "<step>")):
        copied = tmp_path / "models" / name
        shutil.copytree(workdir / "checkpoints" / "0", copied)
        message = (
            f"{copied} is a checkpoint's step folder outside a workdir: a checkpoint is read as "
            f"<workdir>/checkpoints/<step>, e.g. mkdir -p W/checkpoints && cp -r {copied} "
            f"W/checkpoints/{step}, then load W"
        )
        with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
            locate_checkpoint(copied)
    (copied / "state" / "_METADATA").unlink()  # not a complete one: not named one
    with pytest.raises(FileNotFoundError, match="is neither a workdir with checkpoints/"):
        locate_checkpoint(copied)


def test_torchvision_weights_given_as_the_workdir_are_sent_to_the_converter(tmp_path):
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"PK")
    message = (
        f"{weights} is neither a workdir with checkpoints/ nor a checkpoints/<step> directory: "
        "a PyTorch file? torchvision Mask R-CNN weights convert into a workdir with "
        f"scripts/convert_torchvision.py --state_dict={weights} --out=DIR"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        locate_checkpoint(weights)


def test_a_checkpoint_step_is_an_integer(workdir):
    """Integer-like steps are taken; others (the string "0") are refused naming their type,
    not looked for among the stored steps."""
    for step in ("0", 0.0, True):
        message = re.escape(f"step must be an int, got {type(step).__name__} {step!r}")
        with pytest.raises(TypeError, match=message):
            locate_checkpoint(workdir, step=step)
        with pytest.raises(TypeError, match=message):
            mrcnn_jax.load_checkpoint(workdir, step=step)
    assert locate_checkpoint(workdir, step=np.int64(0)) == (workdir, 0)
    assert type(locate_checkpoint(workdir, step=np.int64(0))[1]) is int


# ------------------------------------------------------------------- scripts/predict.py


@pytest.fixture(scope="module")
def workdir(model_setup, tmp_path_factory):
    """A workdir whose step-0 checkpoint holds the small model, its data a small shapes set in
    a temporary folder (eval.py builds it; not in ~/tensorflow_datasets)."""
    config, variables = model_setup
    config = config.copy_and_resolve_references()
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.data.shapes_num_train = config.data.shapes_num_val = 8
    path = tmp_path_factory.mktemp("workdir")
    ckpt_lib.save_variables(path, config, variables)
    return path


def run_script(
    *args, cache, script: str = "predict.py", home: str | None = None
) -> subprocess.CompletedProcess:
    """scripts/<script> with this process's environment (the same 8 CPU devices), HOME set to
    `home` if given."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", script), *map(str, args)],
        env=env,
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Image files in folders, plus a corrupt JPEG and a text file; returns (root, good images
    {path: image}, bad paths). Layout under root:

        folder/a.png, folder/a.jpg (same stem), folder/bad.jpg, folder/notes.md (not an image
        extension: not taken), folder/sub/c.TIF (only with --recursive)
        globbed/d.png, globbed/readme.txt (matched by 'globbed/*')
        e.bmp (given as a file)
    """
    root = tmp_path_factory.mktemp("inputs")
    images = natural_images(5, seed=1)
    good = {}
    for name, image in zip(
        ["folder/a.png", "folder/a.jpg", "folder/sub/c.TIF", "globbed/d.png", "e.bmp"], images
    ):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        good[str(path)] = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)  # JPEG: lossy
    (root / "folder" / "bad.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "folder" / "notes.md").write_text("not an image\n")
    (root / "globbed" / "readme.txt").write_text("not an image either\n")
    bad = [str(root / "folder" / "bad.jpg"), str(root / "globbed" / "readme.txt")]
    return root, good, bad


def test_predict_script_on_a_folder_a_glob_and_a_file(
    model_setup, workdir, inputs, compile_cache, tmp_path
):
    config, variables = model_setup
    root, good, bad = inputs
    out_dir = tmp_path / "out"
    args = [root / "folder", str(root / "globbed" / "*"), root / "e.bmp", root / "folder/a.png"]
    result = run_script(
        f"--workdir={workdir}", f"--out_dir={out_dir}", "--score_threshold=0", "--recursive",
        "--batch_size=8", *args, cache=compile_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    for path in bad:
        assert f"WARNING: skipping unreadable {path!r}" in result.stderr
    detections = json.loads((out_dir / "detections.json").read_text())
    assert {d["file_name"] for d in detections} == set(good)  # a.png once, no notes.md
    predictor = Predictor(config, variables, step=0)
    for path, image in good.items():
        mine = [d for d in detections if d["file_name"] == path]
        want = predictor(image, score_threshold=0.0)
        assert [d["class_name"] for d in mine] == want["class_names"], path
        np.testing.assert_allclose([d["score"] for d in mine], want["scores"], rtol=1e-5)
        for d, (x1, y1, x2, y2) in zip(mine, want["boxes"].tolist()):
            assert d["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=1e-3)
            assert d["segmentation"]["size"] == list(image.shape[:2])
    total = len(detections)
    assert f"5 images, {total} detections, 2 unreadable: {', '.join(bad)}\n" in result.stdout
    assert f"{total} detections of checkpoint step 0 -> {out_dir / 'detections.json'}" in (
        result.stdout
    )
    # Names relative to `root` (the inputs' deepest common folder); a.png and a.jpg share a stem.
    drawings = ["folder/a.png.png", "folder/a.jpg.png", "folder/sub/c.png", "globbed/d.png"]
    drawn = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png"))
    assert drawn == sorted([*drawings, "e.png"])
    picture = cv2.imread(str(out_dir / "globbed" / "d.png"))
    assert picture.shape == good[str(root / "globbed" / "d.png")].shape

    # `~` expanded (a shell leaves `--out_dir=~/...` and a quoted input as they are); a phone
    # photo stored sideways
    # (EXIF orientation 6) turned upright with --exif_orientation, the others as stored.
    no_draw = tmp_path / "no_draw"
    sideways = tmp_path / "sideways.jpg"
    write_sideways_jpeg(sideways, good[str(root / "globbed" / "d.png")])
    result = run_script(
        f"--workdir={workdir}", "--out_dir=~/no_draw", "--score_threshold=0", "--no_draw",
        "--exif_orientation", "--batch_size=8", root / "folder", "~/sideways.jpg",
        cache=compile_cache, home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(p.name for p in no_draw.iterdir()) == ["detections.json"]
    detections = json.loads((no_draw / "detections.json").read_text())
    names = {d["file_name"] for d in detections}
    assert names == {*(str(root / "folder" / n) for n in ("a.png", "a.jpg")), str(sideways)}
    assert "3 images, " in result.stdout and "1 unreadable: " in result.stdout
    upright = visualize.read_image(sideways, exif_orientation=True)
    assert upright.shape[:2] == visualize.read_image(sideways).shape[1::-1]
    want = predictor(upright, score_threshold=0.0)
    mine = [d for d in detections if d["file_name"] == str(sideways)]
    np.testing.assert_allclose([d["score"] for d in mine], want["scores"], rtol=1e-5)
    assert {tuple(d["segmentation"]["size"]) for d in mine} == {upright.shape[:2]}


def test_predict_script_names_what_it_cannot_use(workdir, inputs, compile_cache, tmp_path):
    root, _, bad = inputs
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "x.png").write_bytes(b"")
    for arg, message in [
        (tmp_path / "nowhere.jpg", f"image file {str(tmp_path / 'nowhere.jpg')!r} does not exist"),
        (str(root / "*.gif"), f"pattern {str(root / '*.gif')!r} matches no file"),
        (empty, f"folder {str(empty)!r} holds no image file"),
        ("gs://b/x.jpg", "image input 'gs://b/x.jpg' is a URL: predict.py reads local files"),
        ("/dev/null", "image input '/dev/null' is not a file or a folder"),
    ]:
        result = run_script(f"--workdir={workdir}", root / "e.bmp", arg, cache=compile_cache)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    # Only unreadable files: every one named, nothing written, a failing status.
    out_dir = tmp_path / "out"
    result = run_script(
        f"--workdir={workdir}", f"--out_dir={out_dir}", "--recursive", empty, *bad,
        cache=compile_cache,
    )  # fmt: skip
    assert result.returncode == 1
    unreadable = [str(empty / "sub" / "x.png"), *bad]
    assert f"0 images, 0 detections, 3 unreadable: {', '.join(unreadable)}" in result.stdout
    assert not (out_dir / "detections.json").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("output", ["e.png", "detections.json"])
def test_predict_script_on_a_full_disk_names_the_file(
    output, workdir, inputs, compile_cache, tmp_path
):
    """A write that fails (here into /dev/full, whose writes fail as on a full disk: ENOSPC)
    ends predict.py with the file and the reason, no traceback; was `ValueError: cv2 could not
    write '…/e.png' (does its directory exist?)` under a traceback for a drawing."""
    root, _, _ = inputs
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / output).symlink_to("/dev/full")
    no_draw = ["--no_draw"] if output == "detections.json" else []
    result = run_script(
        f"--workdir={workdir}", f"--out_dir={out_dir}", *no_draw, root / "e.bmp",
        cache=compile_cache,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    expected = f"error: cannot write {out_dir / output}: No space left on device"
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# The other cases' checks are unit-tested (the predictor's steps, `pipeline.split_error`): as
# script runs (~5 s each) they are slow tests, so that the default run stays under 15 minutes.
@pytest.mark.parametrize("cases", ["usual", pytest.param("others", marks=pytest.mark.slow)])
def test_scripts_refuse_a_bad_threshold_step_or_out_dir_naming_it(
    cases, workdir, inputs, compile_cache, tmp_path
):
    """Usage errors (exit status 1, the message, no traceback), before the model loads (an
    eval split TFDS does not know: before it compiles)."""
    root, _, _ = inputs
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    missing_step = f"no complete checkpoint 7 in {workdir / 'checkpoints'} (found steps [0])"
    usual = [
        ("predict.py", ["--score_threshold=50"], "--score_threshold=50.0 must be in [0, 1]"),
        ("predict.py", [f"--out_dir={a_file}"], f"{str(a_file)!r} is a file, not a folder"),
        ("eval.py", ["--checkpoint_step=7"], missing_step),
        ("eval.py", ["--split=valid"], "--split='valid' is not a split of"),
    ]
    others = [
        ("predict.py", ["--score_threshold=nan"], "--score_threshold=nan must be in [0, 1]"),
        ("predict.py", ["--checkpoint_step=7"], missing_step),
        ("eval.py", ["--split=validation[:0]"], "--split='validation[:0]' selects no image of"),
        ("eval.py", [f"--out_dir={a_file}/sub"], f"cannot write into {a_file}/sub (--out_dir)"),
    ]
    for script, args, message in usual if cases == "usual" else others:
        if script == "predict.py":
            args.append(root / "e.bmp")
        result = run_script(f"--workdir={workdir}", *args, cache=compile_cache, script=script)
        assert result.returncode == 1, (args, result.stderr[-3000:])
        assert message in result.stderr, (args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-3000:])


def test_predict_script_refuses_an_out_dir_among_its_inputs(workdir, compile_cache, tmp_path):
    """An output that is an input (here through a symlink to the input folder), or drawings that
    running the command again would read (below a folder read with --recursive): usage errors
    naming both, before the model loads; the inputs are left as they were, nothing is
    written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, image in zip(["x.png", "y.jpg"], natural_images(2, seed=2)):
        assert cv2.imwrite(str(photos / name), image)
    stored = {p: p.read_bytes() for p in photos.iterdir()}
    (tmp_path / "link").symlink_to(photos)
    drawn = photos / "drawn"
    for args, message in [
        (
            [f"--out_dir={tmp_path / 'link'}", photos],
            f"the drawing {str(tmp_path / 'link' / 'x.png')!r} would overwrite the input "
            f"{str(photos / 'x.png')!r} (the same file)",
        ),
        (
            [f"--out_dir={drawn}", "--recursive", photos],
            f"the drawing {str(drawn / 'x.png')!r} would be in the input folder {str(photos)!r} "
            "(read with --recursive)",
        ),
    ]:
        result = run_script(f"--workdir={workdir}", *args, cache=compile_cache)
        assert result.returncode == 1, (args, result.stderr[-3000:])
        assert message in result.stderr, (args, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (args, result.stderr[-3000:])
        assert {p: p.read_bytes() for p in photos.iterdir()} == stored, args


@pytest.fixture(scope="module")
def predict_script():
    """scripts/predict.py imported (it defines its flags; nothing runs)."""
    with imported_script("predict.py") as module:
        yield module


@pytest.mark.parametrize(
    ("inputs", "names"),
    [
        (["d/a/s.jpg", "d/b/s.jpg"], ["a/s.png", "b/s.png"]),
        (["d/x.jpg", "d/x.png", "d/y.gif"], ["x.jpg.png", "x.png.png", "y.png"]),
        # one name where case is ignored (macOS, Windows)
        (["d/X.jpg", "d/x.png"], ["X.jpg.png", "x.png.png"]),
        (["d/a.jpg", "d/a.png/b.jpg"], ["a.jpg.png", "a.png/b.png"]),  # a.png is a folder
        (["d/A.jpg", "d/a.PNG/b.jpg"], ["A.jpg.png", "a.PNG/b.png"]),
    ],
)
def test_drawing_names_keep_the_extension_where_they_would_coincide(predict_script, inputs, names):
    assert predict_script.output_names(inputs) == names


def test_drawing_names_refuse_a_drawing_where_another_needs_a_folder(predict_script):
    with pytest.raises(
        predict_script.app.UsageError,
        match=r"'d/x\.JPG' would both be drawn to x\.JPG\.png \(as X\.jpg\.png, where case is ",
    ):  # one file on macOS and Windows
        predict_script.output_names(["d/X.jpg", "d/x.JPG"])
    with pytest.raises(
        predict_script.app.UsageError,
        match=r"'d/a\.jpg' would be drawn to a\.jpg\.png, the folder of 'd/a\.jpg\.png/z\.jpg''s "
        r"drawing a\.jpg\.png/z\.png: rename one",
    ):
        predict_script.output_names(["d/a.jpg", "d/a.png", "d/a.jpg.png/z.jpg"])


def test_outputs_that_are_links_to_files_are_refused_before_the_work(predict_script, tmp_path):
    """A results json or drawing that is a symbolic link to a file is never written through:
    it failed after predicting every image; a link to a device is written to."""
    image, other = tmp_path / "x.png", tmp_path / "elsewhere.json"
    image.write_bytes(b"")
    other.write_text("[]")
    out = tmp_path / "out"
    out.mkdir()
    (out / "detections.json").symlink_to(other)
    with pytest.raises(
        predict_script.app.UsageError,
        match=r"the results '.*detections\.json': it is a symbolic link to the file",
    ):
        predict_script.check_outputs(
            [str(image)], [str(image)], [], str(out / "detections.json"), False
        )
    (out / "drawn.json").symlink_to("/dev/null")
    predict_script.check_outputs([str(image)], [str(image)], [], str(out / "drawn.json"), False)


def test_outputs_where_a_folder_or_a_file_stands_are_refused_before_the_work(
    predict_script, tmp_path, monkeypatch
):
    """A folder named as a drawing, or a file where a drawing's folder goes, failed at that
    image's drawing, after the work, and no detections.json was written."""
    image = tmp_path / "h.png"
    image.write_bytes(b"")
    out = tmp_path / "out"
    (out / "h.png").mkdir(parents=True)
    results = str(out / "detections.json")
    with pytest.raises(
        predict_script.app.UsageError,
        match=rf"^the drawing '{re.escape(str(out))}/h\.png' is a folder: move it away",
    ):
        predict_script.check_outputs(
            [str(image)], [str(image)], [str(out / "h.png")], results, False
        )
    (out / "sub").write_text("")
    drawing = str(out / "sub" / "deeper" / "s.png")
    with pytest.raises(
        predict_script.app.UsageError,
        match=rf"^the drawing '{re.escape(drawing)}' cannot be written: "
        rf"'{re.escape(str(out))}/sub' is a file, not a folder",
    ):
        predict_script.check_outputs([str(image)], [str(image)], [drawing], results, False)
    predict_script.check_outputs(
        [str(image)], [str(image)], [str(out / "a" / "b.png")], results, False
    )
    monkeypatch.chdir(tmp_path)  # relative paths (the library's callers): the walk ends
    predict_script.check_outputs(["h.png"], ["h.png"], ["new/h.png"], "new/d.json", False)
    (out / "gone").symlink_to(tmp_path / "nothing")
    with pytest.raises(predict_script.app.UsageError, match="is a symbolic link to nothing, not"):
        predict_script.check_outputs(
            [str(image)], [str(image)], [str(out / "gone" / "h.png")], results, False
        )


def test_folders_skip_names_that_are_no_file(predict_script, tmp_path):
    """A dangling symlink (or a folder named x.png) in a folder input is not taken, with or
    without --recursive (it stopped a recursive run before the model loaded)."""
    (tmp_path / "sub" / "dir.png").mkdir(parents=True)
    for folder in (tmp_path, tmp_path / "sub"):
        (folder / "broken.png").symlink_to(tmp_path / "nowhere.png")
        (folder / "good.jpg").write_bytes(b"")
    assert predict_script._folder_images(str(tmp_path), recursive=False) == [
        str(tmp_path / "good.jpg")
    ]
    assert predict_script._folder_images(str(tmp_path), recursive=True) == [
        str(tmp_path / "good.jpg"),
        str(tmp_path / "sub" / "good.jpg"),
    ]


def test_recursive_folders_follow_links_once_and_skip_hidden_names(predict_script, tmp_path):
    """--recursive skipped linked subfolders (os.walk's default), which a `**` glob follows; a
    link back up is not followed again. Hidden names (macOS' `._x.jpg`, `.git/`) are not
    images of the folder, as a glob does not take them."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.jpg").write_bytes(b"")
    root = tmp_path / "photos"
    (root / ".hidden").mkdir(parents=True)
    (root / ".hidden" / "h.jpg").write_bytes(b"")
    (root / "._x.jpg").write_bytes(b"")
    (root / "x.jpg").write_bytes(b"")
    (root / "more").symlink_to(elsewhere)
    (root / "same").symlink_to(elsewhere)  # walked once, under its first name
    (elsewhere / "up").symlink_to(root)  # a cycle
    assert predict_script._folder_images(str(root), recursive=True) == [
        str(root / "x.jpg"),
        str(root / "more" / "far.jpg"),
    ]
    assert predict_script._folder_images(str(root), recursive=False) == [str(root / "x.jpg")]


@pytest.mark.slow  # a script run of 400 images (the default run stays under 15 minutes)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_predict_script_stopped_by_ctrl_c_writes_the_detections_so_far(
    signum, workdir, compile_cache, tmp_path
):
    """SIGINT (or SIGTERM: it killed the run, nothing written) once the first drawing is
    written: exit status 130 (143), one line saying where it stopped and no traceback;
    detections.json holds exactly the images predicted before the stop (the first ones, in
    order, every drawn one among them), and an earlier run's detections.json is not left
    beside the drawings (it was, and everything was lost)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    image = natural_images(1, seed=3)[0]
    for k in range(400):
        assert cv2.imwrite(str(photos / f"{k:03d}.png"), image)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "detections.json").write_text('[{"file_name": "an earlier run"}]')
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache)}
    script = os.path.join(REPO, "scripts", "predict.py")
    command = [sys.executable, script, f"--workdir={workdir}", f"--out_dir={out_dir}"]
    command += ["--score_threshold=0", photos]  # detections in every image
    process = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not (out_dir / "000.png").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    cause = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[signum]
    done = re.search(rf"stopped by {cause} after (\d+) of 400 images", stderr)
    assert done and 0 < int(done[1]) < 400, stderr[-3000:]
    detections = json.loads((out_dir / "detections.json").read_text())
    named = list(dict.fromkeys(d["file_name"] for d in detections))
    drawn = sorted(p.name for p in out_dir.glob("*.png"))
    assert named == [str(photos / f"{k:03d}.png") for k in range(len(named))]
    assert len(named) == int(done[1])
    assert drawn == [f"{k:03d}.png" for k in range(len(drawn))] and len(drawn) <= int(done[1])
    assert f"(the {done[1]} images predicted before the stop)" in stdout


def write_shapes_json(folder: pathlib.Path, num_images: int) -> pathlib.Path:
    """The first `num_images` images of the shapes val split as PNGs and a COCO json
    (`folder/test.json`, the shapes' category ids, image ids as in the TFDS split)."""
    folder.mkdir()
    images, annotations = [], []
    for index in range(num_images):
        image, objects = shapes.generate_image(0, "validation", index, (128, 128))
        cv2.imwrite(str(folder / f"{index}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": 128, "width": 128})
        for label, mask in objects:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0,
                "category_id": shapes.CATEGORY_IDS[label], "area": float(mask.sum()),
                "bbox": mask_utils.toBbox(rle).tolist(),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
            })  # fmt: skip
    categories = [
        {"id": i, "name": n} for i, n in zip(shapes.CATEGORY_IDS, shapes.CLASS_NAMES, strict=True)
    ]
    path = folder / "test.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return path


def eval_on_json(folder, json_path, images, out_dir, cache) -> subprocess.CompletedProcess:
    """eval.py of the checkpoint `folder` on the COCO-format `json_path`, its images in
    `images`, results into `out_dir`."""
    return run_script(
        f"--workdir={folder}", f"--out_dir={out_dir}", f"--json={json_path}",
        f"--images={images}", cache=cache, script="eval.py",
    )  # fmt: skip


def checkpoint_folder(model_setup, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    """(workdir, its checkpoint folder `checkpoints/0`) of the test model, whose config
    evaluates the first 6 images (`eval.max_images`) of an 8-image shapes val split built in
    `tmp_path`."""
    config, variables = model_setup
    config = config.copy_and_resolve_references()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.shapes_num_train = config.data.shapes_num_val = config.eval.batch_size = 8
    config.eval.max_images = 6
    workdir = tmp_path / "workdir"
    folder = ckpt_lib.save_variables(workdir, config, variables)
    assert folder == workdir / "checkpoints" / "0"
    return workdir, folder


@pytest.mark.slow  # four script runs (48 s in the default run)
def test_scripts_write_into_the_workdir_of_a_checkpoint_folder(
    model_setup, inputs, compile_cache, tmp_path
):
    """`--workdir=<workdir>/checkpoints/0`: predict.py's default --out_dir and eval.py's files
    are in <workdir>, as with `--workdir=<workdir>`, not in the checkpoint folder. eval.py
    says when it scores only the checkpoint's `eval.max_images` of the split, and
    `--max_images=0` scores all; `--json` scores all of a json's images."""
    workdir, folder = checkpoint_folder(model_setup, tmp_path)
    stored = sorted(p.name for p in folder.iterdir())
    root, _, _ = inputs
    result = run_script(
        f"--workdir={folder}", "--no_draw", "--batch_size=8", root / "e.bmp",
        cache=compile_cache,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert (workdir / "predictions" / "detections.json").is_file()
    result = run_script(f"--workdir={folder}", cache=compile_cache, script="eval.py")
    assert result.returncode == 0, result.stderr[-5000:]
    assert (
        "checkpoint step 0, split validation, the first 6 of its 8 images (the checkpoint's "
        "config.eval.max_images; --max_images=0: all):"
    ) in result.stdout
    eval_results = json.loads((workdir / "eval_0.json").read_text())
    assert (eval_results["step"], eval_results["split"]) == (0, "validation")
    assert eval_results["num_images"] == 6
    limited = {d["image_id"] for d in json.loads((workdir / "detections_0.json").read_text())}
    assert len(set(eval_results["image_ids"])) == 6 and limited <= set(eval_results["image_ids"])
    result = run_script(
        f"--workdir={folder}", "--max_images=0", f"--out_dir={tmp_path / 'all'}",
        cache=compile_cache, script="eval.py",
    )  # fmt: skip
    assert "checkpoint step 0, split validation, 8 images:" in result.stdout, result.stderr[-3000:]
    all_results = json.loads((tmp_path / "all" / "eval_0.json").read_text())
    assert all_results["num_images"] == 8 and "image_ids" not in all_results
    detections = json.loads((tmp_path / "all" / "detections_0.json").read_text())
    assert {d["image_id"] for d in detections} > limited  # the other 2 images scored too
    # The same 8 images as a COCO-format json (a held-out set, say): the same detections.
    # All its images, whatever the checkpoint's eval.max_images (6).
    json_path = write_shapes_json(tmp_path / "held_out", 8)
    result = eval_on_json(folder, json_path, json_path.parent, tmp_path / "all", compile_cache)
    header = f"checkpoint step 0, json {json_path}, 8 images:"
    assert header in result.stdout, result.stderr[-3000:]
    held_out = json.loads((tmp_path / "all" / "detections_0_test.json").read_text())
    assert len(held_out) == len(detections) > 0

    def same(a: dict, b: dict) -> bool:  # near-equal scores may come in either order
        ids = (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        close = np.allclose(a["bbox"], b["bbox"], atol=1e-3)
        return ids and close and abs(a["score"] - b["score"]) < 1e-5

    assert all(any(same(got, want) for want in detections) for got in held_out)
    summary = json.loads((tmp_path / "all" / "eval_0_test.json").read_text())
    assert (summary["json"], summary["num_images"]) == (str(json_path), 8)
    assert "split" not in summary
    assert sorted(p.name for p in folder.iterdir()) == stored


@pytest.mark.slow  # the refusals are unit-tested (evaluator, paths, output): here, as run
def test_eval_script_refuses_what_would_overwrite_or_misscore_and_expands_home(
    model_setup, compile_cache, tmp_path
):
    """eval.py refuses a second json of the same file name into one --out_dir (it overwrote the
    first's results) and a json naming the model's ids otherwise, before the model runs; it
    expands `~` in --workdir and --out_dir; on a full disk it ends with the file and the
    reason, no traceback and no partial file."""
    workdir, folder = checkpoint_folder(model_setup, tmp_path)
    stored = sorted(p.name for p in folder.iterdir())
    result = run_script(f"--workdir={folder}", cache=compile_cache, script="eval.py")
    assert result.returncode == 0, result.stderr[-5000:]
    eval_results = json.loads((workdir / "eval_0.json").read_text())
    json_path = write_shapes_json(tmp_path / "held_out", 8)
    result = eval_on_json(folder, json_path, json_path.parent, tmp_path / "all", compile_cache)
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads((tmp_path / "all" / "eval_0_test.json").read_text())
    # Another json of the same file name into the same --out_dir: refused, nothing overwritten.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "test.json").write_text(json_path.read_text())
    result = eval_on_json(
        folder, tmp_path / "other" / "test.json", json_path.parent, tmp_path / "all", compile_cache
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"eval_0_test.json holds the results of json {json_path}, not of json " in result.stderr
    assert json.loads((tmp_path / "all" / "eval_0_test.json").read_text()) == summary
    # The same ids naming other classes: refused before the model runs.
    renamed = json.loads(json_path.read_text())
    for category, name in zip(renamed["categories"], ("leaf", "stone", "cup")):
        category["name"] = name
    (json_path.parent / "renamed.json").write_text(json.dumps(renamed))
    result = eval_on_json(
        folder,
        json_path.parent / "renamed.json",
        json_path.parent,
        tmp_path / "renamed",
        compile_cache,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "has the model's name for its id (id, model's, dataset's): [(1, 'circle', 'leaf')" in (
        result.stderr
    )
    assert not (tmp_path / "renamed").exists()
    assert sorted(p.name for p in folder.iterdir()) == stored
    out_dir = tmp_path / "elsewhere" / "results"  # --out_dir: created, the workdir untouched
    in_workdir = sorted(p.name for p in workdir.iterdir())
    result = run_script(  # `~` expanded in both (a shell leaves `--workdir=~/...` as it is)
        "--workdir=~/workdir/checkpoints/0", "--out_dir=~/elsewhere/results",
        cache=compile_cache, script="eval.py", home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["detections_0.json", "eval_0.json"]
    assert json.loads((out_dir / "eval_0.json").read_text()) == eval_results
    assert sorted(p.name for p in workdir.iterdir()) == in_workdir
    if not os.path.exists("/dev/full"):
        return
    full = tmp_path / "full"  # a full disk: writes to /dev/full fail with ENOSPC
    full.mkdir()
    (full / "detections_0.json").symlink_to("/dev/full")
    result = run_script(
        f"--workdir={folder}", f"--out_dir={full}", cache=compile_cache, script="eval.py"
    )
    assert result.returncode == 1, result.stderr[-5000:]
    expected = f"error: cannot write {full / 'detections_0.json'}: No space left on device"
    assert expected in result.stderr, result.stderr[-5000:]
    assert "Traceback" not in result.stderr, result.stderr[-5000:]
    assert not any(full.iterdir())  # no partial detections, no metrics file
