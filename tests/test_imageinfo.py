"""Header sniffing: real encoder output, hand-made bombs, and hostile garbage."""

from __future__ import annotations

import pickle
import random
import struct
import zlib

import cv2
import numpy as np
import pytest

from serve_app.errors import ServiceError
from serve_app.inputs.imageinfo import FORMATS, ImageInfo, check_pixels, sniff

W, H = 53, 37  # odd, different sizes: catches swapped or off-by-one fields


def encode(ext: str, params: tuple[int, ...] = (), channels: int = 3) -> bytes:
    image = np.zeros((H, W, channels), np.uint8)
    image[::3, ::2] = 200  # some content, so encoders cannot collapse it
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


ENCODED = {
    "png": encode(".png"),
    "jpeg-baseline": encode(".jpg"),
    "jpeg-progressive": encode(".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1)),
    "webp-lossy-VP8": encode(".webp", (cv2.IMWRITE_WEBP_QUALITY, 80)),
    "webp-lossless-VP8L": encode(".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
    "webp-alpha-VP8X": encode(".webp", (cv2.IMWRITE_WEBP_QUALITY, 80), channels=4),
    "bmp": encode(".bmp"),
    "tiff": encode(".tiff"),
    "gif": encode(".gif"),
}


@pytest.mark.parametrize("name", sorted(ENCODED))
def test_sniffs_real_encoder_output(name: str) -> None:
    data = ENCODED[name]
    assert sniff(data) == ImageInfo(name.split("-")[0], W, H)
    # bytearray and memoryview are accepted as well as bytes
    assert sniff(bytearray(data)) == sniff(memoryview(data)) == sniff(data)


def test_webp_chunk_layouts_are_the_ones_named() -> None:
    assert ENCODED["webp-lossy-VP8"][12:16] == b"VP8 "
    assert ENCODED["webp-lossless-VP8L"][12:16] == b"VP8L"
    assert ENCODED["webp-alpha-VP8X"][12:16] == b"VP8X"
    assert ENCODED["jpeg-progressive"].find(b"\xff\xc2") > 0  # SOF2, not SOF0


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", zlib.crc32(chunk[4:]))


def test_png_bomb_header_reports_its_size_and_is_refused() -> None:
    info = sniff(png_header(60000, 60000))
    assert info == ImageInfo("png", 60000, 60000)
    assert info.pixels == 3_600_000_000
    with pytest.raises(ServiceError) as exc:
        check_pixels(info, 50_000_000)
    assert (exc.value.status, exc.value.code) == (413, "too_many_pixels")
    assert "60000x60000" in exc.value.message


def test_check_pixels_boundaries() -> None:
    check_pixels(ImageInfo("png", 5000, 10000), 50_000_000)  # exactly at the limit: fine
    with pytest.raises(ServiceError):
        check_pixels(ImageInfo("png", 5001, 10000), 50_000_000)
    for unknown in (ImageInfo("jpeg", None, None), None):  # fail closed: 422, never passed on
        with pytest.raises(ServiceError) as exc:
            check_pixels(unknown, 10**12)
        assert (exc.value.status, exc.value.code) == (422, "unknown_image_size")


def test_hand_made_headers_for_every_parser() -> None:
    # JPEG: APP0, a DHT (0xC4 is in the SOF range but is not a frame header), then SOF1.
    jpeg = (
        b"\xff\xd8"
        + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + b"\xff\xc4\x00\x06\x00\x01\x02\x03"
        + b"\xff\xff"  # fill bytes before a marker are legal
        + b"\xff\xc1\x00\x0b\x08"
        + struct.pack(">HH", 4000, 7000)
        + b"\x01\x01\x11\x00"
    )
    assert sniff(jpeg) == ImageInfo("jpeg", 7000, 4000)
    gif = b"GIF89a" + struct.pack("<HH", 640, 480) + b"\x00" * 3
    assert sniff(gif) == ImageInfo("gif", 640, 480)
    bmp_topdown = b"BM" + b"\x00" * 12 + struct.pack("<Iii", 40, 300, -200) + b"\x00" * 28
    assert sniff(bmp_topdown) == ImageInfo("bmp", 300, 200)
    bmp_core = b"BM" + b"\x00" * 12 + struct.pack("<IHH", 12, 30, 20) + b"\x00" * 4
    assert sniff(bmp_core) == ImageInfo("bmp", 30, 20)
    vp8x = b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x10\x00\x00\x00"
    vp8x += (16383).to_bytes(3, "little") + (9).to_bytes(3, "little")
    assert sniff(vp8x) == ImageInfo("webp", 16384, 10)
    tiff_be = b"MM\x00*" + struct.pack(">IH", 8, 2)
    tiff_be += struct.pack(">HHIHH", 256, 3, 1, 1234, 0) + struct.pack(">HHII", 257, 4, 1, 99)
    assert sniff(tiff_be) == ImageInfo("tiff", 1234, 99)


def test_jpeg_without_frame_header_before_scan_has_unknown_size() -> None:
    jpeg = b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 100
    assert sniff(jpeg) == ImageInfo("jpeg", None, None)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x89PNG",
        b"hello world, not an image at all",
        b"<html><body>nope</body></html>",
        b"RIFF\x10\x00\x00\x00WAVEfmt ",  # RIFF but not WebP
        b"BMW is a car maker, and this text starts with BM",
        b"\x00" * 64,
    ],
)
def test_non_images_are_none(data: bytes) -> None:
    assert sniff(data) is None


def test_wrong_types_are_none() -> None:
    assert sniff("\x89PNG\r\n\x1a\n") is None  # type: ignore[arg-type]
    assert sniff(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(ENCODED))
def test_every_truncation_is_handled(name: str) -> None:
    data = ENCODED[name]
    fmt = name.split("-")[0]
    for n in range(min(len(data), 400)):
        info = sniff(data[:n])
        assert info is None or info.format == fmt
        if info is not None and info.width is not None:
            assert (info.width, info.height) == (W, H)


def test_random_bytes_and_corrupted_headers_never_raise() -> None:
    rng = random.Random(1234)
    prefixes = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"II*\0"]
    prefixes += [b"MM\0*", b"BM", b""]
    for i in range(4000):
        body = rng.randbytes(rng.randrange(0, 200))
        data = prefixes[i % len(prefixes)] + body
        info = sniff(data)
        assert info is None or (
            info.format in FORMATS
            and (info.width is None or info.width > 0)
            and (info.height is None or info.height > 0)
        )
    for name, data in ENCODED.items():  # flip bytes inside real headers
        for _ in range(300):
            corrupt = bytearray(data[:300])
            for _ in range(3):
                corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
            info = sniff(bytes(corrupt))
            assert info is None or info.format in FORMATS, name


def test_hostile_jpeg_of_many_tiny_segments_is_cheap() -> None:
    data = b"\xff\xd8" + b"\xff\xfe\x00\x02" * 500_000 + b"\xff\xc0\x00\x0b\x08\x00\x10\x00\x10"
    assert sniff(data) == ImageInfo("jpeg", None, None)  # gave up at the segment cap
    with pytest.raises(ServiceError) as exc:  # ... and an unknown size is refused
        check_pixels(sniff(data), 50_000_000)
    assert exc.value.status == 422


def test_input_error_pickles() -> None:
    err = ServiceError(413, "too_many_pixels", "60000x60000 is too big")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ServiceError
    assert (back.status, back.code, back.message) == (413, "too_many_pixels", err.message)
    assert str(back) == str(err) and back.body() == err.body()
