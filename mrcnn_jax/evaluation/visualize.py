"""Reading images for prediction and drawing detections on them (cv2, no matplotlib).

Images are ``[H, W, 3]`` uint8 RGB numpy arrays throughout; cv2's BGR order stays inside
`read_image` and `write_image`.
"""

import os
import unicodedata

import cv2
import numpy as np

from mrcnn_jax import image_headers
from mrcnn_jax.evaluation.output import write_file

# Instance colours (RGB), cycled in detection order: matplotlib's "tab10".
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def read_image(path: str | os.PathLike, *, exif_orientation: bool = False) -> np.ndarray:
    """Reads an image file (any format cv2 decodes: JPEG, PNG, BMP, ...) as ``[H, W, 3]`` uint8 RGB.

    Grey images are expanded to three channels and an alpha channel is dropped. By default the
    stored pixels, as the training and eval pipeline decodes them (and torchvision's PIL
    reading): an EXIF orientation is not applied, so boxes and masks refer to the file's own
    pixel grid. With `exif_orientation=True` the image is turned (and mirrored) as its EXIF
    orientation tag says (a JPEG's, PNG's or WebP's: `image_headers.exif_orientation`), as
    photo viewers show it (a phone photo taken upright is often stored sideways), and as a
    dataset built with `config.data.exif_orientation` holds it: boxes and masks then refer to
    the turned image. A TIFF's orientation tag is applied either way (cv2 applies it whatever
    `IMREAD_IGNORE_ORIENTATION` asks; PIL too), and so where training reads it (`coco_reader`
    stores the PNG of cv2's decoding).

    Raises:
      FileNotFoundError: `path` does not exist (IsADirectoryError, a subclass of OSError as
        FileNotFoundError is: it is a folder).
      ValueError: the file is empty or not an image cv2 can decode (named as a JPEG, PNG,
        GIF, BMP or TIFF file cv2 cannot decode when it starts as one: truncated, damaged or
        of a variant cv2 lacks), or its header (JPEG, PNG, GIF, BMP, TIFF, WebP) declares more
        than `MAX_IMAGE_PIXELS` pixels (a file of a few KB may declare 30000×30000: its
        decoding alone would take GBs).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"image file {path!r} is a folder, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # turned below: cv2's versions differ
    data = np.fromfile(path, np.uint8)
    if not data.size:
        raise ValueError(f"cannot read image file {path!r}: the file is empty")
    size = image_headers.declared_size(data.tobytes())
    if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"cannot read image file {path!r}: its header declares {size[0]}x{size[1]} pixels, "
            f"more than the {MAX_IMAGE_PIXELS:,} read (visualize.MAX_IMAGE_PIXELS)"
        )
    try:
        image, refusal = cv2.imdecode(data, flags), ""
    except cv2.error as error:  # e.g. a size beyond cv2's own limits in a format read without
        image, refusal = None, f" ({' '.join(str(error).split())})"  # a header here
    if image is None:
        kind = next((k for magic, k in _SIGNATURES if data[: len(magic)].tobytes() == magic), None)
        reason = (
            f"a {kind} file cv2 cannot decode (truncated, damaged or a variant cv2 lacks?)"
            if kind
            else "not an image format cv2 decodes"
        )
        raise ValueError(f"cannot read image file {path!r}: {reason}{refusal}")
    if exif_orientation:
        image = image_headers.orient(image, image_headers.exif_orientation(data.tobytes()))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# Images larger than this (16384², 0.8 GB as RGB) are refused before decoding.
MAX_IMAGE_PIXELS = 2**28


# The first bytes of the formats that cameras, scanners and browsers write, to tell a damaged
# file of a known format from a file of another kind.
_SIGNATURES = (
    (image_headers.JPEG_SIGNATURE, "JPEG"),
    (image_headers.PNG_SIGNATURE, "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    *((signature, "TIFF") for signature in image_headers.TIFF_SIGNATURES),
)


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes ``[H, W, 3]`` uint8 RGB `image` to `path`; the format follows the extension.

    Raises:
      ValueError: `image` is not ``[H, W, 3]`` uint8 (a numpy array or one `np.asarray` reads:
        JAX, torch on the CPU, PIL), or no encoder handles the extension.
      OSError: the file cannot be written (no such folder, a full disk, no permission), with
        the system's reason and `path`; nothing is left at `path` after a failed write.
    """
    image = _as_image(image)
    path = os.fspath(path)
    try:  # encoded here, written below: cv2.imwrite says only False, whatever went wrong
        encoded, data = cv2.imencode(
            os.path.splitext(path)[1], cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        )
    except cv2.error as e:  # e.g. an extension no encoder handles
        raise ValueError(f"cv2 could not encode {path!r}: {e}") from e
    if not encoded:
        raise ValueError(f"cv2 could not encode {path!r}")
    write_file(path, lambda f: f.write(data.tobytes()), binary=True)


def _as_image(image: np.ndarray, grey: bool = False) -> np.ndarray:
    """`image` as a numpy ``[H, W, 3]`` uint8 array (with `grey`, ``[H, W]`` and ``[H, W, 1]``
    repeated into three channels); ValueError naming what was given otherwise."""
    given = type(image).__name__
    try:
        image = np.asarray(image)
    except (TypeError, RuntimeError) as error:  # e.g. torch: bfloat16, requires_grad
        raise ValueError(f"image must be uint8 RGB [H, W, 3], got a {given} ({error})") from None
    if grey and image.dtype == np.uint8 and (image.ndim == 2 or image.shape[2:] == (1,)):
        return np.repeat(image.reshape((*image.shape[:2], 1)), 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        what = "" if given == "ndarray" else f"a {given}, "
        raise ValueError(
            f"image must be uint8 RGB [H, W, 3], got {what}{image.dtype} {image.shape}"
        )
    return image


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    masks: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    alpha: float = 0.5,
) -> np.ndarray:
    """Draws each detection's mask (blended), box and "name score" label on a copy of `image`.

    Detection i gets colour ``PALETTE[i % len(PALETTE)]``: inside its mask every pixel becomes
    ``(1 - alpha) * pixel + alpha * colour`` (later detections blend over earlier ones), its box
    is a rectangle of that colour ``t = max(1, round(min(H, W) / 800))`` pixels wide along the
    inside of the outermost pixels the box covers, and the label sits in a filled box of that
    colour on the box's top edge (kept inside the image), its text drawn with lines ``t`` wide.
    The labels come after every mask and box, the first detection's last, so that where labels
    overlap the first one (the highest scoring, in the predictor's order) stays readable. The
    font (cv2's Hershey) has ASCII only: accents are dropped from names (``café`` -> ``cafe``)
    and other characters written as escapes (``猫`` -> ``\\u732b``), so names in other scripts
    stay apart (not all drawn as ``?``).

    Args:
      image: ``[H, W, 3]`` uint8 RGB (grey ``[H, W]`` or ``[H, W, 1]``, as the predictor takes,
        is drawn on in colour).
      boxes: ``[N, 4]`` float ``(x1, y1, x2, y2)`` in the image's pixels, finite (parts
        outside the image are not drawn).
      masks: ``[N, H, W]`` bool.
      scores: ``[N]`` float.
      class_names: N names (str: the predictor's ``class_names``, not its ``classes``).
      alpha: mask opacity in [0, 1].

    Returns:
      ``[H, W, 3]`` uint8 RGB; `image` itself is not modified.

    Raises:
      ValueError: on malformed or mismatched shapes, boxes that are not finite, names that are
        not strings, or `alpha` outside [0, 1].
    """
    image = _as_image(image, grey=True)
    boxes = np.asarray(boxes, np.float32)
    masks = np.asarray(masks, bool)
    scores = np.asarray(scores, np.float32)
    num = len(class_names)
    height, width = image.shape[:2]
    for name, array, shape in (
        ("boxes", boxes, (num, 4)),
        ("masks", masks, (num, height, width)),
        ("scores", scores, (num,)),
    ):
        if array.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} (N = {num} class names, image {height}x{width}), "
                f"got {array.shape}"
            )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for i, name in enumerate(class_names):
        if not isinstance(name, str):
            raise ValueError(
                f"class_names must be strings, got {type(name).__name__} {name} at {i} (the "
                "predictor's class_names, not its classes)"
            )
    not_finite = np.flatnonzero(~np.isfinite(boxes).all(axis=1))
    if not_finite.size:
        first = int(not_finite[0])
        raise ValueError(f"boxes must be finite, got {boxes[first]} at detection {first}")

    blended = image.astype(np.float32)
    colours = [np.asarray(PALETTE[i % len(PALETTE)], np.float32) for i in range(num)]
    for mask, colour in zip(masks, colours):
        blended[mask] = (1.0 - alpha) * blended[mask] + alpha * colour
    out = np.round(blended).astype(np.uint8)

    font_scale = max(0.3, min(height, width) / 800)
    thickness = max(1, round(min(height, width) / 800))
    # Beyond the outline's width past the image nothing is drawn: clipped so that cv2's int32
    # holds them, the outline (drawn inwards) still outside.
    margin = thickness + 2
    boxes = np.clip(boxes, -margin, np.array([width, height, width, height], np.float32) + margin)
    corners = []
    for box, colour in zip(boxes, colours):
        colour = tuple(int(c) for c in colour)
        x1, y1 = int(np.floor(box[0])), int(np.floor(box[1]))  # the first and last pixel
        x2, y2 = max(int(np.ceil(box[2])) - 1, x1), max(int(np.ceil(box[3])) - 1, y1)  # covered
        for k in range(min(thickness, (x2 - x1) // 2 + 1, (y2 - y1) // 2 + 1)):  # inwards
            cv2.rectangle(out, (x1 + k, y1 + k), (x2 - k, y2 - k), colour, thickness=1)
        corners.append((x1, y1))
    labelled = list(zip(corners, scores, class_names, colours))
    for (x1, y1), score, name, colour in reversed(labelled):
        colour = tuple(int(c) for c in colour)
        text = f"{_ascii(name)} {score:.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, font_scale, thickness)
        label_h = text_h + baseline + 2
        left = min(max(x1, 0), max(width - text_w - 2, 0))
        top = min(max(y1 - label_h, 0), max(height - label_h, 0))
        cv2.rectangle(out, (left, top), (left + text_w + 2, top + label_h), colour, thickness=-1)
        text_colour = (0, 0, 0) if sum(colour) > 384 else (255, 255, 255)
        cv2.putText(
            out,
            text,
            (left + 1, top + text_h + 1),
            _FONT,
            font_scale,
            text_colour,
            thickness,
            cv2.LINE_AA,
        )
    return out


def _ascii(name: str) -> str:
    """`name` in the ASCII characters cv2's fonts draw: accents dropped, others escaped."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    return plain.encode("ascii", "backslashreplace").decode("ascii")
