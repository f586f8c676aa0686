"""End to end through the running Serve app: every route and input form, real models."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import cv2
import numpy as np
import pytest
from helpers import PICO, YUNET, shared_file

from serve_app.registry import MODELS, names_of

DETECTORS = names_of("detector")


@pytest.fixture(scope="module")
def sample() -> bytes:
    return shared_file("images", "pigo_sample.jpg").read_bytes()


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "answer is not a decodable image"
    return img


def assert_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail", "request_id"} and body["detail"]
    if code:
        assert body["error"] == code, body
    return body


def test_healthz(http):
    assert http.get("/healthz").json() == {"status": "ok"}


def test_models_lists_every_configured_model(http):
    models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    for name, spec in MODELS.items():  # what the web page and clients read from the registry
        assert (models[name]["box_color"], models[name]["default_output"]) == (
            spec.box_color,
            spec.default_output,
        )
    # Weights the test service installs from the shared data (the others ship with OpenCV
    # or are fetched by the session fixture): without that data they are simply missing.
    from_shared = {"face-detect-pigo": PICO / "facefinder", "yunet-face-detection": YUNET}
    for name in DETECTORS:
        assert models[name]["kind"] == "detector"
        ready = name not in from_shared or from_shared[name].exists()
        assert models[name]["status"] == ("ready" if ready else "missing weights"), models[name]
        assert models[name]["resources"]["num_cpus"] > 0
    assert models["sam-vit-h"]["status"] == "missing weights"
    assert "python -m serve_app.models fetch sam_vit_h" in models["sam-vit-h"]["fetch_command"]
    assert models["sam-segmentation-light"]["random_weights"] is True


def test_openapi_docs(http):
    spec = http.get("/openapi.json").json()
    assert "/v1/detect/{model}" in spec["paths"]
    assert http.get("/docs").status_code == 200


@pytest.mark.parametrize("model", DETECTORS)
def test_detect_raw_body_finds_the_face(http, sample, model):
    r = http.post(f"/v1/detect/{model}", content=sample)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["width"], body["height"]) == (model, 320, 400)
    assert body["count"] == len(body["faces"]) >= 1
    if model in ("cnn-face-detection", "face-detect-pigo"):
        assert body["count"] == 1
    face = body["faces"][0]
    # YuNet adds its five landmarks (tests/test_yunet.py checks them).
    assert set(face) - {"landmarks"} == {"x", "y", "w", "h", "score"}
    # pigo's reference: centre (col 156, row 203), side 245.
    assert abs(face["x"] + face["w"] / 2 - 156) < 60 and abs(face["y"] + face["h"] / 2 - 203) < 60
    assert body["timing_ms"]["total"] > 0


def test_detect_multipart_upload_and_params(http, sample):
    r = http.post(
        "/v1/detect/cnn-face-detection",
        files={"file": ("face.jpg", sample, "image/jpeg")},
        data={"confidence": "0.9"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["filename"] == "face.jpg" and body["parameters"]["confidence"] == 0.9
    assert body["count"] == 1


def test_detect_json_base64_and_url(http, sample, image_server):
    b64 = base64.b64encode(sample).decode()
    r = http.post("/v1/detect/face-detect-pigo", json={"image_base64": b64, "q_threshold": 3})
    assert r.status_code == 200 and r.json()["count"] == 1
    r = http.post(
        "/v1/detect/face-detect-pigo", json={"image_base64": "data:image/jpeg;base64," + b64}
    )
    assert r.status_code == 200 and r.json()["count"] == 1
    r = http.post("/v1/detect/cnn-face-detection", json={"url": f"{image_server}/pigo_sample.jpg"})
    assert r.status_code == 200 and r.json()["count"] == 1


def greenish(pixels: np.ndarray) -> float:
    """Share of BGR pixels that are clearly green (survives JPEG's rounding, unlike ==)."""
    p = pixels.astype(int)
    return float(((p[..., 1] - np.maximum(p[..., 0], p[..., 2])) > 100).mean())


@pytest.mark.parametrize(("fmt", "media"), [("jpeg", "image/jpeg"), ("png", "image/png")])
def test_detect_image_answer(http, sample, fmt, media):
    r = http.post(f"/v1/detect/face-detect-pigo?format={fmt}", content=sample)
    assert r.status_code == 200 and r.headers["content-type"] == media
    assert r.headers["x-count"] == "1"
    drawn, original = decode(r.content), decode(sample)
    assert drawn.shape == original.shape
    # The box the JSON answer reports is drawn in green, on all four sides, where the
    # original has no green at all.
    [face] = http.post("/v1/detect/face-detect-pigo", content=sample).json()["faces"]
    x, y, w, h = face["x"], face["y"], face["w"], face["h"]
    for side in (
        np.s_[y, x : x + w],
        np.s_[y + h, x : x + w],
        np.s_[y : y + h, x],
        np.s_[y : y + h, x + w],
    ):
        assert greenish(drawn[side]) > 0.9, (fmt, side)
        assert greenish(original[side]) < 0.1
    if fmt == "png":  # lossless: the exact colour
        assert np.all(drawn == (0, 255, 0), axis=2).sum() > 100


def test_function_with_url_body_answers_jpeg(http, sample_url):
    """The OpenFaaS habit: `curl -d https://host/img.jpg .../function/face-detect-pigo`."""
    url = sample_url
    r = http.post(
        "/function/face-detect-pigo",
        content=url.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg" and r.headers["x-count"] == "1"
    assert decode(r.content).shape == (400, 320, 3)


def test_function_with_bytes_and_namespace_suffix(http, sample):
    r = http.post("/function/cnn-face-detection.openfaas-fn", content=sample)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def test_basic_face_detection_answers_base64_text_or_json(http, sample):
    r = http.post("/function/basic-face-detection", content=sample)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert decode(base64.b64decode(r.text)).shape == (400, 320, 3)
    r = http.post("/function/basic-face-detection?format=json", content=sample)
    assert r.json()["count"] >= 1


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"garbage bytes, no image"}, 415, "unsupported_media_type"),
        ({"content": b""}, 400, "empty_body"),
        (
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            400,
            "bad_json",
        ),
        ({"json": {"image_base64": "@@@"}}, 400, "bad_base64"),
        ({"json": {"nothing": 1}}, 400, "no_image"),
        ({"json": {"url": "http://127.0.0.1:9/x.jpg"}}, 400, "fetch_refused"),
        ({"json": {"url": "http://localhost:9/x.jpg"}}, 400, "fetch_refused"),
        ({"json": {"url": "ftp://example.com/x.jpg"}}, 400, "bad_url"),
        ({"content": _png_header(60000, 60000) + b"\0" * 64}, 413, "too_many_pixels"),
        # A JPEG without a frame header: its size is unknown, refused before decoding.
        ({"content": b"\xff\xd8\xff\xe0" + b"\0" * 100}, 422, "unknown_image_size"),
        ({"files": {"other": ("a.txt", b"hi", "text/plain")}}, 400, "no_file"),
        ({"content": b"x" * (8 * 2**20 + 1)}, 413, "too_large"),
    ],
)
def test_bad_input_gives_4xx_json(http, kwargs, status, code):
    assert_error(http.post("/v1/detect/cnn-face-detection", **kwargs), status, code)


def test_bad_parameters(http, sample):
    assert_error(
        http.post("/v1/detect/cnn-face-detection?confidence=7", content=sample),
        422,
        "bad_parameter",
    )
    assert_error(
        http.post("/v1/detect/cnn-face-detection?confidence=abc", content=sample),
        422,
        "bad_parameter",
    )
    assert_error(
        http.post("/v1/detect/cnn-face-detection?colour=red", content=sample),
        422,
        "unknown_parameter",
    )
    assert_error(
        http.post("/v1/detect/face-detect-pigo?min_size=500&max_size=100", content=sample),
        422,
        "bad_parameter",
    )
    assert_error(http.post("/v1/detect/cnn-face-detection?format=gif", content=sample), 422)


def test_unknown_routes_and_models(http, sample):
    assert_error(http.post("/v1/detect/nope", content=sample), 404, "unknown_model")
    assert_error(http.post("/v1/detect/sam-mobile", content=sample), 404, "unknown_model")
    assert_error(http.post("/function/nope", content=sample), 404, "unknown_model")
    assert_error(http.get("/nothing-here"), 404, "not_found")
    assert_error(http.get("/v1/detect/cnn-face-detection"), 405)


def test_url_fetch_errors(http, image_server):
    assert_error(
        http.post("/v1/detect/cnn-face-detection", json={"url": f"{image_server}/text"}), 415
    )
    assert_error(
        http.post("/v1/detect/cnn-face-detection", json={"url": f"{image_server}/missing.jpg"}),
        422,
        "fetch_failed",
    )
    assert_error(
        http.post(
            "/v1/detect/cnn-face-detection", json={"url": f"{image_server}/redirect-to-loopback"}
        ),
        400,
        "fetch_refused",
    )


def test_missing_weights_answer_503_with_the_fetch_command(http, sample):
    r = http.post("/v1/segment/sam-vit-h", content=sample)
    body = assert_error(r, 503, "weights_missing")
    assert "python -m serve_app.models fetch sam_vit_h" in body["detail"]
    assert r.headers.get("retry-after")


def test_service_still_answers_after_bad_input(http, sample):
    for _ in range(3):
        http.post("/v1/detect/cnn-face-detection", content=b"\x89PNG\r\n\x1a\nbroken")
    r = http.post("/v1/detect/cnn-face-detection", content=sample)
    assert r.status_code == 200 and r.json()["count"] == 1
    assert json.loads(r.text)["model"] == "cnn-face-detection"
