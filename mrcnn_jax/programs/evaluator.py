"""The evaluation program: the sharded inference step, run over a dataset split and scored with
COCOeval (bbox and segm)."""

import threading
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import numpy.typing as npt
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from pycocotools.coco import COCO
from tqdm import tqdm

from mrcnn_jax.data import coco_json, pipeline, schema
from mrcnn_jax.evaluation.coco_eval import CocoEvaluator, pycocotools_output
from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
from mrcnn_jax.sharding import AXIS, shard_batch
from mrcnn_jax.train.state import TrainState
from mrcnn_jax.train.transfer import class_sources, plain_name

MODEL_INPUTS = ("image", "image_size")
# What CocoEvaluator needs to map boxes back: image_size (resized) and orig_size give the ratios.
BATCH_METADATA = ("image_id", "image_size", "orig_size", "valid")


def make_predict_step(model: MaskRCNN, mesh: Mesh) -> Callable[[dict, dict], dict[str, jax.Array]]:
    """Builds `predict_step(variables, batch) -> detections` (see `MaskRCNN.__call__`), sharded
    over the mesh like the train step; `variables` replicated, outputs keep the batch sharding."""

    def per_replica(variables, batch):
        return model.apply(variables, batch, train=False)

    step = jax.shard_map(
        per_replica, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False
    )
    return jax.jit(step)


def coco_from_dict(dataset: dict) -> COCO:
    """A pycocotools `COCO` index over a ground-truth dict (images, annotations, categories)."""
    coco = COCO()
    coco.dataset = dataset
    with pycocotools_output():
        coco.createIndex()
    return coco


def check_dataset_classes(
    config: ml_collections.ConfigDict,
    builder: tfds.core.DatasetBuilder,
    strict_names: bool = False,
    annotated_ids: Callable[[], set[int]] | None = None,
) -> None:
    """Raises ValueError unless the model can be scored on the dataset's categories.

    The ground truth is scored under the dataset's category ids, the detections under
    `data.label_to_category_id` (label l -> category id; empty: the dataset's own, label by
    label). Every dataset category must be one the model predicts (a model may predict more:
    torchvision's 90 labels on COCO's 80 categories), and with empty ids `model.num_classes`
    must be the dataset's count; otherwise the metrics would be wrong without a word, as after
    a dataset rebuilt from an edited annotation file. Names that differ for the same id (case,
    `_` and spaces aside, `transfer.plain_name`) only warn: a config may name its classes its
    own way; with `strict_names` (another annotation file given for evaluation) a dataset
    none of whose names is the model's for the same id is refused. A dataset category named as
    the model names another id is refused (ids permuted, e.g. another export of the same labels).
    With `annotated_ids` (the category ids the evaluated annotations use, asked for only then),
    categories the model does not predict that no annotation uses only warn: they cannot
    change COCO's numbers (a json listing every label of a project).
    """
    names = schema.class_names(builder.info)
    ids = schema.label_to_category_id(builder.info).tolist()
    where = f"dataset {builder.info.full_name} in {builder.data_dir}"
    model_ids = list(config.data.label_to_category_id)
    if not model_ids:
        if config.model.num_classes != len(names):
            raise ValueError(
                f"the model has {config.model.num_classes} classes but {where} has {len(names)} "
                f"({names[:8]}) and config.data.label_to_category_id is empty"
            )
        model_ids = ids  # scored label by label
    model_names = dict(zip(model_ids, config.data.class_names or (), strict=False))
    named_ids = list(model_names)  # the model's class of each dataset class, by name
    sources = class_sources(names, list(model_names.values()), len(names), len(named_ids))
    moved = [
        (n, i, named_ids[k])
        for i, n, k in zip(ids, names, sources, strict=True)
        if model_names and k is not None and named_ids[k] != i
    ]
    if moved:
        raise ValueError(
            f"{where} has the model's classes under other ids (name, dataset's id, model's id): "
            f"{moved[:8]}: each would be scored against another class's detections; give its "
            "categories the model's ids"
        )
    missing = [(i, n) for i, n in zip(ids, names, strict=True) if i not in model_ids]
    if missing and annotated_ids:
        used = annotated_ids()
        unused = [(i, n) for i, n in missing if i not in used]
        if unused:
            logging.warning(
                "%s has categories the model does not predict, which no annotation uses (not "
                "scored): %s (id, name)",
                where,
                unused[:8],
            )
        missing = [(i, n) for i, n in missing if i in used]
    if missing:
        raise ValueError(
            f"{where} has categories the model does not predict: {missing[:8]} (id, name) are "
            f"not in config.data.label_to_category_id={model_ids[:16]}; was the dataset rebuilt "
            "from another annotation file after training?"
        )
    named = [(i, model_names[i], n) for i, n in zip(ids, names, strict=True) if i in model_names]
    renamed = [(i, mine, n) for i, mine, n in named if plain_name(mine) != plain_name(n)]
    if strict_names and renamed and len(renamed) == len(named):
        raise ValueError(
            f"no category of {where} has the model's name for its id (id, model's, "
            f"dataset's): {renamed[:8]}: its ids mean other classes than the model's"
        )
    if renamed:
        logging.warning(
            "%d categories of %s have other names in the config (id, config, dataset): %s; "
            "they are scored by id",
            len(renamed),
            where,
            renamed[:8],
        )


class EvaluationStopped(Exception):
    """`evaluate_split`'s `stop` event was set (SIGTERM during a training run's evaluation)."""


def evaluate_split(
    predict_step: Callable,
    variables: dict,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    builder: tfds.core.DatasetBuilder,
    split: str | None = None,
    results_path: str | None = None,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> dict[str, float]:
    """COCO bbox and segm metrics of the model on `split` (default `config.data.val_split`).

    Every process feeds its shard; predictions and batch metadata are gathered to every host and
    scored there (the same numbers everywhere). `config.eval.max_images > 0` limits the images.
    The batch is `eval_batch_size(config, mesh.size)`. Check the config against the dataset
    first, once (`check_dataset_classes`: the trainer before training, eval.py before
    evaluating), not at every call.

    `stop` (one process: the trainer's SIGTERM event) is checked before each batch and before
    the scoring. `results_path`: process 0 writes the detections there (COCO results json)
    once they are scored, so an interrupted scoring leaves no results without metrics.

    Returns:
      `{"bbox/AP": ..., ..., "segm/ARl": ...}`: the 12 COCOeval numbers per IoU type, 0–1 scale.

    Raises:
      EvaluationStopped: `stop` was set (a preemption's grace period is shorter than a COCO
        evaluation).
    """
    split = split or config.data.val_split
    batch_size = eval_batch_size(config, mesh.size)
    if batch_size != config.eval.batch_size:
        config = ml_collections.ConfigDict(config.to_dict())
        config.eval.batch_size = batch_size
    category_ids = (
        config.data.label_to_category_id or schema.label_to_category_id(builder.info).tolist()
    )
    evaluator = CocoEvaluator(
        dict(enumerate(category_ids)), mask_paste=config.model.roi_heads.mask_paste
    )
    batches = pipeline.create_eval_dataset(config, builder=builder, split=split)
    evaluated = pipeline.eval_split(config, builder, split)
    show = progress and jax.process_index() == 0
    bar = tqdm(
        total=builder.info.splits[evaluated].num_examples,
        desc=f"eval {split}",
        unit="img",
        disable=not show,
        leave=False,
    )
    with bar:
        for batch in batches:
            if stop is not None and stop.is_set():
                raise EvaluationStopped
            inputs = shard_batch({k: batch[k] for k in MODEL_INPUTS}, mesh)
            batch["image_id"] = image_id_parts(batch["image_id"])
            metadata = shard_batch({k: batch[k] for k in BATCH_METADATA}, mesh)
            outputs = predict_step(variables, inputs)
            outputs, metadata = multihost_utils.process_allgather((outputs, metadata), tiled=True)
            image_ids = image_id_of(metadata["image_id"])
            evaluator.add_batch({**metadata, "image_id": image_ids}, outputs)
            bar.update(int(np.count_nonzero(metadata["valid"])))  # padding rows aside
    if stop is not None and stop.is_set():  # before the scoring too (a minute on COCO)
        raise EvaluationStopped
    ground_truth = coco_json.coco_ground_truth(builder, evaluated)
    with pycocotools_output():  # its tables
        metrics = evaluator.evaluate(coco_from_dict(ground_truth))
    if results_path and jax.process_index() == 0:  # after the scoring, which Ctrl-C may stop
        evaluator.write_results(results_path)
    return metrics


def eval_batch_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """`config.eval.batch_size` rounded up to a multiple of `num_devices`, so that any number of
    devices evaluates any config (rows that pad a batch are skipped: the metrics do not change).

    Raises:
      ValueError: `config.eval.batch_size` is not positive.
    """
    batch_size = config.eval.batch_size
    if batch_size < 1:
        raise ValueError(f"config.eval.batch_size={batch_size} must be at least 1")
    return -(-batch_size // num_devices) * num_devices


def image_id_parts(image_id: np.ndarray) -> np.ndarray:
    """`[B]` int64 image ids as `[B, 2]` int32 `(id >> 31, id & (2**31 - 1))`: JAX gathers them
    across hosts without 64-bit types, and ids of 2**31 or more (e.g. dates) stay whole.

    Raises:
      ValueError: for an id of magnitude 2**62 or more, naming it.
    """
    image_id = np.asarray(image_id, np.int64)
    high, low = image_id >> 31, image_id & (2**31 - 1)
    too_large = image_id[(image_id < -schema.IMAGE_ID_LIMIT) | (image_id >= schema.IMAGE_ID_LIMIT)]
    if too_large.size:
        raise ValueError(f"image ids must be below 2**62 in magnitude, got {too_large.tolist()}")
    return np.stack([high, low], axis=-1).astype(np.int32)


def image_id_of(parts: npt.ArrayLike) -> np.ndarray:
    """The `[B]` int64 image ids of `image_id_parts`' `[B, 2]`."""
    parts = np.asarray(parts, np.int64)
    return (parts[..., 0] << 31) + parts[..., 1]


def variables_of(state: TrainState) -> dict:
    """The `{"params", "batch_stats"}` a model needs for inference, from a train state."""
    return {"params": state.params, "batch_stats": state.batch_stats}


def metrics_summary(metrics: dict[str, float]) -> str:
    """One line with the headline numbers, e.g. `bbox AP 0.612 | segm AP 0.583`."""
    parts = [f"{t} AP {metrics[f'{t}/AP']:.3f}" for t in ("bbox", "segm") if f"{t}/AP" in metrics]
    return " | ".join(parts)
