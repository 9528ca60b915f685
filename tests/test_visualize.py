"""Drawing detections and reading/writing images (mrcnn_jax.evaluation.visualize)."""

import errno
import os
import re

import numpy as np
import pytest
from helpers import write_sideways_jpeg

from mrcnn_jax import image_headers
from mrcnn_jax.evaluation import visualize

GREY = 100


def one_detection(height=40, width=60):
    """A grey image with one detection: box (10, 15)-(30, 35) and a mask filling its inside."""
    image = np.full((height, width, 3), GREY, np.uint8)
    boxes = np.array([[10.0, 15.0, 30.0, 35.0]], np.float32)
    masks = np.zeros((1, height, width), bool)
    masks[0, 17:33, 12:28] = True
    return image, boxes, masks, np.array([0.875], np.float32), ["square"]


def test_draw_detections_blends_mask_and_draws_box_and_label():
    image, boxes, masks, scores, names = one_detection()
    original = image.copy()
    out = visualize.draw_detections(image, boxes, masks, scores, names, alpha=0.5)
    colour = np.array(visualize.PALETTE[0])
    np.testing.assert_array_equal(image, original)  # the input is not modified
    assert out.shape == image.shape and out.dtype == np.uint8
    # Inside the mask, away from the box outline and the label: the exact blend.
    np.testing.assert_array_equal(out[25, 20], np.round(0.5 * GREY + 0.5 * colour))
    # The outline on the outermost covered pixels: columns 10 and 29, rows 15 and 34.
    for y, x in ((25, 10), (25, 29), (34, 20)):
        np.testing.assert_array_equal(out[y, x], colour)
    assert not np.array_equal(out[25, 9], colour) and not np.array_equal(out[25, 30], colour)
    # Far from the detection nothing changes.
    np.testing.assert_array_equal(out[38:, 40:], original[38:, 40:])
    # The label is drawn in a filled box ending at the box's top edge.
    label_region = out[:15, 10:]
    assert (label_region == colour).all(axis=-1).sum() > 20
    assert (np.abs(label_region.astype(int) - colour).sum(axis=-1) > 100).any()  # the text


def test_draw_detections_alpha_and_empty():
    image, boxes, masks, scores, names = one_detection()
    opaque = visualize.draw_detections(image, boxes, masks, scores, names, alpha=1.0)
    np.testing.assert_array_equal(opaque[25, 20], visualize.PALETTE[0])
    empty = visualize.draw_detections(
        image, np.zeros((0, 4)), np.zeros((0, 40, 60), bool), np.zeros(0), []
    )
    np.testing.assert_array_equal(empty, image)


def test_draw_detections_colours_cycle_per_instance():
    image = np.zeros((20, 20 * 12, 3), np.uint8)
    n = len(visualize.PALETTE) + 2
    masks = np.zeros((n, 20, 20 * 12), bool)
    boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        masks[i, 10:18, 20 * i + 5 : 20 * i + 15] = True
        boxes[i] = [20 * i + 2, 5, 20 * i + 18, 20]
    out = visualize.draw_detections(image, boxes, masks, np.ones(n), ["x"] * n, alpha=1.0)
    for i in range(n):
        np.testing.assert_array_equal(
            out[14, 20 * i + 10], visualize.PALETTE[i % len(visualize.PALETTE)]
        )


def test_the_first_detections_label_is_drawn_last_on_top():
    """Two detections with the same box: both labels start at the same corner, and the first
    (highest scoring) one's is drawn over the second's, which was drawn over it before."""
    image, boxes, masks, scores, _ = one_detection()
    two = [np.concatenate([a, a]) for a in (boxes, masks, scores)]
    out = visualize.draw_detections(image, *two, ["a", "a"])
    top = np.flatnonzero((out[:15, 10] != GREY).any(axis=-1))[0]  # the labels' top left
    np.testing.assert_array_equal(out[top, 10], visualize.PALETTE[0])
    assert not (out[:15] == visualize.PALETTE[1]).all(axis=-1).any()  # covered by the first


def test_lines_grow_with_the_image_and_stay_inside_the_box():
    """On a 1600² image boxes are 2 pixels wide, inwards from the outermost covered pixels
    (at 40×60: 1, as `test_draw_detections_blends_mask_and_draws_box_and_label` checks)."""
    image = np.full((1600, 1600, 3), GREY, np.uint8)
    boxes = np.array([[400.0, 500.0, 900.0, 1100.0]], np.float32)
    masks = np.zeros((1, 1600, 1600), bool)
    out = visualize.draw_detections(image, boxes, masks, np.ones(1), ["x"])
    colour = visualize.PALETTE[0]
    for x, expected in ((399, False), (400, True), (401, True), (402, False), (898, True)):
        assert (out[800, x] == colour).all() == expected, x
    assert (out[1099, 600] == colour).all() and (out[1098, 600] == colour).all()
    assert not (out[1097, 600] == colour).all() and not (out[1100, 600] == colour).all()


def test_names_outside_ascii_are_drawn_apart():
    """cv2's font has ASCII only: accents are dropped and other characters escaped, so two
    classes named in another script no longer both draw as "? 0.88"."""
    assert visualize._ascii("café") == "cafe"
    assert visualize._ascii("猫 cat") == "\\u732b cat"
    drawn = [visualize.draw_detections(*one_detection()[:4], [name]) for name in ("猫", "犬")]
    assert not np.array_equal(*drawn)


@pytest.mark.parametrize(
    ("name", "change", "match"),
    [
        ("image", lambda a: a[0].astype(np.float32), "image must be uint8 RGB"),
        ("boxes", lambda a: a[1][:, :3], "boxes must have shape"),
        ("masks", lambda a: a[2][:, :-1], "masks must have shape"),
        ("scores", lambda a: np.zeros(2), "scores must have shape"),
    ],
)
def test_draw_detections_rejects_bad_shapes(name, change, match):
    args = list(one_detection())
    index = ("image", "boxes", "masks", "scores").index(name)
    args[index] = change(args)
    with pytest.raises(ValueError, match=match):
        visualize.draw_detections(*args)


def test_draw_detections_names_bad_detections_and_clips_far_boxes():
    """Label ids given as names, a NaN box: one line naming the argument (were a TypeError in
    unicodedata and "cannot convert float NaN to integer"). Boxes far past the image (beyond
    cv2's int32) draw as the same boxes clipped to a pixel past the edges."""
    image, boxes, masks, scores, _ = one_detection()
    with pytest.raises(ValueError, match=r"class_names must be strings, got int32 3 at 0 \(the"):
        visualize.draw_detections(image, boxes, masks, scores, list(np.array([3], np.int32)))
    bad = np.array([[10.0, np.nan, 30.0, 35.0]], np.float32)
    with pytest.raises(
        ValueError, match=r"boxes must be finite, got \[10. nan 30. 35.\] at detection 0"
    ):
        visualize.draw_detections(image, bad, masks, scores, ["a"])
    far = np.array([[-1e10, 15.0, 1e10, 1e12]], np.float32)
    near = np.array([[-2.0, 15.0, 62.0, 42.0]], np.float32)
    np.testing.assert_array_equal(
        visualize.draw_detections(image, far, masks, scores, ["a"]),
        visualize.draw_detections(image, near, masks, scores, ["a"]),
    )
    edges = visualize.draw_detections(image, near, np.zeros_like(masks), scores, ["a"])
    assert (edges[30:, [0, -1]] == GREY).all()  # the sides past the image are not drawn
    big = np.full((2400, 2400, 3), GREY, np.uint8)  # outlines 3 pixels wide, drawn inwards
    boxes = np.array([[-50.0, 100.0, 1e6, 2000.0]], np.float32)
    drawn = visualize.draw_detections(big, boxes, np.zeros((1, 2400, 2400), bool), scores, ["a"])
    assert (drawn[1000:1990, [0, 1, 2, -3, -2, -1]] == GREY).all()  # its sides: outside


def test_images_of_other_array_types_and_grey_are_drawn_and_written(tmp_path):
    """`draw_detections` and `write_image` take what `np.asarray` reads as uint8 RGB (JAX, PIL;
    write_image said "cv2 could not encode" for a JAX array and had no `ndim` for a list, now
    named); a grey image, as the predictor takes it, is drawn on in colour (was refused)."""
    import jax.numpy as jnp
    from PIL import Image

    image, boxes, masks, scores, names = one_detection()
    image[::3] = 7  # not uniform: a dropped or turned row would show
    want = visualize.draw_detections(image, boxes, masks, scores, names)
    for given in (jnp.asarray(image), Image.fromarray(image)):
        got = visualize.draw_detections(given, boxes, masks, scores, names)
        np.testing.assert_array_equal(got, want, err_msg=type(given).__name__)
        visualize.write_image(tmp_path / "a.png", given)
        np.testing.assert_array_equal(visualize.read_image(tmp_path / "a.png"), image)
    for grey in (image[..., 0], image[..., :1]):
        got = visualize.draw_detections(grey, boxes, masks, scores, names)
        np.testing.assert_array_equal(got, want)  # the image's three channels are equal
    with pytest.raises(
        ValueError, match=r"image must be uint8 RGB \[H, W, 3\], got uint8 \(40, 60\)"
    ):
        visualize.write_image(tmp_path / "b.png", image[..., 0])
    with pytest.raises(ValueError, match=r"got a list, int64 \(40, 60, 3\)"):
        visualize.write_image(tmp_path / "b.png", image.astype(int).tolist())
    assert not (tmp_path / "b.png").exists()


def test_read_image_names_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=re.escape(f"{str(tmp_path)!r} is a folder, not")):
        visualize.read_image(tmp_path)


def test_draw_detections_rejects_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        visualize.draw_detections(*one_detection(), alpha=1.5)


def test_image_round_trip(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    visualize.write_image(path, image)
    np.testing.assert_array_equal(visualize.read_image(path), image)  # RGB order kept


def test_read_image_turns_by_exif_orientation_only_when_asked(tmp_path):
    """Stored pixels by default (as the input pipeline reads them); turned 90° clockwise for
    orientation 6 with `exif_orientation=True`, as PIL's `ImageOps.exif_transpose` does."""
    from PIL import Image, ImageOps

    rows, cols = np.mgrid[:30, :50]  # smooth, and no symmetry a wrong turn would keep
    image = np.stack([rows * 8, cols * 5, rows * 2 + cols * 3], axis=-1).astype(np.uint8)
    path = tmp_path / "sideways.jpg"
    write_sideways_jpeg(path, image)
    stored = visualize.read_image(path)
    assert stored.shape == (30, 50, 3)
    turned = visualize.read_image(path, exif_orientation=True)
    np.testing.assert_array_equal(turned, np.rot90(stored, k=-1))
    with Image.open(path) as reference:
        reference = np.asarray(ImageOps.exif_transpose(reference).convert("RGB"))
    assert reference.shape == turned.shape == (50, 30, 3)
    assert np.abs(reference.astype(int) - turned).mean() < 2  # another JPEG decoder


def test_read_image_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        visualize.read_image(missing)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.jpg'?: the file is empty"):
        visualize.read_image(empty)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.jpg'?: not an image format cv2 decodes"):
        visualize.read_image(not_an_image)
    # Files cut short (an interrupted copy) are named by their format.
    image = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
    for extension, kind, keep in ((".jpg", "JPEG", 300), (".png", "PNG", 40)):
        whole = tmp_path / f"whole{extension}"
        visualize.write_image(whole, image)
        cut = tmp_path / f"cut{extension}"
        cut.write_bytes(whole.read_bytes()[:keep])
        message = f"cut\\{extension}'?: a {kind} file cv2 cannot decode \\(truncated, damaged or a "
        with pytest.raises(ValueError, match=message):
            visualize.read_image(cut)


def test_read_image_refuses_a_header_declaring_too_many_pixels(tmp_path, monkeypatch):
    """A file of a few KB may declare 30000×30000 pixels: refused before decoding, the declared
    size read from the header of each format predict.py reads from folders (also a progressive
    JPEG's, one after an EXIF block, big- and little-endian TIFF, BigTIFF, OS/2 and top-down
    BMP, the three kinds of WebP); at the limit it is read."""
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (30, 50, 3), np.uint8)
    files = {}
    for name, options in (
        ("a.png", {}),
        ("b.jpg", {}),
        ("c.jpg", {"progressive": True}),
        ("e.gif", {}),
        ("f.bmp", {}),
        ("g.tif", {"compression": "tiff_deflate"}),
        ("n.tif", {"big_tiff": True}),
        ("h.webp", {"quality": 80}),
        ("i.webp", {"lossless": True}),
        ("j.webp", {"exif": b"Exif\0\0MM\0*\0\0\0\x08\0\0"}),  # extended (VP8X)
    ):
        files[name] = tmp_path / name
        Image.fromarray(image).save(files[name], **options)
    files["d.jpg"] = tmp_path / "d.jpg"
    write_sideways_jpeg(files["d.jpg"], image)
    files["k.tif"] = tmp_path / "k.tif"  # big-endian, as Pillow writes 16-bit grey
    grey = np.arange(30 * 50, dtype=">u2").tobytes()
    Image.frombytes("I;16B", (50, 30), grey).save(files["k.tif"])
    bmp = bytearray(files["f.bmp"].read_bytes())
    bmp[22:26] = (-30).to_bytes(4, "little", signed=True)  # rows stored top-down
    files["l.bmp"] = tmp_path / "l.bmp"
    files["l.bmp"].write_bytes(bytes(bmp))
    core = bytearray(files["f.bmp"].read_bytes()[:14]) + (12).to_bytes(4, "little")
    files["m.bmp"] = tmp_path / "m.bmp"  # OS/2's 12-byte header: 16-bit sizes, no pixels
    files["m.bmp"].write_bytes(
        bytes(core + (50).to_bytes(2, "little") + (30).to_bytes(2, "little"))
    )
    magic = {n: files[n].read_bytes()[:4] for n in ("g.tif", "k.tif", "n.tif")}
    assert magic == {"g.tif": b"II*\0", "k.tif": b"MM\0*", "n.tif": b"II+\0"}  # n: BigTIFF
    assert {files[n].read_bytes()[12:16] for n in ("h.webp", "i.webp", "j.webp")} == {
        b"VP8 ",
        b"VP8L",
        b"VP8X",
    }
    monkeypatch.setattr(visualize, "MAX_IMAGE_PIXELS", 30 * 50)
    for path in files.values():
        assert image_headers.declared_size(path.read_bytes()) == (30, 50), path.name
        if path.name != "m.bmp":
            assert visualize.read_image(path).shape[:2] == (30, 50)
    monkeypatch.setattr(visualize, "MAX_IMAGE_PIXELS", 30 * 50 - 1)
    for path in files.values():
        with pytest.raises(ValueError, match=r"its header declares 30x50 pixels, more than the"):
            visualize.read_image(path)


@pytest.mark.parametrize(
    "name, error",
    [
        ("image.unknown", ValueError),
        ("image", ValueError),
        ("no_such_dir/image.png", FileNotFoundError),
    ],
)
def test_write_image_errors_name_the_file(tmp_path, name, error):
    with pytest.raises(error, match=re.escape(name)):
        visualize.write_image(tmp_path / name, np.zeros((4, 4, 3), np.uint8))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_failed_image_write_names_the_file_and_leaves_nothing(tmp_path):
    """Writes into /dev/full fail as on a full disk (ENOSPC), with no file name: the error names
    the path (cv2.imwrite said only False: "does its directory exist?")."""
    path = tmp_path / "full.png"
    path.symlink_to("/dev/full")
    with pytest.raises(OSError, match=re.escape(f"No space left on device: '{path}'")) as failure:
        visualize.write_image(path, np.zeros((4, 4, 3), np.uint8))
    assert failure.value.errno == errno.ENOSPC
    assert not os.path.lexists(path)
