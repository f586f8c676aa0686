"""SAM calls through the running service: a cancelled call (what the router does on its
timeout) frees the replica's worker thread, and the decoder-prompt budget answers 422."""

from __future__ import annotations

import time

import cv2
import pytest
from helpers import shared_file

from serve_app.launch import APP_NAME

LIGHT = "sam-segmentation-light"  # tiny ViT, random weights, max_decoder_prompts 512 here
# Every filter off: 256 prompts x 3 masks, each kept and decoded at 12 MP. Minutes of work.
HEAVY = {
    "points_per_side": 16,
    "pred_iou_thresh": 0,
    "stability_score_thresh": 0,
    "box_nms_thresh": 1.0,
}


def handle():
    from ray import serve

    return serve.get_deployment_handle(LIGHT, APP_NAME)


def running() -> int:
    return handle().info.remote().result(timeout_s=60)["running"]


def wait_running(want: int, timeout_s: float) -> float:
    t0 = time.monotonic()
    while running() != want:
        assert time.monotonic() - t0 < timeout_s, f"{LIGHT} never had {want} call(s) running"
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    img = cv2.imread(str(shared_file("images", "truck.jpg")))
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (4000, 3000)))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("method", ["generate", "generate_stream"])
def test_a_cancelled_sam_call_frees_the_replica(service, sam_ready, photo_12mp, method):
    """`generate` is the direct route's call, `generate_stream` the jobs deployment's."""
    from ray.serve.exceptions import RequestCancelledError

    wait_running(0, 120)  # nothing left over from earlier tests
    if method == "generate":
        response = handle().generate.remote(photo_12mp, HEAVY)
    else:
        response = handle().options(stream=True).generate_stream.remote(photo_12mp, HEAVY)
    wait_running(1, 120)
    time.sleep(1.0)  # into its work (decoding, the encoder, the first decoder batches)
    assert running() == 1, "the work ended before it could be cancelled: make it heavier"
    response.cancel()
    freed = wait_running(0, 300)
    print(f"\n{LIGHT} {method}: worker thread done {freed:.2f} s after the cancel")
    with pytest.raises(RequestCancelledError):
        if method == "generate":
            response.result(timeout_s=60)
        else:
            for _ in response:
                pass
    assert freed < 10, "the cancelled call kept its worker thread"


def test_sam_work_budget_is_a_422_naming_the_parameter(http, sam_ready):
    img = cv2.imread(str(shared_file("images", "truck.jpg")))
    ok, buf = cv2.imencode(".png", cv2.resize(img, (64, 48)))
    assert ok
    params = {"points_per_side": 16, "crop_n_layers": 1}  # 5 x 256 = 1,280 prompts
    t0 = time.monotonic()
    r = http.post(f"/v1/segment/{LIGHT}", params=params, content=buf.tobytes())
    took = time.monotonic() - t0
    body = r.json()
    assert (r.status_code, body["error"]) == (422, "over_work_budget"), r.text
    assert "crop_n_layers=1" in body["detail"] and "max_decoder_prompts" in body["detail"]
    assert set(body) == {"error", "detail", "request_id"}
    print(f"\nrefused in {took * 1e3:.0f} ms: {body['detail']}")
    # Within the budget the same image is served.
    r = http.post(f"/v1/segment/{LIGHT}", params={"points_per_side": 16}, content=buf.tobytes())
    assert r.status_code == 200, r.text
