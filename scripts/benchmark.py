r"""Benchmarks against torchvision, one subcommand each; every run prints one JSON line.

  python scripts/benchmark.py roi_align [--output_sizes=7,14] [--methods=gather,einsum] [--backward]
  python scripts/benchmark.py nms [--num_boxes=1000,4000] [--iou_threshold=0.7]
  python scripts/benchmark.py conv [--image_size=512 --batch_size=2 --rois=128]
  python scripts/benchmark.py paste [--sizes=480x640,800x1333] [--detections=100]
  python scripts/benchmark.py train|infer [--sizes=512x512,832x1344] [--batch_size=2] [--matched]
  python scripts/benchmark.py train --mask_rois_per_image=0,32   # two budgets, alternating calls
  python scripts/benchmark.py train --mask_head_chunk=0,32       # one pass / chunks of 32
  python scripts/benchmark.py breakdown [--model_config=shapes_r18 --sizes=128x128 --batch_size=8]

Times are the median wall-clock seconds over --repeats calls after --warmup calls (the first of
which compiles: no compilation cache unless JAX_COMPILATION_CACHE_DIR is set, reported as
`compilation_cache`; `xla_flags` reports XLA_FLAGS, with the scripts' codegen option from
`launch.use_fast_cpu_codegen`), with `block_until_ready`. Functions timed together (ours and
torchvision's, or several variants) take turns, and each timed call follows an untimed call of
the same function: each is timed in its steady state, as in a loop of its own calls (twice the
calls, half of them untimed). `train`, `infer`, `breakdown` split our
first call in `first_call`: tracing, lowering, compiling, the first run and the system CPU seconds
of that run (the kernel faulting in fresh memory, chiefly XLA's temporary buffer of `temp_gib`).
torchvision runs on the same inputs in the same process and `ratio` is ours / torchvision's (below
1: we are faster). A subcommand ignores the flags it does not use (--help says which). `train` and
`infer` time R50-FPN Mask R-CNN (configs/coco_r50_fpn_1x.py; another with --model_config, then
without torchvision) against torchvision's Mask R-CNN R50-FPN on the CPU (only where JAX runs
there too), built as the recipes run it (`torchvision_maskrcnn`: frozen BatchNorm, stem and res2
frozen, as our `model.norm` and `model.freeze_at`), their calls interleaved with ours; inference
on both sides ends at the 28×28 mask probabilities (pasting into the image is `paste`'s) and
torchvision's runs under `torch.inference_mode`; its train step also normalises the images and
resizes the full-image GT masks (its `transform`; ours get both from the data pipeline: ~0.02 s
an image at 256², ~0.5 s at 832×1344 with 128 masks). `cpu_seconds` (and `cpu_ratio`) are the
median process CPU seconds of each side's calls: under a competing load the side whose threads
get less of the cores slows down, in wall time far more than in CPU time (torch's threads lost
more than XLA's in such a run). `peak_host_rss_gib` is the process's peak so far (both sides,
earlier sizes). They report the `work` per image of each: RoIs through the box
head, and through the mask head the foreground RoIs (train) or detections (infer), and at
inference the (box, class) candidates of the final NMS; ours are the static config sizes (padded
slots included) but for the mask head in training: the slots of the chunks it ran
(`model.roi_heads.mask_head_chunk`; all G / B slots of `model.roi_heads.mask_rois_per_image`
without chunks); torchvision's are counted by forward hooks; `matched` says whether they are
equal (else `why`).
--matched gives torchvision our RPN/RoI budgets and, at inference, the score threshold at which
as many (box, class) candidates per image enter its final NMS as enter ours (our static
`detections_pre_nms_topk` of them; found on an untimed first call, one warm-up more for it;
`nms_candidates` in `work`, counted before torchvision drops boxes under 0.01 px) and our
detections_per_image; zero RPN
box deltas and no proposal NMS suppression (its
proposals are then the post_nms_topk best anchors, as many as our static slots: with random
weights most of its proposals are otherwise degenerate or suppressed, e.g. 35-300 left at 256²);
and in training at least as many GT objects as our mask slots per image (every GT box is also a
proposal of IoU 1: a foreground RoI) and a positive fraction that caps its foreground RoIs at that
number, so both fill every slot.
--mask_rois_per_image=a,b,... times our train step at each mask-head budget (and
--mask_head_chunk=c,d,... at each chunk size, crossed with the budgets), the calls of the
variants interleaved so that the machine's load hits each alike; each row's `ratio` is against
the same torchvision run (with --matched, one per budget).

`conv` times forward + backward (input and kernel gradients) of the conv layers of R50-FPN Mask
R-CNN at --image_size² and --batch_size (the mask head's on --rois 14×14 RoIs per image): ours
(`ops/conv.py`, the kernel gradient as matmuls on CPU) against XLA's own
`lax.conv_general_dilated` gradient (`xla_seconds`, `ratio_to_xla`) and torch's conv2d.

`paste` times pasting --detections 28×28 masks (random probabilities) at random boxes (sides 10 px
to the image's longer side, some reaching outside it) into an image of each of --sizes, then
thresholding at 0.5 (`evaluation.paste_masks`, numpy): each of our methods against torchvision's
`paste_masks_in_image` (padding 1) on the same masks and boxes, which our "torchvision" method
must equal (`same_as_torchvision`).

`breakdown` profiles our train step (`jax.profiler`, --repeats steps after --warmup) and sums the
time of every XLA op by the stage that its name stack names (`jax.named_scope`s and Flax module
names: backbone+fpn, rpn_head, proposals, roi_sampling, box_roi_align, box_head, mask_roi_align,
mask_budget, mask_head, mask_targets, losses, optimizer), forward and backward apart (ops under
`transpose(...)`); ops the compiler made without a name take the stage of their nearest named
neighbour. `op_seconds` may exceed the step's wall time where independent ops overlap.
"""

import collections
import functools
import glob
import gzip
import importlib
import itertools
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from absl import app, flags

from mrcnn_jax.programs import launch

if __name__ == "__main__":  # before torch and JAX are imported, which it would import twice
    launch.set_up_process(compilation_cache=False)

# torchvision segfaults when imported after tensorflow (see tests/conftest.py): import it first.
try:
    import torch
    import torchvision
except ImportError as error:
    torch = torchvision = None
    NO_TORCHVISION = f"{error}"  # said on stderr where a comparison is left out

import jax
import jax.numpy as jnp
import numpy as np

from mrcnn_jax.evaluation.masks import PASTE_METHODS, paste_masks
from mrcnn_jax.ops.conv import conv_general_dilated, uses_winograd
from mrcnn_jax.ops.nms import nms
from mrcnn_jax.ops.roi_align import multilevel_roi_align

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/

# A help that starts with "<subcommand>[, <subcommand>...]: " names the only subcommands using it.
flags.DEFINE_integer(
    "repeats",
    None,
    "Timed calls (default 5; train, infer, breakdown: 3), each after an untimed one where "
    "several functions are timed together.",
    lower_bound=1,
)
flags.DEFINE_integer("warmup", 1, "Untimed calls first (the first compiles).", lower_bound=1)
flags.DEFINE_integer(
    "seed",
    0,
    "Seed of the random inputs and (train, infer) both models' weights (breakdown: ours).",
    lower_bound=0,
    upper_bound=2**32 - 1,  # jax.random.key keeps its low 32 bits
)
flags.DEFINE_integer(
    "batch_size", 2, "roi_align, conv, train, infer, breakdown: images per call.", lower_bound=1
)
flags.DEFINE_integer(
    "image_size",
    1024,
    "roi_align, nms, conv: side of the square image (at least 32: conv's res5 at stride 32).",
    lower_bound=32,
)
flags.DEFINE_integer(
    "rois", 512, "roi_align, conv: boxes per image (conv: mask-head RoIs).", lower_bound=0
)
flags.DEFINE_integer("channels", 256, "roi_align: feature channels.", lower_bound=1)
flags.DEFINE_list("output_sizes", ["7", "14"], "roi_align: RoIAlign output sizes to time.")
flags.DEFINE_integer("sampling_ratio", 2, "roi_align: samples per bin and axis.", lower_bound=1)
flags.DEFINE_list("methods", ["gather", "einsum"], "roi_align: ours to time (einsum: ~13 GB).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "roi_align: our feature dtype.")
flags.DEFINE_bool("backward", False, "roi_align: time forward + backward w.r.t. the features.")
flags.DEFINE_list("num_boxes", ["1000", "4000"], "nms: input box counts to time.")
flags.DEFINE_integer("max_output", 1000, "nms: static output size.", lower_bound=1)
flags.DEFINE_float(
    "iou_threshold", 0.7, "nms: suppression IoU, in [0, 1].", lower_bound=0.0, upper_bound=1.0
)
flags.DEFINE_list(
    "sizes", ["512x512", "832x1344"], "train, infer, breakdown, paste: (padded) image sizes HxW."
)
flags.DEFINE_integer("detections", 100, "paste: masks pasted per image.", lower_bound=1)
flags.DEFINE_integer(
    "num_objects", 10, "train, breakdown: ground-truth objects per image.", lower_bound=1
)
flags.DEFINE_bool("skip_torchvision", False, "train, infer: do not time torchvision's model.")
flags.DEFINE_bool("matched", False, "train, infer: make torchvision do our work (see above).")
flags.DEFINE_list(
    "mask_rois_per_image",
    None,
    "train, breakdown: values of model.roi_heads.mask_rois_per_image to time (0: every "
    "foreground slot); several alternate in one process. Default: the config's.",
)
flags.DEFINE_list(
    "mask_head_chunk",
    None,
    "train, breakdown: values of model.roi_heads.mask_head_chunk to time (0: one pass over all "
    "mask slots), each with every --mask_rois_per_image, alternating. Default: the config's.",
)
flags.DEFINE_string(
    "model_config",
    "coco_r50_fpn_1x",
    "train, infer, breakdown: configs/ module of our model (torchvision runs only against "
    "coco_r50_fpn_1x).",
)
flags.DEFINE_integer(
    "num_classes",
    None,
    "train, infer, breakdown: model.num_classes. Default: the config's, and 80 (COCO's) for a "
    "config that takes the dataset's count (model.num_classes 0: coco_format, ...).",
    lower_bound=1,
)
FLAGS = flags.FLAGS
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
flags.register_validator(
    "model_config",
    lambda name: re.fullmatch(r"\w+", name) and os.path.isfile(os.path.join(CONFIGS, name + ".py")),
    "--model_config must name a module of configs/: "
    + ", ".join(sorted(n[:-3] for n in os.listdir(CONFIGS) if n.endswith(".py"))),
)
MODEL_NAMES = {"coco_r50_fpn_1x": "R50-FPN"}  # --model_config: the name in the output
_POSITIVE = r"[1-9]\d*"
_LISTS = {  # flag: (regular expression of an item, what the items are)
    "output_sizes": (_POSITIVE, "positive integers"),
    "num_boxes": (_POSITIVE, "positive integers"),
    "sizes": (rf"{_POSITIVE}x{_POSITIVE}", "HxW sizes (positive)"),
    "methods": ("gather|einsum", "gather, einsum"),
    "mask_rois_per_image": (r"\d+", "integers"),
    "mask_head_chunk": (r"\d+", "integers"),
}
for _name, (_item, _what) in _LISTS.items():
    _check = lambda values, item=_item: (
        values is None or (bool(values) and all(re.fullmatch(item, v) for v in values))
    )
    flags.register_validator(_name, _check, f"--{_name} must be a comma-separated list of {_what}")


def measure(fn, *args) -> tuple[float, float, object]:
    """(seconds of the first call, median seconds of --repeats calls after --warmup calls, the
    last output) of `fn(*args)`, which returns JAX arrays (blocked on) or anything else."""
    return measure_alternating([functools.partial(fn, *args)])[0]


def measure_alternating(fns, cpu_seconds: list | None = None) -> list[tuple[float, float, object]]:
    """`measure` of each of the no-argument `fns`, their calls interleaved (the warm-up calls of
    each in turn, then two calls of each in turn: a, b, a a, b b, ...) so that a load that
    changes over time hits every one alike. With several `fns`, each timed call follows an
    untimed call of the same function:
    what is timed is that function's steady state, as in a loop of its own calls (a training
    run's), not what the previous function's calls cost it (XLA:CPU maps a program's temporary
    buffer afresh at every call and unmaps it on return; after a torchvision train step of a
    few seconds this virtual machine has taken those pages back, and our R50 step at 512² paid
    4.8-5.8 s of system time to fault them in again, against 0.3-1.0 s after a call of its
    own; docs/performance.md). With `cpu_seconds`, appends to it each one's median process
    CPU seconds (all threads): under a competing load a side whose threads get less of the
    cores takes longer, in wall time far more than in CPU time."""
    times, cpu, outs = [[] for _ in fns], [[] for _ in fns], [None] * len(fns)
    for turn in range(FLAGS.warmup + FLAGS.repeats):
        for i, fn in enumerate(fns):
            if len(fns) > 1 and turn >= FLAGS.warmup:
                jax.block_until_ready(fn())  # settles: the timed call follows one of its own
            start, start_cpu = time.perf_counter(), time.process_time()
            outs[i] = jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    if cpu_seconds is not None:
        cpu_seconds.extend(statistics.median(c[FLAGS.warmup :]) for c in cpu)
    return [(t[0], statistics.median(t[FLAGS.warmup :]), out) for t, out in zip(times, outs)]


def significant(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (a time of 6e-05 s keeps its precision)."""
    return float(f"{value:.{digits}g}")


def compare(first: float, ours: float, reference: float | None) -> dict:
    """Our first-call and steady-state seconds, torchvision's and the ratio (None without it),
    to 4 significant digits, the ratio that of the unrounded times, to 3."""
    ratio = None if reference is None else significant(ours / reference, 3)
    reference = None if reference is None else significant(reference)
    times = {"first_call_seconds": significant(first), "seconds": significant(ours)}
    return {**times, "torchvision_seconds": reference, "ratio": ratio}


def random_boxes(rng, shape, image_size: int, min_size: float, max_size: float) -> np.ndarray:
    """`[*shape, 4]` float32 (x1, y1, x2, y2): centres uniform in the image, sqrt(area)
    log-uniform in [min_size, max_size], aspect ratio log-uniform in [1/3, 3]."""
    centre = rng.uniform(0, image_size, (*shape, 2))
    side = np.exp(rng.uniform(np.log(min_size), np.log(max_size), shape))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), shape))
    half = 0.5 * np.stack([side * np.sqrt(aspect), side / np.sqrt(aspect)], -1)
    return np.concatenate([centre - half, centre + half], -1).astype(np.float32)


def proposal_like_boxes(rng, num_boxes: int, image_size: int, per_object: int = 20) -> np.ndarray:
    """`[num_boxes, 4]` float32 boxes in clusters of ~`per_object` jittered copies of random
    objects (sides 16..image_size/4), so that NMS suppresses like on RPN proposals."""
    objects = random_boxes(rng, (max(1, num_boxes // per_object),), image_size, 16, image_size / 4)
    boxes = objects[rng.integers(0, len(objects), num_boxes)]
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, 1)
    return (boxes + 0.1 * size * rng.normal(size=boxes.shape)).astype(np.float32)


def forward_backward(pool, features, boxes, cotangent):
    """`pool(features, boxes)` and its VJP w.r.t. the features for `cotangent`."""
    out, vjp = jax.vjp(lambda f: pool(f, boxes), features)
    return out, vjp(cotangent)[0]


def run_roi_align() -> list[dict]:
    """Multilevel RoIAlign on P2..P5 of a square image, ours (each method) vs torchvision."""
    rng, size, channels = np.random.default_rng(FLAGS.seed), FLAGS.image_size, FLAGS.channels
    shapes = [(FLAGS.batch_size, size >> level, size >> level, channels) for level in range(2, 6)]
    features = [rng.normal(size=shape).astype(np.float32) for shape in shapes]
    boxes = random_boxes(rng, (FLAGS.batch_size, FLAGS.rois), size, 16, size)
    inputs = ([jnp.asarray(f, FLAGS.dtype) for f in features], jnp.asarray(boxes))
    roi_align = functools.partial(multilevel_roi_align, sampling_ratio=FLAGS.sampling_ratio)
    results = []
    for output_size in map(int, FLAGS.output_sizes):
        args = inputs
        if FLAGS.backward:
            cotangent = rng.normal(size=(*boxes.shape[:2], output_size, output_size, channels))
            args = (*inputs, jnp.asarray(cotangent, FLAGS.dtype))
        ours = []
        for method in FLAGS.methods:
            pool = functools.partial(roi_align, output_size=output_size, method=method)
            step = functools.partial(forward_backward, pool) if FLAGS.backward else pool
            ours.append(functools.partial(jax.jit(step), *args))
        theirs = torchvision_roi_align(features, boxes, output_size)
        timed = measure_alternating([*ours, theirs] if theirs else ours)
        reference = timed[-1][1] if theirs else None
        for method, (first, seconds, _) in zip(FLAGS.methods, timed):
            result = {"output_size": output_size, "method": method}
            results.append({**result, **compare(first, seconds, reference)})
    return results


def torchvision_roi_align(features, boxes, output_size: int) -> Callable[[], None] | None:
    """A call of torchvision's MultiScaleRoIAlign on the same inputs (NCHW, float32), with
    --backward its backward pass too; None without torchvision or with --dtype=bfloat16."""
    if torchvision is None or FLAGS.dtype != "float32":
        return None
    names = [f"p{level}" for level in range(2, 2 + len(features))]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, output_size, FLAGS.sampling_ratio)
    to_nchw = lambda f: torch.from_numpy(f).permute(0, 3, 1, 2).contiguous()
    x = {name: to_nchw(f).requires_grad_(FLAGS.backward) for name, f in zip(names, features)}
    torch_boxes, image_shapes = [torch.from_numpy(b) for b in boxes], [(FLAGS.image_size,) * 2]

    def call() -> None:
        with torch.set_grad_enabled(FLAGS.backward):
            out = pooler(x, torch_boxes, image_shapes * len(boxes))
            if FLAGS.backward:
                out.backward(torch.ones_like(out))

    return call


def run_nms() -> list[dict]:
    """Greedy NMS of proposal-like boxes, ours vs torchvision.ops.nms (truncated to max_output)."""
    rng, threshold = np.random.default_rng(FLAGS.seed), FLAGS.iou_threshold
    step = jax.jit(functools.partial(nms, iou_threshold=threshold, max_output=FLAGS.max_output))
    results = []
    for num_boxes in map(int, FLAGS.num_boxes):
        boxes = proposal_like_boxes(rng, num_boxes, FLAGS.image_size)
        scores = rng.uniform(size=num_boxes).astype(np.float32)
        calls = [functools.partial(step, jnp.asarray(boxes), jnp.asarray(scores))]
        if torchvision is not None:
            tv_inputs = (torch.from_numpy(boxes), torch.from_numpy(scores), threshold)
            calls.append(functools.partial(torchvision.ops.nms, *tv_inputs))
        (first, seconds, (indices, valid)), *theirs = measure_alternating(calls)
        kept = np.asarray(indices)[np.asarray(valid)]
        result = {"num_boxes": num_boxes, "kept": len(kept)}
        reference = None
        if theirs:
            ((_, reference, expected),) = theirs
            same = np.array_equal(kept, expected.numpy()[: FLAGS.max_output])
            result["same_as_torchvision"] = bool(same)
        results.append({**result, **compare(first, seconds, reference)})
    return results


def run_paste() -> list[dict]:
    """Mask pasting at each of --sizes, each of our methods vs torchvision's (see above)."""
    rng, results = np.random.default_rng(FLAGS.seed), []
    for size in FLAGS.sizes:
        height, width = map(int, size.split("x"))
        longer = max(height, width)
        boxes = random_boxes(rng, (FLAGS.detections,), longer, 10, longer)
        boxes *= np.array([width, height, width, height], np.float32) / longer
        masks = rng.random((FLAGS.detections, 28, 28), dtype=np.float32)
        calls = [
            functools.partial(paste_masks, masks, boxes, image_size=(height, width), method=method)
            for method in PASTE_METHODS
        ]
        if torchvision is not None:
            from torchvision.models.detection.roi_heads import paste_masks_in_image

            tv_inputs = (torch.from_numpy(masks)[:, None], torch.from_numpy(boxes))
            calls.append(
                functools.partial(
                    paste_masks_in_image, *tv_inputs, img_shape=(height, width), padding=1
                )
            )
        timed = measure_alternating(calls)
        reference, expected = None, None
        if torchvision is not None:
            _, reference, pasted = timed.pop()
            expected = pasted[:, 0].numpy() > 0.5
        for method, (first, seconds, out) in zip(PASTE_METHODS, timed):
            result = {"size": size, "detections": FLAGS.detections, "method": method}
            if method == "torchvision" and expected is not None:
                result["same_as_torchvision"] = bool(np.array_equal(out, expected))
            results.append({**result, **compare(first, seconds, reference)})
    return results


def conv_layers() -> list[tuple[str, tuple[int, int, int, int], int, int, int]]:
    """R50-FPN Mask R-CNN conv layers at --image_size and --batch_size: (name, input
    [B, H, W, C], kernel, stride, output channels)."""
    b, s, n = FLAGS.batch_size, FLAGS.image_size, FLAGS.batch_size * FLAGS.rois
    return [
        ("stem 7x7/2 3->64", (b, s, s, 3), 7, 2, 64),
        ("res2 3x3 64->64", (b, s // 4, s // 4, 64), 3, 1, 64),
        ("res2 1x1 64->256", (b, s // 4, s // 4, 64), 1, 1, 256),
        ("res3 3x3/2 128->128", (b, s // 4, s // 4, 128), 3, 2, 128),
        ("res3 3x3 128->128", (b, s // 8, s // 8, 128), 3, 1, 128),
        ("res4 3x3 256->256", (b, s // 16, s // 16, 256), 3, 1, 256),
        ("res4 1x1 256->1024", (b, s // 16, s // 16, 256), 1, 1, 1024),
        ("res5 3x3 512->512", (b, s // 32, s // 32, 512), 3, 1, 512),
        ("fpn/rpn P2 3x3 256->256", (b, s // 4, s // 4, 256), 3, 1, 256),
        ("mask head 3x3 256->256", (n, 14, 14, 256), 3, 1, 256),
    ]


def conv_forward_backward(conv, x, w, stride: int):
    """`conv(x, w)` (padding `k // 2`) and its VJP w.r.t. both for a cotangent of ones."""
    k = w.shape[0]
    y, vjp = jax.vjp(lambda x, w: conv(x, w, (stride, stride), ((k // 2, k // 2),) * 2), x, w)
    return y, vjp(jnp.ones_like(y))


def xla_conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def torch_conv(x: np.ndarray, w: np.ndarray, stride: int) -> Callable[[], None] | None:
    """A call of torch's conv2d forward + backward (both gradients) on the same arrays; None
    without torch."""
    if torch is None:
        return None
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
    pad = w.shape[0] // 2
    return lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=pad).sum().backward()


def run_conv() -> list[dict]:
    """Forward + both gradients of each of `conv_layers()`: ours, XLA's, torch's."""
    rng, results = np.random.default_rng(FLAGS.seed), []
    for name, shape, k, stride, out in conv_layers():
        x = rng.normal(size=shape).astype(np.float32)
        w = rng.normal(size=(k, k, shape[-1], out)) / np.sqrt(k * k * shape[-1])
        w = w.astype(np.float32)
        steps = [
            functools.partial(
                jax.jit(conv_forward_backward, static_argnums=(0, 3)), conv, x, w, stride
            )
            for conv in (conv_general_dilated, xla_conv)
        ]
        theirs = torch_conv(x, w, stride)
        (first, ours, _), (_, xla, _), *torch_timed = measure_alternating(
            [*steps, theirs] if theirs else steps
        )
        reference = torch_timed[0][1] if torch_timed else None
        result = {"layer": name, "input": list(shape), "xla_seconds": significant(xla)}
        result["winograd"] = uses_winograd(
            shape, w.shape, (stride, stride), ((k // 2, k // 2),) * 2
        )
        result["ratio_to_xla"] = significant(ours / xla, 3)
        results.append({**result, **compare(first, ours, reference)})
    return results


def synthetic_detection_batch(rng, config, num_objects: int) -> dict:
    """A train batch (docs/CONTRACTS.md keys) of noise images with `num_objects` random boxes
    and random masks each; `config` fixes the image size, batch and padding."""
    b, (h, w) = config.train.batch_size, config.data.image_size
    m, s = config.data.max_instances, config.data.mask_size
    x1y1 = rng.uniform(0, 0.7, (b, m, 2)) * [w, h]
    boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0.05, 0.3, (b, m, 2)) * [w, h]], -1)
    valid = np.arange(m)[None, :].repeat(b, 0) < num_objects
    classes = rng.integers(0, config.model.num_classes, (b, m))
    return {
        "image": rng.normal(size=(b, h, w, 3)).astype(np.float32),
        "image_size": np.tile(np.array([h, w], np.int32), (b, 1)),
        "gt_boxes": np.where(valid[..., None], boxes, 0).astype(np.float32),
        "gt_classes": np.where(valid, classes, -1).astype(np.int32),
        "gt_valid": valid,
        "gt_masks": (rng.uniform(size=(b, m, s, s)) > 0.3) & valid[..., None, None],
    }


class OurProgram:
    """Our jitted `program` on fixed `args`: each call runs it once and returns its outputs
    (with `carry`, a train step's: the new state, the first output, replaces the first argument
    and the call returns the metrics). The first call traces, lowers and compiles it apart and
    records `first_call`: the seconds of each, of the first run (blocked on) and of the system
    CPU time the process spent during that run (mostly faulting in the memory the run touches
    first: XLA's temporary buffer, `temp_gib`); `compiled` is the compiled program."""

    def __init__(self, program, *args, carry: bool = False):
        self.program, self.args, self.carry = program, args, carry
        self.compiled, self.first_call = None, None

    def __call__(self):
        if self.compiled is not None:
            return self._run()
        times = [time.perf_counter()]
        traced = self.program.trace(*self.args)
        times.append(time.perf_counter())
        lowered = traced.lower()
        times.append(time.perf_counter())
        self.compiled = lowered.compile()
        times.append(time.perf_counter())
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        out = jax.block_until_ready(self._run())
        times.append(time.perf_counter())
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - system
        seconds = [round(b - a, 2) for a, b in itertools.pairwise(times)]
        phases = ("trace_seconds", "lower_seconds", "compile_seconds", "run_seconds")
        self.first_call = {**dict(zip(phases, seconds)), "run_system_seconds": round(system, 2)}
        return out

    def first_call_report(self) -> dict:
        """`first_call` and `temp_gib` (asked of the compiled program after the timed calls,
        so that the phases add up to the first call's time)."""
        memory = self.compiled.memory_analysis()
        temp_gib = round(memory.temp_size_in_bytes / 2**30, 2) if memory else None
        return {**self.first_call, "temp_gib": temp_gib}

    def _run(self):
        out = self.compiled(*self.args)
        if not self.carry:
            return out
        self.args = (out[0], *self.args[1:])
        return out[1]


def mask_rois_per_image(config) -> float:
    """Our mask-head training slots per image: G / B."""
    from mrcnn_jax.modeling.mask_rcnn import num_mask_slots

    batch = config.train.batch_size
    return num_mask_slots(config.model.roi_heads, batch) / batch


def model_config(name: str, num_classes: int | None = None):
    """The config of `configs/<name>.py` with `num_classes` classes (None: the config's, or
    COCO's 80 where it takes the dataset's count, `model.num_classes` 0)."""
    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.num_classes = num_classes or config.model.num_classes or 80
    return config


def our_configs(size: str) -> list:
    """The --model_config config at `size` (HxW) and --batch_size, one per pair of
    --mask_rois_per_image and --mask_head_chunk values (the config's own without the flags)."""
    configs = []
    for budget, chunk in itertools.product(
        FLAGS.mask_rois_per_image or [None], FLAGS.mask_head_chunk or [None]
    ):
        config = model_config(FLAGS.model_config, FLAGS.num_classes)
        config.data.image_size = tuple(int(v) for v in size.split("x"))
        config.train.batch_size = FLAGS.batch_size
        if budget is not None:
            config.model.roi_heads.mask_rois_per_image = int(budget)
        if chunk is not None:
            config.model.roi_heads.mask_head_chunk = int(chunk)
        configs.append(config)
    return configs


def our_model(config, batch: dict, train: bool):
    """An `OurProgram` running one train step or one inference of our model, and the (box head,
    mask head) RoIs per image of either (static sizes)."""
    from mrcnn_jax import sharding
    from mrcnn_jax.modeling.mask_rcnn import MaskRCNN
    from mrcnn_jax.programs import evaluator
    from mrcnn_jax.train import state as state_lib
    from mrcnn_jax.train import step as step_lib

    model = MaskRCNN.from_config(config.model, axis_name=sharding.AXIS)
    mesh = sharding.create_mesh(jax.devices()[:1])
    state, lr_fn = state_lib.create_train_state(jax.random.key(FLAGS.seed), config, model)
    state, r = sharding.replicate(state, mesh), config.model.roi_heads
    if not train:
        predict, variables = evaluator.make_predict_step(model, mesh), evaluator.variables_of(state)
        inputs = sharding.shard_batch({k: batch[k] for k in evaluator.MODEL_INPUTS}, mesh)
        proposals = config.model.rpn.post_nms_topk_test
        sizes = proposals, r.detections_per_image
        return OurProgram(predict, variables, inputs), sizes
    train_step = step_lib.make_train_step(config, mesh, lr_fn)
    step = OurProgram(
        train_step, state, sharding.shard_batch(batch, mesh), jax.random.key(FLAGS.seed), carry=True
    )
    return step, (r.batch_size_per_image, mask_rois_per_image(config))


def torchvision_maskrcnn(config, **kwargs) -> "torch.nn.Module":
    """torchvision's `MaskRCNN` R50-FPN (random weights, `kwargs` to its constructor) as its
    training recipe and coco_r50_fpn_1x run it: frozen BatchNorm (`model.norm="frozen"`) and the
    backbone's stages up to `model.freeze_at` frozen (torchvision's `trainable_backbone_layers`;
    `maskrcnn_resnet50_fpn` without weights trains them all, with batch statistics). Its
    inference returns the 28×28 mask probabilities as ours: the paste into the image
    (`transform.postprocess`) is left out on both sides (`benchmark.py paste` times it)."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    resnet = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(resnet, trainable_layers=5 - config.model.freeze_at)
    model = torchvision.models.detection.MaskRCNN(backbone, **kwargs)
    model.transform.postprocess = lambda result, image_sizes, original_sizes: result
    return model


def torchvision_model(config, batch: dict, train: bool) -> tuple[Callable[[], object], Callable]:
    """`torchvision_maskrcnn` on the same images (and targets): a function running one call
    (inference under `torch.inference_mode`; training: one SGD step of its trainable
    parameters) and a function giving the RoIs per image its heads saw in the last call
    (forward hooks). With --matched in training, its foreground RoIs are capped at our mask
    slots per image."""
    (h, w), rpn, r = config.data.image_size, config.model.rpn, config.model.roi_heads
    kwargs = dict(num_classes=config.model.num_classes + 1, min_size=min(h, w), max_size=max(h, w))
    if FLAGS.matched:
        kwargs.update(
            rpn_pre_nms_top_n_train=rpn.pre_nms_topk_train,
            rpn_pre_nms_top_n_test=rpn.pre_nms_topk_test,
            rpn_post_nms_top_n_train=rpn.post_nms_topk_train,
            rpn_post_nms_top_n_test=rpn.post_nms_topk_test,
            rpn_nms_thresh=1.0,  # no suppression, see the module docstring
            box_batch_size_per_image=r.batch_size_per_image,
            box_positive_fraction=mask_rois_per_image(config) / r.batch_size_per_image,
            box_detections_per_img=r.detections_per_image,
            box_score_thresh=0.0,
        )
    torch.manual_seed(FLAGS.seed)
    model = torchvision_maskrcnn(config, **kwargs)
    for param in model.rpn.head.bbox_pred.parameters() if FLAGS.matched else ():
        torch.nn.init.zeros_(param)  # RPN box deltas 0: proposals are anchors (module docstring)
    images = [torch.from_numpy(x).permute(2, 0, 1).contiguous() for x in batch["image"]]
    work, heads = {}, model.roi_heads
    for key, head in (("box_head_rois", heads.box_head), ("mask_head_rois", heads.mask_head)):
        count = lambda _, x, key=key: work.__setitem__(key, x[0].shape[0] / len(images))
        head.register_forward_pre_hook(count)
    if not train:
        scores = {}  # the last call's foreground class scores, [RoIs, K]
        keep = lambda _, __, out: scores.__setitem__("last", out[0])
        heads.box_predictor.register_forward_hook(keep)
        model.eval()

        def candidates() -> torch.Tensor:  # foreground (box, class) scores of the last call
            return torch.softmax(scores["last"], -1)[:, 1:]

        def infer():
            with torch.inference_mode():
                return model(images)

        if FLAGS.matched:  # the threshold that sends as many candidates to NMS as ours
            infer()
            pooled = candidates().flatten()
            k = min(len(images) * r.detections_pre_nms_topk, pooled.numel())
            kth = torch.topk(pooled, k).values[-1]
            heads.score_thresh = float(torch.nextafter(kth, torch.tensor(-1.0)))

        def inference_work() -> dict:
            passed = (candidates() > heads.score_thresh).sum().item()
            return {**work, "nms_candidates": passed / len(images)}

        return infer, inference_work
    optimizer = torch.optim.SGD(
        [p for p in model.train().parameters() if p.requires_grad], lr=1e-4, momentum=0.9
    )
    ys, xs, targets = np.arange(h)[:, None], np.arange(w), []
    for boxes, classes, keep in zip(batch["gt_boxes"], batch["gt_classes"], batch["gt_valid"]):
        x1, y1, x2, y2 = boxes[keep].astype(int).T[..., None, None]
        masks = torch.from_numpy((ys >= y1) & (ys < y2) & (xs >= x1) & (xs < x2)).to(torch.uint8)
        labels = torch.from_numpy(classes[keep] + 1).long()
        targets.append({"boxes": torch.from_numpy(boxes[keep]), "labels": labels, "masks": masks})

    def step():
        optimizer.zero_grad()
        sum(model(images, targets).values()).backward()
        optimizer.step()

    return step, lambda: dict(work)


def with_torchvision() -> bool:
    """Whether `train`/`infer` time torchvision: installed, not skipped, against our R50-FPN,
    and our program on the CPU (where torchvision runs)."""
    return torchvision is not None and compares_models()


def compares_models() -> bool:
    """Whether `train`/`infer` compare with torchvision where it is installed."""
    return (
        not FLAGS.skip_torchvision
        and FLAGS.model_config == "coco_r50_fpn_1x"
        and jax.default_backend() == "cpu"
    )


def check_sizes() -> None:
    """Refuses a --sizes canvas that is not a multiple of --model_config's
    model.size_divisibility, as training does (`pipeline.check_canvas`)."""
    divisibility = model_config(FLAGS.model_config).model.size_divisibility
    for size in FLAGS.sizes:
        sides = [int(side) for side in size.split("x")]
        if any(side % divisibility for side in sides):
            fixed = "x".join(str(-(-side // divisibility) * divisibility) for side in sides)
            raise app.UsageError(
                f"--sizes: {size} is not a multiple of model.size_divisibility={divisibility} "
                f"of --model_config={FLAGS.model_config}: use {fixed}"
            )


def run_model(train: bool) -> list[dict]:
    """Our train step (at each --mask_rois_per_image and --mask_head_chunk, alternating) or
    inference on one device, against torchvision's R50-FPN Mask R-CNN."""
    from mrcnn_jax.modeling.mask_rcnn import num_mask_head_slots_run

    rng, results = np.random.default_rng(FLAGS.seed), []
    for size in FLAGS.sizes:
        configs = our_configs(size) if train else our_configs(size)[:1]
        num_objects = FLAGS.num_objects
        if FLAGS.matched and train:  # a GT per mask slot
            num_objects = max(num_objects, *(int(mask_rois_per_image(c)) for c in configs))
        for config in configs:
            config.data.max_instances = max(config.data.max_instances, num_objects)
        batch = synthetic_detection_batch(rng, configs[0], num_objects)
        ours = [our_model(config, batch, train) for config in configs]
        theirs = {}  # torchvision's (call, work) by the mask slots it is matched to
        for config, (_, (_, mask_rois)) in zip(configs, ours) if with_torchvision() else ():
            key = mask_rois if FLAGS.matched and train else None
            if key not in theirs:
                theirs[key] = torchvision_model(config, batch, train)
        # Our calls and torchvision's interleaved, so that a load that changes over time hits
        # both sides alike (it may slow them unequally: the CPU seconds are reported too).
        cpu = []
        timed = measure_alternating(
            [run for run, _ in ours] + [run for run, _ in theirs.values()], cpu
        )
        references = {}  # torchvision's (seconds, CPU seconds, work) by the same keys
        for (key, (_, work_of)), (_, seconds, _), cpu_seconds in zip(
            theirs.items(), timed[len(ours) :], cpu[len(ours) :]
        ):
            references[key] = (seconds, cpu_seconds, work_of())
        for config, (program, (box_rois, mask_rois)), (first, seconds, out), cpu_seconds in zip(
            configs, ours, timed, cpu
        ):
            valid = out["num_mask_rois"] if train else np.mean(np.sum(out["valid"], 1))
            work_ours = {"box_head_rois": box_rois, "mask_head_rois": mask_rois}
            if not train:  # (box, class) candidates of the final NMS: a static top-k
                r = config.model.roi_heads
                work_ours["nms_candidates"] = min(
                    r.detections_pre_nms_topk, box_rois * config.model.num_classes
                )
            if train:  # the chunks of slots its mask head ran (all G slots without chunks)
                b = config.train.batch_size
                run = num_mask_head_slots_run(config.model, b, round(float(valid) * b))
                work_ours["mask_head_rois"] = run / b
            work = {"ours": {**work_ours, "valid_mask_head_rois": float(valid)}}
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
            result = {"image_size": size, **({"num_objects": num_objects} if train else {})}
            if train:
                result["mask_rois_per_image"] = config.model.roi_heads.mask_rois_per_image
                result["mask_head_chunk"] = config.model.roi_heads.mask_head_chunk
            result["peak_host_rss_gib"] = round(rss, 2)
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                result["peak_device_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
            reference = reference_cpu = None
            if references:
                key = mask_rois if FLAGS.matched and train else None
                reference, reference_cpu, their_work = references[key]
                work["torchvision"] = their_work
                why = [
                    f"{k}: torchvision {v:g}, ours {work_ours[k]:g}"
                    for k, v in their_work.items()
                    if v != work_ours[k]
                ]
                result["matched"] = not why
                if why:
                    result["why"] = "; ".join(why) + ("" if FLAGS.matched else " (see --matched)")
            timing = compare(first, seconds, reference)
            timing["cpu_seconds"] = significant(cpu_seconds)
            timing["torchvision_cpu_seconds"] = reference_cpu and significant(reference_cpu)
            timing["cpu_ratio"] = reference_cpu and significant(cpu_seconds / reference_cpu, 3)
            first_call = program.first_call_report()
            results.append({**result, **timing, "first_call": first_call, "work": work})
    return results


# Stage: the components of an op's name stack that put it there (the first stage that matches).
STAGES = {
    "optimizer": ("optimizer",),
    "losses": ("losses",),
    "backbone+fpn": ("backbone", "fpn"),
    "rpn_head": ("rpn_head",),
    "proposals": ("proposals",),
    "roi_sampling": ("sample_rois",),
    "box_roi_align": ("box_roi_align",),
    "box_head": ("box_head",),
    "mask_roi_align": ("mask_roi_align",),
    "mask_budget": ("sample_mask_rois",),
    "mask_head": ("mask_head",),
    "mask_targets": ("mask_targets",),
}
_CONTROL_FLOW = ("while", "conditional", "call")  # their body's ops are traced on their own
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")


def hlo_stages(hlo_text: str) -> dict[str, tuple[str, str] | None]:
    """Each instruction of an optimised HLO module: (stage, "forward" or "backward") from its
    `op_name` metadata or else from that of the nearest instruction along its users (a layout
    copy takes its consumer's), then along its operands, then the instruction calling its
    computation; ("other", ...) when none has one. None for control flow, whose bodies'
    instructions are traced (and counted) on their own."""
    op_names, users, operands, computation_of, caller = (
        {},
        collections.defaultdict(list),
        {},
        {},
        {},
    )
    control_flow, computation = set(), None
    for line in hlo_text.splitlines():
        if match := _COMPUTATION.match(line):
            computation = match[1]
        elif match := _INSTRUCTION.match(line):
            name, opcode, rest = match.groups()
            if opcode in _CONTROL_FLOW:
                control_flow.add(name)
            op_names[name] = (re.findall(r'op_name="([^"]*)"', rest) or [None])[0]
            operands[name] = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            for operand in operands[name]:
                users[operand].append(name)
            for called in re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", rest):
                caller[called] = name
            computation_of[name] = computation

    def nearest_name(name: str, max_depth: int = 8) -> str | None:
        for edges in (users, operands):
            level, seen = [name], {name}
            for _ in range(max_depth):
                named = [op_names[n] for n in level if op_names.get(n)]
                if named:
                    return named[0]
                level = [m for n in level for m in edges.get(n, ()) if m not in seen]
                seen.update(level)
        outer = caller.get(computation_of[name])
        return nearest_name(outer) if outer else None

    stages = {}
    for name in op_names:
        op_name = nearest_name(name) or ""
        parts = [re.sub(r"^(?:\w+\()+|\)+$", "", p) for p in op_name.split("/")]  # jvp(losses)
        stage = next((s for s, marks in STAGES.items() if any(m in parts for m in marks)), "other")
        stages[name] = (stage, "backward" if "transpose(" in op_name else "forward")
    return {name: None if name in control_flow else stage for name, stage in stages.items()}


def traced_op_seconds(trace_dir: str, module: str) -> dict[str, float]:
    """Total seconds of each HLO instruction of `module` in the perfetto trace under
    `trace_dir` (`jax.profiler.trace(..., create_perfetto_trace=True)`)."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    seconds = collections.Counter()
    for event in events:
        args = event.get("args", {})
        if event.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
            seconds[args["hlo_op"]] += event["dur"] * 1e-6
    return seconds


def stage_seconds(step: OurProgram) -> tuple[float, dict]:
    """Wall seconds per step under the profiler, and seconds per step of each stage's ops
    (forward, backward and their share of all ops), over --repeats profiled steps."""
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(FLAGS.repeats):
                jax.block_until_ready(step())
        profiled = (time.perf_counter() - start) / FLAGS.repeats
        hlo = step.compiled.as_text()
        op_seconds = traced_op_seconds(trace_dir, re.match(r"HloModule ([\w.\-]+)", hlo)[1])
    stages = hlo_stages(hlo)
    per_stage = {s: {"forward": 0.0, "backward": 0.0} for s in [*STAGES, "other"]}
    for name, seconds in op_seconds.items():
        stage = stages.get(name, ("other", "forward"))
        if stage is not None:
            per_stage[stage[0]][stage[1]] += seconds / FLAGS.repeats
    total = sum(sum(times.values()) for times in per_stage.values())
    return profiled, {
        stage: {
            **{k: round(v, 4) for k, v in times.items()},
            "share": round(sum(times.values()) / total, 3),
        }
        for stage, times in per_stage.items()
        if sum(times.values())
    }


def run_breakdown() -> list[dict]:
    """Our train step's seconds per stage (see the module docstring), at each --sizes and
    --mask_rois_per_image, from a profile of --repeats steps after the timed ones."""
    rng, results = np.random.default_rng(FLAGS.seed), []
    for size in FLAGS.sizes:
        configs = our_configs(size)
        batch = synthetic_detection_batch(rng, configs[0], FLAGS.num_objects)
        for config in configs:
            step, _ = our_model(config, batch, train=True)
            first, seconds, _ = measure(step)
            profiled, stages = stage_seconds(step)
            op_seconds = sum(v["forward"] + v["backward"] for v in stages.values())
            results.append({
                "image_size": size,
                "mask_rois_per_image": config.model.roi_heads.mask_rois_per_image,
                "mask_head_chunk": config.model.roi_heads.mask_head_chunk,
                "first_call_seconds": round(first, 2),
                "first_call": step.first_call_report(),
                "seconds": round(seconds, 3),
                "profiled_seconds": round(profiled, 3),
                "op_seconds": round(op_seconds, 3),
                "stages": stages,
            })  # fmt: skip
    return results


COMMANDS = {
    "roi_align": run_roi_align,
    "nms": run_nms,
    "conv": run_conv,
    "paste": run_paste,
    "train": functools.partial(run_model, True),
    "infer": functools.partial(run_model, False),
    "breakdown": run_breakdown,
}


def flags_of(command: str) -> dict:
    """The flags `command` reads: those whose help names no subcommand, or names it."""
    scope = lambda flag: re.match(r"(?:<.*?>: )?([a-z_]+(, [a-z_]+)*): ", flag.help)  # enum: <a|b>
    used = lambda flag: not scope(flag) or command in scope(flag)[1].split(", ")
    return {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.argv[0]) if used(f)}


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        what = f"unknown subcommand {argv[1]!r}" if len(argv) > 1 else "no subcommand"
        raise app.UsageError(f"{what}; expected one of: {', '.join(COMMANDS)}")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments after {argv[1]!r}: {argv[2:]}")
    command, model = argv[1], argv[1] in ("train", "infer", "breakdown")
    if model:
        check_sizes()
    compares = compares_models() if command in ("train", "infer") else not model
    if torchvision is None and compares:
        print(
            f"benchmark.py: torchvision is not available ({NO_TORCHVISION}): timing ours alone "
            "(pip install -e '.[torch]' for the comparison)",
            file=sys.stderr,
            flush=True,
        )
    if FLAGS.repeats is None:
        FLAGS.repeats = 3 if model else 5
    results, device = COMMANDS[command](), jax.devices()[0]
    output = {
        "benchmark": command,
        "jax_backend": jax.default_backend(),
        "jax_device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "torchvision": torchvision.__version__ if torchvision else None,
        "torch_threads": torch.get_num_threads() if torch else None,
        # Set: first calls may load compiled programs instead of compiling them (not cold).
        "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "xla_flags": os.environ.get("XLA_FLAGS"),  # with launch.use_fast_cpu_codegen's option
        **({"model": MODEL_NAMES.get(FLAGS.model_config, FLAGS.model_config)} if model else {}),
        "config": {"command": command, **flags_of(command)},
        "results": results,
    }
    print(json.dumps(output), flush=True)


if __name__ == "__main__":
    launch.run(main)
