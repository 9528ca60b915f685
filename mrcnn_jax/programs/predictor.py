"""Notebook-friendly inference from a checkpoint:

    import mrcnn_jax
    predictor = mrcnn_jax.load_checkpoint("/tmp/shapes")  # a workdir or a checkpoint directory
    result = predictor(image)  # image: [H, W, 3] uint8 RGB numpy array
    results = predictor.predict_batch(images)  # many images, batched over the local devices

`result` holds the detections in ORIGINAL image pixels: `boxes [N, 4]` float32 (x1, y1, x2, y2),
`scores [N]` float32, `classes [N]` int32 (contiguous labels 0..K-1: a SavedModel's `labels`),
`category_ids [N]` int64 (the dataset's category ids, `config.data.label_to_category_id`, or the
labels where the config has none: a SavedModel's `classes`), `class_names` (N strings),
`masks [N, H, W]` bool. Grey (`[H, W]`, `[H, W, 1]`) and RGBA (`[H, W, 4]`) uint8 images are
taken as `evaluation.visualize.read_image` reads such files: grey repeated into R, G and B, the
alpha channel dropped.
`predict_batch` returns one such dict per image, the same as calling the predictor on each.
`locate_checkpoint(path)` says which workdir and step `load_checkpoint(path)` reads, loading
nothing (scripts/eval.py writes its results into that workdir).
"""

import contextlib
import copy
import dataclasses
import functools
import operator
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax.errors import ScopeCollectionNotFound, ScopeParamNotFoundError, ScopeParamShapeError

from mrcnn_jax import image_headers, interrupts, jax_settings, paths, sharding
from mrcnn_jax.data import pipeline
from mrcnn_jax.evaluation.coco_eval import boxes_to_original
from mrcnn_jax.evaluation.masks import paste_masks
from mrcnn_jax.modeling.checks import check_class_fields, check_model_config
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.modeling.resnet import BN_EPSILON
from mrcnn_jax.programs.evaluator import make_predict_step
from mrcnn_jax.train import checkpoint as ckpt_lib

# PIL modes `predictor(image)` converts to RGB with `image.convert("RGB")`: 1-bit, 8-bit grey,
# palette and colour modes (the alpha channel, where there is one, dropped).
PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


@dataclasses.dataclass(frozen=True)
class _Placed:
    """A `Predictor`'s variables on its devices, and the arrays they were placed from."""

    leaves: list  # jax.tree_util.tree_leaves(variables) when placed
    treedef: Any
    replicated: dict  # on every device of the mesh (predict_batch's)
    on_first_device: dict  # their copy on the mesh's first device (__call__'s), no new memory


@dataclasses.dataclass
class Predictor:
    """A model with its variables and config; call it on one image, or `predict_batch` on many
    (see the module docstring).

    `devices` are those `predict_batch` splits its batches over (default: this process's
    devices, `jax.local_devices()`); `__call__` runs on the first of them. The variables are
    placed on the devices once, at the first call of either, and again whenever `variables` or
    any array in it has been replaced (`predictor.variables["params"]["box_head"] = ...`), so
    both always use the current values. Numpy arrays in `variables` are made read-only when
    placed: an in-place write (`kernel[0] = x`, `kernel += x`), which the placed copies would
    not see, raises instead; assign a new array. A field of `config` changed between calls
    (`predictor.config.data.image_size`, `predictor.config.model.roi_heads.score_threshold`)
    applies from the next call (a changed `config.model` is built and compiled again); variables
    that do not fit the model it describes raise ValueError at the call.
    """

    config: ml_collections.ConfigDict
    variables: dict[str, Any]
    step: int
    devices: Sequence[jax.Device] | None = None

    def __post_init__(self):
        self._mesh = sharding.create_mesh(list(self.devices or jax.local_devices()))
        self._device = self._mesh.devices.flat[0]  # __call__'s
        self._placed: _Placed | None = None
        self._built: tuple[dict, Callable, Callable] | None = None
        self._programs()  # a config.model the model cannot be built from: ValueError here

    def _programs(self) -> tuple[Callable, Callable]:
        """The jitted single-image apply and sharded predict step of the model `config.model`
        describes now: built first here, and again after a field of it changed (set in a
        notebook: `predictor.config.model.roi_heads.detections_per_image = 5`)."""
        fields = self.config.model.to_dict()
        if self._built is None or self._built[0] != fields:
            model = MaskRCNN.from_config(self.config.model)
            self._built = (copy.deepcopy(fields), *_programs(model, self._mesh))
        return self._built[1], self._built[2]

    @property
    def class_names(self) -> list[str]:
        """The name of each label 0..K-1 (`config.data.class_names`; "0", "1", ... where the
        config has none)."""
        names = list(self.config.data.class_names)
        return names or [str(i) for i in range(self.config.model.num_classes)]

    @property
    def category_ids(self) -> np.ndarray:
        """`[K]` int64: the dataset's category id of each label 0..K-1
        (`config.data.label_to_category_id`, any integers; the labels where the config has
        none)."""
        ids = list(self.config.data.label_to_category_id) or range(self.config.model.num_classes)
        return np.asarray(ids, np.int64)

    @property
    def num_devices(self) -> int:
        """How many devices `predict_batch` splits a batch over; its batch size is a multiple."""
        return self._mesh.size

    @interrupts.handled_interrupts()
    @jax_settings.with_defaults
    def __call__(self, image: np.ndarray, score_threshold: float = 0.5) -> dict[str, Any]:
        """Detects objects in `image [H, W, 3]` uint8 RGB (H, W ≥ 1; grey `[H, W]`, `[H, W, 1]`
        and RGBA `[H, W, 4]` are converted, see the module docstring); keeps scores ≥
        `score_threshold`, in [0, 1], of the model's detections: at most
        `config.model.roi_heads.detections_per_image`, each scoring above its
        `roi_heads.score_threshold` (0.05), so a `score_threshold` at or below that adds none.
        One canvas, `config.data.image_size`, for every image (training's `data.canvas_groups`
        do not apply). Many images: `predict_batch`.

        Raises:
          ValueError: `image` is not one non-empty uint8 image of those shapes (a batch
            `[B, H, W, 3]` or a list of images: the message says to use `predict_batch`), or
            `score_threshold` is not in [0, 1].
        """
        score_threshold = _score_threshold(score_threshold)
        if isinstance(image, list | tuple) or np.ndim(image) == 4:
            got = f"list of {len(image)}" if isinstance(image, list | tuple) else np.shape(image)
            nested = isinstance(image, list | tuple) and image and isinstance(image[0], list)
            raise ValueError(
                f"predictor(image) takes one image [H, W, 3], got a batch of images ({got}): "
                "use predictor.predict_batch(images)"
                + ("; one image as nested lists: np.asarray(image, np.uint8)" if nested else "")
            )
        image = _as_rgb(image)
        inputs = pipeline.preprocess_image(image, self.config)
        batch = jax.device_put({k: v[None] for k, v in inputs.items()}, self._device)
        apply, _ = self._programs()
        with _variables_fitting_the_config():
            out = jax.device_get(apply(self._placed_variables().on_first_device, batch))
        return self._detections(
            {k: v[0] for k, v in out.items()}, inputs["image_size"], image, score_threshold
        )

    @interrupts.handled_interrupts()
    @jax_settings.with_defaults
    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        score_threshold: float = 0.5,
        batch_size: int | None = None,
    ) -> list[dict[str, Any]]:
        """`[self(image, score_threshold) for image in images]`, run `batch_size` images at a time
        data-parallel over `devices`.

        Each image is preprocessed alone (`pipeline.preprocess_image`, any size), the batches are
        split evenly over the devices, and the last one is padded with blank canvases whose
        detections are dropped, so every batch has one shape and the program compiles once per
        `batch_size`. The next batch is dispatched before the previous one's masks are pasted.

        Args:
          images: `[H_i, W_i, 3]` uint8 RGB arrays (H_i, W_i ≥ 1; grey and RGBA converted as
            by `__call__`), sizes may differ; or one `[B, H, W, 3]` array.
          score_threshold: keep detections scoring at least this, in [0, 1].
          batch_size: images per program run, a positive multiple of `num_devices` (default
            `num_devices`, one image per device).

        Returns:
          One dict per image, in order, as `__call__` returns (original image pixels).

        Raises:
          ValueError: `batch_size` is not a positive multiple of `num_devices`, `score_threshold`
            is not in [0, 1], `images` is one image (`[H, W, 3]`) rather than several, or an
            image is not one `__call__` takes.
        """
        score_threshold = _score_threshold(score_threshold)
        try:  # numpy, JAX, torch, TF: [H, W, 3] (or grey [H, W]) is one image
            rank = len(images.shape)
        except (AttributeError, TypeError, ValueError):  # no shape, or not a sized one
            rank = None
        if rank in (2, 3) or (isinstance(images, np.ndarray | jax.Array) and rank != 4):
            raise ValueError(
                f"predict_batch(images) takes a sequence of images or a [B, H, W, 3] array, got "
                f"an array {tuple(images.shape)}: use predictor(image) or predict_batch([image])"
            )
        if isinstance(images, str | bytes | os.PathLike):
            raise ValueError(f"predict_batch(images) takes images, got {_not_pixels(images)}")
        if isinstance(images, Mapping) or not isinstance(images, Iterable):
            hint = ": pass list(images.values())" if isinstance(images, Mapping) else ""
            if _is_pil(images):
                hint = ": one image? predictor(image) or predict_batch([image])"
            raise ValueError(
                "predict_batch(images) takes a sequence of images or a [B, H, W, 3] array, got "
                f"a {type(images).__name__}{hint}"
            )
        if not isinstance(images, np.ndarray | jax.Array):
            images = list(images)  # a generator, a tuple
        batch_size = self.num_devices if batch_size is None else batch_size
        if not pipeline.is_int(batch_size) or batch_size < 1 or batch_size % self.num_devices:
            raise ValueError(
                f"batch_size={batch_size!r} must be a positive multiple of the "
                f"{self.num_devices} devices"
            )
        variables = self._placed_variables().replicated
        _, sharded_apply = self._programs()
        results: list[dict[str, Any]] = []
        pending = None  # (device outputs, inputs, images) of the batch in flight
        for start in range(0, len(images), batch_size):
            chunk = [
                _batch_image(images, i) for i in range(start, min(start + batch_size, len(images)))
            ]
            inputs = [pipeline.preprocess_image(image, self.config) for image in chunk]
            batch = _stack_padded(inputs, batch_size, tuple(self.config.data.image_size))
            with _variables_fitting_the_config():
                outputs = sharded_apply(variables, sharding.shard_batch(batch, self._mesh))
            if pending is not None:
                results += self._batch_detections(*pending, score_threshold)
            pending = (outputs, inputs, chunk)
        if pending is not None:
            results += self._batch_detections(*pending, score_threshold)
        return results

    def _placed_variables(self) -> _Placed:
        """`variables` on the devices: placed at the first call, and again when `variables` or
        one of its arrays is not the object placed last (compared by identity, the placed
        objects kept so that their ids are not reused)."""
        leaves, treedef = jax.tree_util.tree_flatten(self.variables)
        placed = self._placed
        if (
            placed is None
            or placed.treedef != treedef
            or any(new is not old for new, old in zip(leaves, placed.leaves, strict=True))
        ):
            for leaf in leaves:
                if isinstance(leaf, np.ndarray):
                    leaf.flags.writeable = False  # in-place writes would not reach the copies
            replicated = sharding.replicate(self.variables, self._mesh)
            on_first_device = jax.tree_util.tree_map(
                lambda x: next(s.data for s in x.addressable_shards if s.device == self._device),
                replicated,
            )
            self._placed = placed = _Placed(leaves, treedef, replicated, on_first_device)
        return placed

    def _batch_detections(
        self, outputs: dict, inputs: list[dict], images: list[np.ndarray], score_threshold: float
    ) -> list[dict[str, Any]]:
        """The detections of the real (not padding) rows of one batch's model outputs."""
        outputs = jax.device_get(outputs)
        return [
            self._detections(
                {k: v[i] for k, v in outputs.items()}, x["image_size"], image, score_threshold
            )
            for i, (x, image) in enumerate(zip(inputs, images))
        ]

    def _detections(
        self, out: dict, image_size: np.ndarray, image: np.ndarray, threshold: float
    ) -> dict[str, Any]:
        """One image's model outputs (`[D, ...]`, see docs/CONTRACTS.md) as `__call__`'s result:
        valid detections scoring ≥ `threshold`, boxes and pasted masks in the pixels of `image`
        (the original), which the model saw resized to `image_size` [2] (height, width)."""
        keep = out["valid"] & (out["scores"] >= threshold)
        height, width = np.shape(image)[:2]
        # torchvision's postprocess: x * W / resized_w, y * H / resized_h.
        boxes = boxes_to_original(out["boxes"][keep], image_size, (height, width))
        masks = paste_masks(
            out["masks"][keep],
            boxes,
            (height, width),
            method=self.config.model.roi_heads.mask_paste,
        )
        boxes = np.clip(boxes, 0, np.asarray([width, height, width, height], np.float32))
        classes = out["classes"][keep]
        return {
            "boxes": boxes.astype(np.float32, copy=False),
            "scores": out["scores"][keep],
            "classes": classes,
            "category_ids": self.category_ids[classes],
            "class_names": [self.class_names[c] for c in classes],
            "masks": masks,
        }


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """`image` as `[H, W, 3]` uint8 RGB: grey `[H, W]` or `[H, W, 1]` repeated into three
    channels, RGBA `[H, W, 4]` without its alpha channel (as `visualize.read_image` reads such
    files). A PIL image of an 8-bit mode (`PIL_MODES`: palette, CMYK, YCbCr, grey, ...) is
    converted to RGB by PIL (`np.asarray` alone would read a palette image's indices as grey
    and CMYK as RGBA).

    Raises:
      ValueError: `image` is not uint8 of one of those shapes with H, W ≥ 1, is a PIL image
        of another mode (16-bit, float: convert it yourself), or is a file name.
    """
    if isinstance(image, str | bytes | os.PathLike):
        raise ValueError(f"image is {_not_pixels(image)}")
    if _is_pil(image):
        if image.mode not in PIL_MODES:
            hint = " (16-bit grey: np.asarray(image) >> 8 as uint8)" if "16" in image.mode else ""
            raise ValueError(
                f"image is a PIL image of mode {image.mode!r}: convert it to one of "
                f"{PIL_MODES} (8-bit), e.g. image.convert('RGB') after scaling its values to "
                f"0-255{hint}"
            )
        image = image.convert("RGB")
    given = type(image).__name__
    try:
        image = np.asarray(image)
    except (TypeError, RuntimeError) as error:  # e.g. torch: bfloat16, requires_grad
        raise ValueError(
            f"image ({given}) cannot be read as a numpy array ({error}): pass a uint8 numpy "
            "array, e.g. tensor.detach().cpu().numpy()"
        ) from None
    if image.dtype == object:  # None, a dict
        raise ValueError(f"image must be an RGB uint8 array [H, W, 3], got a {given}")
    if image.dtype != np.uint8 or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))
    ):
        raise ValueError(
            f"image must be an RGB uint8 array [H, W, 3] (or grey [H, W], [H, W, 1], RGBA "
            f"[H, W, 4]), got {image.dtype} {image.shape}{_conversion_hint(image)}"
        )
    if not image.shape[0] or not image.shape[1]:
        raise ValueError(f"image must be at least 1x1 pixels [H, W, 3], got {image.shape}")
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    return image[..., :3]


def _is_pil(image: Any) -> bool:
    """Whether `image` is a PIL image (told by its attributes: PIL is not imported here)."""
    return isinstance(getattr(image, "mode", None), str) and callable(
        getattr(image, "convert", None)
    )


def _not_pixels(given: str | bytes | os.PathLike) -> str:
    """What `given`, taken for an image, is instead, and what to do: a file name, or the bytes
    of an encoded image file (`requests.get(url).content`); shown at most 100 characters long."""
    if isinstance(given, bytes) and (size := image_headers.declared_size(given)):
        height, width = size
        return (
            f"the {len(given):,} bytes of an encoded image file ({height}x{width}), not its "
            "pixels: decode them first, e.g. np.asarray(PIL.Image.open(io.BytesIO(data))"
            ".convert('RGB'))"
        )
    name = repr(os.fspath(given))
    name = name if len(name) <= 100 else f"{name[:97]}..."
    return (
        f"a file name ({name}), not its pixels: read it first, e.g. with "
        "mrcnn_jax.evaluation.visualize.read_image(path)"
    )


def _conversion_hint(image: np.ndarray) -> str:
    """How to turn `image`, refused by `_as_rgb`, into uint8 `[H, W, 3]`, for the common
    layouts of other libraries (torch's channels-first floats in [0, 1], floats in [0, 255] from
    arithmetic on pixels, 16-bit files, grey+alpha), or ""."""
    if image.ndim not in (2, 3):
        return ""
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        return ": channels first? image.transpose(1, 2, 0) puts them last"
    if image.ndim == 3 and image.shape[-1] == 2 and image.dtype == np.uint8:
        return ": grey+alpha? image[..., 0] is the grey image"
    if np.issubdtype(image.dtype, np.floating):
        finite = image[np.isfinite(image)]
        if finite.size and finite.min() >= 0 and finite.max() <= 1:
            return ": floats in [0, 1]? (image * 255).round().astype(np.uint8) gives 8-bit pixels"
        return (
            ": floats in [0, 255]? image.round().clip(0, 255).astype(np.uint8) gives 8-bit pixels"
        )
    if image.dtype == np.uint16:
        return ": 16 bits? (image >> 8).astype(np.uint8) gives 8-bit pixels"
    integers = np.issubdtype(image.dtype, np.integer) and image.dtype != np.uint8 and image.size
    if integers and image.min() >= 0 and image.max() <= 255:
        return ": integers in [0, 255]? image.astype(np.uint8) gives 8-bit pixels"
    return ""


def _batch_image(images: Sequence[np.ndarray], index: int) -> np.ndarray:
    """`_as_rgb(images[index])`, its ValueError naming the index (`images[7]: ...`)."""
    try:
        return _as_rgb(images[index])
    except ValueError as error:
        raise ValueError(f"images[{index}]: {error}") from None


@functools.lru_cache(maxsize=8)
def _programs(model: MaskRCNN, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
    """`model`'s jitted single-image apply and its predict step sharded over `mesh`, shared by
    the predictors of equal models (a checkpoint loaded again, one of another step), so that a
    process compiles each once: every `load_checkpoint` compiled them anew (4-8 s a reload).
    Those of the last 8 (model, mesh) pairs stay compiled, with their devices, after their
    predictors are gone."""
    return jax.jit(functools.partial(_apply, model)), make_predict_step(model, mesh)


def _apply(model: MaskRCNN, variables: dict, batch: dict) -> dict[str, jax.Array]:
    return model.apply(variables, batch, train=False)


@contextlib.contextmanager
def _variables_fitting_the_config() -> Iterator[None]:
    """Flax's errors for variables of another model (`Predictor(config, variables)` of two
    checkpoints, a `config.model` field changed) as one ValueError naming both sides."""
    try:
        yield
    except (ScopeParamShapeError, ScopeParamNotFoundError, ScopeCollectionNotFound) as error:
        raise ValueError(
            "predictor.variables do not fit the model predictor.config.model describes: "
            f"{str(error).splitlines()[0]}"
        ) from None


def _score_threshold(score_threshold: float) -> float:
    """`score_threshold` as a float: a Python, numpy, JAX or torch number (a 0-d array of
    integer or float dtype); ValueError unless it is one in [0, 1] (NaN is not, nor a bool or
    a string)."""
    try:
        array = np.asarray(score_threshold)
    except Exception:  # e.g. a tensor on an accelerator: not a number here
        array = np.asarray(None)
    if array.ndim or array.dtype.kind not in "fiu" or not 0.0 <= float(array) <= 1.0:
        raise ValueError(f"score_threshold={score_threshold!r} must be a number in [0, 1]")
    return float(array)


def _stack_padded(
    inputs: list[dict[str, np.ndarray]], batch_size: int, canvas: tuple[int, int]
) -> dict[str, np.ndarray]:
    """`inputs` stacked into `{"image" [batch_size, Ht, Wt, 3], "image_size" [batch_size, 2]}`,
    the rows after them blank canvases (zeros, the whole canvas as content)."""
    blank = {
        "image": np.zeros((*canvas, 3), np.float32),
        "image_size": np.asarray(canvas, np.int32),
    }
    rows = inputs + [blank] * (batch_size - len(inputs))
    return {k: np.stack([row[k] for row in rows]) for k in ("image", "image_size")}


def _locate(path: epath.Path) -> tuple[epath.Path, int | None]:
    """(workdir, step) for a workdir, its `checkpoints/` directory, or one `checkpoints/<step>`."""
    if (path / "checkpoints").is_dir():
        return path, None
    if path.name == "checkpoints" and path.is_dir():
        return path.parent, None
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if reason := paths.unreachable(path):  # is_dir() said no for it
        raise FileNotFoundError(f"cannot reach {path}: {reason}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (a workdir holding checkpoints/)")
    hint = ""
    if path.is_dir() and not ckpt_lib.missing_parts(path):  # a step folder moved or copied out
        step = path.name if path.name.isdigit() else "<step>"
        raise FileNotFoundError(
            f"{path} is a checkpoint's step folder outside a workdir: a checkpoint is read as "
            f"<workdir>/checkpoints/<step>, e.g. mkdir -p W/checkpoints && cp -r {path} "
            f"W/checkpoints/{step}, then load W"
        )
    if path.suffix in (".pth", ".pt") and path.is_file():
        hint = (
            ": a PyTorch file? torchvision Mask R-CNN weights convert into a workdir with "
            f"scripts/convert_torchvision.py --state_dict={path} --out=DIR"
        )
    raise FileNotFoundError(
        f"{path} is neither a workdir with checkpoints/ nor a checkpoints/<step> directory{hint}"
    )


def _check_tree(restored, expected, what: str, dtypes: bool = True) -> None:
    """Raises ValueError naming the first leaf whose path, shape or dtype (with `dtypes`)
    differs; `restored`'s leaves are arrays or their stored metadata (`.shape`, `.dtype`)."""
    got = {
        jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
        for p, x in jax.tree_util.tree_leaves_with_path(restored)
    }
    want = {
        jax.tree_util.keystr(p): (tuple(x.shape), np.dtype(x.dtype))
        for p, x in jax.tree_util.tree_leaves_with_path(expected)
    }
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, (shape, dtype) in want.items():
        got_shape, got_dtype = got[name]
        if got_shape != shape:
            raise ValueError(f"{what}: {name} has shape {got_shape}, the config needs {shape}")
        if dtypes and got_dtype != dtype:
            raise ValueError(f"{what}: {name} has dtype {got_dtype}, the config needs {dtype}")


def _check_finite(variables: dict, what: str) -> None:
    """Raises ValueError naming the first variable with a NaN or infinite value, or a BatchNorm
    variance whose denominator `var + BN_EPSILON` is negative (converted weights may hold down
    to -BN_EPSILON): a diverged run's or a corrupt file's weights give no detection and no
    error otherwise."""
    for path, x in jax.tree_util.tree_leaves_with_path(variables):
        name = jax.tree_util.keystr(path)
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise ValueError(f"{what}: {name} has {bad} NaN or infinite values of {np.size(x)}")
        if name.endswith("['var']") and np.any(np.asarray(x) + BN_EPSILON < 0):
            raise ValueError(
                f"{what}: {name} has values below -{BN_EPSILON} (a BatchNorm variance: "
                f"var + {BN_EPSILON} must not be negative)"
            )


def check_loadable_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError, naming the field, unless a checkpoint stored with `config` can be
    loaded (`load_checkpoint` checks the same of the stored config): the model's values
    (`checks.check_model_config`), the canvas (`pipeline.check_canvas`) and one entry per class
    in `config.data.class_names` and `label_to_category_id` (`checks.check_class_fields`: the
    predictor would name the classes wrongly)."""
    check_model_config(config.model)
    pipeline.check_canvas(config)
    check_class_fields(config)


def _check_stored_config(config: ml_collections.ConfigDict, what: str) -> tuple[int, int]:
    """The canvas `data.image_size` of a checkpoint's stored config, once it passes
    `check_loadable_config`; ValueError naming `what` otherwise (also for a config that
    lacks a field or has one of another type: not a config of this project)."""
    try:
        check_loadable_config(config)
        return tuple(int(s) for s in config.data.image_size)
    except (KeyError, AttributeError, TypeError) as error:
        detail = (str(error.args[0] if error.args else error).splitlines() or [""])[0]
        raise ValueError(
            f"{what}: its stored config is not a config of this project ({type(error).__name__}: "
            f"{detail})"
        ) from None
    except ValueError as error:
        raise ValueError(f"{what}: its stored config: {error}") from None


def _check_step(step: Any) -> int:
    """`step` as an int: ints and integer-like objects (`operator.index`, e.g. `np.int64`).

    Raises:
      TypeError: anything else (a string such as "400", a float, a bool), naming its type.
    """
    if not isinstance(step, bool):
        try:
            return operator.index(step)
        except TypeError:
            pass
    raise TypeError(f"step must be an int, got {type(step).__name__} {step!r}")


def _open(path: str | epath.PathLike, step: int | None):
    """(read-only checkpoint manager, workdir, step, whether that is the latest complete step
    because neither `step` nor `path` names one) of `locate_checkpoint(path, step)`."""
    step = None if step is None else _check_step(step)
    if not os.fspath(path):  # epath.Path("") is the current folder
        raise ValueError(
            "the checkpoint path is empty: give a workdir, its checkpoints/ folder or one "
            "checkpoints/<step> folder"
        )
    workdir, path_step = _locate(epath.Path(paths.absolute(path)))
    asked = step if step is not None else path_step
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    try:  # the latest complete step (incomplete folders skipped, with a warning), or a check
        step = ckpt_lib.choose_step(manager, asked)
    except FileNotFoundError:
        manager.close()
        raise
    return manager, workdir, step, asked is None


def locate_checkpoint(
    path: str | epath.PathLike, step: int | None = None
) -> tuple[epath.Path, int]:
    """(workdir, step) of the checkpoint that `load_checkpoint(path, step)` loads; loads nothing.

    The workdir is the training workdir holding `checkpoints/`, also when `path` is its
    `checkpoints/` directory or one `checkpoints/<step>` directory. Without a step (in `step` or
    `path`) it is the latest complete checkpoint: later step folders that are not complete
    checkpoints (e.g. an interrupted copy, `checkpoint.missing_parts`) are skipped with a
    warning naming them.

    Raises:
      FileNotFoundError: no complete checkpoint there, or the step asked for is not one (the
        message names its folder, what it lacks and the complete steps).
      TypeError: `step` is not an integer.
    """
    manager, workdir, step, _ = _open(path, step)
    manager.close()
    return workdir, step


@interrupts.handled_interrupts()
@jax_settings.with_defaults
def read_checkpoint(
    path: str | epath.PathLike, step: int | None = None
) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
    """(config, variables, step) of the checkpoint that `load_checkpoint(path, step)` loads:
    `variables` holds `params` and `batch_stats` as numpy arrays, checked to fit the stored
    config's model (every path, shape and dtype); arguments and errors as `load_checkpoint`'s.

    A training running in the workdir deletes its older checkpoints (`train.keep_checkpoints`),
    also while one is read: a read that fails because its checkpoint's folder is gone, or no
    longer complete, is that; a read of the latest then reads the new latest (up to `_READS`
    times in all), and either raises FileNotFoundError saying so."""
    for attempt in range(1, _READS + 1):
        manager, _, chosen, latest = _open(path, step)
        folder = ckpt_lib.step_dir(manager, chosen)
        try:
            return _read_variables(manager, chosen)
        except Exception:
            if not _deleted(folder):
                raise
            if latest and attempt < _READS:
                logging.warning(
                    "checkpoint %s was deleted while it was read (a training running in that "
                    "workdir keeps only its newest checkpoints): reading the latest again",
                    folder,
                )
                continue
            again = f", {_READS} times" if latest else ""
            raise FileNotFoundError(
                f"checkpoint {folder} was deleted while it was read{again}: a training running "
                "in that workdir keeps only its newest train.keep_checkpoints checkpoints; read "
                "the latest, or a step it keeps"
            ) from None
        finally:
            manager.close()


_READS = 3


def _deleted(folder: epath.Path) -> bool:
    """Whether the checkpoint `folder`, whose read just failed, is gone or no longer complete (a
    training deleting it; its files go first), after a moment for a deletion in progress. A
    complete folder that cannot be read is damaged, not deleted."""
    time.sleep(_DELETION_SECONDS)
    return not folder.exists() or bool(ckpt_lib.missing_parts(folder))


_DELETION_SECONDS = 0.5


def _read_variables(
    manager: ocp.CheckpointManager, step: int
) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
    """`read_checkpoint`'s (config, variables, step) of checkpoint `step` of `manager`."""
    what = f"checkpoint {manager.directory}/{step}"
    config = ml_collections.ConfigDict(ckpt_lib.load_config(manager, step))
    image_size = _check_stored_config(config, what)
    expected = MaskRCNN.from_config(config.model).variable_shapes(image_size)

    def check(stored: dict, dtypes: bool = True) -> None:
        for collection in ("params", "batch_stats"):
            _check_tree(
                stored.get(collection) or {},
                expected.get(collection, {}),
                f"{what} {collection}",
                dtypes,
            )

    state = ckpt_lib.restore_raw(  # shapes checked before the data is read
        manager, step, check_stored=lambda metadata: check(metadata, dtypes=False)
    )
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    check(variables)
    _check_finite(variables, what)
    return config, variables, step


@interrupts.handled_interrupts()
@jax_settings.with_defaults
def load_checkpoint(path: str | epath.PathLike, step: int | None = None) -> Predictor:
    """Loads the model, variables and config of a checkpoint for inference.

    Args:
      path: a training workdir (the latest complete checkpoint is used), its `checkpoints/`
        directory, or one `checkpoints/<step>` directory (`locate_checkpoint` says which
        workdir and step); a local path has `~` expanded, a relative one is taken from the
        current folder.
      step: a specific step (overrides the one in `path`): an int (or integer-like, e.g.
        `np.int64`).

    Raises:
      FileNotFoundError: no complete checkpoint there, or the step asked for is not one (its
        folder lacks files, e.g. after an interrupted copy: the message names them and the
        complete steps), or a training running in the workdir deleted it while it was read
        (the latest: three times in a row; `read_checkpoint`); for a URL, also when its
        storage does not answer ("cannot reach gs://...: <the storage's reason>").
      TypeError: `step` is not an integer (e.g. the string "400").
      ValueError: the stored parameters do not fit the stored config (a variable's path, shape
        or dtype differs from the model's); `ckpt_lib.CorruptCheckpointError`, a ValueError:
        its files are damaged (the message names the step folder or file); `path` is a URL of
        a scheme etils.epath cannot open (`ram://`) or `gs:/` with one slash, or empty.
    """
    config, variables, step = read_checkpoint(path, step)
    return Predictor(config=config, variables=variables, step=step)
