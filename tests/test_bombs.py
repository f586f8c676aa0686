"""Decode-time defences, in process: every bomb of tests/bombs.py is refused before OpenCV
allocates for it, sizes are read as libtiff reads them, and OpenCV's own refusals are 422s.
(tests/test_bombs_http.py sends the same corpus through the service.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from bombs import BIG_W, BOMBS, _tiff_entries, tiff

from serve_app.errors import ServiceError
from serve_app.inputs.decode import decode_image
from serve_app.inputs.imageinfo import ImageInfo, sniff

REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 50_000_000

# Runs in a fresh interpreter, as a replica does: serve_app is imported before cv2 (so the
# OpenCV limit from the environment applies) and peak RSS shows what the decoder allocated.
SCRIPT = """
import json, resource, sys, time
sys.path.insert(0, "tests")
from bombs import BOMBS
from serve_app.inputs.decode import decode_image
from serve_app.errors import ServiceError
out = {}
for name, (data, _) in BOMBS.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        decode_image(data, max_pixels=50_000_000)
        status = 200
    except ServiceError as err:
        status = err.status
    seconds = time.perf_counter() - t0
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    out[name] = [status, grown, seconds]
print(json.dumps(out))
"""


def test_every_bomb_is_refused_fast_without_allocating() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, timeout=120, cwd=REPO, check=True
    )
    results = json.loads(run.stdout.decode().strip().splitlines()[-1])
    print()
    for name, (status, grown_mib, seconds) in results.items():
        print(
            f"  {name}: {len(BOMBS[name][0])} bytes -> {status}, +{grown_mib} MiB, "
            f"{seconds * 1e3:.1f} ms"
        )
    for name, (status, grown_mib, seconds) in results.items():
        assert status in BOMBS[name][1], (name, status)
        assert grown_mib < 64, f"{name} grew the process by {grown_mib} MiB"
        assert seconds < 1.0, f"{name} took {seconds:.2f} s"


def test_duplicate_size_tags_read_as_libtiff_reads_them() -> None:
    # libtiff keeps the first of a duplicated tag: so must the sniffer, both ways round.
    small_first = _tiff_entries(
        [(256, 4, 16), (257, 4, 16), (256, 4, BIG_W), (257, 4, BIG_W)], big=False
    )
    assert sniff(small_first) == ImageInfo("tiff", 16, 16)
    assert decode_image(small_first, max_pixels=MAX_PIXELS).shape == (16, 16, 3)
    assert sniff(BOMBS["tiff-duplicate-size-tags"][0]) == ImageInfo("tiff", BIG_W, BIG_W)


def test_bigtiff_is_read_properly() -> None:
    data = tiff(64, 32, big=True)
    assert sniff(data) == ImageInfo("tiff", 64, 32)
    assert decode_image(data, max_pixels=MAX_PIXELS).shape == (32, 64, 3)
    with pytest.raises(ServiceError) as exc:
        decode_image(data, max_pixels=64 * 32 - 1)
    assert exc.value.status == 413


def test_size_tag_of_a_type_libtiff_reads_otherwise_is_unknown_and_refused() -> None:
    # ImageWidth as a RATIONAL (type 5): libtiff would not take it as the sniffer might.
    data = _tiff_entries([(256, 5, 16), (257, 4, 16)], big=False)
    assert sniff(data) == ImageInfo("tiff", None, None)
    with pytest.raises(ServiceError) as exc:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert (exc.value.status, exc.value.code) == (422, "unknown_image_size")


def test_opencv_refusal_is_a_422_without_its_text() -> None:
    # 2000000x1 is few pixels but wider than OpenCV's width limit (2^17 when serve_app set
    # it, 2^20 by default): OpenCV asserts, with its source path in the message.
    data = tiff(2_000_000, 1)
    with pytest.raises(cv2.error):
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    with pytest.raises(ServiceError) as exc:
        decode_image(data, max_pixels=MAX_PIXELS)
    assert (exc.value.status, exc.value.code) == (422, "bad_image")
    assert "/" not in exc.value.message and "cpp" not in exc.value.message


def test_gif_is_refused_by_name() -> None:
    ok, gif = cv2.imencode(".gif", np.zeros((8, 8, 3), np.uint8))
    assert ok
    with pytest.raises(ServiceError) as exc:
        decode_image(gif.tobytes(), max_pixels=MAX_PIXELS)
    assert exc.value.status == 415 and "GIF" in exc.value.message


def test_opencv_limit_follows_the_environment_at_import() -> None:
    code = (
        "import serve_app, json; from serve_app.inputs.decode import opencv_pixel_limit;"
        "print(opencv_pixel_limit())"
    )
    env = {"OPENCV_IO_MAX_IMAGE_PIXELS": "1234567", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=REPO, env=env, timeout=60, check=True
    )
    assert out.stdout.decode().split() == ["1234567"]
    # ... and OpenCV enforces it: a 2000x1000 PNG is over 1234567 pixels.
    code = (
        "import serve_app, cv2, numpy as np\n"
        "png = cv2.imencode('.png', np.zeros((1000, 2000, 3), np.uint8))[1]\n"
        "try:\n    cv2.imdecode(png, 1); print('decoded')\n"
        "except cv2.error:\n    print('refused')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, cwd=REPO, env=env, timeout=60, check=True
    )
    assert out.stdout.decode().split() == ["refused"]
