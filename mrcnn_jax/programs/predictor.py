"""Notebook-friendly inference from a checkpoint:

    import mrcnn_jax
    predictor = mrcnn_jax.load_checkpoint("/tmp/shapes")  # a workdir or a checkpoint directory
    result = predictor(image)  # image: [H, W, 3] uint8 RGB numpy array

`result` holds the detections in ORIGINAL image pixels: `boxes [N, 4]` (x1, y1, x2, y2),
`scores [N]`, `classes [N]` (contiguous labels), `class_names` (N strings), `masks [N, H, W]` bool.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mrcnn_jax.data import pipeline
from mrcnn_jax.evaluation.coco_eval import boxes_to_original
from mrcnn_jax.evaluation.masks import paste_masks
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.train import checkpoint as ckpt_lib


@dataclasses.dataclass
class Predictor:
    """A model with its variables and config; call it on one image (see the module docstring)."""

    config: ml_collections.ConfigDict
    variables: dict[str, Any]
    step: int

    def __post_init__(self):
        model = MaskRCNN.from_config(self.config.model)
        self._apply = jax.jit(lambda v, b: model.apply(v, b, train=False))

    @property
    def class_names(self) -> list[str]:
        names = list(self.config.data.class_names)
        return names or [str(i) for i in range(self.config.model.num_classes)]

    def __call__(self, image: np.ndarray, score_threshold: float = 0.5) -> dict[str, Any]:
        """Detects objects in `image [H, W, 3]` uint8 RGB; keeps scores ≥ `score_threshold`."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"image must be an RGB uint8 array [H, W, 3], got {image.dtype} {image.shape}"
            )
        inputs = pipeline.preprocess_image(image, self.config)
        out = jax.device_get(
            self._apply(
                self.variables, jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], inputs)
            )
        )
        out = {k: v[0] for k, v in out.items()}
        keep = out["valid"] & (out["scores"] >= score_threshold)
        height, width = image.shape[:2]
        # torchvision's postprocess: x * W / resized_w, y * H / resized_h.
        boxes = boxes_to_original(out["boxes"][keep], inputs["image_size"], (height, width))
        masks = paste_masks(
            out["masks"][keep],
            boxes,
            (height, width),
            method=self.config.model.roi_heads.mask_paste,
        )
        boxes = np.clip(boxes, 0, [width, height, width, height])
        classes = out["classes"][keep]
        return {
            "boxes": boxes,
            "scores": out["scores"][keep],
            "classes": classes,
            "class_names": [self.class_names[c] for c in classes],
            "masks": masks,
        }


def _locate(path: epath.Path) -> tuple[epath.Path, int | None]:
    """(workdir, step) for a workdir, its `checkpoints/` directory, or one `checkpoints/<step>`."""
    if (path / "checkpoints").is_dir():
        return path, None
    if path.name == "checkpoints" and path.is_dir():
        return path.parent, None
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(
        f"{path} is neither a workdir with checkpoints/ nor a checkpoints/<step> directory"
    )


def _check_tree(restored, expected, what: str) -> None:
    """Raises ValueError naming the first leaf whose path or shape differs."""
    got = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path(restored)
    }
    want = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(expected)
    }
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"{what}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(f"{what}: {name} has shape {got[name]}, the config needs {shape}")


def load_checkpoint(path: str | epath.PathLike, step: int | None = None) -> Predictor:
    """Loads the model, variables and config of a checkpoint for inference.

    Args:
      path: a training workdir (the latest checkpoint is used), its `checkpoints/` directory, or
        one `checkpoints/<step>` directory.
      step: a specific step (overrides the one in `path`).

    Raises:
      FileNotFoundError: no complete checkpoint there.
      ValueError: the stored parameters do not fit the stored config.
    """
    workdir, path_step = _locate(epath.Path(path))
    manager = ckpt_lib.create_manager(workdir, read_only=True)
    step = step if step is not None else path_step
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"no complete checkpoint{'' if step is None else f' {step}'} in "
            f"{manager.directory} (found steps {manager.all_steps()})"
        )
    config = ml_collections.ConfigDict(ckpt_lib.load_config(manager, step))
    state = ckpt_lib.restore_raw(manager, step)
    expected = MaskRCNN.from_config(config.model).variable_shapes(tuple(config.data.image_size))
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    for collection in ("params", "batch_stats"):
        _check_tree(
            variables[collection],
            expected.get(collection, {}),
            f"checkpoint {manager.directory}/{step} {collection}",
        )
    manager.close()
    return Predictor(config=config, variables=variables, step=step)
