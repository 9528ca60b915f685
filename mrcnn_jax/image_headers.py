"""What an image file's header says, read without decoding the pixels: the size a PNG, JPEG,
GIF, BMP, TIFF or WebP file declares (`declared_size`), a JPEG's, PNG's or WebP's EXIF
orientation (`exif_orientation`; `orient` turns pixels as it says) and a TIFF's orientation tag
(`tiff_orientation`)."""

from collections.abc import Iterator

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# TIFF's: little- and big-endian, then BigTIFF's (64-bit offsets) in both orders.
TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, payload) of each segment of a JPEG file's bytes before its scan (where the pixels
    start); none for other formats, and none past a segment cut short."""
    if not data.startswith(JPEG_SIGNATURE):
        return
    at = 2
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker, length = data[at + 1], int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in (0xD9, 0xDA):  # the end, or the scan
            return
        yield marker, data[at + 4 : at + 2 + length]
        at += 2 + length


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) that an image file's header declares: a PNG's IHDR, a JPEG's frame
    header, a GIF's logical screen, a BMP's info header, a TIFF's first directory, a WebP's
    VP8, VP8L or VP8X chunk. None for other formats and for headers cut short."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    for marker, payload in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(payload) >= 5:
            # a start of frame: precision, then height and width
            return int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return _little(data, 8, 2), _little(data, 6, 2)
    if data.startswith(b"BM") and _little(data, 14, 4) == 12 and len(data) >= 22:
        return _little(data, 20, 2), _little(data, 18, 2)  # OS/2's header: 16-bit sizes
    if data.startswith(b"BM") and len(data) >= 26:
        height = int.from_bytes(data[22:26], "little", signed=True)  # < 0: stored top-down
        return abs(height), int.from_bytes(data[18:22], "little", signed=True)
    if data[:4] in TIFF_SIGNATURES:
        tags = _tiff_tags(data)
        if 256 in tags and 257 in tags:  # ImageWidth, ImageLength
            return tags[257], tags[256]
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":  # lossy: 14-bit sizes after the key frame's start code
            return _little(data, 28, 2) & 0x3FFF, _little(data, 26, 2) & 0x3FFF
        if chunk == b"VP8L":  # lossless: 14-bit sizes minus one, packed after a 0x2F byte
            bits = _little(data, 21, 4)
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
        if chunk == b"VP8X":  # extended: 24-bit canvas sizes minus one
            return _little(data, 27, 3) + 1, _little(data, 24, 3) + 1
    return None


def _little(data: bytes, at: int, size: int) -> int:
    """The little-endian unsigned integer of `size` bytes at `at`."""
    return int.from_bytes(data[at : at + size], "little")


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a PNG file's bytes (its pixels' IDAT chunks too; payloads
    are views, not copies); none for other formats, and none past a chunk cut short."""
    if not data.startswith(PNG_SIGNATURE):
        return
    view, at = memoryview(data), len(PNG_SIGNATURE)
    while at + 8 <= len(data):
        length, kind = int.from_bytes(data[at : at + 4], "big"), data[at + 4 : at + 8]
        if at + 12 + length > len(data):
            return
        yield kind, view[at + 8 : at + 8 + length]
        at += 12 + length  # length, type, payload, CRC


def _webp_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(FourCC, payload) of each chunk of a WebP file's bytes within its RIFF size (payloads are
    views, not copies); none for other formats, and none past a chunk cut short."""
    if not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return
    view, at, end = memoryview(data), 12, min(len(data), 8 + _little(data, 4, 4))
    while at + 8 <= end:
        kind, length = data[at : at + 4], _little(data, at + 4, 4)
        if at + 8 + length > end:
            return
        yield kind, view[at + 8 : at + 8 + length]
        at += 8 + length + length % 2  # payloads are padded to an even size


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1–8) of a JPEG, PNG or WebP file's bytes: from a JPEG's APP1
    block, a PNG's eXIf chunk (that starts with the TIFF header, as libpng requires: one with a
    JPEG's "Exif" prefix is ignored) or an extended WebP's EXIF chunk (announced by its VP8X
    chunk's flag, as the format requires). 1 (as stored) without the tag, for a malformed one
    and for other formats (a TIFF's own tag: `tiff_orientation`). `orient` turns pixels so."""
    blocks = [p[6:] for m, p in _jpeg_segments(data) if m == 0xE1 and p.startswith(b"Exif\0\0")]
    blocks += [bytes(p) for kind, p in _png_chunks(data) if kind == b"eXIf"]
    webp = list(_webp_chunks(data))
    if webp and webp[0][0] == b"VP8X" and len(webp[0][1]) and webp[0][1][0] & 0x08:
        blocks += [bytes(p) for kind, p in webp if kind == b"EXIF"]
    return _tiff_orientation(blocks[0]) if blocks else 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """`image` `[H, W, ...]` (the stored pixels) as EXIF `orientation` (1–8) says to show it:
    mirrored left-right (2) or top-bottom (4), turned half (3), a quarter clockwise (6) or
    anticlockwise (8), transposed (5) or transversed (7); as PIL's `ImageOps.exif_transpose`
    and OpenCV's JPEG decoding show it. Done here, not by OpenCV: its versions differ on which
    formats they turn (4.10 leaves a WebP as stored)."""
    turns = {
        1: lambda x: x,
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: x.swapaxes(0, 1),
        6: lambda x: x.swapaxes(0, 1)[:, ::-1],
        7: lambda x: x[::-1, ::-1].swapaxes(0, 1),
        8: lambda x: x.swapaxes(0, 1)[::-1],
    }
    return np.ascontiguousarray(turns[orientation](image))


def tiff_orientation(data: bytes) -> int:
    """The orientation tag (1–8) of a TIFF file's bytes: 1 without it and for other formats.
    OpenCV (and PIL) decode a TIFF turned as it says, whatever `cv2.IMREAD_IGNORE_ORIENTATION`
    asks (it holds for a JPEG's EXIF only)."""
    return _tiff_orientation(data) if data[:4] in TIFF_SIGNATURES else 1


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of an EXIF block's first directory (TIFF layout), or 1."""
    value = _tiff_tags(tiff).get(0x0112, 1)
    return value if 1 <= value <= 8 else 1


def _tiff_tags(tiff: bytes) -> dict[int, int]:
    """tag -> value of the SHORT, LONG and LONG8 entries holding one value in a TIFF layout's
    first directory (a TIFF or BigTIFF file's, an EXIF block's); {} for a malformed one."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return {}
    big = int.from_bytes(tiff[2:4], order) == 43  # BigTIFF: 8-byte counts, offsets, values
    number_size, entry_size = (8, 20) if big else (2, 12)
    directory = int.from_bytes(tiff[8:16] if big else tiff[4:8], order)
    count = int.from_bytes(tiff[directory : directory + number_size], order)
    tags = {}
    for k in range(count):
        at = directory + number_size + entry_size * k
        entry = tiff[at : at + entry_size]
        if len(entry) < entry_size:
            break
        kind = int.from_bytes(entry[2:4], order)
        number = int.from_bytes(entry[4:12] if big else entry[4:8], order)
        size = {3: 2, 4: 4, 16: 8}.get(kind)  # SHORT, LONG, LONG8: its value first in the field
        if number == 1 and size:
            value = entry[12:] if big else entry[8:]
            tags[int.from_bytes(entry[:2], order)] = int.from_bytes(value[:size], order)
    return tags
