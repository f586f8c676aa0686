"""Metrics and the access log: the Prometheus text Ray serves, scraped over loopback.

Ray exports metrics asynchronously: each process pushes to its node's agent every
`metrics_report_interval_ms` (2 s in the test session). So every check here first waits for
a barrier: requests sent after a time T are visible in the scrape once each process's
`visionserve_last_event_timestamp_seconds` reads >= T, and everything that process recorded
before is in that same export. Counts are then compared as exact deltas against that scrape,
polled with a deadline (never a fixed sleep): the outcome cannot depend on machine speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import _TINY_PNG_B64
from fastapi import Request
from helpers import shared_file

from serve_app import metrics
from serve_app.access import ACCESS_LOG, RequestObserver, access_line, observe_model_call

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 120.0  # generous: exports arrive every 2 s; a stuck export is a failure
Key = tuple[str, frozenset]


# -- scraping -------------------------------------------------------------------------------
def scrape(port: int) -> list[Any]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def key(name: str, **labels: Any) -> Key:
    return (name, frozenset((k, str(v)) for k, v in labels.items()))


def value(samples: list[Any], k: Key, agg=sum) -> float:
    """Sum (or max) over every series with these labels (any replica, worker, node)."""
    name, labels = k
    found = [s.value for s in samples if s.name == name and labels <= set(s.labels.items())]
    return agg(found) if found else 0.0


def wait_until(port: int, ready, what: str, explain=lambda samples: "") -> list[Any]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        samples = scrape(port)
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"metrics did not show {what} within {DEADLINE_S:.0f} s{explain(samples)}")
        time.sleep(0.25)


def barrier(port: int, since: float, events: list[tuple[str, str]]) -> list[Any]:
    """The first scrape in which each (source, model) process exported after `since`."""
    gauge = "ray_visionserve_last_event_timestamp_seconds"
    keys = [key(gauge, source=s, model=m) for s, m in events]
    return wait_until(
        port,
        lambda got: all(value(got, k, max) >= since for k in keys),
        "the sentinel requests",
        lambda got: ": not yet seen " + str([_show(k) for k in keys if value(got, k, max) < since]),
    )


def expect_deltas(port: int, base: list[Any], want: dict[Key, float]) -> None:
    """Wait until every counter moved by at least its delta, then require exactly that."""
    before = {k: value(base, k) for k in want}
    got = wait_until(
        port,
        lambda s: all(value(s, k) - before[k] >= d for k, d in want.items()),
        "the expected increments",
        lambda s: (
            ": (moved, expected) "
            + str(
                {
                    _show(k): (value(s, k) - before[k], d)
                    for k, d in want.items()
                    if value(s, k) - before[k] < d
                }
            )
        ),
    )
    moved = {k: value(got, k) - before[k] for k in want}
    wrong = {_show(k): (moved[k], d) for k, d in want.items() if moved[k] != d}
    assert not wrong, f"(moved, expected) per series: {wrong}"


def _show(k: Key) -> str:
    return k[0] + "{" + ",".join(f"{a}={b}" for a, b in sorted(k[1])) + "}"


def bucket_deltas(
    name: str, values: list[float], buckets: tuple[float, ...], **labels: Any
) -> dict[Key, float]:
    """Expected `le` bucket increments (cumulative, as Prometheus counts them) + `_count`."""
    want = {
        key(f"{name}_bucket", le=str(b), **labels): float(sum(v <= b for v in values))
        for b in buckets
    }
    want[key(f"{name}_bucket", le="+Inf", **labels)] = float(len(values))
    want[key(f"{name}_count", **labels)] = float(len(values))
    return want


# -- unit: metric table, log line, middleware -----------------------------------------------
def test_metric_table_is_consistent():
    names = [m.name for m in metrics.METRICS]
    assert len(names) == len(set(names))
    for m in metrics.METRICS:
        assert m.name.startswith("visionserve_") and m.description
        reserved = {"deployment", "replica", "application"}  # Serve adds these itself
        assert not reserved & set(m.tags), m.name
        if m.kind == "histogram":
            assert list(m.buckets) == sorted(m.buckets) and m.buckets[0] > 0, m.name
        else:
            assert not m.buckets, m.name
    assert metrics.BY_NAME["visionserve_requests"].exported == "ray_visionserve_requests_total"
    assert metrics.BY_NAME["visionserve_jobs"].exported == "ray_visionserve_jobs"


def test_every_metric_is_documented_with_its_labels():
    rows = {
        line.split("|")[1].strip(" `"): line
        for line in (REPO / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("| `ray_visionserve_")
    }
    assert set(rows) == {m.exported for m in metrics.METRICS}
    for m in metrics.METRICS:
        cells = rows[m.exported].split("|")
        assert cells[2].strip() == m.kind, m.name
        assert cells[3].strip() == ", ".join(f"`{t}`" for t in m.tags), m.name


def test_access_line_has_fixed_fields_and_nothing_else():
    record = {
        "ts": "2026-01-01T00:00:00.000+00:00",
        "request_id": "abc",
        "method": "POST",
        "route": "/v1/detect/{model}",
        "path": "/v1/detect/face-detect-pigo",
        "model": "face-detect-pigo",
        "status": 200,
        "error": None,
        "ms": {"total": 12.5},
        "bytes_in": 1000,
        "bytes_out": 300,
        "count": 1,
        "image": b"\xff\xd8 raw image bytes",
        "image_base64": "aGVsbG8=",
    }
    line = access_line(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert list(doc) == [
        "ts",
        "request_id",
        "method",
        "route",
        "path",
        "model",
        "status",
        "error",
        "ms",
        "bytes_in",
        "bytes_out",
        "count",
    ]
    assert doc["status"] == 200 and doc["ms"] == {"total": 12.5}
    assert "image" not in line and "aGVsbG8" not in line


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture()
def observed_app():
    """A small app with the router's middleware and error handlers, no Ray."""
    from fastapi import FastAPI

    from serve_app.api import api
    from serve_app.errors import ServiceError

    app = FastAPI()
    app.exception_handlers.update(api.exception_handlers)
    app.add_middleware(RequestObserver)

    class Policy:
        @observe_model_call
        async def call(self, model: str, method: str) -> dict[str, Any]:
            if model == "cnn-face-detection":
                raise ServiceError(422, "bad_image", "not an image")
            return {"count": 3, "timing_ms": {"decode": 1.0, "inference": 2.0, "total": 3.5}}

    @app.post("/v1/detect/{model}")
    async def detect(model: str, request: Request) -> dict[str, Any]:
        body = await request.body()
        if not body:
            raise ServiceError(400, "empty_body", "no image")
        return await Policy().call(model, "detect")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    lines = _Lines()
    ACCESS_LOG.addHandler(lines)
    try:
        yield app, lines.lines
    finally:
        ACCESS_LOG.removeHandler(lines)


async def _send(app, *requests: tuple[str, str, dict]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return [await client.request(m, url, **kw) for m, url, kw in requests]


def test_one_json_line_per_request(observed_app):
    app, lines = observed_app
    image = b"IMAGE-BYTES-MARKER" * 100
    ok, refused, unknown, failed, missing, traced, bug = asyncio.run(
        _send(
            app,
            ("POST", "/v1/detect/face-detect-pigo?min_size=30", {"content": image}),
            ("POST", "/v1/detect/face-detect-pigo", {"content": b""}),
            ("POST", "/v1/detect/no-such-model", {"content": b"x"}),
            ("POST", "/v1/detect/cnn-face-detection", {"content": b"xy"}),
            ("GET", "/nowhere", {}),
            (
                "POST",
                "/v1/detect/face-detect-opencv",
                {"content": b"x", "headers": {"x-request-id": "client-id-1"}},
            ),
            ("GET", "/boom", {}),
        )
    )
    assert [r.status_code for r in (ok, refused, unknown, failed, missing, traced, bug)] == [
        200,
        400,
        200,
        422,
        404,
        200,
        500,
    ]
    assert len(lines) == 7, lines
    by_status = {line["status"]: line for line in lines}

    line = lines[0]
    assert line["request_id"] == ok.headers["x-request-id"] and len(line["request_id"]) == 32
    assert (line["method"], line["route"], line["model"]) == (
        "POST",
        "/v1/detect/{model}",
        "face-detect-pigo",
    )
    assert line["path"] == "/v1/detect/face-detect-pigo"  # no query string
    assert line["bytes_in"] == len(image) and line["bytes_out"] == len(ok.content)
    assert line["error"] is None and line["count"] == 3
    assert line["ms"]["replica"] == {"decode": 1.0, "inference": 2.0, "total": 3.5}
    assert 0 <= line["ms"]["model_call"] <= line["ms"]["total"]
    assert all("MARKER" not in json.dumps(x) for x in lines)

    assert by_status[400]["error"] == "empty_body"
    # The error body, the header and the log line name the same id.
    assert (
        refused.json().get("request_id", by_status[400]["request_id"])
        == (refused.headers["x-request-id"])
        == by_status[400]["request_id"]
    )
    assert by_status[422]["error"] == "bad_image" and by_status[422]["model"] == (
        "cnn-face-detection"
    )
    assert lines[2]["model"] == "unknown"  # not a configured model: no new label value
    assert by_status[404] | {"ts": None, "request_id": None, "ms": None} == {
        "ts": None,
        "request_id": None,
        "method": "GET",
        "route": "unmatched",
        "path": "/nowhere",
        "model": "none",
        "status": 404,
        "error": "not_found",
        "ms": None,
        "bytes_in": 0,
        "bytes_out": len(missing.content),
        "count": None,
    }
    # A caller's id (Serve's proxy forwards it, or makes one) is kept, and not repeated.
    assert lines[5]["request_id"] == "client-id-1"
    assert traced.headers.get_list("x-request-id") == []
    assert by_status[500]["error"] == "internal" and by_status[500]["route"] == "/boom"
    ids = [line["request_id"] for line in lines]
    assert len(set(ids)) == len(ids)


def test_job_gauges_count_by_state_and_age(monkeypatch):
    from types import SimpleNamespace as Job

    recorded: dict[tuple, float] = {}
    monkeypatch.setattr(metrics, "_enabled", lambda: True)
    monkeypatch.setattr(metrics, "_jobs_seen", set())

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def set(self, v: float, tags: dict[str, str]) -> None:
            recorded[(self.name, *sorted(tags.items()))] = v

    monkeypatch.setattr(metrics, "_metric", Fake)
    jobs = [
        Job(model="sam-mobile", status="running", created=100.0),
        Job(model="sam-mobile", status="queued", created=110.0),
        Job(model="sam-mobile", status="queued", created=105.0),
        Job(model="face-detect-pigo", status="done", created=50.0),
    ]
    metrics.refresh_jobs(jobs, now=120.0)
    g = "visionserve_jobs"
    assert recorded[(g, ("model", "sam-mobile"), ("state", "queued"))] == 2
    assert recorded[(g, ("model", "sam-mobile"), ("state", "running"))] == 1
    assert not any(k[0] == g and ("model", "face-detect-pigo") in k for k in recorded)
    age = "visionserve_job_oldest_age_seconds"
    assert recorded[(age, ("state", "queued"))] == 15.0
    assert recorded[(age, ("state", "running"))] == 20.0
    metrics.refresh_jobs([], now=130.0)  # drained: the same series read 0, not their last value
    assert recorded[(g, ("model", "sam-mobile"), ("state", "queued"))] == 0
    assert recorded[(age, ("state", "queued"))] == 0.0


# -- monitoring manifests -------------------------------------------------------------------
def test_dashboard_is_generated_and_uses_only_exported_metrics():
    from kuberay.monitoring import dashboard

    path = REPO / "kuberay" / "monitoring" / "grafana-dashboard.json"
    assert json.loads(path.read_text()) == dashboard.build(), (
        "stale: run python -m kuberay.monitoring.dashboard"
    )
    exported = {m.exported for m in metrics.METRICS}
    series = {
        f"{m.exported}_{s}"
        for m in metrics.METRICS
        if m.kind == "histogram"
        for s in ("bucket", "sum", "count")
    }
    used = dashboard.referenced_metrics(dashboard.build())
    assert used, "the dashboard queries no metric"
    assert used <= exported | series, used - exported - series
    # Every metric is on the dashboard: a new one without a panel is easy to forget.
    assert {m.exported for m in metrics.METRICS} <= {
        u.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for u in used
    }


def test_podmonitor_scrapes_every_ray_pod_on_the_metrics_port():
    docs = list(
        yaml.safe_load_all((REPO / "kuberay" / "monitoring" / "podmonitor.yaml").read_text())
    )
    (pm,) = [d for d in docs if d]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert {"ray_io_cluster", "ray_io_node_type"} <= targets


# -- the running service --------------------------------------------------------------------
def _ready_models(http) -> dict[str, str]:
    models = http.get("/v1/models").json()["models"]
    return {m["name"]: m["kind"] for m in models if m.get("status") == "ready"}


def test_requests_move_each_models_counters_by_exactly_n(service, http, metrics_port):
    image = shared_file("images", "pigo_sample.jpg").read_bytes()
    ready = _ready_models(http)
    assert "face-detect-opencv" in ready, ready
    n = {"detector": 3, "segmenter": 2}

    def send(model: str, kind: str) -> tuple[httpx.Response, int]:
        if kind == "detector":
            return http.post(f"/v1/detect/{model}", content=image), len(image)
        body = json.dumps({"image_base64": _TINY_PNG_B64, "points": [[0, 0]]}).encode()
        r = http.post(
            f"/v1/segment/{model}", content=body, headers={"content-type": "application/json"}
        )
        return r, len(body)

    # Barrier: once these sentinels show, every earlier test's requests are in the scrape.
    since = time.time()
    for model, kind in ready.items():
        r, _ = send(model, kind)
        assert r.status_code == 200, (model, r.text[:300])
    base = barrier(metrics_port, since, [(s, m) for m in ready for s in ("request", "answer")])

    want: dict[Key, float] = {}
    for model, kind in ready.items():
        route = "/v1/detect/{model}" if kind == "detector" else "/v1/segment/{model}"
        method = "detect" if kind == "detector" else "segment"
        answers, sent = [], 0
        for _ in range(n[kind]):
            r, size = send(model, kind)
            assert r.status_code == 200, (model, r.text[:300])
            answers.append(r.json())
            sent += size
        count = float(len(answers))
        want[key("ray_visionserve_requests_total", route=route, model=model, status=200)] = count
        want[key("ray_visionserve_request_seconds_count", route=route, model=model, status=200)] = (
            count
        )
        want[key("ray_visionserve_request_bytes_total", route=route, model=model)] = sent
        want[
            key(
                "ray_visionserve_model_call_seconds_count", model=model, method=method, outcome="ok"
            )
        ] = count
        for stage in ("decode", "inference", "render", "total"):
            want[key("ray_visionserve_stage_seconds_count", model=model, stage=stage)] = count
        want.update(
            bucket_deltas(
                "ray_visionserve_objects_per_answer",
                [a["count"] for a in answers],
                metrics.COUNT_BUCKETS,
                model=model,
                kind="faces" if kind == "detector" else "masks",
            )
        )
        want.update(
            bucket_deltas(
                "ray_visionserve_input_megapixels",
                [a["width"] * a["height"] / 1e6 for a in answers],
                metrics.MEGAPIXEL_BUCKETS,
                model=model,
            )
        )

    # Refusals: by the router, by the URL fetch, and by a model replica.
    detect = "/v1/detect/{model}"
    refused = []  # the requests to face-detect-opencv
    r = http.post("/v1/detect/face-detect-opencv", content=b"")
    assert (r.status_code, r.json()["error"]) == (400, "empty_body")
    r = http.post("/v1/detect/no-such-model", content=image)
    assert (r.status_code, r.json()["error"]) == (404, "unknown_model")
    r = http.post("/v1/detect/face-detect-opencv", json={"url": "http://127.0.0.1:9/x.jpg"})
    assert (r.status_code, r.json()["error"]) == (400, "fetch_refused")
    refused.append(r)
    r = http.post("/v1/detect/face-detect-opencv", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert r.status_code in (415, 422), r.text
    refused.append(r)
    replica_code = r.json()["error"]
    refusals = "ray_visionserve_refusals_total"
    want[
        key(refusals, route=detect, model="face-detect-opencv", status=400, reason="empty_body")
    ] = 1
    want[key(refusals, route=detect, model="unknown", status=404, reason="unknown_model")] = 1
    want[
        key(refusals, route=detect, model="face-detect-opencv", status=400, reason="fetch_refused")
    ] = 1
    want[
        key(
            refusals,
            route=detect,
            model="face-detect-opencv",
            status=r.status_code,
            reason=replica_code,
        )
    ] = 1
    want[key("ray_visionserve_url_fetches_total", result="fetch_refused")] = 1
    # Refused bodies were received all the same: they count as bytes in.
    want[key("ray_visionserve_request_bytes_total", route=detect, model="face-detect-opencv")] += (
        sum(len(x.request.content) for x in refused)
    )
    want[
        key(
            "ray_visionserve_model_call_seconds_count",
            model="face-detect-opencv",
            method="detect",
            outcome=replica_code,
        )
    ] = 1
    expect_deltas(metrics_port, base, want)


def test_jobs_count_outcomes_and_drain_the_queue_gauge(service, http, metrics_port):
    image = shared_file("images", "pigo_sample.jpg").read_bytes()
    model = "face-detect-opencv"

    def run_job(content: bytes) -> dict[str, Any]:
        r = http.post(f"/v1/jobs/{model}", content=content)
        assert r.status_code == 202, r.text
        status_url = r.json()["status_url"]
        deadline = time.monotonic() + DEADLINE_S
        while (view := http.get(status_url).json())["status"] not in ("done", "failed"):
            assert time.monotonic() < deadline, view
            time.sleep(0.1)
        return view

    since = time.time()
    assert run_job(image)["status"] == "done"
    base = barrier(metrics_port, since, [("job", model)])
    assert run_job(image)["status"] == "done"
    failed = run_job(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    assert failed["status"] == "failed"
    code = failed["error"]["error"]
    expect_deltas(
        metrics_port,
        base,
        {
            key("ray_visionserve_jobs_finished_total", model=model, result="done"): 1,
            key("ray_visionserve_jobs_finished_total", model=model, result=code): 1,
            key("ray_visionserve_job_seconds_count", model=model): 2,
        },
    )
    # Nothing left running: the depth gauge reads 0 for this model once refreshed.
    wait_until(
        metrics_port,
        lambda s: (
            any(x.name == "ray_visionserve_jobs" and x.labels.get("model") == model for x in s)
            and value(s, key("ray_visionserve_jobs", model=model, state="running"), max) == 0
        ),
        "the running-jobs gauge back at 0",
    )


def test_router_writes_one_json_line_per_request(service, http, ray_session):
    """The line reaches the router replica's stderr log, with Serve's request id."""
    import uuid

    image = shared_file("images", "pigo_sample.jpg").read_bytes()
    request_id = f"metrics-test-{uuid.uuid4().hex}"
    r = http.post(
        "/v1/detect/face-detect-opencv", content=image, headers={"x-request-id": request_id}
    )
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-request-id") == [request_id]  # Serve's header, not doubled
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + DEADLINE_S
    while True:  # worker logs are files written by another process: poll, bounded
        # Serve's own access log names the id too; ours are the lines that are JSON.
        found = [
            line
            for path in logs.glob("worker-*.err")
            for line in path.read_text(errors="replace").splitlines()
            if request_id in line and line.startswith("{")
        ]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert len(found) == 1, found
    doc = json.loads(found[0])
    assert doc["request_id"] == request_id and doc["status"] == 200 and doc["error"] is None
    assert (doc["route"], doc["model"]) == ("/v1/detect/{model}", "face-detect-opencv")
    assert doc["bytes_in"] == len(image) and doc["count"] == r.json()["count"]
    assert set(doc["ms"]) == {"total", "model_call", "replica"}
    assert doc["ms"]["replica"] == r.json()["timing_ms"]
