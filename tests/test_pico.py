"""Pico cascade runtime: bit-exact parity with pigo's own output (shared/data/pico)."""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from serve_app.models.pico import (
    DETECTION_DTYPE,
    README_PARAMS,
    STORE_PARAMS,
    PicoCascade,
    PicoParams,
    to_gray_pigo,
)
from serve_app.models.types import Detection

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PICO = DATA / "pico"
REFERENCE = PICO / "reference_detections.json"

if not REFERENCE.is_file():
    pytest.skip(
        f"pigo reference data not found at {PICO} (shared/ is beside the repo root)",
        allow_module_level=True,
    )

REF = json.loads(REFERENCE.read_text())
IMAGES = sorted(REF["results"])
PNGS = [name for name in IMAGES if name.endswith(".png")]
SETS = {"store": STORE_PARAMS, "readme_defaults": README_PARAMS}


@cache
def cascade() -> PicoCascade:
    return PicoCascade.from_file(PICO / "facefinder")


@cache
def reference_gray(image: str) -> np.ndarray:
    gray = cv2.imread(str(PICO / REF["results"][image]["gray_png"]), cv2.IMREAD_UNCHANGED)
    assert gray is not None and gray.dtype == np.uint8 and gray.ndim == 2
    return gray


@cache
def decoded(image: str) -> np.ndarray:
    bgr = cv2.imread(str(DATA / "images" / image), cv2.IMREAD_COLOR)
    assert bgr is not None, image
    return bgr


@cache
def raw_for(image: str, pset: str, variant: str = "head") -> np.ndarray:
    if variant == "head":
        gray = reference_gray(image)
    else:
        gray = to_gray_pigo(decoded(image), "bgr", variant="v1_1_0")
    return cascade().run_cascade(gray, SETS[pset])


def classify_region(c: PicoCascade, gray: np.ndarray, r: int, col: int, s: int) -> float:
    """pigo's classifyRegion, one window at a time, as written in Go: the plain reference."""
    out = np.float32(0.0)
    for t in range(c.ntrees):
        idx = 1
        for _ in range(c.depth):
            r1, c1, r2, c2 = (int(v) for v in c.codes[t, idx])
            # Go's >> on signed ints is arithmetic, like Python's.
            p1 = gray[(r * 256 + r1 * s) >> 8, (col * 256 + c1 * s) >> 8]
            p2 = gray[(r * 256 + r2 * s) >> 8, (col * 256 + c2 * s) >> 8]
            idx = 2 * idx + int(p1 <= p2)
        out = np.float32(out + c.preds[t, idx - (1 << c.depth)])
        if out <= c.thresholds[t]:
            return -1.0
    return np.float32(out - c.thresholds[-1])


def reference_run_cascade(c: PicoCascade, gray: np.ndarray, params: PicoParams) -> np.ndarray:
    """pigo's RunCascade over classify_region: scale, then row, then column."""
    rows, cols = gray.shape
    found = []
    for scale in params.scales():
        step = int(max(params.shift_factor * scale, 1.0))
        offset = scale // 2 + 1
        for r in range(offset, rows - offset + 1, step):
            for col in range(offset, cols - offset + 1, step):
                q = classify_region(c, gray, r, col, scale)
                if q > 0:
                    found.append((r, col, scale, q))
    return np.array(found, dtype=DETECTION_DTYPE)


def sha256(gray: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(gray).tobytes()).hexdigest()


def as_rows(dets: np.ndarray) -> list[tuple[int, int, int, np.float32]]:
    return [(int(d["row"]), int(d["col"]), int(d["scale"]), np.float32(d["q"])) for d in dets]


def ref_rows(entries: list[dict]) -> list[tuple[int, int, int, np.float32]]:
    # The JSON holds float32 shortest round-trip digits: float32(parse) is the exact value.
    return [(e["row"], e["col"], e["scale"], np.float32(e["q"])) for e in entries]


def assert_same(got: np.ndarray, want: list[dict], what: str) -> None:
    got_rows, want_rows = as_rows(got), ref_rows(want)
    assert len(got_rows) == len(want_rows), f"{what}: {len(got_rows)} vs pigo {len(want_rows)}"
    for i, (g, w) in enumerate(zip(got_rows, want_rows, strict=True)):
        # == on float32: equal to the last bit, not approximately.
        assert g == w, f"{what}[{i}]: got {g}, pigo {w}"


def test_params_match_reference() -> None:
    for key, params in SETS.items():
        ref = REF["params"][key]
        assert (params.min_size, params.max_size) == (ref["minSize"], ref["maxSize"])
        assert (params.shift_factor, params.scale_factor) == (
            ref["shiftFactor"],
            ref["scaleFactor"],
        )
        assert params.iou_threshold == ref["iouThreshold"]
        assert params.q_threshold == ref["qThreshold"]
    assert PicoParams() == STORE_PARAMS


@pytest.mark.parametrize("image", IMAGES)
def test_reference_gray_is_pigos(image: str) -> None:
    assert sha256(reference_gray(image)) == REF["results"][image]["gray_sha256"]


@pytest.mark.parametrize("pset", sorted(SETS))
@pytest.mark.parametrize("image", IMAGES)
def test_parity_with_pigo(image: str, pset: str) -> None:
    ref = REF["results"][image]
    raw = raw_for(image, pset)
    assert_same(raw, ref[f"{pset}_raw"], f"{image}/{pset} raw windows")
    clusters = PicoCascade.cluster(raw, SETS[pset].iou_threshold)
    assert_same(clusters, ref[pset], f"{image}/{pset} clusters")
    kept = clusters[clusters["q"] > np.float32(SETS[pset].q_threshold)]
    assert_same(kept, ref[f"{pset}_kept"], f"{image}/{pset} kept")
    if not kept.size:
        return  # detect() would rerun the scan for nothing; the faces are the kept clusters
    faces = cascade().detect(reference_gray(image), SETS[pset])
    assert [(f.x + f.w // 2, f.y + f.h // 2, f.w) for f in faces] == [
        (e["col"], e["row"], e["scale"]) for e in ref[f"{pset}_kept"]
    ]


@pytest.mark.parametrize("image", PNGS)
def test_gray_formulas_on_lossless_inputs(image: str) -> None:
    # PNG decoding is lossless, so cv2's pixels are Go's and both formulas must match exactly.
    bgr = decoded(image)
    assert sha256(to_gray_pigo(bgr, "bgr")) == REF["results"][image]["gray_sha256"]
    v110 = REF["variant_pigo_v1_1_0"]["results"][image]
    assert sha256(to_gray_pigo(bgr, "bgr", variant="v1_1_0")) == v110["gray_sha256"]


@pytest.mark.parametrize("pset", sorted(SETS))
@pytest.mark.parametrize("image", PNGS)
def test_parity_with_pigo_v1_1_0(image: str, pset: str) -> None:
    # Only the PNGs: for JPEGs the v1.1.0 gray needs Go's own JPEG decoder.
    ref = REF["variant_pigo_v1_1_0"]["results"][image]
    raw = raw_for(image, pset, "v1_1_0")
    assert_same(raw, ref[f"{pset}_raw"], f"v1.1.0 {image}/{pset} raw windows")
    clusters = PicoCascade.cluster(raw, SETS[pset].iou_threshold)
    assert_same(clusters, ref[pset], f"v1.1.0 {image}/{pset} clusters")
    kept = clusters[clusters["q"] > np.float32(SETS[pset].q_threshold)]
    assert_same(kept, ref[f"{pset}_kept"], f"v1.1.0 {image}/{pset} kept")


def test_detect_on_decoded_jpeg_finds_the_face() -> None:
    # cv2's JPEG decoder differs from Go's by a few levels: near the reference, not equal.
    faces = cascade().detect(to_gray_pigo(decoded("pigo_sample.jpg"), "bgr"))
    (want,) = REF["results"]["pigo_sample.jpg"]["store_kept"]
    assert len(faces) == 1, faces
    (face,) = faces
    assert isinstance(face, Detection)
    assert abs(face.x + face.w / 2 - want["col"]) <= 10
    assert abs(face.y + face.h / 2 - want["row"]) <= 10
    assert face.w == face.h and abs(face.w - want["scale"]) <= 0.1 * want["scale"]
    assert face.score > STORE_PARAMS.q_threshold


def test_threads_do_not_change_results() -> None:
    gray = reference_gray("skimage_astronaut.png")
    one = cascade().run_cascade(gray, STORE_PARAMS, threads=1)
    two = cascade().run_cascade(gray, STORE_PARAMS, threads=2)
    assert one.tobytes() == two.tobytes() and one.size > 0


@pytest.mark.parametrize("image", ["skimage_astronaut.png", "pigo_sample.jpg"])
def test_kernel_equals_the_plain_reference_loop(image: str) -> None:
    """The compiled kernel, window for window and bit for bit, against pigo's loop as written
    (on a downscaled image: the plain loop is slow)."""
    gray = reference_gray(image)
    small = cv2.resize(gray, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    params = PicoParams(min_size=20, max_size=200, shift_factor=0.1)
    got = cascade().run_cascade(small, params)
    want = reference_run_cascade(cascade(), small, params)
    assert want.size > 0, "the reference found no window: the comparison would be empty"
    assert as_rows(got) == as_rows(want)


def test_channel_order_and_gray_input() -> None:
    bgr = decoded("skimage_astronaut.png")
    assert np.array_equal(to_gray_pigo(bgr, "bgr"), to_gray_pigo(bgr[..., ::-1], "rgb"))
    camera = cv2.imread(str(DATA / "images" / "skimage_camera.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(to_gray_pigo(camera, "bgr"), reference_gray("skimage_camera.png"))
    with pytest.raises(ValueError):
        to_gray_pigo(bgr, "bgra")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        to_gray_pigo(bgr.astype(np.float32), "bgr")


def test_small_and_empty_images() -> None:
    assert cascade().run_cascade(np.zeros((15, 15), np.uint8)).size == 0
    assert cascade().detect(np.zeros((0, 0), np.uint8)) == []
    with pytest.raises(ValueError):
        cascade().run_cascade(np.zeros((32, 32, 3), np.uint8))


def test_loader_rejects_bad_cascades() -> None:
    good = (PICO / "facefinder").read_bytes()
    for bad in (
        b"",
        good[:15],
        good[:-1],
        good + b"\0",
        b"\x00" * 16,
        np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes(),
    ):
        with pytest.raises(ValueError, match="not a pico cascade"):
            PicoCascade.from_bytes(bad)
    nan_threshold = bytearray(good)
    nan_threshold[16 + 4 * 63 + 4 * 64 : 16 + 4 * 63 + 4 * 64 + 4] = b"\x00\x00\xc0\x7f"
    with pytest.raises(ValueError, match="non-finite"):
        PicoCascade.from_bytes(bytes(nan_threshold))
    casc = PicoCascade.from_bytes(good)
    assert (casc.depth, casc.ntrees) == (6, 468)


def test_params_validation() -> None:
    for bad in ({"min_size": 0}, {"shift_factor": 0.0}, {"scale_factor": 0.9}):
        with pytest.raises(ValueError):
            PicoParams(**bad)
    assert STORE_PARAMS.scales()[:6] == [20, 22, 24, 26, 28, 30]
