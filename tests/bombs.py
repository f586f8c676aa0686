"""Decompression bombs and size tricks: small files whose decoding would cost gigabytes.

Each entry is (bytes, statuses the service may answer). They are built here, byte by byte,
so that each one states exactly which header field it abuses; none needs test data.
"""

from __future__ import annotations

import struct
import zlib

# Over the service's 50 MP, under OpenCV's default 2^30 pixels: without our header check
# OpenCV would allocate the whole canvas (20000x20000x3 = 1.1 GiB) and start decoding.
BIG_W, BIG_H = 20000, 20000


def jpeg_sof(width: int, height: int) -> bytes:
    """SOF0 (baseline) for a 3-component image."""
    comps = b"".join(bytes([i, 0x11, 0]) for i in (1, 2, 3))
    return b"\xff\xc0" + struct.pack(">HBHHB", 8 + len(comps), 8, height, width, 3) + comps


def jpeg_tail() -> bytes:
    # A DHT and a scan header with a little entropy data, then EOI: enough that a decoder
    # that accepted the frame would allocate it and start decoding.
    dht = b"\xff\xc4" + struct.pack(">H", 2 + 17 + 1) + b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 12, 3) + b"\x01\x00\x02\x00\x03\x00" + b"\x00\x3f\x00"
    return dht + sos + b"\x00" * 64 + b"\xff\xd9"


def jpeg_padded_segments(segments: int = 1500) -> bytes:
    """More COM segments before the frame than the sniffer reads: the size stays unknown."""
    return b"\xff\xd8" + b"\xff\xfe\x00\x02" * segments + jpeg_sof(BIG_W, BIG_H) + jpeg_tail()


def jpeg_huge_frame(width: int = 65535, height: int = 65535) -> bytes:
    return b"\xff\xd8" + jpeg_sof(width, height) + jpeg_tail()


def _tiff_entries(entries: list[tuple[int, int, int]], big: bool) -> bytes:
    """A little-endian TIFF (classic or BigTIFF) of one IFD: (tag, type, value) entries,
    8-bit gray, one strip of zeros right after the IFD."""
    entry_size, head = (20, 8) if big else (12, 2)
    ifd_at = 16 if big else 8
    data_at = ifd_at + head + entry_size * (len(entries) + 5) + (8 if big else 4)
    width = next(v for t, _, v in entries if t == 256)
    height = next(v for t, _, v in entries if t == 257)
    strip = min(width * height, 4096)
    entries = entries + [(258, 3, 8), (262, 3, 1), (273, 4, data_at), (277, 3, 1), (279, 4, strip)]
    if big:
        out = b"II+\x00" + struct.pack("<HHQ", 8, 0, ifd_at) + struct.pack("<Q", len(entries))
        for tag, typ, value in entries:
            out += struct.pack("<HHQQ", tag, typ, 1, value)
        out += struct.pack("<Q", 0)
    else:
        out = b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(entries))
        for tag, typ, value in entries:
            value_field = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
            out += struct.pack("<HHI", tag, typ, 1) + value_field
        out += struct.pack("<I", 0)
    assert len(out) == data_at
    return out + b"\x00" * strip


def tiff(width: int, height: int, *, big: bool = False) -> bytes:
    return _tiff_entries([(256, 4, width), (257, 4, height)], big)


def tiff_duplicate_tags() -> bytes:
    """ImageWidth/ImageLength twice: huge first (what libtiff uses), tiny last."""
    return _tiff_entries([(256, 4, BIG_W), (257, 4, BIG_H), (256, 4, 16), (257, 4, 16)], big=False)


def png_declared(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    out = b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(chunk[4:]))
    idat = zlib.compress(b"\x00" * 4096)
    out += struct.pack(">I", len(idat)) + b"IDAT" + idat
    out += struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return out + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def webp_declared(width: int, height: int) -> bytes:
    """VP8X canvas of the given size around a tiny VP8L frame."""
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    vp8x += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    vp8l = b"VP8L" + struct.pack("<I", 5) + b"\x2f" + b"\x00\x00\x00\x00" + b"\x00"
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


# name -> (bytes, acceptable statuses)
BOMBS: dict[str, tuple[bytes, set[int]]] = {
    "jpeg-1500-segments-then-20000x20000": (jpeg_padded_segments(), {422}),
    "jpeg-frame-65535x65535": (jpeg_huge_frame(), {413}),
    "jpeg-frame-20000x20000": (jpeg_huge_frame(BIG_W, BIG_H), {413}),
    "bigtiff-20000x20000": (tiff(BIG_W, BIG_H, big=True), {413}),
    "tiff-20000x20000": (tiff(BIG_W, BIG_H), {413}),
    "tiff-duplicate-size-tags": (tiff_duplicate_tags(), {413}),
    "png-60000x60000": (png_declared(60000, 60000), {413}),
    "png-20000x20000": (png_declared(BIG_W, BIG_H), {413}),
    "webp-16384x16384": (webp_declared(16384, 16384), {413}),
}
