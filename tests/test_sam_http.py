"""Segment Anything end to end over HTTP: automatic, prompted, jobs with progress, overlays.

The test service runs the real SAM code with random weights (a tiny ViT from
segment_anything's builder, and MobileSAM's real TinyViT): masks are checked for
structure and consistency, never for quality.
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from helpers import shared_file
from pycocotools import mask as mask_utils

LIGHT = "sam-segmentation-light"  # tiny ViT in the test service


@pytest.fixture(scope="module")
def small_png() -> bytes:
    img = cv2.imread(str(shared_file("images", "truck.jpg")))
    ok, buf = cv2.imencode(".png", cv2.resize(img, (240, 160)))
    assert ok
    return buf.tobytes()


def rle_mask(seg: dict) -> np.ndarray:
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)


def check_masks(body: dict, width: int, height: int) -> None:
    assert (body["width"], body["height"]) == (width, height)
    assert body["count"] == len(body["masks"])
    for m in body["masks"]:
        mask = rle_mask(m["segmentation"])
        assert mask.shape == (height, width)
        assert m["area"] == int(mask.sum())
        if m["area"]:
            ys, xs = np.nonzero(mask)
            # segment_anything's bbox convention: [x, y, max-min, max-min]
            assert m["bbox"] == [
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min()),
                int(ys.max() - ys.min()),
            ]
        assert 0.0 <= m["stability_score"] <= 1.0


def test_automatic_masks_json(http, small_png):
    params = {"points_per_side": 4, "pred_iou_thresh": 0, "stability_score_thresh": 0}
    r = http.post(f"/v1/segment/{LIGHT}", content=small_png, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "automatic" and body["count"] >= 1
    check_masks(body, 240, 160)


def test_automatic_overlay_image_renders(http, small_png):
    params = {
        "points_per_side": 4,
        "pred_iou_thresh": 0,
        "stability_score_thresh": 0,
        "format": "png",
    }
    r = http.post(f"/v1/segment/{LIGHT}", content=small_png, params=params)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    overlay = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(small_png, np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == original.shape
    assert np.any(overlay != original), "no mask was drawn"


def test_prompted_masks_and_embedding_cache(http, small_png):
    body = {"points": [[120, 80], [30, 30]], "labels": [1, 0], "multimask": True}
    from base64 import b64encode

    payload = {"image_base64": b64encode(small_png).decode(), **body}
    first = http.post(f"/v1/segment/{LIGHT}", json=payload)
    assert first.status_code == 200, first.text
    a = first.json()
    assert a["mode"] == "prompted" and a["count"] == 3  # multimask: three per prompt
    check_masks(a, 240, 160)
    second = http.post(
        f"/v1/segment/{LIGHT}",
        json={**payload, "points": [[60, 40]], "labels": [1], "multimask": False},
    )
    b = second.json()
    assert second.status_code == 200 and b["count"] == 1
    assert b["cached_embedding"] is True, "the second prompt on the same image re-ran the encoder"
    boxes = http.post(
        f"/v1/segment/{LIGHT}",
        json={
            **payload,
            "points": None,
            "multimask": False,
            "boxes": [[10, 10, 100, 90], [50, 20, 200, 150]],
        },
    )
    assert boxes.status_code == 200 and boxes.json()["count"] == 2


@pytest.mark.parametrize(
    "prompt",
    [
        {"points": [[1, 2, 3]]},
        {"points": [[10, 10]], "labels": [1, 1]},
        {"points": [[10, 10]], "labels": [7]},
        {"points": [[9999, 10]]},
        {"boxes": [[50, 50, 10, 10]]},
        {"points": "not json"},
        {"points": [["a", "b"]]},
    ],
)
def test_bad_prompts_are_422(http, small_png, prompt):
    from base64 import b64encode

    r = http.post(
        f"/v1/segment/{LIGHT}", json={"image_base64": b64encode(small_png).decode(), **prompt}
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "bad_prompt"


def test_parameter_bounds_come_from_config(http, small_png):
    r = http.post(f"/v1/segment/{LIGHT}?points_per_side=999", content=small_png)
    assert r.status_code == 422 and r.json()["error"] == "bad_parameter"


def test_job_reports_progress_then_result(http, small_png):
    r = http.post(
        f"/v1/jobs/{LIGHT}",
        content=small_png,
        params={"points_per_side": 8, "pred_iou_thresh": 0, "stability_score_thresh": 0},
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["status_url"]
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = http.get(job["status_url"]).json()
        seen.append((status["status"], status["progress"], status["stage"]))
        if status["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert seen[-1][0] == "done", seen[-1]
    progress = [p for _, p, _ in seen]
    assert progress == sorted(progress), "progress went backwards"
    assert any(0 < p < 1 for p in progress) or len(seen) < 3, seen
    result = http.get(job["result_url"])
    assert result.status_code == 200
    check_masks(result.json(), 240, 160)


def test_unknown_job_and_not_done(http):
    r = http.get("/v1/jobs/nope")
    assert r.status_code == 404 and r.json()["error"] == "unknown_job"


def test_function_sam_answers_the_overlay(http, small_png):
    r = http.post(f"/function/{LIGHT}?points_per_side=4", content=small_png)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"


def test_mobile_sam_runs_with_its_real_encoder(http, small_png):
    r = http.post("/v1/segment/sam-mobile?points_per_side=2", content=small_png)
    assert r.status_code == 200, r.text
    check_masks(r.json(), 240, 160)


def test_sam_models_are_listed_with_their_status(http, small_png):
    models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    for name in ("sam-segmentation-light", "sam-segmentation", "sam-vit-h", "sam-mobile"):
        assert models[name]["kind"] == "segmenter"
    # The light model keeps `dtype: auto`: bf16 exactly where this host's CPU flags say
    # native bf16 (the replica runs on this machine); MobileSAM is configured float32.
    import torch

    from serve_app.models.sam.precision import native_bf16

    native, _ = native_bf16(torch.device("cpu"))
    assert models[LIGHT]["dtype"] == ("bfloat16" if native else "float32")
    assert models[LIGHT]["dtype_reason"].startswith("auto: ")
    assert models["sam-mobile"]["dtype"] == "float32"
    assert models[LIGHT]["parameters"]["crop_n_layers"]["max"] == 1
    assert models["sam-segmentation"]["status"] == "missing weights"
    r = http.post("/v1/segment/sam-segmentation", content=small_png)
    assert r.status_code == 503 and "fetch sam_vit_l" in r.json()["detail"]


def test_automatic_masks_with_a_crop_layer(http, small_png):
    params = {
        "points_per_side": 2,
        "pred_iou_thresh": 0,
        "stability_score_thresh": 0,
        "crop_n_layers": 1,
    }
    r = http.post(f"/v1/segment/{LIGHT}", content=small_png, params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["crop_n_layers"] == 1 and body["count"] >= 1
    check_masks(body, 240, 160)
    too_many = http.post(f"/v1/segment/{LIGHT}?crop_n_layers=2", content=small_png)
    assert too_many.status_code == 422 and too_many.json()["error"] == "bad_parameter"
