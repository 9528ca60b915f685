"""What an image file's header says, read without decoding the pixels: the size a PNG or JPEG
declares (`declared_size`) and a JPEG's EXIF orientation (`exif_orientation`)."""

from collections.abc import Iterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


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
    """(height, width) that a PNG's IHDR or a JPEG's frame header declares; None for other
    formats and for headers cut short."""
    if data.startswith(PNG_SIGNATURE) and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    for marker, payload in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(payload) >= 5:
            # a start of frame: precision, then height and width
            return int.from_bytes(payload[1:3], "big"), int.from_bytes(payload[3:5], "big")
    return None


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1–8) of a JPEG file's bytes: 1 (as stored) without the tag, for a
    malformed one and for other formats."""
    for marker, payload in _jpeg_segments(data):
        if marker == 0xE1 and payload.startswith(b"Exif\0\0"):
            return _tiff_orientation(payload[6:])
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of an EXIF block's first directory (TIFF layout), or 1."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    directory = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[directory : directory + 2], order)
    for k in range(count):
        entry = tiff[directory + 2 + 12 * k : directory + 14 + 12 * k]
        if len(entry) < 12:
            break
        if int.from_bytes(entry[:2], order) == 0x0112:  # a SHORT, its value first
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1
