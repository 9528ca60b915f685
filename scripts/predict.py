r"""Runs a training checkpoint on image files, folders and globs: draws the detections and saves
them as COCO results.

  python scripts/predict.py --workdir=/tmp/mrcnn_shapes photo.jpg
  python scripts/predict.py --workdir=/tmp/mrcnn_shapes --recursive photos/ 'more/**/*.png'
  python scripts/predict.py --workdir=/tmp/mrcnn_shapes --no_draw --batch_size=32 photos/

Inputs (after the flags, any number, in any mix):
  - a file: read whatever its extension;
  - a folder: its files ending in .jpg .jpeg .png .bmp .gif .webp .tif .tiff (any case), sorted
    by name; with --recursive also those of its subfolders, linked ones too, each real folder
    once (others are not looked at, nor are names that are no file: a dangling symlink, a
    folder named x.png; nor hidden files and folders, names starting with '.', such as macOS'
    `._x.jpg` resource files: a glob pattern does not take them either);
  - a glob pattern, quoted so that the shell leaves it alone: expanded here with Python's
    `glob.glob(pattern, recursive=True)` (`**` spans folders), every file it matches is read.
Each is a local path (a leading `~` expanded, also in a quoted pattern); a URL (`gs://...`) is
refused: copy the images first.
An input that names no existing file or folder, a pattern matching no file, a folder holding
no image file, a --score_threshold outside [0, 1], a --batch_size that is not a positive
multiple of the local device count, a --workdir without the checkpoint and an --out_dir that
cannot be created or written to (a regular file, read-only) are errors (naming it) before the
model loads. A file reached twice (same real path) is predicted once, under the first name it
was reached by.

The inputs are never written: an output (a drawing or detections.json) that is an input file,
also through a symlink or a hard link, is an error naming both, before the model loads. So is,
when drawing, an --out_dir where the same command run again would read the drawings as images:
a folder input itself or, with --recursive, any folder below it (e.g. `--recursive photos/
--out_dir=photos/predictions`); choose an --out_dir outside the inputs.

Each image is read as the checkpoint's training read its images: by default as its stored
pixels (an EXIF orientation is not applied: a phone photo stored sideways is predicted, drawn and
reported sideways, in the file's own pixel grid, which is what the coordinates of detections.json
refer to); turned as its EXIF tag says (as photo viewers show it) where the run was trained with
config.data.exif_orientation=True, and the drawings and detections.json then refer to the turned
image. --exif_orientation / --noexif_orientation choose either way. A TIFF is read turned as its
orientation tag says either way (OpenCV always applies it, as PIL does).
The images are read, predicted, drawn and written streaming, --batch_size at a time (the next
batch is read while one is predicted), split data-parallel over the process's local devices; a
progress bar counts the images. A file that cannot be decoded (not an image, truncated, a format
cv2 lacks) is named in a warning and skipped. The run ends with the line
`N images, M detections, K unreadable[: file, ...]`; it exits with status 1 if no image could be
read (and then writes nothing), else 0. Ctrl-C (SIGINT) or SIGTERM stops it after the image at
hand (a second one at once): detections.json then holds the detections of the images predicted
so far, `stopped by Ctrl-C after N of M images` (or `by SIGTERM`) says where, and the exit
status is 130 (143). Every file appears whole or not at all (a killed run leaves none
half-written). A detections.json of an earlier run in --out_dir is deleted once the model has
loaded; drawings of an earlier run that this one does not redraw stay, and a last line counts
them (in a local --out_dir; a new --out_dir per run keeps runs apart).

Outputs, in --out_dir:
  - `<name>.png` per image (not with --no_draw): the detections scoring at least
    --score_threshold drawn on it (masks in a semi-transparent colour per instance, boxes, class
    names and scores). `<name>` is the image's path relative to the deepest folder holding all
    the inputs, with the extension removed, so `a/x.jpg` and `b/x.jpg` become `a/x.png` and
    `b/x.png` (subfolders are created) and files given from one folder keep their bare names;
    images whose names would still coincide (`x.jpg` beside `x.png`, also `X.jpg` beside
    `x.png`, one name on a case-insensitive file system as macOS' and Windows') keep their
    extension (`x.jpg.png`, `x.png.png`), and so does one whose drawing would be another's
    folder (`a.jpg` beside `a.png/b.jpg`: `a.jpg.png`, `a.png/b.png`). Inputs whose names
    still differ only in case (`X.jpg` beside `x.jpg`) are an error: one file where case is
    ignored.
  - `detections.json`: every image's detections in the COCO results format, in original image
    pixels, with the image's path (as given, or the folder joined with the file's path in it,
    or as the glob matched it) as "file_name" in place of "image_id": `{"file_name",
    "category_id", "label", "class_name", "score", "bbox": [x, y, w, h], "segmentation": RLE}`.
    "category_id" is there when the checkpoint's config records `data.label_to_category_id`
    (e.g. configs/torchvision_r50_fpn_v1.py); "label" is the contiguous class 0..K-1.

Flags:
  --workdir            training workdir holding checkpoints/, or its checkpoints/ or
                       checkpoints/<step> folder (required).
  --checkpoint_step    checkpoint step to use (default: the latest, or that of --workdir).
  --score_threshold    keep detections scoring at least this (in [0, 1], default 0.5).
  --out_dir            where the drawings and detections.json go (default:
                       <workdir>/predictions, in the training workdir also when --workdir names
                       a checkpoint folder); not where the inputs are read from (see above).
  --recursive          also take the image files in the subfolders of folder inputs.
  --batch_size         images per program run, a positive multiple of the local device count
                       (default: 2 per local device); the last batch is padded, so one
                       compilation serves all. Another batch size compiles another program:
                       scores and boxes may differ in the 7th significant digit.
  --no_draw            write only detections.json, no PNGs.
  --[no]exif_orientation  turn each image as its EXIF orientation says before predicting, or
                       not (default: as the checkpoint's config.data.exif_orientation, the stored
                       pixels unless the run trained on turned images).
"""

import collections
import contextlib
import glob
import json
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from absl import app, flags, logging
from pycocotools import mask as mask_util

from mrcnn_jax import interrupts
from mrcnn_jax import paths as paths_lib
from mrcnn_jax.programs import launch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGES_PER_DEVICE = 2  # the default --batch_size per local device

_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Training workdir holding checkpoints/ (or its checkpoints/ or checkpoints/<step> folder).",
)
_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "Checkpoint step to use (default: the latest)."
)
_SCORE_THRESHOLD = flags.DEFINE_float(
    "score_threshold",
    0.5,
    "Keep detections scoring at least this (in [0, 1]; the model returns none at or below "
    "its config.model.roi_heads.score_threshold, 0.05 by default).",
)
_OUT_DIR = flags.DEFINE_string(
    "out_dir",
    None,
    "Where the drawings and detections.json go (default: <workdir>/predictions, in the "
    "training workdir). Refused if an output is an input, or if the drawings would go where "
    "the inputs are read from (a folder input, with --recursive also below it).",
)
_RECURSIVE = flags.DEFINE_bool(
    "recursive",
    False,
    f"Folder inputs: also take the image files ({' '.join(IMAGE_EXTENSIONS)}) of subfolders.",
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size",
    None,
    "Images per program run, split over the local devices: a positive multiple of their "
    f"number (default: {IMAGES_PER_DEVICE} per local device). The last batch is padded.",
)
_NO_DRAW = flags.DEFINE_bool("no_draw", False, "Write only detections.json, no PNG drawings.")
_EXIF_ORIENTATION = flags.DEFINE_bool(
    "exif_orientation",
    None,
    "Turn each image as its EXIF orientation tag says (as photo viewers show phone photos) "
    "before predicting; the drawings and detections.json then refer to the turned image. "
    "Default: as the checkpoint's training read its images (config.data.exif_orientation; "
    "the stored pixels unless it was set).",
)
launch.mark_paths_required(["workdir"])


def coco_results(
    result: dict[str, Any], file_name: str, with_category_ids: bool
) -> list[dict[str, Any]]:
    """One image's predictor output (see `mrcnn_jax.predictor`) as COCO result dicts, with the
    dataset's "category_id" of each where `with_category_ids`."""
    masks = np.asarray(result["masks"], np.uint8)
    rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
    results = []
    for (x1, y1, x2, y2), score, label, category_id, name, rle in zip(
        result["boxes"],
        result["scores"],
        result["classes"],
        result["category_ids"],
        result["class_names"],
        rles,
    ):
        entry = {"file_name": file_name, "label": int(label), "class_name": name}
        if with_category_ids:
            entry["category_id"] = int(category_id)
        entry |= {
            "score": float(score),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        }
        results.append(entry)
    return results


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_images(folder: str, recursive: bool) -> list[str]:
    """The image files of `folder` (and of its subfolders if `recursive`, linked ones too, each
    real folder once), sorted; a name that is not a file (a dangling symlink, a folder named
    x.png) or is hidden (starts with '.') is not taken."""
    if recursive:
        found, seen = [], set()
        for root, dirs, files in os.walk(folder, followlinks=True):
            seen.add(os.path.realpath(root))
            kept = []
            for name in sorted(d for d in dirs if not d.startswith(".")):
                real = os.path.realpath(os.path.join(root, name))
                if real not in seen:  # a link to a folder walked or to be walked: once
                    seen.add(real)
                    kept.append(name)
            dirs[:] = kept
            found += [os.path.join(root, n) for n in sorted(files)]
    else:
        found = [os.path.join(folder, n) for n in sorted(os.listdir(folder))]
    return [
        p
        for p in found
        if not os.path.basename(p).startswith(".") and _is_image_file(p) and os.path.isfile(p)
    ]


def collect_inputs(args: Sequence[str], recursive: bool) -> list[str]:
    """The image paths that files, folders and glob patterns `args` name (see the module
    docstring), in argument order, each real file once.

    Raises:
      app.UsageError: an argument names nothing to read.
    """
    paths, seen = [], set()
    for arg in args:
        if paths_lib.is_url(arg):
            raise app.UsageError(
                f"image input {arg!r} is a URL: predict.py reads local files, folders and "
                "patterns (copy the images here first, e.g. with gsutil cp)"
            )
        if os.path.isfile(arg):
            found = [arg]
        elif os.path.isdir(arg):
            found = _folder_images(arg, recursive)
            if not found:
                hint = "" if recursive else " (--recursive takes those of subfolders)"
                raise app.UsageError(
                    f"folder {arg!r} holds no image file ({' '.join(IMAGE_EXTENSIONS)}){hint}"
                )
        elif glob.has_magic(arg):
            found = sorted(p for p in glob.glob(arg, recursive=True) if os.path.isfile(p))
            if not found:
                raise app.UsageError(f"pattern {arg!r} matches no file")
        elif os.path.exists(arg):
            raise app.UsageError(f"image input {arg!r} is not a file or a folder")
        else:
            raise app.UsageError(f"image file {arg!r} does not exist")
        for path in found:
            key = os.path.normcase(os.path.realpath(path))
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def output_names(paths: Sequence[str]) -> list[str]:
    """The drawing's relative path `<name>.png` for each input (see the module docstring).

    Stems are compared as a case-insensitive file system (macOS', Windows') compares names, so
    `X.jpg` beside `x.png` keeps its extension too; so does a stem whose `.png` another
    drawing needs as its folder (`a.jpg` beside `a.png/b.jpg`).

    Raises:
      app.UsageError: two inputs would still write the same file (also where case is
        ignored), or one a file where another's drawing needs a folder.
    """
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    relative = [os.path.relpath(p, root) for p in absolute]
    stems = [os.path.splitext(r)[0] for r in relative]
    counts = collections.Counter(stem.casefold() for stem in stems)
    folders = {folder.casefold() for stem in stems for folder in _folders(stem)}
    names = [
        (rel if counts[stem.casefold()] > 1 or f"{stem}.png".casefold() in folders else stem)
        + ".png"
        for stem, rel in zip(stems, relative)
    ]
    drawn_by: dict[str, tuple[str, str]] = {}  # casefolded name -> (input, name)
    for path, name in zip(paths, names):
        if (other := drawn_by.get(name.casefold())) is not None:
            raise app.UsageError(
                f"{other[0]!r} and {path!r} would both be drawn to {name}"
                + ("" if other[1] == name else f" (as {other[1]}, where case is ignored)")
            )
        drawn_by[name.casefold()] = (path, name)
    for path, name in zip(paths, names):
        for folder in _folders(name):
            if (other := drawn_by.get(folder.casefold())) is not None:
                raise app.UsageError(
                    f"{other[0]!r} would be drawn to {other[1]}, the folder of {path!r}'s "
                    f"drawing {name}: rename one"
                )
    return names


def _folders(name: str) -> list[str]:
    """The folders of a relative path: `a/b/x.png` -> [`a`, `a/b`]."""
    parts = name.split(os.sep)
    return [os.sep.join(parts[:k]) for k in range(1, len(parts))]


def check_outputs(
    args: Sequence[str],
    paths: Sequence[str],
    drawings: Sequence[str],
    results_path: str,
    recursive: bool,
) -> None:
    """Refuses outputs that would overwrite or, on a second run, be read as the inputs.

    Args:
      args: the input arguments (files, folders, glob patterns), as `collect_inputs` took them.
      paths: the image files they name (`collect_inputs(args, recursive)`).
      drawings: the drawings this run writes (none with --no_draw).
      results_path: the detections.json it writes.
      recursive: whether folder inputs include their subfolders.

    Raises:
      app.UsageError: an output is an existing input file (the same file: also through a
        symlink or a hard link), a symbolic link to a file (never written through) or a
        folder, or a file stands where a folder of drawings goes, or a drawing lies in a folder
        input (or, with `recursive`, below it), naming the input and the output.
    """
    inputs = {}  # (device, inode) -> path
    for path in paths:
        stat = os.stat(path)
        inputs.setdefault((stat.st_dev, stat.st_ino), path)
    for what, output in [*(("drawing", d) for d in drawings), ("results", results_path)]:
        try:  # refused when written, after the work
            paths_lib.check_not_a_link_to_a_file(output)
        except OSError as error:
            raise app.UsageError(f"the {what} {output!r}: {error.strerror}") from error
        try:
            stat = os.stat(output)
        except OSError:  # not there (yet): no input either
            continue
        if (source := inputs.get((stat.st_dev, stat.st_ino))) is not None:
            raise app.UsageError(
                f"the {what} {output!r} would overwrite the input {source!r} (the same file): "
                "choose an --out_dir outside the inputs"
            )
        if os.path.isdir(output):  # failed after the work, the detections not written
            raise app.UsageError(
                f"the {what} {output!r} is a folder: move it away, or choose another --out_dir"
            )
    first_drawing = {}  # the folder of drawings -> the first drawing in it
    for drawing in drawings:
        first_drawing.setdefault(os.path.dirname(drawing), drawing)
    for folder, drawing in first_drawing.items():  # a file where a folder of drawings goes
        while folder and not paths_lib.is_url(folder) and not os.path.isdir(folder):
            if os.path.lexists(folder):
                what = "a symbolic link to nothing" if os.path.islink(folder) else "a file"
                raise app.UsageError(
                    f"the drawing {drawing!r} cannot be written: {folder!r} is {what}, not a "
                    "folder (move it away, or choose another --out_dir)"
                )
            if os.path.dirname(folder) == folder:  # the root
                break
            folder = os.path.dirname(folder)
    real_folders = {  # with a trailing separator: "/a/bc/" does not start with "/a/b/"
        os.path.join(os.path.realpath(folder), ""): drawing
        for folder, drawing in first_drawing.items()
    }
    for arg in args:
        if os.path.isdir(arg):
            folder = os.path.join(os.path.realpath(arg), "")
            for parent, drawing in real_folders.items():
                if parent == folder or (recursive and parent.startswith(folder)):
                    raise app.UsageError(
                        f"the drawing {drawing!r} would be in the input folder {arg!r}"
                        f"{' (read with --recursive)' if recursive else ''}, where running "
                        "this again reads it as an image: choose an --out_dir outside the "
                        "inputs (or --no_draw)"
                    )


def read_batches(
    paths: Sequence[str], batch_size: int, exif_orientation: bool = False
) -> Iterator[tuple[list[tuple[int, np.ndarray]], list[tuple[int, str]]]]:
    """Reads `paths` in order and yields `(read, unreadable)` for each `batch_size` images read
    (and once at the end): `read` pairs an index into `paths` with its `[H, W, 3]` uint8 RGB
    image (turned as its EXIF orientation says with `exif_orientation`), `unreadable` an index
    with why it could not be read."""
    from mrcnn_jax.evaluation import visualize

    read, unreadable = [], []
    for index, path in enumerate(paths):
        try:
            read.append((index, visualize.read_image(path, exif_orientation=exif_orientation)))
        except (OSError, ValueError) as e:
            unreadable.append((index, str(e).strip()))
        if len(read) == batch_size:
            yield read, unreadable
            read, unreadable = [], []
    if read or unreadable:
        yield read, unreadable


class Stop(threading.Event):
    """Set by the first Ctrl-C or SIGTERM in `stop_on_signals`; `signum` says which."""

    signum: int = signal.SIGINT

    @property
    def cause(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else "SIGTERM"


@contextlib.contextmanager
def stop_on_signals(stop: Stop) -> Iterator[None]:
    """In the block, the first Ctrl-C (SIGINT) or SIGTERM (a scheduler's stop) sets `stop`, for
    the caller to stop between images; a second one raises as the handlers before the block
    did (`launch.run`'s: KeyboardInterrupt, `interrupts.Terminated`). Restored after the block."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, frame) -> None:
        stop.signum = signum
        stop.set()
        for handled, handler in previous.items():
            signal.signal(handled, handler)

    for signum in previous:
        signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def read_ahead(iterator: Iterator) -> Iterator:
    """`iterator`'s items, the next one produced in a thread while the caller uses this one."""
    with futures.ThreadPoolExecutor(1) as pool:
        done = object()
        upcoming = pool.submit(next, iterator, done)
        while (item := upcoming.result()) is not done:
            upcoming = pool.submit(next, iterator, done)
            yield item


def main(argv):
    if len(argv) < 2:
        raise app.UsageError("give one or more image files, folders or glob patterns")
    if not 0.0 <= _SCORE_THRESHOLD.value <= 1.0:  # NaN is not either
        raise app.UsageError(f"--score_threshold={_SCORE_THRESHOLD.value} must be in [0, 1]")
    launch.path_flag(_WORKDIR.value, "--workdir")  # a URL of another scheme, or unreachable
    args = [os.path.expanduser(arg) for arg in argv[1:]]  # a quoted '~/photos/*.jpg' too
    paths = collect_inputs(args, _RECURSIVE.value)  # before the model loads
    names = output_names(paths)
    import cv2
    import jax  # after absl parsed the flags, so XLA_FLAGS etc. set on the command line apply
    from etils import epath
    from tqdm import tqdm

    from mrcnn_jax.evaluation import output, visualize
    from mrcnn_jax.programs import predictor as predictor_lib

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # bad files: reported below
    num_devices = jax.local_device_count()
    batch_size = _BATCH_SIZE.value
    if batch_size is None:
        batch_size = IMAGES_PER_DEVICE * num_devices
    if batch_size < 1 or batch_size % num_devices:
        raise app.UsageError(
            f"--batch_size={batch_size} must be a positive multiple of the {num_devices} "
            "local devices"
        )
    try:  # name what to fix
        workdir, _ = predictor_lib.locate_checkpoint(_WORKDIR.value, _STEP.value)
        out_dir = (
            paths_lib.absolute(_OUT_DIR.value)
            if _OUT_DIR.value
            else os.path.join(str(workdir), "predictions")
        )
        drawings = [] if _NO_DRAW.value else [os.path.join(out_dir, name) for name in names]
        results_path = os.path.join(out_dir, "detections.json")
        check_outputs(args, paths, drawings, results_path, _RECURSIVE.value)
        launch.make_output_folder(out_dir, "--out_dir")
        # the latest when no step is named: also after a training deleted the located one
        predictor = predictor_lib.load_checkpoint(_WORKDIR.value, _STEP.value)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        raise app.UsageError(str(error)) from error
    with_category_ids = bool(predictor.config.data.label_to_category_id)
    exif_orientation = _EXIF_ORIENTATION.value
    if exif_orientation is None:  # as the run's training read its images
        exif_orientation = bool(predictor.config.data.get("exif_orientation", False))
    try:  # an earlier run's results never sit beside these drawings (a link to a device: kept)
        if paths_lib.is_url(results_path) or not os.path.islink(results_path):
            epath.Path(results_path).unlink(missing_ok=True)
    except OSError as error:
        sys.exit(f"error: cannot replace {results_path}: {error.strerror or error}")

    detections, unreadable, num_read, stop, written = [], [], 0, Stop(), set()
    try:
        with tqdm(total=len(paths), unit="image", desc="predict") as bar, stop_on_signals(stop):
            for read, bad in read_ahead(read_batches(paths, batch_size, exif_orientation)):
                if stop.is_set():
                    break
                for index, error in bad:
                    bar.write(
                        f"WARNING: skipping unreadable {paths[index]!r}: {error}", file=sys.stderr
                    )
                    unreadable.append(paths[index])
                bar.update(len(bad))
                results = predictor.predict_batch(
                    [image for _, image in read], _SCORE_THRESHOLD.value, batch_size=batch_size
                )
                for (index, image), result in zip(read, results):
                    if stop.is_set():
                        break
                    detections += coco_results(result, paths[index], with_category_ids)
                    num_read += 1
                    if not _NO_DRAW.value:
                        drawn = visualize.draw_detections(
                            image,
                            result["boxes"],
                            result["masks"],
                            result["scores"],
                            result["class_names"],
                        )
                        try:  # its folder (a gs:// one too) and the image, through epath
                            epath.Path(drawings[index]).parent.mkdir(parents=True, exist_ok=True)
                            visualize.write_image(drawings[index], drawn)
                            written.add(drawings[index])
                        except OSError as error:  # e.g. a full disk: the file and why, no trace
                            sys.exit(f"error: cannot write {drawings[index]}: {error.strerror}")
                    bar.update(1)
    except KeyboardInterrupt as interrupt:  # a second signal: what was done is still written
        stop.signum = interrupts.signal_of(type(interrupt))
        stop.set()
    stopped = stop.is_set()

    summary = f"{num_read} images, {len(detections)} detections, {len(unreadable)} unreadable"
    print(summary + (": " + ", ".join(unreadable) if unreadable else ""), flush=True)
    if stopped:
        done = num_read + len(unreadable)
        print(f"stopped by {stop.cause} after {done} of {len(paths)} images", file=sys.stderr)
    if not num_read:
        print(f"no image {'was' if stopped else 'could be'} read; nothing written", file=sys.stderr)
        return 128 + stop.signum if stopped else 1
    try:
        output.write_file(results_path, lambda f: json.dump(detections, f))
    except OSError as error:  # e.g. a full disk: the file and why, no trace
        sys.exit(f"error: cannot write {results_path}: {error.strerror}")
    print(
        f"{len(detections)} detections of checkpoint step {predictor.step} -> {results_path}"
        + ("" if _NO_DRAW.value else f", drawings in {out_dir}")
        + (f" (the {num_read} images predicted before the stop)" if stopped else ""),
        flush=True,
    )
    others = []  # listing a bucket's folders costs a request each: a local --out_dir only
    if not paths_lib.is_url(out_dir):
        others = [p for p in pathlib.Path(out_dir).rglob("*.png") if str(p) not in written]
    if others:
        print(
            f"note: {len(others)} drawings in {out_dir} are not this run's (e.g. "
            f"{os.path.relpath(others[0], out_dir)}): an earlier run's, not in {results_path}",
            file=sys.stderr,
        )
    return 128 + stop.signum if stopped else 0


if __name__ == "__main__":
    launch.set_up_process()
    launch.run(main)
