"""Fuzzing the HTTP surface: hundreds of malformed requests, zero 5xx, no replica harmed.

The corpus is generated here from a seeded RNG (VS_FUZZ_SEED overrides the seed, so a
failure can be replayed): corrupted JPEG/PNG/WebP made from the shared sample, random
bytes, decompression-bomb headers, broken multipart and JSON, bad base64, non-image URLs,
oversized bodies, bad query parameters. Each case says what a correct service answers:

- "error": a 4xx with the JSON error body;
- "valid": a real image: 200, or a 4xx the model explains (a 1x1 image may be too small);
- "either": a corrupted image, which a tolerant decoder may still read: 200 or a JSON 4xx.

Never a 5xx. Requests go out round-robin over the detector and OpenFaaS routes, two at a
time (below every queue limit, so a 503 here would be a bug, not backpressure).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from helpers import TEST_LIMITS, running_replicas, shared_file

SEED = int(os.environ.get("VS_FUZZ_SEED", "20240611"))
MAX_BODY = TEST_LIMITS["max_body_bytes"]
ROUTES = [
    "/v1/detect/cnn-face-detection",
    "/v1/detect/face-detect-pigo",
    "/v1/detect/face-detect-opencv",
    "/v1/detect/basic-face-detection",
    "/function/face-detect-pigo",
    "/function/cnn-face-detection.openfaas-fn",
    "/function/basic-face-detection",
]
SEGMENT_ROUTE = "/v1/segment/sam-segmentation-light"
WORKERS = 2
DEADLINE_S = 150  # the whole corpus; a hang must fail the test, not stall the suite


@dataclass
class Case:
    name: str
    expect: str  # "error" | "valid" | "either"
    request: dict[str, Any]  # httpx.Client.request keyword arguments
    route: str | None = None  # None: the next route in the rotation
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    case: Case
    route: str
    status: int
    body: bytes
    content_type: str
    seconds: float


# -- building blocks -----------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + data) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc & 0xFFFFFFFF)


def png_header(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)


def png_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, type) of each chunk of a well-formed PNG."""
    out, i = [], 8
    while i + 8 <= len(data):
        length = struct.unpack_from(">I", data, i)[0]
        out.append((i, data[i + 4 : i + 8]))
        i += 12 + length
    return out


def jpeg_sof_offset(data: bytes) -> int:
    """Offset of the frame header's marker, walking the segments (a plain search for FFC0
    can hit bytes inside an APP segment, as in the sample's Photoshop block)."""
    i = 2
    while i + 4 <= len(data):
        marker = data[i + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            return i
        i += 2 + struct.unpack_from(">H", data, i + 2)[0]
    raise AssertionError("no SOF in the sample JPEG")


def encode(ext: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok, ext
    return buf.tobytes()


def multipart(boundary: bytes, parts: list[tuple[bytes, bytes]], close: bool = True) -> bytes:
    """A multipart body from (headers, content) pairs, written by hand to break it at will."""
    out = b""
    for headers, content in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
    return out + (b"--" + boundary + b"--\r\n" if close else b"")


def file_part(data: bytes, name: bytes = b"file") -> tuple[bytes, bytes]:
    disposition = b'Content-Disposition: form-data; name="' + name + b'"; filename="x.jpg"'
    return disposition + b"\r\nContent-Type: image/jpeg", data


def field_part(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"', value


def raw(data: bytes, ctype: str | None = None) -> dict[str, Any]:
    return {"content": data, "headers": {"Content-Type": ctype} if ctype else {}}


def as_json(doc: Any) -> dict[str, Any]:
    return {"content": json.dumps(doc).encode(), "headers": {"Content-Type": "application/json"}}


def json_text(text: str | bytes) -> dict[str, Any]:
    data = text.encode() if isinstance(text, str) else text
    return {"content": data, "headers": {"Content-Type": "application/json"}}


def mp(body: bytes, boundary: bytes | None) -> dict[str, Any]:
    ctype = "multipart/form-data" + (f"; boundary={boundary.decode()}" if boundary else "")
    return {"content": body, "headers": {"Content-Type": ctype}}


# -- the corpus ----------------------------------------------------------------------------


class Corpus:
    def __init__(self, rng: random.Random, sample_jpeg: bytes, image_server: str) -> None:
        self.rng = rng
        self.jpeg = sample_jpeg
        small = cv2.resize(cv2.imdecode(np.frombuffer(sample_jpeg, np.uint8), 1), (160, 200))
        self.png = encode(".png", small)
        self.webp_lossy = encode(".webp", small, [cv2.IMWRITE_WEBP_QUALITY, 80])
        self.webp_lossless = encode(".webp", small, [cv2.IMWRITE_WEBP_QUALITY, 101])
        self.images = {
            "jpeg": self.jpeg,
            "png": self.png,
            "webp": self.webp_lossy,
            "webpl": self.webp_lossless,
        }
        self.server = image_server
        self.cases: list[Case] = []

    def add(
        self,
        name: str,
        expect: str,
        request: dict[str, Any],
        route: str | None = None,
        query: dict[str, str] | None = None,
    ) -> None:
        self.cases.append(Case(name, expect, request, route, query or {}))

    def build(self) -> list[Case]:
        self.corrupted_images()
        self.header_breakage()
        self.random_bytes()
        self.tiny_and_bombs()
        self.content_types_and_multipart()
        self.json_and_base64()
        self.urls_and_sizes()
        self.query_params()
        return self.cases

    def corrupted_images(self) -> None:
        rng = self.rng
        for fmt, data in self.images.items():
            for _ in range(18):
                cut = rng.randrange(1, len(data))
                self.add(f"{fmt} truncated at {cut}/{len(data)}", "either", raw(data[:cut]))
            for _ in range(16):
                buf = bytearray(data)
                flips = rng.randint(1, 24)
                for _ in range(flips):
                    buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                self.add(f"{fmt} with {flips} bit flips", "either", raw(bytes(buf)))
            for _ in range(6):
                buf = bytearray(data)
                start, size = rng.randrange(len(buf)), rng.randint(16, 2048)
                buf[start : start + size] = bytes(len(buf[start : start + size]))
                self.add(f"{fmt} zeroed {size} bytes at {start}", "either", raw(bytes(buf)))
            for _ in range(4):  # the header region, where parsers make their decisions
                buf = bytearray(data)
                for _ in range(rng.randint(1, 6)):
                    buf[rng.randrange(2, min(64, len(buf)))] = rng.randrange(256)
                self.add(f"{fmt} random header bytes", "either", raw(bytes(buf)))

    def header_breakage(self) -> None:
        png, jpeg, webp = self.png, self.jpeg, self.webp_lossy
        chunks = png_chunks(png)
        for offset, kind in chunks:  # a bad CRC in every chunk
            crc_at = offset + 8 + struct.unpack_from(">I", png, offset)[0]
            flipped = bytes(b ^ 0xFF for b in png[crc_at : crc_at + 4])
            bad = png[:crc_at] + flipped + png[crc_at + 4 :]
            self.add(f"png bad {kind.decode()} CRC", "either", raw(bad))
        ihdr_data = png[16:29]
        body = png[33:]  # everything after IHDR
        for name, fields in [
            ("width 0", (0, 200, 8, 2)),
            ("height 0", (160, 0, 8, 2)),
            ("bit depth 3", (160, 200, 3, 2)),
            ("colour type 7", (160, 200, 8, 7)),
            ("size 1x1 with 160x200 data", (1, 1, 8, 2)),
            ("width 2^31", (2**31, 1, 8, 2)),
            ("0xFFFFFFFF squared", (2**32 - 1, 2**32 - 1, 8, 2)),
        ]:
            w, h, depth, colour = fields
            ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, *ihdr_data[10:13])
            self.add(f"png IHDR {name}", "either", raw(png[:8] + png_chunk(b"IHDR", ihdr) + body))
        self.add("png bad signature", "error", raw(b"\x89PNX" + png[4:]))
        self.add(
            "png IHDR length 0xFFFFFFFF", "error", raw(png[:8] + b"\xff\xff\xff\xff" + png[12:])
        )
        self.add("png no IEND", "either", raw(png[:-12]))
        self.add(
            "png IDAT of zlib garbage",
            "error",
            raw(png[:33] + png_chunk(b"IDAT", self.rng.randbytes(500)) + png[-12:]),
        )
        self.add("png only signature", "error", raw(png[:8]))
        # 2^24, not 2^31: the memory side is test_png_chunk_length_bomb_costs_no_memory's.
        self.add(
            "png 16 MiB chunk length, 200 bytes",
            "error",
            raw(png[:33] + struct.pack(">I", 2**24) + b"IDAT" + png[41:200]),
        )

        sof = jpeg_sof_offset(jpeg)
        for h, w in [(0, 0), (0, 320), (65535, 65535), (1, 65535), (400, 0)]:
            bad = jpeg[: sof + 5] + struct.pack(">HH", h, w) + jpeg[sof + 9 :]
            self.add(f"jpeg SOF {w}x{h}", "either", raw(bad))
        self.add("jpeg SOI only", "error", raw(b"\xff\xd8\xff"))
        self.add("jpeg SOI EOI", "error", raw(b"\xff\xd8\xff\xd9"))
        self.add("jpeg segment length 0", "either", raw(b"\xff\xd8\xff\xe0\x00\x00" + jpeg[6:]))
        self.add("jpeg segment length 1", "either", raw(b"\xff\xd8\xff\xe0\x00\x01" + jpeg[6:]))
        self.add("jpeg segment length 65535", "error", raw(b"\xff\xd8\xff\xe0\xff\xff" + jpeg[6:]))
        self.add(
            "jpeg 5000 empty APP segments",
            "valid",
            raw(b"\xff\xd8" + b"\xff\xe1\x00\x02" * 5000 + jpeg[2:]),
        )
        sos = jpeg.find(b"\xff\xda")
        self.add("jpeg without scan", "error", raw(jpeg[:sos] + b"\xff\xd9"))
        self.add(
            "jpeg scan of random bytes",
            "either",
            raw(jpeg[: sos + 14] + self.rng.randbytes(4000) + b"\xff\xd9"),
        )
        dqt = jpeg.find(b"\xff\xdb")
        self.add(
            "jpeg DQT garbage",
            "either",
            raw(jpeg[: dqt + 4] + self.rng.randbytes(65) + jpeg[dqt + 69 :]),
        )

        self.add(
            "webp RIFF size 0xFFFFFFFF", "either", raw(webp[:4] + b"\xff\xff\xff\xff" + webp[8:])
        )
        self.add("webp RIFF size 0", "either", raw(webp[:4] + b"\0\0\0\0" + webp[8:]))
        self.add("webp not WEBP", "error", raw(webp[:8] + b"WEBQ" + webp[12:]))
        self.add("webp chunk size huge", "either", raw(webp[:16] + b"\xff\xff\xff\x7f" + webp[20:]))
        self.add("webp unknown chunk", "error", raw(webp[:12] + b"VP9 " + webp[16:]))
        lossless = self.webp_lossless
        self.add(
            "webp lossless bad signature byte",
            "error",
            raw(lossless[:20] + b"\x00" + lossless[21:]),
        )
        vp8x = (
            b"RIFF"
            + struct.pack("<I", 4 + 18)
            + b"WEBP"
            + b"VP8X"
            + struct.pack("<I", 10)
            + b"\0\0\0\0"
            + (16383).to_bytes(3, "little")
            + (16383).to_bytes(3, "little")
        )
        self.add("webp VP8X 16384x16384 canvas, no frame", "error", raw(vp8x))

    def random_bytes(self) -> None:
        rng = self.rng
        for _ in range(16):
            size = rng.choice([1, 2, 3, 7, 31, 100, 1000, 20000, 200000])
            data = rng.randbytes(size)
            self.add(f"random {size} bytes", "error", raw(data))
        magics = {
            "jpeg": b"\xff\xd8\xff",
            "png": b"\x89PNG\r\n\x1a\n",
            "gif": b"GIF89a",
            "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ",
            "tiff-le": b"II*\x00",
            "tiff-be": b"MM\x00*",
            "bigtiff": b"II+\x00",
            "bmp": b"BM" + b"\0" * 12 + b"(\0\0\0",
        }
        for fmt, magic in magics.items():
            for _ in range(4):
                size = rng.choice([0, 8, 64, 1000, 30000])
                self.add(
                    f"{fmt} magic + {size} random bytes", "either", raw(magic + rng.randbytes(size))
                )
        self.add("text that starts like a URL", "error", raw(b"http://"))
        self.add("plain text", "error", raw(b"hello, is this a face?"))
        for route in ROUTES[:3]:
            self.add("empty body", "error", raw(b""), route=route)
        self.add("empty body labelled image/jpeg", "error", raw(b"", "image/jpeg"))

    def tiny_and_bombs(self) -> None:
        one = np.full((1, 1, 3), 127, np.uint8)
        for ext in (".png", ".jpg", ".bmp", ".tiff"):
            self.add(f"1x1 {ext}", "valid", raw(encode(ext, one)))
        self.add(
            "1x1 .webp lossy", "valid", raw(encode(".webp", one, [cv2.IMWRITE_WEBP_QUALITY, 80]))
        )
        self.add(
            "1x1 .webp lossless",
            "valid",
            raw(encode(".webp", one, [cv2.IMWRITE_WEBP_QUALITY, 101])),
        )
        self.add("1x1 gray png", "valid", raw(encode(".png", np.zeros((1, 1), np.uint8))))
        self.add("1x1 16-bit png", "valid", raw(encode(".png", np.zeros((1, 1, 3), np.uint16))))
        self.add("1x1 rgba png", "valid", raw(encode(".png", np.zeros((1, 1, 4), np.uint8))))
        self.add("1x4000 png", "valid", raw(encode(".png", np.zeros((1, 4000, 3), np.uint8))))
        self.add("4000x1 jpeg", "valid", raw(encode(".jpg", np.zeros((4000, 1, 3), np.uint8))))
        for route in ROUTES:  # a valid tiny image on every route and output format
            self.add("1x1 png", "valid", raw(encode(".png", one)), route=route)

        idat = png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")
        self.add(
            "png 60000x60000 header (pixel bomb)", "error", raw(png_header(60000, 60000) + idat)
        )
        self.add("png 60000x60000 header only", "error", raw(png_header(60000, 60000)))
        self.add("png 8000x8000 (64 MP) header", "error", raw(png_header(8000, 8000) + idat))
        sof = jpeg_sof_offset(self.jpeg)
        bomb = self.jpeg[: sof + 5] + struct.pack(">HH", 60000, 60000) + self.jpeg[sof + 9 :]
        self.add("jpeg 60000x60000 SOF (pixel bomb)", "error", raw(bomb))
        vp8x = (
            b"RIFF"
            + struct.pack("<I", 4 + 18 + 8)
            + b"WEBP"
            + b"VP8X"
            + struct.pack("<I", 10)
            + b"\0\0\0\0"
            + (16383).to_bytes(3, "little") * 2
            + b"ANIM"
            + b"\0" * 4
        )
        self.add("webp VP8X 16384x16384 (pixel bomb)", "error", raw(vp8x))
        bmp = (
            b"BM"
            + struct.pack("<IHHI", 54, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, 50000, 50000, 1, 24, 0, 0, 0, 0, 0, 0)
        )
        self.add("bmp 50000x50000 header (pixel bomb)", "error", raw(bmp))
        tiff = (
            b"II*\x00"
            + struct.pack("<I", 8)
            + struct.pack("<H", 2)
            + struct.pack("<HHII", 256, 4, 1, 100000)
            + struct.pack("<HHII", 257, 4, 1, 100000)
            + b"\0\0\0\0"
        )
        self.add("tiff 100000x100000 header (pixel bomb)", "error", raw(tiff))
        gif = b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\0\0\0;"
        self.add("gif 65535x65535 (unsupported type)", "error", raw(gif))

    def content_types_and_multipart(self) -> None:
        jpeg = self.jpeg
        self.add("jpeg labelled application/json", "error", raw(jpeg, "application/json"))
        self.add("jpeg labelled multipart, no boundary", "error", raw(jpeg, "multipart/form-data"))
        self.add(
            "jpeg labelled multipart with boundary",
            "error",
            raw(jpeg, "multipart/form-data; boundary=xyz"),
        )
        # The Content-Type of raw bytes is not trusted either way: these are images.
        self.add("jpeg labelled text/plain", "valid", raw(jpeg, "text/plain"))
        self.add(
            "jpeg labelled form-urlencoded", "valid", raw(jpeg, "application/x-www-form-urlencoded")
        )
        self.add("png labelled image/jpeg", "valid", raw(self.png, "image/jpeg"))
        self.add("text labelled image/png", "error", raw(b"not a png", "image/png"))

        b = b"fuzzBoundary42"
        one = encode(".png", np.full((1, 1, 3), 9, np.uint8))
        self.add(
            "multipart without a file",
            "error",
            mp(multipart(b, [field_part(b"confidence", b"0.5")]), b),
        )
        self.add(
            "multipart, file under another name",
            "error",
            mp(multipart(b, [file_part(jpeg, b"picture")]), b),
        )
        self.add("multipart, empty file", "error", mp(multipart(b, [file_part(b"")]), b))
        self.add(
            "multipart, garbage file",
            "error",
            mp(multipart(b, [file_part(self.rng.randbytes(3000))]), b),
        )
        self.add(
            "multipart, two files",
            "valid",
            mp(multipart(b, [file_part(one), file_part(jpeg, b"image")]), b),
        )
        self.add(
            "multipart, boundary mismatch",
            "error",
            mp(multipart(b"otherBoundary", [file_part(jpeg)]), b),
        )
        self.add("multipart, empty boundary", "error", mp(multipart(b"", [file_part(jpeg)]), b""))
        long_b = b"B" * 300
        self.add(
            "multipart, 300-char boundary",
            "either",
            mp(multipart(long_b, [file_part(one)]), long_b),
        )
        self.add(
            "multipart, quoted boundary",
            "either",
            {
                "content": multipart(b, [file_part(one)]),
                "headers": {"Content-Type": f'multipart/form-data; boundary="{b.decode()}"'},
            },
        )
        self.add(
            "multipart, not closed", "either", mp(multipart(b, [file_part(one)], close=False), b)
        )
        self.add("multipart, garbage body", "error", mp(self.rng.randbytes(2000), b))
        self.add(
            "multipart, part without headers",
            "error",
            mp(b"--" + b + b"\r\n\r\n" + jpeg + b"\r\n--" + b + b"--\r\n", b),
        )
        self.add(
            "multipart, disposition without name",
            "error",
            mp(multipart(b, [(b'Content-Disposition: form-data; filename="a"', jpeg)]), b),
        )
        self.add(
            "multipart, 100 fields",
            "error",
            mp(
                multipart(
                    b, [field_part(f"f{i}".encode(), b"1") for i in range(100)] + [file_part(one)]
                ),
                b,
            ),
        )
        self.add("multipart, 10 files", "error", mp(multipart(b, [file_part(one)] * 10), b))
        self.add(
            "multipart, field 'file' that is not a file",
            "error",
            mp(multipart(b, [field_part(b"file", b"abc")]), b),
        )
        self.add(
            "multipart, url field to a text page",
            "error",
            mp(multipart(b, [field_part(b"url", f"{self.server}/text".encode())]), b),
        )
        self.add(
            "multipart, unknown charset",
            "either",
            {
                "content": multipart(b, [file_part(one)]),
                "headers": {
                    "Content-Type": f"multipart/form-data; charset=klingon; boundary={b.decode()}"
                },
            },
        )

    def json_and_base64(self) -> None:
        for text in [
            "{",
            "}",
            "[]",
            "[1, 2]",
            '"a string"',
            "null",
            "true",
            "123",
            "{'url': 1}",
            '{"url": "x",}',
            '{"url"\x00: 1}',
            "\ufeff{}",
            "NaN",
            "",
            " ",
        ]:
            self.add(f"invalid JSON {text!r}", "error", json_text(text))
        self.add("JSON not UTF-8", "error", json_text(b'{"url": "\xff\xfe"}'))
        self.add("JSON in UTF-16", "error", json_text(json.dumps({"url": "x"}).encode("utf-16")))
        one_b64 = base64.b64encode(encode(".png", np.full((1, 1, 3), 9, np.uint8))).decode()
        jpeg_b64 = base64.b64encode(self.jpeg).decode()
        docs: list[tuple[str, Any, str]] = [
            ("url 5", {"url": 5}, "error"),
            ("image_base64 5", {"image_base64": 5}, "error"),
            ("url list", {"url": ["http://x/"]}, "error"),
            ("image_base64 list", {"image_base64": [jpeg_b64]}, "error"),
            ("url object", {"url": {"href": "x"}}, "error"),
            ("url null", {"url": None}, "error"),
            ("url true", {"url": True}, "error"),
            ("url empty", {"url": ""}, "error"),
            ("both url and base64", {"url": "http://x/", "image_base64": one_b64}, "error"),
            ("neither", {"confidence": 0.5}, "error"),
            ("empty object", {}, "error"),
            ("image_base64 empty", {"image_base64": ""}, "error"),
            ("image_base64 float", {"image_base64": 1.5}, "error"),
            ("param list", {"image_base64": one_b64, "confidence": [0.5]}, "error"),
            ("param object", {"image_base64": one_b64, "confidence": {"v": 1}}, "error"),
            ("param null", {"image_base64": one_b64, "confidence": None}, "error"),
            ("param bool", {"image_base64": one_b64, "confidence": True}, "error"),
            ("unknown param", {"image_base64": one_b64, "colour": "red"}, "error"),
            ("filename object", {"image_base64": one_b64, "filename": {"a": [1]}}, "either"),
            ("filename number", {"image_base64": one_b64, "filename": 5}, "either"),
            ("valid base64 of 1x1", {"image_base64": one_b64}, "valid"),
        ]
        for name, doc, expect in docs:
            route = ROUTES[0] if "param" in name else None  # cnn takes `confidence`
            self.add(f"JSON {name}", expect, as_json(doc), route=route)
        self.add(
            "JSON param NaN",
            "error",
            json_text(f'{{"image_base64": "{one_b64}", "confidence": NaN}}'),
            route=ROUTES[0],
        )
        self.add(
            "JSON param Infinity",
            "error",
            json_text(f'{{"image_base64": "{one_b64}", "confidence": Infinity}}'),
            route=ROUTES[0],
        )
        self.add(
            "JSON param 1e400",
            "error",
            json_text(f'{{"image_base64": "{one_b64}", "confidence": 1e400}}'),
            route=ROUTES[0],
        )
        self.add("JSON 500-deep nesting", "error", json_text('{"a": ' * 500 + "1" + "}" * 500))
        self.add(
            "JSON many keys",
            "error",
            as_json({"image_base64": one_b64, **{f"k{i}": i for i in range(5000)}}),
        )
        for text in [
            "@@@",
            "abc",
            "a",
            "====",
            "data:image/png;base64,",
            "data:,",
            "data:image/png;base64,@@@",
            "ÿØÿà",
            one_b64[:-2],
            one_b64 + "A",
            " " + one_b64,
            one_b64.replace("A", "-"),
        ]:
            self.add(f"bad base64 {text[:20]!r}", "error", as_json({"image_base64": text}))
        self.add(
            "base64 of random bytes",
            "error",
            as_json({"image_base64": base64.b64encode(self.rng.randbytes(500)).decode()}),
        )
        cut = base64.b64encode(self.jpeg[:3000]).decode()
        self.add("base64 of a truncated jpeg", "either", as_json({"image_base64": cut}))
        self.add(
            "base64 data URL of 1x1",
            "valid",
            as_json({"image_base64": "data:image/png;base64," + one_b64}),
        )

    def urls_and_sizes(self) -> None:
        s = self.server
        for path, expect in [("/text", "error"), ("/missing.jpg", "error"), ("/", "error")]:
            self.add(f"JSON url {path}", expect, as_json({"url": s + path}))
            self.add(
                f"body url {path}",
                expect,
                raw((s + path).encode()),
                route="/function/face-detect-pigo",
            )
        self.add(
            "url https to a plain-HTTP server",
            "error",
            as_json({"url": s.replace("http://", "https://") + "/pigo_sample.jpg"}),
        )
        self.add("url port 0", "error", as_json({"url": "http://127.0.0.2:0/x.jpg"}))
        self.add("url port 99999", "error", as_json({"url": "http://127.0.0.2:99999/x.jpg"}))
        self.add("url without host", "error", as_json({"url": "http:///x.jpg"}))
        self.add("url javascript:", "error", as_json({"url": "javascript:alert(1)"}))
        self.add("url file:", "error", as_json({"url": "file:///etc/passwd"}))
        self.add("url 9000 chars", "error", as_json({"url": s + "/" + "a" * 9000}))
        self.add("url body with a space", "error", raw(f"{s}/pigo sample.jpg".encode()))

        self.add("raw body 1 byte over the cap", "error", raw(b"\xff\xd8\xff" + b"\0" * MAX_BODY))
        self.add(
            "multipart over the cap",
            "error",
            mp(multipart(b"zz", [file_part(b"\0" * MAX_BODY)]), b"zz"),
        )
        self.add(
            "JSON base64 over the cap", "error", as_json({"image_base64": "A" * (MAX_BODY + 4)})
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must hold while streaming
            for _ in range(MAX_BODY // 2**20 + 2):
                yield b"\0" * 2**20

        self.add("chunked body over the cap", "error", {"content": chunks})

    def query_params(self) -> None:
        jpeg = self.jpeg
        cnn, pigo = "/v1/detect/cnn-face-detection", "/v1/detect/face-detect-pigo"
        for value in [
            "abc",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "-1",
            "7",
            "1e309",
            "",
            " ",
            "0x1",
            "%ff",
            "0.5.5",
            "1 2",
        ]:
            self.add(
                f"cnn confidence={value!r}",
                "error",
                raw(jpeg),
                route=cnn,
                query={"confidence": value},
            )
        for value in ["1.5", "-5", "9" * 5000, "1e3", "twenty"]:
            self.add(
                f"pigo min_size={value[:20]!r}",
                "error",
                raw(jpeg),
                route=pigo,
                query={"min_size": value},
            )
        self.add(
            "pigo min_size > max_size",
            "error",
            raw(jpeg),
            route=pigo,
            query={"min_size": "500", "max_size": "100"},
        )
        for fmt in ["gif", "", "JSON", "../etc", "base64 ", "x" * 2000]:
            self.add(
                f"format={fmt[:20]!r}",
                "error",
                raw(jpeg),
                route=self.rng.choice(ROUTES),
                query={"format": fmt},
            )
        self.add("unknown parameter", "error", raw(jpeg), query={"colour": "red"})
        self.add("parameter name of 3000 chars", "error", raw(jpeg), query={"p" * 3000: "1"})
        self.add(
            "segment-only parameter on a detector",
            "error",
            raw(jpeg),
            route=pigo,
            query={"points_per_side": "8"},
        )


# -- running it ----------------------------------------------------------------------------


def send(client: httpx.Client, case: Case, route: str) -> Outcome:
    request = dict(case.request)
    if callable(request.get("content")):
        request["content"] = request["content"]()
    t0 = time.perf_counter()
    try:
        r = client.post(route, params=case.query, **request)
    except httpx.HTTPError as err:  # a dropped connection is as bad as a 5xx
        return Outcome(case, route, 599, repr(err).encode(), "", time.perf_counter() - t0)
    return Outcome(
        case,
        route,
        r.status_code,
        r.content,
        r.headers.get("content-type", ""),
        time.perf_counter() - t0,
    )


def run_corpus(base_url: str, cases: list[Case], routes: list[str]) -> list[Outcome]:
    deadline = time.monotonic() + DEADLINE_S
    plan = []
    for i, case in enumerate(cases):
        plan.append((case, case.route or routes[i % len(routes)]))
    pool = ThreadPoolExecutor(WORKERS)
    try:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            futures = [pool.submit(send, client, case, route) for case, route in plan]
            return [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]
    finally:  # past the deadline: drop what has not started rather than wait for it
        pool.shutdown(wait=True, cancel_futures=True)


# What an error answer must never reveal: process, host and code internals.
LEAKS = {
    "pid": re.compile(r"pid=|\bpid\b\s*\d"),
    "ip=": re.compile(r"\bip="),
    "ray task": re.compile(r"ray::"),
    "traceback": re.compile(r"Traceback|File \""),
    "a filesystem path": re.compile(
        r"(?<![\w.:/])/(?:home|root|tmp|usr|opt|work|io|proc|etc|var)/"
    ),
    "OpenCV source": re.compile(r"\.cpp\b|cv2\.error"),
}
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")


def internals(o: Outcome) -> str | None:
    """The first kind of internal detail an error body carries, if any. An IP address is a
    leak unless the caller sent it (a URL of theirs, echoed back)."""
    text = o.body.decode("utf-8", "replace")
    for name, pattern in LEAKS.items():
        if pattern.search(text):
            return name
    sent = repr(o.case.request) + repr(o.case.query)
    for ip in IPV4.findall(text):
        if ip not in sent:
            return f"the IP address {ip}"
    return None


def problems(outcomes: list[Outcome]) -> list[str]:
    """What went wrong, one line per case: 5xx, non-JSON errors, wrong verdicts."""
    found = []
    for o in outcomes:
        where = f"{o.case.name!r} -> POST {o.route}: {o.status}"
        if o.status >= 500:
            found.append(f"{where} {o.body[:300]!r}")
        elif o.status >= 400:
            try:
                body = json.loads(o.body)
            except ValueError:
                body = None
            if not (
                o.content_type.startswith("application/json")
                and isinstance(body, dict)
                and set(body) == {"error", "detail", "request_id"}
                and body["detail"]
            ):
                found.append(f"{where} not the JSON error shape: {o.body[:200]!r}")
            leak = internals(o)
            if leak:
                found.append(f"{where} error answer reveals {leak}: {o.body[:200]!r}")
        elif o.status == 200:
            if o.case.expect == "error":
                found.append(f"{where} accepted input that must be refused")
        else:
            found.append(f"{where} unexpected status")
        if o.case.expect == "valid" and o.status >= 400 and o.status not in (413, 422):
            found.append(f"{where} refused a valid image: {o.body[:200]!r}")
    return found


def report(title: str, outcomes: list[Outcome]) -> None:
    statuses = Counter(o.status for o in outcomes)
    codes = Counter()
    for o in outcomes:
        if 400 <= o.status < 500 and o.content_type.startswith("application/json"):
            codes[(o.status, json.loads(o.body).get("error"))] += 1
    slowest = max(outcomes, key=lambda o: o.seconds)
    print(
        f"\n{title}: {len(outcomes)} inputs over {len({o.route for o in outcomes})} routes; "
        f"status histogram {dict(sorted(statuses.items()))}; "
        f"5xx seen: {sum(n for s, n in statuses.items() if s >= 500)}"
    )
    print("  error codes: " + ", ".join(f"{s} {c}: {n}" for (s, c), n in sorted(codes.items())))
    print(f"  slowest: {slowest.seconds:.2f} s ({slowest.case.name!r} on {slowest.route})")


@pytest.fixture(scope="module")
def sample() -> bytes:
    return shared_file("images", "pigo_sample.jpg").read_bytes()


@pytest.fixture(scope="module")
def corpus(sample, image_server) -> list[Case]:
    cases = Corpus(random.Random(SEED), sample, image_server).build()
    assert len(cases) >= 300, len(cases)
    return cases


@pytest.mark.slow
def test_fuzz_corpus_gets_4xx_never_5xx(service, http, corpus, sample):
    before = running_replicas()
    outcomes = run_corpus(service["url"], corpus, ROUTES)
    report(f"fuzz (seed {SEED})", outcomes)
    found = problems(outcomes)
    assert not found, f"{len(found)} problem(s):\n" + "\n".join(found[:40])

    # Nothing crashed or restarted: the very same replicas are RUNNING, and still serve.
    assert running_replicas() == before
    r = http.post("/v1/detect/cnn-face-detection", content=sample)
    assert r.status_code == 200 and r.json()["count"] == 1


@pytest.fixture(scope="module")
def segment_ready(service, http) -> None:
    probe = http.post(SEGMENT_ROUTE, content=encode(".png", np.zeros((8, 8, 3), np.uint8)))
    if probe.status_code != 200:
        pytest.skip(
            f"{SEGMENT_ROUTE} does not serve ({probe.status_code}: {probe.text[:120]}); "
            "its fuzzing waits for the SAM engine"
        )


def prompt_cases(sample: bytes) -> list[Case]:
    """Broken prompts (points/labels/boxes), as query JSON text and as JSON body lists."""
    b64 = base64.b64encode(sample).decode()  # 320x400
    queries = {
        "points garbage": {"points": "garbage"},
        "points empty": {"points": "[]"},
        "points one number": {"points": "[[1]]"},
        "points three numbers": {"points": "[[1, 2, 3]]"},
        "points strings": {"points": '[["a", 1]]'},
        "points 1e400": {"points": "[[1e400, 1]]"},
        "points NaN": {"points": "[[NaN, 1]]"},
        "points negative": {"points": "[[-1, -1]]"},
        "points outside": {"points": "[[99999, 1]]"},
        "points object": {"points": "{}"},
        "points null": {"points": "null"},
        "100 points": {"points": str([[1, 1]] * 100)},
        "label 2": {"points": "[[1, 2]]", "labels": "[2]"},
        "labels too many": {"points": "[[1, 2]]", "labels": "[1, 1]"},
        "labels not JSON": {"points": "[[1, 2]]", "labels": "one"},
        "box inverted": {"boxes": "[[10, 10, 5, 5]]"},
        "box outside": {"boxes": "[[0, 0, 1e9, 1e9]]"},
        "box three numbers": {"boxes": "[[1, 2, 3]]"},
        "boxes ragged": {"boxes": "[[1, 2, 3, 4], [1]]"},
        "labels without points": {"labels": "[1]"},
    }
    cases = [
        Case(f"prompt {name}", "error", raw(sample), SEGMENT_ROUTE, q)
        for name, q in queries.items()
    ]
    bodies = {
        "points as dict": {"points": {"x": 1}},
        "points as number": {"points": 5},
        "points list of strings": {"points": ["1,2"]},
        "boxes nested 3 deep": {"boxes": [[[1, 2, 3, 4]]]},
        "labels floats": {"points": [[1, 2]], "labels": [0.5]},
        "labels null": {"points": [[1, 2]], "labels": [None]},
        "label 2**70": {"points": [[1, 2]], "labels": [2**70]},
    }
    for name, doc in bodies.items():
        cases.append(
            Case(
                f"prompt JSON {name}", "error", as_json({"image_base64": b64, **doc}), SEGMENT_ROUTE
            )
        )
    ok = {
        "one point": {"points": "[[10, 10]]", "labels": "[1]"},
        "one box": {"boxes": "[[1, 1, 20, 20]]"},
        "multimask maybe": {"points": "[[10, 10]]", "multimask": "maybe"},
    }
    cases += [Case(f"prompt {n}", "valid", raw(sample), SEGMENT_ROUTE, q) for n, q in ok.items()]
    return cases


@pytest.mark.slow
def test_fuzz_segment_route(service, http, corpus, sample, segment_ready):
    before = running_replicas()
    # SAM takes seconds per image here: every input that must be refused (they never reach
    # the model), a sample of the rest, and one prompt point per side to keep each run short.
    rotation = [c for c in corpus if c.route is None]
    chosen = [c for i, c in enumerate(rotation) if c.expect != "either" or i % 16 == 0]
    cases = [replace(c, query={**c.query, "points_per_side": "1"}) for c in chosen]
    cases += prompt_cases(sample)
    outcomes = run_corpus(service["url"], cases, [SEGMENT_ROUTE])
    report("fuzz, segment route", outcomes)
    found = problems(outcomes)
    assert not found, f"{len(found)} problem(s):\n" + "\n".join(found[:40])
    assert running_replicas() == before


# -- 5xx the fuzzing found, fixed in 87030aa: kept as regression tests -------------------

ONE_PX_B64 = base64.b64encode(encode(".png", np.full((1, 1, 3), 9, np.uint8))).decode()
FOUND_5XX = [
    # RecursionError from the C scanner, not a JSONDecodeError.
    pytest.param(json_text("[" * 100_000), id="json-deep-nesting"),
    # ValueError: integers over sys.get_int_max_str_digits() (4300) digits.
    pytest.param(json_text('{"url": ' + "1" * 5000 + "}"), id="json-5000-digit-integer"),
    # A lone surrogate is valid JSON syntax but not encodable text: the answer that echoed it
    # (the bad_url detail, the result's filename) failed to encode, or quote() failed on it.
    pytest.param(json_text('{"url": "http://\\ud800/x.jpg"}'), id="json-surrogate-in-url-host"),
    pytest.param(
        json_text('{"url": "http://127.0.0.2:1/\\ud800.jpg"}'), id="json-surrogate-in-url-path"
    ),
    pytest.param(
        json_text(f'{{"image_base64": "{ONE_PX_B64}", "filename": "\\udfff"}}'),
        id="json-surrogate-in-filename",
    ),
]


@pytest.mark.parametrize("request_kwargs", FOUND_5XX)
def test_found_5xx_are_json_400(http, request_kwargs):
    r = http.post("/v1/detect/face-detect-pigo", **request_kwargs)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_json"


def test_png_chunk_length_bomb_costs_no_memory(sample):
    """A tiny PNG whose IDAT declares 2^31-1 bytes: refused without a big allocation.

    OpenCV 4.14's PNG reader allocates what a chunk declares (2 GiB, zero-filled, ~6 s here)
    before finding the bytes absent; decode.py now refuses such a PNG first (87030aa).

    Measured in a fresh interpreter, whose peak RSS shows what the decoder allocated
    (OpenCV's allocations are invisible to tracemalloc).
    """
    small = cv2.resize(cv2.imdecode(np.frombuffer(sample, np.uint8), 1), (16, 20))
    png = encode(".png", small)
    bomb = png[:33] + struct.pack(">I", 2**31 - 1) + b"IDAT" + b"\0" * 100
    script = (
        "import resource, sys\n"
        "from serve_app.inputs.decode import decode_image\n"
        "from serve_app.errors import ServiceError\n"
        "data = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_image(data, max_pixels=50_000_000)\n"
        "    print('decoded')\n"
        "except ServiceError as err:\n"
        "    print(err.status)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=bomb,
        capture_output=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    status, grown_mib = out.stdout.decode().split()
    print(f"\nPNG chunk-length bomb: {len(bomb)} bytes -> {status}, peak RSS +{grown_mib} MiB")
    assert status in ("400", "413", "415", "422")
    assert int(grown_mib) < 256, f"decoding a {len(bomb)}-byte PNG grew the process {grown_mib} MiB"


# 5xx the fuzzing found on the SAM route, fixed in 3a5c0ab: an image over 2048:1 resized
# to a 0-pixel side; prompt JSON with huge integers, deep nesting or ragged labels raised.
FOUND_5XX_SEGMENT = [
    pytest.param({}, np.zeros((1, 4000, 3), np.uint8), 422, id="thin-1x4000-automatic"),
    pytest.param(
        {"points": "[[0, 0]]"}, np.zeros((4000, 1, 3), np.uint8), 422, id="thin-4000x1-prompted"
    ),
    pytest.param(
        {"points": "[[1, 2], [3, 4]]", "labels": "[[1], [1, 0]]"}, None, 422, id="ragged-labels"
    ),
    pytest.param({"points": "[[1" + "1" * 5000 + ", 2]]"}, None, 422, id="5000-digit-point"),
    pytest.param({"boxes": "[" * 5000}, None, 422, id="deep-nesting-boxes"),
]


@pytest.mark.parametrize(("query", "image", "status"), FOUND_5XX_SEGMENT)
def test_found_5xx_segment(http, sample, segment_ready, query, image, status):
    data = sample if image is None else encode(".png", image)
    r = http.post(SEGMENT_ROUTE, params={"points_per_side": "1", **query}, content=data)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "detail", "request_id"}
