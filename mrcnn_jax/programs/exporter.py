"""A checkpoint as a TensorFlow SavedModel holding the whole inference path.

    from mrcnn_jax.programs import exporter
    exporter.export_saved_model("/tmp/mrcnn_shapes", "/tmp/mrcnn_shapes_savedmodel")

and, in a process with TensorFlow only (no JAX, no mrcnn_jax):

    detect = tf.saved_model.load("/tmp/mrcnn_shapes_savedmodel").signatures["serving_default"]
    result = detect(image=tf.constant(image))  # image: [H, W, 3] uint8 RGB, any size

The graph runs what `mrcnn_jax.load_checkpoint(...)(image)` runs: the eval resize into the
config's static canvas `data.image_size` (`pipeline.resize_and_pad_tf`, the pipeline's own TF
code), the model (`MaskRCNN.from_config(config.model).apply(variables, batch, train=False)`,
compiled from JAX), then in TF the predictor's postprocessing: valid detections scoring at least
the threshold, boxes back to the original pixels per axis (`coco_eval.boxes_to_original`),
clipped to the image, and optionally the masks pasted into it (`evaluation.masks.paste_masks`,
`config.model.roi_heads.mask_paste`, re-implemented here in TF: `paste_masks_tf`).

Signatures (every box is (x1, y1, x2, y2) float32 in ORIGINAL image pixels):

- `serving_default`: `image` [H, W, 3] uint8 → `boxes [N, 4]`, `scores [N]` float32,
  `labels [N]` int32 (contiguous 0..K-1), `classes [N]` int32 (the dataset's category ids,
  `config.data.label_to_category_id`; where the config leaves that empty, the labels themselves),
  `class_names [N]` string (`config.data.class_names`, or "0".."K-1" where empty),
  `masks [N, S, S]` float32 probabilities over each (unclipped) box (S = 2 ×
  `model.roi_heads.mask_pooler_size` = 28), and with `full_masks` `full_masks [N, H, W]` bool.
  N counts the detections scoring ≥ the export's `score_threshold`, in the model's order
  (descending score); N = 0 gives every output with a leading dimension 0.
- `serving_batch`: `images [B, Hmax, Wmax, 3]` uint8 (image b in its top-left
  `image_sizes[b]` = (h, w) int32 corner, any padding) → the same keys padded to
  `[B, D, ...]` (D = `model.roi_heads.detections_per_image`; padding rows 0, label/class -1,
  name "") plus `num_detections [B]` int32; `full_masks [B, D, Hmax, Wmax]`, False beyond
  each image. Row b equals `serving_default` on the image alone (bit for bit with
  `batch_size` 1, where both run the same program; up to float rounding otherwise). B may be
  0. `image_sizes` needs one row per image, each in 1..(Hmax, Wmax).

Signatures cannot have optional inputs (TensorFlow binds every input of a signature), so they
use the threshold given at export; the loaded object's functions take it as an optional input:
`loaded.detect(image, score_threshold=0.3)` and `loaded.detect_batch(images, image_sizes,
score_threshold=0.3)`, in [0, 1] as the predictor's. Inputs the functions and signatures refuse
(a threshold outside [0, 1] or NaN, bad `image_sizes`, an empty image, an image that is not
`[H, W, 3]`: grey or RGBA, which unlike the predictor they do not convert) raise
`tf.errors.InvalidArgumentError` naming the input; the functions refuse a wrong rank or channel
count earlier, when TensorFlow binds the arguments (TypeError). Images must be uint8, and only a
tensor is checked: a `tf.constant` of another dtype is refused (InvalidArgumentError by the
signatures, TypeError by the functions), but TensorFlow converts a numpy argument to the
declared uint8 without a check (a float image in [0, 1] would arrive black, 16-bit values
wrap), as it converts any argument of a function with an `input_signature`; one form per dtype
would check them, at the cost of a new trace for every image size a loaded function sees.
Convert first: `(image * 255).round().astype(np.uint8)` for floats in [0, 1]. Also saved:
`loaded.class_names`, `loaded.category_ids`, `loaded.step` (variables) and the checkpoint's
config as the asset `assets/config.json` (`loaded.config_file.asset_path`).

How the model gets into the graph. `jax2tf.convert` (native serialization) is what this does,
step by step: `jax.export` lowers the jitted model to StableHLO (the `lax.while_loop` NMS and
the gathers need no TF equivalent) for the chosen platforms, and an `XlaCallModule` op carries
the module; the weights are TF variables passed in as arguments. jax2tf itself cannot do the
job with the installed pair: it serializes for jax's own 4-week compatibility target
(StableHLO 1.15.0 for jax 0.10), which TensorFlow 2.21's `XlaCallModule` (StableHLO 1.13.7)
refuses to read. So the module is re-serialized (`jax.extend.mlir`) for the older of the two
versions (`jaxlib`'s and TensorFlow's StableHLO bindings tell them), which both sides read.
The batch dimension of each module is static: downgraded to 1.13.7, `top_k` becomes a
composite whose decomposition keeps dynamic shapes, which TF's shape refinement rejects under
a symbolic batch. `serving_default` runs a batch-1 module; `serving_batch` runs a `batch_size`
module over chunks of the batch (the last chunk padded).
"""

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.extend.mlir as jax_mlir
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath
from jax import export as jax_export
from jaxlib.mlir.dialects import stablehlo as jax_stablehlo
from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo
from tensorflow.compiler.tf2xla.python import xla as tfxla

from mrcnn_jax import interrupts, jax_settings, paths
from mrcnn_jax.data import pipeline
from mrcnn_jax.evaluation.masks import PASTE_METHODS
from mrcnn_jax.modeling.checks import check_class_fields
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.programs.predictor import Predictor, load_checkpoint
from mrcnn_jax.train import storage_errors

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportWriteError(OSError):
    """The SavedModel could not be written (a full disk, a quota, no permission): the message
    says where and why; what the export had written is removed, so the same command can run
    again once the cause is fixed."""


_INT32_MAX = np.iinfo(np.int32).max


def check_exportable(config: ml_collections.ConfigDict, full_masks: bool) -> None:
    """Raises ValueError, naming the config field, where the SavedModel cannot represent it.

    The data settings must pass `pipeline.check_data` (canvas, resize, `data.mean`/`data.std`
    three values); `data.class_names` and `data.label_to_category_id`, where set, need one entry
    per class (`model.num_classes`), the ids fitting int32; with `full_masks`,
    `model.roi_heads.mask_paste` one of `PASTE_METHODS`.
    """
    pipeline.check_data(config)
    check_class_fields(config)
    ids = tuple(config.data.label_to_category_id)
    bad = [
        int(i) if isinstance(i, np.integer) else i
        for i in ids
        if not isinstance(i, (int, np.integer)) or not 0 <= i <= _INT32_MAX
    ]
    if bad:
        raise ValueError(
            f"config.data.label_to_category_id holds {len(bad)} category id(s) a SavedModel "
            f"cannot output: {bad[:5]}{' ...' if len(bad) > 5 else ''} (its `classes` are "
            f"int32 ids in [0, {_INT32_MAX}], -1 beyond the detections): renumber those "
            "categories in the dataset's json and train with it"
        )
    paste = config.model.roi_heads.mask_paste
    if full_masks and paste not in PASTE_METHODS:
        raise ValueError(
            f"config.model.roi_heads.mask_paste={paste!r} is not one of {PASTE_METHODS}: "
            "full masks cannot be pasted"
        )


# ------------------------------------------------------------------------ the model in TF


def _tf_target_version() -> str:
    """The StableHLO version both jax (its 4-week target) and TensorFlow's XlaCallModule read."""
    jax_version = jax_stablehlo.get_version_from_compatibility_requirement(
        jax_stablehlo.StablehloCompatibilityRequirement.WEEK_4
    )
    return tf_stablehlo.get_smaller_version(jax_version, tf_stablehlo.get_current_version())


class _Model:
    """The model at a static batch `[batch, Ht, Wt, 3]`, lowered by `jax.export` and run in TF
    as an `XlaCallModule` op with the weights as arguments."""

    def __init__(self, predictor: Predictor, batch: int, platforms: Sequence[str]):
        model = MaskRCNN.from_config(predictor.config.model)
        leaves, treedef = jax.tree_util.tree_flatten(predictor.variables)

        def infer(weights, image, image_size):
            variables = jax.tree_util.tree_unflatten(treedef, weights)
            out = model.apply(variables, {"image": image, "image_size": image_size}, train=False)
            floats = ("boxes", "scores", "masks")
            return {k: v.astype(jnp.float32) if k in floats else v for k, v in out.items()}

        canvas = tuple(predictor.config.data.image_size)
        specs = (
            [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves],
            jax.ShapeDtypeStruct((batch, *canvas, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, 2), jnp.int32),
        )
        self.exported = jax_export.export(jax.jit(infer), platforms=tuple(platforms))(*specs)
        self.module = jax_mlir.serialize_portable_artifact(
            self.exported.mlir_module(), _tf_target_version()
        )

    def __call__(self, weights: Sequence[tf.Variable], image, image_size) -> dict[str, tf.Tensor]:
        """`image [batch, Ht, Wt, 3]` f32, `image_size [batch, 2]` i32 -> the model's outputs
        (docs/CONTRACTS.md "Model output at inference")."""
        e = self.exported
        args = jax.tree_util.tree_leaves(((list(weights), image, image_size), {}))
        results = tfxla.call_module(
            [args[i] for i in sorted(e.module_kept_var_idx)],
            version=e.calling_convention_version,
            module=self.module,
            Tout=[tf.as_dtype(a.dtype) for a in e.out_avals],
            Sout=[a.shape for a in e.out_avals],
            platforms=[p.upper() for p in e.platforms],
            disabled_checks=[str(c) for c in e.disabled_safety_checks],
            use_shardy_partitioner=jax.config.jax_use_shardy_partitioner,
        )
        return jax.tree_util.tree_unflatten(e.out_tree, results)


# ------------------------------------------------------------------ postprocessing in TF


def _linear_taps(in_size: int, out_size: tf.Tensor, dst: tf.Tensor):
    """`masks._linear_resize_taps` for output positions `dst` (any shape, f32), clamped so
    that positions outside `0..out_size-1` still index the map."""
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    src = tf.maximum(scale * (dst + 0.5) - 0.5, 0.0)
    i0 = tf.minimum(tf.cast(tf.floor(src), tf.int32), in_size - 1)
    i1 = tf.minimum(i0 + 1, in_size - 1)
    w1 = tf.clip_by_value(src - tf.cast(i0, tf.float32), 0.0, 1.0)
    return i0, i1, 1.0 - w1, w1


def _paste_one_torchvision(mask, box, height, width, canvas, threshold):
    """`masks._paste_torchvision` of one `[M, M]` map into a `canvas` (Hc, Wc) bool image,
    foreground only inside (height, width)."""
    m = mask.shape[-1]
    padded = tf.pad(mask, [[1, 1], [1, 1]])
    scale = np.float32((m + 2) / m)
    w_half = (box[2] - box[0]) * 0.5 * scale
    h_half = (box[3] - box[1]) * 0.5 * scale
    x_c, y_c = (box[2] + box[0]) * 0.5, (box[3] + box[1]) * 0.5
    bx1, bx2 = tf.cast(x_c - w_half, tf.int32), tf.cast(x_c + w_half, tf.int32)  # truncation
    by1, by2 = tf.cast(y_c - h_half, tf.int32), tf.cast(y_c + h_half, tf.int32)
    xs, ys = tf.range(canvas[1]), tf.range(canvas[0])
    cx0, cx1, wx0, wx1 = _linear_taps(
        m + 2, tf.maximum(bx2 - bx1 + 1, 1), tf.cast(tf.maximum(xs - bx1, 0), tf.float32)
    )
    ry0, ry1, wy0, wy1 = _linear_taps(
        m + 2, tf.maximum(by2 - by1 + 1, 1), tf.cast(tf.maximum(ys - by1, 0), tf.float32)
    )
    columns = tf.gather(padded, cx0, axis=1) * wx0 + tf.gather(padded, cx1, axis=1) * wx1
    region = tf.gather(columns, ry0) * wy0[:, None] + tf.gather(columns, ry1) * wy1[:, None]
    inside_x = (xs >= bx1) & (xs <= bx2) & (xs < width)
    inside_y = (ys >= by1) & (ys <= by2) & (ys < height)
    return (region > threshold) & inside_y[:, None] & inside_x[None, :]


def _grid_taps(positions: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor, m: int):
    """`masks._grid_sample_taps` at the pixels `positions` [n] int32 of a box `lo..hi`."""
    centres = tf.cast(positions, tf.float32) + 0.5
    grid = (centres - lo) / (hi - lo) * 2.0 - 1.0
    coord = (grid + 1.0) * np.float32(m / 2) - 0.5
    floor = tf.floor(coord)
    w1 = coord - floor
    floor = tf.where(tf.math.is_finite(floor), floor, -1.0)
    i0 = tf.cast(tf.clip_by_value(floor, -1.0, m), tf.int32) + 1
    i1 = tf.cast(tf.clip_by_value(floor + 1.0, -1.0, m), tf.int32) + 1
    return i0, i1, 1.0 - w1, w1


def _paste_one_detectron2(mask, box, height, width, canvas, threshold):
    """`masks._paste_detectron2` of one `[M, M]` map (same pixels, taps and summation order)."""
    m = mask.shape[-1]
    padded = tf.pad(mask, [[1, 1], [1, 1]])
    xs, ys = tf.range(canvas[1]), tf.range(canvas[0])
    cx0, cx1, e, w = _grid_taps(xs, box[0], box[2], m)
    ry0, ry1, s, n = _grid_taps(ys, box[1], box[3], m)
    north, south = tf.gather(padded, ry0), tf.gather(padded, ry1)  # [Hc, M + 2]
    s, n, e, w = s[:, None], n[:, None], e[None, :], w[None, :]
    region = (
        tf.gather(north, cx0, axis=1) * (s * e)
        + tf.gather(north, cx1, axis=1) * (s * w)
        + tf.gather(south, cx0, axis=1) * (n * e)
        + tf.gather(south, cx1, axis=1) * (n * w)
    )
    x0 = tf.maximum(tf.cast(tf.floor(box[0]), tf.int32) - 1, 0)
    x1 = tf.minimum(tf.cast(tf.math.ceil(box[2]), tf.int32) + 1, width)
    y0 = tf.maximum(tf.cast(tf.floor(box[1]), tf.int32) - 1, 0)
    y1 = tf.minimum(tf.cast(tf.math.ceil(box[3]), tf.int32) + 1, height)
    inside_x, inside_y = (xs >= x0) & (xs < x1), (ys >= y0) & (ys < y1)
    return (region >= threshold) & inside_y[:, None] & inside_x[None, :]


def paste_masks_tf(
    masks: tf.Tensor,
    boxes: tf.Tensor,
    image_size: tf.Tensor,
    method: str,
    canvas: tf.Tensor | None = None,
    threshold: float = 0.5,
) -> tf.Tensor:
    """`evaluation.masks.paste_masks` in TensorFlow ops, with the same float32 arithmetic.

    Args:
      masks: `[N, M, M]` float32 probabilities, each over its box (pixel (i, j) covers the point
        (x1 + (j + 0.5) w / M, y1 + (i + 0.5) h / M)).
      boxes: `[N, 4]` float32 (x1, y1, x2, y2) finite, in the image's pixels (unclipped).
      image_size: `[2]` int32 (height, width) of the image, positive.
      method: "detectron2" or "torchvision" (`config.model.roi_heads.mask_paste`).
      canvas: `[2]` int32 (Hc, Wc) ≥ image_size, the output's size (default image_size);
        pixels beyond the image are False.
      threshold: foreground where the pasted probability is ≥ it (detectron2) or > it
        (torchvision).

    Returns:
      `[N, Hc, Wc]` bool (N may be 0), equal to `paste_masks(masks, boxes, image_size,
      threshold, method=method)` on the image.
    """
    if method not in PASTE_METHODS:
        raise ValueError(f"method must be one of {PASTE_METHODS}, got {method!r}")
    paste = _paste_one_detectron2 if method == "detectron2" else _paste_one_torchvision
    image_size = tf.cast(image_size, tf.int32)
    canvas = image_size if canvas is None else tf.cast(canvas, tf.int32)
    return _map_or_empty(
        lambda x: paste(x[0], x[1], image_size[0], image_size[1], canvas, threshold),
        (tf.cast(masks, tf.float32), tf.cast(boxes, tf.float32)),
        tf.TensorSpec([None, None], tf.bool),
        lambda: tf.zeros([0, canvas[0], canvas[1]], tf.bool),
    )


def _map_or_empty(fn: Callable[[Any], Any], elems: Any, spec: Any, empty: Callable[[], Any]) -> Any:
    """`tf.map_fn(fn, elems, fn_output_signature=spec)`, or `empty()` (the same structure with
    leading dimension 0) where `elems` have no rows: TF cannot stack zero results of a shape it
    does not fully know (`spec` with None dimensions, such as the image's size)."""
    rows = tf.shape(tf.nest.flatten(elems)[0])[0]
    return tf.cond(rows > 0, lambda: tf.map_fn(fn, elems, fn_output_signature=spec), empty)


def _boxes_to_original(boxes: tf.Tensor, resized: tf.Tensor, orig: tf.Tensor) -> tf.Tensor:
    """`coco_eval.boxes_to_original`: x * (orig_w / resized_w), y * (orig_h / resized_h), f32."""
    ratios = tf.cast(orig, tf.float32) / tf.cast(resized, tf.float32)  # (h, w)
    return boxes * tf.stack([ratios[1], ratios[0], ratios[1], ratios[0]])


def _checked_threshold(threshold: tf.Tensor) -> tf.Tensor:
    """`threshold` [] f32, run only after a check that it is in [0, 1] (NaN is not), as the
    predictor checks its `score_threshold`: the graph raises InvalidArgumentError otherwise."""
    in_range = (threshold >= 0.0) & (threshold <= 1.0)
    check = tf.debugging.Assert(in_range, ["score_threshold must be in [0, 1], got", threshold])
    with tf.control_dependencies([check]):
        return tf.identity(threshold)


def _checked_images(images: tf.Tensor, rank: int) -> tf.Tensor:
    """`images` (`[H, W, 3]` for rank 3, `[B, H, W, 3]` for rank 4), run only after a check of
    its shape: a signature's call does not enforce its input's shape (grey `[H, W]` or RGBA
    `[H, W, 4]` would fail deep in the graph, naming no input). The rank is checked through the
    element count, as the signature's static rank would fold `tf.rank` to a constant."""
    shape = tf.shape(images)
    dims = tf.pad(shape, [[0, rank]])[:rank]  # zeros past a lower rank: a count of 0
    ok = tf.equal(tf.size(images), tf.reduce_prod(dims)) & tf.equal(dims[-1], 3)
    name = "image must be [H, W, 3]" if rank == 3 else "images must be [B, H, W, 3]"
    check = tf.debugging.Assert(
        ok, [f"{name} uint8 RGB (convert grey and RGBA), got", shape], summarize=8
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def _checked_image_sizes(image_sizes: tf.Tensor, images: tf.Tensor) -> tf.Tensor:
    """`image_sizes [B, 2]` int32 (h, w), run only after checks that there is one per image of
    `images [B, Hmax, Wmax, 3]` and each is in 1..(Hmax, Wmax) (a slice `[:h, :w]` would take
    a negative size as counted from the end): InvalidArgumentError otherwise."""
    checks = [
        tf.debugging.assert_equal(
            tf.shape(image_sizes)[0],
            tf.shape(images)[0],
            message="image_sizes must have one row (height, width) per image",
        ),
        tf.debugging.assert_greater_equal(
            image_sizes, 1, message="image_sizes below 1: heights and widths must be positive"
        ),
        tf.debugging.assert_less_equal(
            image_sizes, tf.shape(images)[1:3][None], message="image_sizes beyond the images"
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(image_sizes)


class _Detector:
    """The TF computations of the saved functions: preprocess, model, postprocess.

    `weights` are the variables' leaves (jax tree order), `names` [K] string and `ids` [K]
    int32 the class names and category ids of labels 0..K-1: tf.Variables the saved module
    tracks."""

    def __init__(
        self,
        predictor: Predictor,
        weights: Sequence[tf.Variable],
        names: tf.Variable,
        ids: tf.Variable,
        *,
        platforms: Sequence[str],
        full_masks: bool,
        batch_size: int,
    ):
        config = predictor.config
        self.data, self.canvas = config.data, tuple(config.data.image_size)
        self.weights, self.names, self.ids = weights, names, ids
        self.paste = config.model.roi_heads.mask_paste if full_masks else None
        self.batch_size = batch_size
        self.single = _Model(predictor, 1, platforms)
        self.batched = self.single if batch_size == 1 else _Model(predictor, batch_size, platforms)

    def _preprocess(self, image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        tf.debugging.assert_positive(
            tf.shape(image)[:2], message="image height and width must be positive"
        )
        return pipeline.resize_and_pad_tf(image, self.data)

    def _postprocess(self, out, resized, orig, threshold) -> tuple[dict, tf.Tensor]:
        """One image's model outputs [D, ...] (resized to `resized`, originally `orig` (h, w))
        -> (the outputs of the kept detections, first, padded to D; their unclipped boxes)."""
        keep = out["valid"] & (out["scores"] >= threshold)
        order = tf.argsort(tf.cast(~keep, tf.int32), stable=True)
        out = {k: tf.gather(v, order) for k, v in out.items()}
        keep = tf.gather(keep, order)
        boxes = _boxes_to_original(out["boxes"], resized, orig)
        labels = tf.where(keep, out["classes"], -1)
        safe = tf.maximum(labels, 0)
        limit = tf.cast(tf.stack([orig[1], orig[0], orig[1], orig[0]]), tf.float32)
        result = {
            "boxes": tf.where(keep[:, None], tf.clip_by_value(boxes, 0.0, limit), 0.0),
            "scores": tf.where(keep, out["scores"], 0.0),
            "labels": labels,
            "classes": tf.where(keep, tf.gather(self.ids, safe), -1),
            "class_names": tf.where(keep, tf.gather(self.names, safe), ""),
            "masks": tf.where(keep[:, None, None], out["masks"], 0.0),
            "num_detections": tf.reduce_sum(tf.cast(keep, tf.int32)),
        }
        return result, tf.where(keep[:, None], boxes, 0.0)

    def detect(self, image: tf.Tensor, threshold: tf.Tensor) -> dict[str, tf.Tensor]:
        """`image [H, W, 3]` uint8, `threshold` [] f32 in [0, 1] -> the `serving_default`
        outputs (module docstring)."""
        threshold = _checked_threshold(threshold)
        image = _checked_images(image, rank=3)
        canvas, resized = self._preprocess(image)
        out = self.single(self.weights, canvas[None], resized[None])
        orig = tf.shape(image)[:2]
        result, boxes = self._postprocess(
            {k: v[0] for k, v in out.items()}, resized, orig, threshold
        )
        n = result.pop("num_detections")
        result = {k: v[:n] for k, v in result.items()}
        if self.paste:  # only the kept detections
            result["full_masks"] = paste_masks_tf(result["masks"], boxes[:n], orig, self.paste)
        return result

    def detect_batch(self, images, image_sizes, threshold) -> dict[str, tf.Tensor]:
        """`images [B, Hmax, Wmax, 3]` uint8 (B ≥ 0), `image_sizes [B, 2]` int32 (h, w) in
        1..(Hmax, Wmax), `threshold` [] f32 in [0, 1] -> `serving_batch` outputs."""
        threshold = _checked_threshold(threshold)
        images = _checked_images(images, rank=4)
        image_sizes = _checked_image_sizes(tf.cast(image_sizes, tf.int32), images)
        canvases, resized = tf.map_fn(
            lambda x: self._preprocess(x[0][: x[1][0], : x[1][1]]),
            (images, image_sizes),
            fn_output_signature=(
                tf.TensorSpec([*self.canvas, 3], tf.float32),
                tf.TensorSpec([2], tf.int32),
            ),
        )
        outputs = self._run_chunks(canvases, resized)
        full_canvas = tf.shape(images)[1:3]

        def postprocess(x):
            out, size, orig = x
            result, boxes = self._postprocess(out, size, orig, threshold)
            if self.paste:
                pasted = paste_masks_tf(result["masks"], boxes, orig, self.paste, full_canvas)
                valid = tf.range(tf.shape(boxes)[0]) < result["num_detections"]
                result["full_masks"] = pasted & valid[:, None, None]
            return result

        spec = self._output_spec()

        def no_images():
            shapes = {k: [0, *s.shape] for k, s in spec.items()}
            if self.paste:
                shapes["full_masks"] = [0, spec["full_masks"].shape[0], *tf.unstack(full_canvas)]
            return {k: tf.zeros(shapes[k], s.dtype) for k, s in spec.items()}

        return _map_or_empty(postprocess, (outputs, resized, image_sizes), spec, no_images)

    def _run_chunks(self, canvases: tf.Tensor, resized: tf.Tensor) -> dict[str, tf.Tensor]:
        """The `batch_size` model over a batch of any size B (last chunk padded) -> [B, D, ...]."""
        b, size = tf.shape(canvases)[0], self.batch_size
        pad = (-b) % size
        canvases = tf.pad(canvases, [[0, pad], [0, 0], [0, 0], [0, 0]])
        resized = tf.concat([resized, tf.tile([self.canvas], [pad, 1])], axis=0)
        chunks = (
            tf.reshape(canvases, [-1, size, *self.canvas, 3]),
            tf.reshape(resized, [-1, size, 2]),
        )
        e = self.batched.exported
        spec = jax.tree_util.tree_unflatten(
            e.out_tree, [tf.TensorSpec(a.shape, tf.as_dtype(a.dtype)) for a in e.out_avals]
        )
        outputs = tf.map_fn(
            lambda x: self.batched(self.weights, x[0], x[1]), chunks, fn_output_signature=spec
        )
        return {k: tf.reshape(v, [-1, *v.shape[2:]])[:b] for k, v in outputs.items()}

    def _output_spec(self) -> dict[str, tf.TensorSpec]:
        """`serving_batch`'s per-image outputs [D, ...]."""
        avals = jax.tree_util.tree_unflatten(
            self.single.exported.out_tree, self.single.exported.out_avals
        )
        d, mask = avals["masks"].shape[1], avals["masks"].shape[2:]
        spec = {
            "boxes": tf.TensorSpec([d, 4], tf.float32),
            "scores": tf.TensorSpec([d], tf.float32),
            "labels": tf.TensorSpec([d], tf.int32),
            "classes": tf.TensorSpec([d], tf.int32),
            "class_names": tf.TensorSpec([d], tf.string),
            "masks": tf.TensorSpec([d, *mask], tf.float32),
            "num_detections": tf.TensorSpec([], tf.int32),
        }
        if self.paste:
            spec["full_masks"] = tf.TensorSpec([d, None, None], tf.bool)
        return spec


# ------------------------------------------------------------------------------ the export


def _variable_name(path) -> str:
    """`params/backbone/stem_conv/kernel` for a variables-tree path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _module(
    predictor: Predictor,
    *,
    platforms: Sequence[str],
    full_masks: bool,
    score_threshold: float,
    batch_size: int,
    config_path: str,
) -> tuple[tf.Module, dict[str, Any]]:
    """The tf.Module to save (variables, config asset, functions) and its signatures."""
    config = predictor.config
    module = tf.Module()
    module.weights = [
        tf.Variable(np.asarray(x), trainable=False, name=_variable_name(path))
        for path, x in jax.tree_util.tree_leaves_with_path(predictor.variables)
    ]
    ids = tuple(config.data.label_to_category_id) or tuple(range(config.model.num_classes))
    module.class_names = tf.Variable(predictor.class_names, trainable=False, name="class_names")
    module.category_ids = tf.Variable(ids, dtype=tf.int32, trainable=False, name="category_ids")
    module.step = tf.Variable(predictor.step, dtype=tf.int64, trainable=False, name="step")
    module.config_file = tf.saved_model.Asset(config_path)
    detector = _Detector(
        predictor,
        module.weights,
        module.class_names,
        module.category_ids,
        platforms=platforms,
        full_masks=full_masks,
        batch_size=batch_size,
    )

    default = tf.constant(score_threshold, tf.float32)
    image = tf.TensorSpec([None, None, 3], tf.uint8, name="image")
    images = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
    sizes = tf.TensorSpec([None, 2], tf.int32, name="image_sizes")
    threshold = tf.TensorSpec([], tf.float32, name="score_threshold")

    @tf.function(input_signature=[image, threshold], autograph=False)
    def detect(image, score_threshold=default):
        return detector.detect(image, score_threshold)

    @tf.function(input_signature=[images, sizes, threshold], autograph=False)
    def detect_batch(images, image_sizes, score_threshold=default):
        return detector.detect_batch(images, image_sizes, score_threshold)

    @tf.function(input_signature=[image], autograph=False)
    def serving_default(image):
        return detect(image, default)

    @tf.function(input_signature=[images, sizes], autograph=False)
    def serving_batch(images, image_sizes):
        return detect_batch(images, image_sizes, default)

    module.detect, module.detect_batch = detect, detect_batch
    signatures = {
        "serving_default": serving_default.get_concrete_function(),
        "serving_batch": serving_batch.get_concrete_function(),
    }
    return module, signatures


@interrupts.handled_interrupts()
@jax_settings.with_defaults
def export_saved_model(
    source: Predictor | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    checkpoint_step: int | None = None,
    platforms: Sequence[str] = ("cpu",),
    full_masks: bool = False,
    score_threshold: float = 0.5,
    batch_size: int = 1,
) -> epath.Path:
    """Writes a checkpoint's whole inference path as a TensorFlow SavedModel (module docstring).

    Args:
      source: a `Predictor` (`mrcnn_jax.load_checkpoint(...)`), or what `load_checkpoint`
        takes: a workdir, its `checkpoints/` or one `checkpoints/<step>` directory.
      out_dir: the SavedModel directory to create (absent or empty; `~` expanded).
      checkpoint_step: the checkpoint to load when `source` is a path (default: the latest).
      platforms: what the model is compiled for, any of `PLATFORMS` (one module holds them
        all; TF picks the one it runs on).
      full_masks: also output the masks pasted into the image (`full_masks`, bool [N, H, W]),
        as `config.model.roi_heads.mask_paste` says.
      score_threshold: the signatures' threshold (and the functions' default): detections
        scoring at least this are returned.
      batch_size: the static batch of the model inside `serving_batch` (batches of any size
        run in chunks of it).

    Returns:
      `out_dir`.

    Raises:
      ValueError: bad arguments, or a config the SavedModel cannot represent (`check_exportable`
        names the field).
      FileExistsError: `out_dir` is a file or not empty, or another export is writing there.
      ExportWriteError: writing the SavedModel failed; `out_dir` is as it was (absent or empty).
    """
    check_arguments(platforms, score_threshold, batch_size)
    out_dir = epath.Path(paths.absolute(out_dir))
    existed = out_dir.exists()
    if existed and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder for the SavedModel")
    out_dir.mkdir(parents=True, exist_ok=True)
    # first: what another export is writing is not "killed midway"
    with _written_alone(out_dir) as check_still_ours:
        _check_empty(out_dir)  # before the checkpoint is read
        try:
            if isinstance(source, Predictor):
                predictor = source
            else:
                predictor = load_checkpoint(source, checkpoint_step)
            check_exportable(predictor.config, full_masks)
            with tempfile.TemporaryDirectory() as tmp:
                config_path = os.path.join(tmp, "config.json")
                with open(config_path, "w") as f:
                    json.dump(json.loads(predictor.config.to_json()), f, indent=2)
                module, signatures = _module(
                    predictor,
                    platforms=tuple(platforms),
                    full_masks=full_masks,
                    score_threshold=score_threshold,
                    batch_size=batch_size,
                    config_path=config_path,
                )
                check_still_ours()
                try:
                    tf.saved_model.save(module, str(out_dir), signatures=signatures)
                except (OSError, tf.errors.OpError) as error:
                    reason = storage_errors.tensorflow_error_text(error)
                    raise ExportWriteError(
                        f"writing the SavedModel to {out_dir} failed ({reason}); what it had "
                        "written is removed"
                    ) from error
        except BaseException:  # also Ctrl-C: a half-written SavedModel makes out_dir "not empty"
            with contextlib.suppress(FileExistsError):  # a folder not ours is left alone
                check_still_ours()
                _remove_written(out_dir, existed)
            raise
    return out_dir


def _check_empty(out_dir: epath.Path) -> None:
    """Raises FileExistsError if `out_dir` exists and holds anything."""
    if out_dir.exists() and any(out_dir.iterdir()):
        stopped = not (out_dir / "saved_model.pb").exists() and (out_dir / "variables").exists()
        raise FileExistsError(
            f"{out_dir} is not empty"
            + (": it holds the variables/ of an export killed midway, delete it" if stopped else "")
        )


@contextlib.contextmanager
def _written_alone(out_dir: epath.Path) -> Iterator[Callable[[], None]]:
    """Holds an exclusive lock (`flock`) on the local folder `out_dir` during the block, so that
    a second export into it is refused at once: two exports started together both passed the
    emptiness check, both wrote there and both reported success, one SavedModel silently lost
    (and a failing one's clean-up could delete the other's). A URL is not locked (cloud storage
    has no locks).

    Yields a check that `out_dir` is still the locked folder (`_check_same_folder`).

    Raises:
      FileExistsError: another export holds the lock.
    """
    if paths.is_url(str(out_dir)):
        yield lambda: None
        return
    folder = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"{out_dir} is being written by another export: wait for it to end, or export "
                "into another folder"
            ) from None
        except OSError:  # a file system without flock (some NFS): unlocked, as before
            pass
        yield lambda: _check_same_folder(out_dir, folder)
    finally:
        os.close(folder)  # releases the lock


def _check_same_folder(out_dir: epath.Path, locked: int) -> None:
    """Raises FileExistsError unless `out_dir` is still the folder of the descriptor `locked`
    (a refused export that made it too removed it as empty: another export would not see
    this one's lock on the folder made again)."""
    try:
        same = os.path.samestat(os.fstat(locked), os.stat(out_dir))
    except OSError:
        same = False
    if not same:
        raise FileExistsError(
            f"{out_dir} was removed or replaced while this export ran (another export into it?): "
            "export again"
        )


def check_arguments(
    platforms: Sequence[str], score_threshold: float, batch_size: int, prefix: str = ""
) -> None:
    """Raises ValueError naming `prefix` + the argument (scripts/export.py: `--`, its flags) for
    `platforms` not some of `PLATFORMS`, a `score_threshold` outside [0, 1] (NaN too) or a
    `batch_size` below 1."""
    if not platforms or set(platforms) - set(PLATFORMS):
        raise ValueError(
            f"{prefix}platforms={','.join(platforms)} must be some of {','.join(PLATFORMS)}"
        )
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"{prefix}score_threshold={score_threshold} must be in [0, 1]")
    if batch_size < 1:
        raise ValueError(f"{prefix}batch_size={batch_size} must be at least 1")


def _remove_written(out_dir: epath.Path, existed: bool) -> None:
    """Leaves `out_dir` as a failed export found it: absent, or (when it `existed`) empty."""
    if not existed:
        out_dir.rmtree(missing_ok=True)
        return
    for child in out_dir.iterdir():
        if child.is_dir():
            child.rmtree()
        else:
            child.unlink()
