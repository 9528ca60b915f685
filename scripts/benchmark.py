"""Benchmarks, one subcommand each; every run prints one JSON line.

    python scripts/benchmark.py roi_align [--repeats 5] [--methods gather einsum] [--backward]
    python scripts/benchmark.py nms [--repeats 5] [--num-boxes 1000 4000]
    python scripts/benchmark.py train [--sizes 512x512 832x1344] [--batch-size 2]
    python scripts/benchmark.py infer [--sizes 512x512 832x1344] [--batch-size 2]

Times are the median wall-clock seconds over `--repeats` calls after `--warmup` calls (the first
of which compiles), with `block_until_ready`. Where torchvision is installed, its op runs on the
same inputs in the same process and `ratio` is ours / torchvision's (below 1: we are faster).
To add a benchmark, write `add_<name>_command(subparsers)` that registers a parser whose `run`
default returns the JSON-able result dict, and call it in `build_parser`.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

# torchvision segfaults when imported after tensorflow (see tests/conftest.py): import it first.
try:
    import torch
    import torchvision
except ImportError:
    torch = torchvision = None

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.ops.nms import nms
from mrcnn_jax.ops.roi_align import multilevel_roi_align


def median_seconds(
    fn: Callable[..., Any], fn_args: tuple, repeats: int, warmup: int
) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` calls after `warmup` calls) of
    `fn(*fn_args)`, which returns JAX arrays (blocked on) or anything else (already done)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*fn_args))
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*fn_args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    return {
        "jax_backend": jax.default_backend(),
        "jax_device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "torchvision": torchvision.__version__ if torchvision else None,
        "torch_threads": torch.get_num_threads() if torch else None,
    }


def random_boxes(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    image_size: int,
    min_size: float,
    max_size: float,
) -> np.ndarray:
    """`[*shape, 4]` float32 (x1, y1, x2, y2): centres uniform in the image, sqrt(area)
    log-uniform in [min_size, max_size], aspect ratio log-uniform in [1/3, 3]."""
    centre = rng.uniform(0, image_size, (*shape, 2))
    side = np.exp(rng.uniform(np.log(min_size), np.log(max_size), shape))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), shape))
    half = 0.5 * np.stack([side * np.sqrt(aspect), side / np.sqrt(aspect)], -1)
    return np.concatenate([centre - half, centre + half], -1).astype(np.float32)


def proposal_like_boxes(
    rng: np.random.Generator, num_boxes: int, image_size: int, boxes_per_object: int = 20
) -> np.ndarray:
    """`[num_boxes, 4]` float32 boxes in clusters of ~`boxes_per_object` jittered copies of
    random objects (sides 16..image_size/4), so that NMS suppresses like on RPN proposals."""
    objects = random_boxes(
        rng, (max(1, num_boxes // boxes_per_object),), image_size, 16, image_size / 4
    )
    boxes = objects[rng.integers(0, len(objects), num_boxes)]
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, 1)
    return (boxes + 0.1 * size * rng.normal(size=boxes.shape)).astype(np.float32)


def ratio(ours: float, reference: float | None) -> float | None:
    return None if reference is None else ours / reference


# ---------------------------------------------------------------------------------------------
# roi_align


def run_roi_align(args: argparse.Namespace) -> dict[str, Any]:
    """Multilevel RoIAlign on P2..P5 of a square image, ours (each method) vs torchvision."""
    rng = np.random.default_rng(args.seed)
    levels = range(2, 6)
    features = [
        rng.normal(
            size=(args.batch, args.image_size >> level, args.image_size >> level, args.channels)
        ).astype(np.float32)
        for level in levels
    ]
    boxes = random_boxes(rng, (args.batch, args.rois), args.image_size, 16, args.image_size)
    jax_features = [jnp.asarray(f, args.dtype) for f in features]
    jax_boxes = jnp.asarray(boxes)
    results = []
    for output_size in args.output_sizes:
        reference = _torchvision_roi_align_seconds(features, boxes, output_size, args)
        for method in args.methods:
            pool = functools.partial(
                multilevel_roi_align,
                output_size=output_size,
                sampling_ratio=args.sampling_ratio,
                method=method,
            )
            step, inputs = jax.jit(pool), (jax_features, jax_boxes)
            if args.backward:
                cotangent = rng.normal(
                    size=(*boxes.shape[:2], output_size, output_size, args.channels)
                )
                step = jax.jit(functools.partial(_forward_backward, pool))
                inputs = (*inputs, jnp.asarray(cotangent, args.dtype))
            first, seconds = median_seconds(step, inputs, args.repeats, args.warmup)
            results.append(
                {
                    "output_size": output_size,
                    "method": method,
                    "first_call_seconds": round(first, 4),
                    "seconds": round(seconds, 4),
                    "torchvision_seconds": reference,
                    "ratio": ratio(seconds, reference),
                }
            )
    return {
        "benchmark": "roi_align",
        **environment(),
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "results": results,
    }


def _forward_backward(
    pool: Callable[..., jax.Array],
    features: list[jax.Array],
    boxes: jax.Array,
    cotangent: jax.Array,
) -> tuple[jax.Array, list[jax.Array]]:
    """`pool(features, boxes)` and its VJP w.r.t. the features for `cotangent`."""
    out, vjp = jax.vjp(lambda f: pool(f, boxes), features)
    return out, vjp(cotangent)[0]


def _torchvision_roi_align_seconds(
    features: list[np.ndarray], boxes: np.ndarray, output_size: int, args: argparse.Namespace
) -> float | None:
    """Median seconds of torchvision's MultiScaleRoIAlign on the same inputs (NCHW)."""
    if torchvision is None or args.dtype != "float32":
        return None
    names = [f"p{level}" for level in range(2, 2 + len(features))]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, args.sampling_ratio)
    x = {
        name: torch.from_numpy(f).permute(0, 3, 1, 2).contiguous().requires_grad_(args.backward)
        for name, f in zip(names, features)
    }
    torch_boxes = [torch.from_numpy(b) for b in boxes]
    image_shapes = [(args.image_size, args.image_size)] * len(boxes)

    def call() -> None:
        with torch.set_grad_enabled(args.backward):
            out = pooler(x, torch_boxes, image_shapes)
            if args.backward:
                out.backward(torch.ones_like(out))

    return round(median_seconds(call, (), args.repeats, args.warmup)[1], 4)


def add_roi_align_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "roi_align", help="multilevel RoIAlign (P2-P5) vs torchvision MultiScaleRoIAlign"
    )
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--rois", type=int, default=512, help="boxes per image")
    parser.add_argument("--channels", type=int, default=256, help="feature channels")
    parser.add_argument(
        "--image-size",
        type=int,
        default=1024,
        help="square input size; P2..P5 are image_size / 4 .. / 32",
    )
    parser.add_argument(
        "--output-sizes", type=int, nargs="+", default=[7, 14], help="RoIAlign output sizes to time"
    )
    parser.add_argument("--sampling-ratio", type=int, default=2, help="samples per bin and axis")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["gather", "einsum"],
        choices=["gather", "einsum"],
        help="our strategies to time (einsum at 1024² and 14x14: ~13 GB, ~30 s)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="feature dtype for ours (torchvision is timed for float32 only)",
    )
    parser.add_argument(
        "--backward",
        action="store_true",
        help="time forward + backward w.r.t. the features instead of forward",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random inputs seed")
    parser.set_defaults(run=run_roi_align)


# ---------------------------------------------------------------------------------------------
# nms


def run_nms(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy NMS of random boxes, ours vs torchvision.ops.nms (truncated to max_output)."""
    rng = np.random.default_rng(args.seed)
    step = jax.jit(
        functools.partial(nms, iou_threshold=args.iou_threshold, max_output=args.max_output)
    )
    results = []
    for num_boxes in args.num_boxes:
        boxes = proposal_like_boxes(rng, num_boxes, args.image_size)
        scores = rng.uniform(size=num_boxes).astype(np.float32)
        inputs = (jnp.asarray(boxes), jnp.asarray(scores))
        first, seconds = median_seconds(step, inputs, args.repeats, args.warmup)
        indices, valid = step(*inputs)
        kept = np.asarray(indices)[np.asarray(valid)]
        result = {
            "num_boxes": num_boxes,
            "first_call_seconds": round(first, 4),
            "seconds": round(seconds, 5),
            "kept": len(kept),
        }
        if torchvision is not None:
            torch_boxes, torch_scores = torch.from_numpy(boxes), torch.from_numpy(scores)
            reference = median_seconds(
                torchvision.ops.nms,
                (torch_boxes, torch_scores, args.iou_threshold),
                args.repeats,
                args.warmup,
            )[1]
            expected = torchvision.ops.nms(torch_boxes, torch_scores, args.iou_threshold)
            result.update(
                torchvision_seconds=round(reference, 5),
                ratio=seconds / reference,
                same_as_torchvision=bool(np.array_equal(kept, expected.numpy()[: args.max_output])),
            )
        results.append(result)
    return {
        "benchmark": "nms",
        **environment(),
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "results": results,
    }


def add_nms_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("nms", help="greedy NMS vs torchvision.ops.nms")
    parser.add_argument(
        "--num-boxes", type=int, nargs="+", default=[1000, 4000], help="input box counts to time"
    )
    parser.add_argument("--max-output", type=int, default=1000, help="static output size")
    parser.add_argument("--iou-threshold", type=float, default=0.7, help="suppression IoU")
    parser.add_argument(
        "--image-size",
        type=int,
        default=1024,
        help="boxes lie in a square image of this size, sides 16..size/4",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="random inputs seed")
    parser.set_defaults(run=run_nms)


# ---------------------------------------------------------------------------------------------


def synthetic_detection_batch(rng: np.random.Generator, config, num_objects: int) -> dict:
    """A train batch (docs/CONTRACTS.md keys) of noise images with `num_objects` random boxes
    and box-crop masks each; `config` fixes the image size, batch and padding."""
    b, (h, w) = config.train.batch_size, config.data.image_size
    m, s = config.data.max_instances, config.data.mask_size
    x1y1 = rng.uniform(0, 0.7, (b, m, 2)) * [w, h]
    wh = rng.uniform(0.05, 0.3, (b, m, 2)) * [w, h]
    valid = np.arange(m)[None, :].repeat(b, 0) < num_objects
    return {
        "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "image_size": np.tile(np.array([h, w], np.int32), (b, 1)),
        "gt_boxes": np.where(valid[..., None], np.concatenate([x1y1, x1y1 + wh], -1), 0).astype(
            np.float32
        ),
        "gt_classes": np.where(valid, rng.integers(0, config.model.num_classes, (b, m)), -1).astype(
            np.int32
        ),
        "gt_valid": valid,
        "gt_masks": (rng.uniform(size=(b, m, s, s)) > 0.3) & valid[..., None, None],
    }


def _torchvision_model_seconds(batch: dict, config, train: bool, args) -> float:
    """Median seconds of torchvision's maskrcnn_resnet50_fpn on the same images (and targets)."""
    h, w = config.data.image_size
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=config.model.num_classes + 1,
        min_size=min(h, w),
        max_size=max(h, w),
    )
    images = [torch.from_numpy(x).permute(2, 0, 1).contiguous() for x in batch["image"]]
    if not train:
        model.eval()
        return median_seconds(lambda: model(images), (), args.repeats, args.warmup)[1]
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    targets = []
    for i in range(len(images)):
        keep = batch["gt_valid"][i]
        boxes = batch["gt_boxes"][i][keep]
        masks = np.zeros((len(boxes), h, w), np.uint8)
        for k, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
            masks[k, y1:y2, x1:x2] = 1
        targets.append(
            {
                "boxes": torch.from_numpy(boxes),
                "labels": torch.from_numpy(batch["gt_classes"][i][keep] + 1).long(),
                "masks": torch.from_numpy(masks),
            }
        )

    def step():
        optimizer.zero_grad()
        loss = sum(model(images, targets).values())
        loss.backward()
        optimizer.step()

    return median_seconds(step, (), args.repeats, args.warmup)[1]


def _jax_model_fn(config, batch: dict, train: bool) -> Callable[[], Any]:
    """A no-argument function running one train step (state carried over) or one inference."""
    from mrcnn_jax.train import loop, step
    from mrcnn_jax.train import state as state_lib

    model = loop.build_model(config)
    mesh = step.create_mesh(jax.devices()[:1])
    state, lr_fn = state_lib.create_train_state(jax.random.key(0), config, model)
    state = step.replicate(state, mesh)
    if train:
        train_step = step.make_train_step(model, config, mesh, lr_fn)
        inputs = step.shard_batch(batch, mesh)
        holder = {"state": state}

        def run():
            holder["state"], metrics = train_step(holder["state"], inputs, jax.random.key(0))
            return metrics

        return run
    predict = step.make_predict_step(model, mesh)
    inputs = step.shard_batch({k: batch[k] for k in ("image", "image_size")}, mesh)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return lambda: predict(variables, inputs)


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    """R50-FPN Mask R-CNN (configs/coco_r50_fpn_1x.py) train step or inference, on one device."""
    import resource
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from configs import coco_r50_fpn_1x

    train = args.command == "train"
    rng = np.random.default_rng(args.seed)
    results = []
    for size in args.sizes:
        config = coco_r50_fpn_1x.get_config()
        config.data.image_size = tuple(int(v) for v in size.split("x"))
        config.train.batch_size = args.batch_size
        batch = synthetic_detection_batch(rng, config, args.num_objects)
        run = _jax_model_fn(config, batch, train)
        first, seconds = median_seconds(run, (), args.repeats, args.warmup)
        result = {
            "image_size": size,
            "first_call_seconds": round(first, 2),
            "seconds": round(seconds, 3),
            "peak_host_rss_gib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2
            ),
        }
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            result["peak_device_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
        if torchvision is not None and not args.skip_torchvision:
            reference = _torchvision_model_seconds(batch, config, train, args)
            result.update(torchvision_seconds=round(reference, 3), ratio=seconds / reference)
        results.append(result)
    return {
        "benchmark": args.command,
        **environment(),
        "model": "R50-FPN",
        "config": {k: v for k, v in vars(args).items() if k != "run"},
        "results": results,
    }


def add_model_commands(subparsers: Any) -> None:
    for name, help_text in (
        ("train", "one R50-FPN train step vs torchvision's"),
        ("infer", "R50-FPN inference vs torchvision's"),
    ):
        parser = subparsers.add_parser(name, help=help_text)
        parser.add_argument(
            "--sizes",
            nargs="+",
            default=["512x512", "832x1344"],
            help="padded input sizes HxW (multiples of 64)",
        )
        parser.add_argument("--batch-size", type=int, default=2, help="images per step")
        parser.add_argument(
            "--num-objects", type=int, default=10, help="ground-truth objects per image"
        )
        parser.add_argument("--repeats", type=int, default=3, help="timed calls (median)")
        parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
        parser.add_argument("--seed", type=int, default=0, help="random inputs seed")
        parser.add_argument(
            "--skip-torchvision", action="store_true", help="do not time torchvision's model"
        )
        parser.set_defaults(run=run_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_roi_align_command(subparsers)
    add_nms_command(subparsers)
    add_model_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "warmup", 1) < 1 or getattr(args, "repeats", 1) < 1:
        raise SystemExit("--warmup and --repeats must be >= 1")
    print(json.dumps(args.run(args)), flush=True)


if __name__ == "__main__":
    main()
