"""The bomb corpus (tests/bombs.py) through the service: each file sent as the body and
fetched by URL from the loopback image server gets a quick 413/422, and every detector
replica stays up (same replica ids) with its peak RSS under its `memory` budget."""

from __future__ import annotations

import time

import pytest
from bombs import BOMBS
from helpers import EXTRA_FILES, running_replicas, shared_file

from serve_app.launch import APP_NAME

DETECTORS = ["face-detect-pigo", "face-detect-opencv", "basic-face-detection", "cnn-face-detection"]
FORBIDDEN = ("Traceback", "ray::", "pid=", "/io/opencv", ".cpp", "cv2.error")


def replica_info(name: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(name, APP_NAME).info.remote().result(timeout_s=30)


@pytest.fixture(scope="module")
def ready(service, http, model_dir) -> list[str]:
    """The detectors that can answer here (pigo needs its cascade from ../shared)."""
    models = {m["name"]: m for m in http.get("/v1/models").json()["models"]}
    usable = [d for d in DETECTORS if models.get(d, {}).get("status") == "ready"]
    assert "face-detect-opencv" in usable, models  # no weights needed: always there
    return usable


@pytest.mark.parametrize("how", ["body", "url"])
def test_bombs_are_refused_and_replicas_survive(service, http, image_server, ready, how):
    before = running_replicas()
    for name, (data, _) in BOMBS.items():
        EXTRA_FILES[name] = data
    slowest = (0.0, "")
    for model in ready:
        for name, (data, statuses) in BOMBS.items():
            t0 = time.monotonic()
            if how == "body":
                r = http.post(f"/v1/detect/{model}", content=data)
            else:
                r = http.post(f"/v1/detect/{model}", json={"url": f"{image_server}/extra/{name}"})
            took = time.monotonic() - t0
            slowest = max(slowest, (took, f"{model} {name}"))
            assert r.status_code in statuses, (model, name, how, r.status_code, r.text)
            body = r.json()
            assert set(body) == {"error", "detail", "request_id"}, body
            assert not any(word in r.text for word in FORBIDDEN), r.text
            assert took < 1.0, f"{model} took {took:.2f} s to refuse {name}"
    print(
        f"\n{len(BOMBS)} bombs x {len(ready)} detectors ({how}): slowest answer "
        f"{slowest[0] * 1e3:.0f} ms ({slowest[1]})"
    )
    assert running_replicas() == before, "a replica restarted"
    budgets = {
        d["name"]: d["ray_actor_options"]["memory"]
        for d in service["config"]["applications"][0]["deployments"]
    }
    for model in ready:
        info = replica_info(model)
        peak = info["peak_rss_bytes"]
        print(
            f"  {model}: peak RSS {peak / 2**20:.0f} MiB of {budgets[model] / 2**20:.0f} MiB; "
            f"OpenCV pixel limit {info['limits']['decoder_max_pixels']}"
        )
        assert peak < budgets[model], f"{model} peaked at {peak / 2**20:.0f} MiB"
        # OpenCV's own limit is the service's, from the app's runtime_env.
        assert info["limits"]["decoder_max_pixels"] == info["limits"]["max_pixels"]


def test_gif_by_url_is_refused_before_the_download(http, image_server):
    gif = b"GIF89a" + (64).to_bytes(2, "little") * 2 + b"\x00" * (2 * 2**20)
    EXTRA_FILES["big.gif"] = gif
    r = http.post("/v1/detect/face-detect-opencv", json={"url": f"{image_server}/extra/big.gif"})
    assert r.status_code == 415 and "GIF" in r.json()["detail"], r.text
    r = http.post("/v1/detect/face-detect-opencv", content=gif[:200])
    assert r.status_code == 415 and "GIF" in r.json()["detail"], r.text


def test_pico_worst_parameters_on_50mp_are_refused_over_http(http, ready):
    if "face-detect-pigo" not in ready:
        pytest.skip("face-detect-pigo has no cascade here (../shared/data/pico)")
    from bombs import png_declared

    t0 = time.monotonic()
    r = http.post(
        "/v1/detect/face-detect-pigo",
        content=png_declared(8660, 5773),
        params={"min_size": 4, "shift_factor": 0.01, "scale_factor": 1.01, "max_size": 20000},
    )
    assert r.status_code == 422 and r.json()["error"] == "over_work_budget", r.text
    assert time.monotonic() - t0 < 1.0


def test_a_timed_out_call_frees_the_replica(service, http):
    """What the router does on timeout: `response.cancel()`. Serve cancels the replica's
    task, whose cancel event stops the model; the next request gets the model at once."""
    from ray import serve

    sample = shared_file("images", "pigo_sample.jpg").read_bytes()
    handle = serve.get_deployment_handle("cnn-face-detection", APP_NAME)
    assert http.post("/v1/detect/cnn-face-detection", content=sample).status_code == 200
    response = handle.detect.remote(sample, {"test_delay_s": 120})
    time.sleep(1.0)  # it holds the model now
    response.cancel()
    t0 = time.monotonic()
    r = http.post("/v1/detect/cnn-face-detection", content=sample)
    waited = time.monotonic() - t0
    from ray.serve.exceptions import RequestCancelledError

    with pytest.raises(RequestCancelledError):  # cancelled while it held the model, not refused
        response.result(timeout_s=30)
    print(
        f"\nafter cancelling a 120 s call, the next request took {waited:.2f} s "
        f"(model time {r.json()['timing_ms']['total']:.0f} ms)"
    )
    assert r.status_code == 200, r.text
    assert waited < 10, "the cancelled call kept the model"
