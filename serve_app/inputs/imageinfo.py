"""Image type and size from the header bytes, without decoding any pixel data.

This runs on untrusted bytes before a decoder sees them, so that a tiny file announcing a
60000x60000 canvas (a decompression bomb) is refused before anything allocates for it. Every
parser below bounds-checks and gives up quietly: garbage yields ``None``, a recognised but
truncated or malformed header yields an ``ImageInfo`` whose dimensions are ``None``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from serve_app.errors import ServiceError

FORMATS = frozenset({"jpeg", "png", "webp", "bmp", "gif", "tiff"})
# What the service decodes. GIF is recognised only to be refused by name (OpenCV's GIF reader
# is new and its limits untested here), both before a URL's body is downloaded and at decode.
ACCEPTED = frozenset({"jpeg", "png", "webp", "bmp", "tiff"})
ACCEPTED_NAMES = "JPEG, PNG, WebP, BMP or TIFF"

# Enough leading bytes for sniff() to tell whether something is one of FORMATS at all (the
# longest signature is RIFF....WEBP); the dimensions may need more.
SNIFF_PREFIX_BYTES = 32

# A JPEG may put many segments before its frame header; real files need a handful to a few
# dozen. The cap keeps a hostile file of millions of tiny segments from costing seconds.
# A file that needs more is refused (its size is unknown, see check_pixels), not passed on.
_MAX_JPEG_SEGMENTS = 1024
_MAX_TIFF_ENTRIES = 1024

# SOF0..SOF15, minus the markers in that range that are not frame headers.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG, DAC
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field

# BITMAPCOREHEADER, OS/2 v2 (short and full), BITMAPINFOHEADER, V2, V3, V4, V5.
_BMP_DIB_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

_Dims = tuple[int | None, int | None]
_UNKNOWN: _Dims = (None, None)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int | None = None
    height: int | None = None

    @property
    def pixels(self) -> int | None:
        if self.width is None or self.height is None:
            return None
        return self.width * self.height


def sniff(data: bytes | bytearray | memoryview) -> ImageInfo | None:
    """Recognise an image from its leading bytes; ``None`` if it is none of ``FORMATS``."""
    try:
        b = bytes(data) if isinstance(data, memoryview) else data
        if not isinstance(b, bytes | bytearray):
            return None
        fmt = _format_of(b)
    except Exception:  # hostile input must never turn into a 500
        return None
    if fmt is None:
        return None
    try:
        width, height = _PARSERS[fmt](b)
    except Exception:  # the parsers bounds-check; this is the backstop for a missed case
        width, height = _UNKNOWN
    width, height = _positive(width), _positive(height)
    if width is None or height is None:  # half a size is no size
        return ImageInfo(fmt)
    return ImageInfo(fmt, width, height)


def check_accepted(info: ImageInfo | None) -> ImageInfo:
    """Refuse (415) bytes that are no image, or an image type the service does not decode."""
    if info is None or info.format not in ACCEPTED:
        kind = f"a {info.format.upper()} image" if info else "not an image"
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"{kind}; send {ACCEPTED_NAMES} bytes, or an image URL",
        )
    return info


def check_pixels(info: ImageInfo | None, max_pixels: int) -> None:
    """Refuse an image whose canvas exceeds ``max_pixels``, or whose size cannot be read.

    Fails closed: an image whose header does not give its size (malformed, truncated, over
    the segment/entry caps, a JPEG whose height comes later in a DNL marker) is refused with
    422 rather than handed to a decoder whose own limits are far larger than ours.
    """
    if info is None or info.width is None or info.height is None:
        fmt = info.format.upper() if info else "image"
        raise ServiceError(
            422,
            "unknown_image_size",
            f"the {fmt} header does not state a readable width and height; the service "
            "only decodes images whose size it can check first",
        )
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ServiceError(
            413,
            "too_many_pixels",
            f"{info.format} image is {info.width}x{info.height} "
            f"({pixels / 1e6:.1f} MP); the limit is {max_pixels / 1e6:.1f} MP",
        )


def _positive(v: int | None) -> int | None:
    return v if isinstance(v, int) and v > 0 else None


def _format_of(b: bytes | bytearray) -> str | None:
    if b[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if b[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if b[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if len(b) >= 12 and b[:4] == b"RIFF" and b[8:12] == b"WEBP":
        return "webp"
    if b[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if b[:2] == b"BM":
        # Two bytes are a weak signature (any text starting "BM..."), so also demand a
        # plausible DIB header size once there are enough bytes to read it.
        if len(b) < 18:
            return "bmp"
        return "bmp" if struct.unpack_from("<I", b, 14)[0] in _BMP_DIB_SIZES else None
    return None


def _png(b: bytes | bytearray) -> _Dims:
    # IHDR must be the first chunk: length(4) "IHDR" width(4) height(4), big-endian.
    if len(b) < 24 or b[12:16] != b"IHDR":
        return _UNKNOWN
    return struct.unpack_from(">II", b, 16)


def _gif(b: bytes | bytearray) -> _Dims:
    # Logical screen descriptor right after the signature; frames are clipped to it.
    if len(b) < 10:
        return _UNKNOWN
    return struct.unpack_from("<HH", b, 6)


def _bmp(b: bytes | bytearray) -> _Dims:
    if len(b) < 18:
        return _UNKNOWN
    dib = struct.unpack_from("<I", b, 14)[0]
    if dib == 12:  # BITMAPCOREHEADER: unsigned 16-bit
        return struct.unpack_from("<HH", b, 18) if len(b) >= 22 else _UNKNOWN
    if len(b) < 26:
        return _UNKNOWN
    width, height = struct.unpack_from("<ii", b, 18)
    return width, abs(height)  # negative height means top-down rows, not a negative size


def _webp(b: bytes | bytearray) -> _Dims:
    chunk = b[12:16]
    if chunk == b"VP8 ":
        # Lossy: 3-byte frame tag, start code 9d 01 2a, then 14-bit sizes (top 2 bits = scale).
        if len(b) < 30 or b[23:26] != b"\x9d\x01\x2a":
            return _UNKNOWN
        width, height = struct.unpack_from("<HH", b, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        # Lossless: signature byte 0x2f, then (width-1) and (height-1) as 14-bit fields.
        if len(b) < 25 or b[20] != 0x2F:
            return _UNKNOWN
        bits = struct.unpack_from("<I", b, 21)[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        # Extended: flags(1) reserved(3), then canvas (width-1), (height-1) as 24-bit LE.
        if len(b) < 30:
            return _UNKNOWN
        width = int.from_bytes(b[24:27], "little") + 1
        height = int.from_bytes(b[27:30], "little") + 1
        return width, height
    return _UNKNOWN


def _jpeg(b: bytes | bytearray) -> _Dims:
    n = len(b)
    i = 2
    for _ in range(_MAX_JPEG_SEGMENTS):
        # Like libjpeg, skip stray bytes between segments rather than give up on them.
        i = b.find(b"\xff", i)
        if i < 0:
            return _UNKNOWN
        while i < n and b[i] == 0xFF:  # fill bytes
            i += 1
        if i >= n:
            return _UNKNOWN
        marker = b[i]
        i += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI, or SOS: entropy-coded data and still no frame
            return _UNKNOWN
        if i + 2 > n:
            return _UNKNOWN
        length = struct.unpack_from(">H", b, i)[0]
        if length < 2:
            return _UNKNOWN
        if marker in _JPEG_SOF:
            # length(2) precision(1) height(2) width(2); height 0 means "defined by DNL later".
            if i + 7 > n:
                return _UNKNOWN
            height, width = struct.unpack_from(">HH", b, i + 3)
            return width, height
        i += length
    return _UNKNOWN


# TIFF field types libtiff converts to an integer width/height: BYTE, SHORT, LONG, SBYTE,
# SSHORT, SLONG, LONG8, SLONG8, IFD8 -> (struct code, size).
_TIFF_INTS = {
    1: ("B", 1),
    3: ("H", 2),
    4: ("I", 4),
    6: ("b", 1),
    8: ("h", 2),
    9: ("i", 4),
    16: ("Q", 8),
    17: ("q", 8),
    18: ("Q", 8),
}


def _tiff(b: bytes | bytearray) -> _Dims:
    """ImageWidth/ImageLength of the first IFD, classic or BigTIFF, as libtiff reads them.

    libtiff keeps the first of duplicated tags (and warns about the rest), so the first entry
    of each tag counts; a type it would not read as an integer makes the size unknown.
    """
    n = len(b)
    end = "<" if b[:2] == b"II" else ">"
    big = b[2:4] in (b"+\x00", b"\x00+")
    if big:
        # BigTIFF: bytesize 8, reserved 0, 8-byte IFD offset; IFD = 8-byte count, 20-byte
        # entries (tag, type, 8-byte count, 8-byte value field).
        if n < 16 or struct.unpack_from(end + "HH", b, 4) != (8, 0):
            return _UNKNOWN
        ifd = struct.unpack_from(end + "Q", b, 8)[0]
        head, entry, field, count_fmt = 8, 20, 8, "Q"
    else:
        if n < 8:
            return _UNKNOWN
        ifd = struct.unpack_from(end + "I", b, 4)[0]
        head, entry, field, count_fmt = 2, 12, 4, "I"
    if ifd + head > n:
        return _UNKNOWN
    count = struct.unpack_from(end + ("Q" if big else "H"), b, ifd)[0]
    dims: dict[int, int | None] = {}
    for k in range(min(count, _MAX_TIFF_ENTRIES)):
        p = ifd + head + entry * k
        if p + entry > n:
            break
        tag, typ = struct.unpack_from(end + "HH", b, p)
        if tag not in (256, 257) or tag in dims:  # ImageWidth, ImageLength; first one wins
            continue
        num = struct.unpack_from(end + count_fmt, b, p + 4)[0]
        code = _TIFF_INTS.get(typ)
        if code is None or num != 1 or code[1] > field:
            dims[tag] = None  # libtiff reads it some other way or not at all: unknown
            continue
        dims[tag] = struct.unpack_from(end + code[0], b, p + 4 + (8 if big else 4))[0]
    return dims.get(256), dims.get(257)


_PARSERS = {
    "png": _png,
    "jpeg": _jpeg,
    "gif": _gif,
    "webp": _webp,
    "tiff": _tiff,
    "bmp": _bmp,
}
