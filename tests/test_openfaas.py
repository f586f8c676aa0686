"""OpenFaaS gateway compatibility: what faas-cli sends, answered the way it parses.

The real faas-cli is a Go binary that no package registry we use ships, so `FaasCli` below
sends its requests header for header (as observed from faas-cli 0.16.37) and the checks
decode the answers as strictly as its Go structs do. The first tests need no Ray: the
FunctionStatus builder, the safe POST and the callback retries, against loopback servers.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode, urlsplit

import cv2
import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from helpers import REPO, TEST_IMAGE_HOST, shared_file

from serve_app import callbacks, openfaas
from serve_app.auth import ApiKeyMiddleware
from serve_app.config import AppSettings, ModelSettings
from serve_app.errors import ServiceError
from serve_app.inputs.addresses import check_url
from serve_app.inputs.fetch import post_url
from serve_app.job import Job

NAMESPACE = "openfaas-fn"
FUNCTION_KEYS = {
    "name",
    "image",
    "invocationCount",
    "replicas",
    "availableReplicas",
    "namespace",
    "labels",
    "annotations",
}  # + createdAt when known
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
CALLBACK_WAIT_S = 90


# --------------------------------------------------------------------------- helpers


def is_int(value: Any) -> bool:
    # Go's uint64 refuses 1.0; Python's bool is an int subclass that JSON writes as true.
    return type(value) is int


def assert_function_status(item: dict[str, Any]) -> None:
    """Decodes into faas-provider's types.FunctionStatus the way faas-cli does."""
    assert set(item) - {"createdAt"} == FUNCTION_KEYS, sorted(item)
    assert isinstance(item["name"], str) and item["name"]
    assert isinstance(item["image"], str) and ":" in item["image"]
    assert item["namespace"] == NAMESPACE
    for key in ("replicas", "availableReplicas", "invocationCount"):
        assert is_int(item[key]) and item[key] >= 0, (key, item[key])
    for key in ("labels", "annotations"):  # map[string]string
        assert isinstance(item[key], dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in item[key].items())
    if "createdAt" in item:  # time.Time: RFC 3339, never ""
        assert RFC3339.fullmatch(item["createdAt"]), item["createdAt"]
        datetime.fromisoformat(item["createdAt"].replace("Z", "+00:00"))


def decode(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "not a decodable image"
    return img


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


class FaasCli:
    """The requests of faas-cli 0.16.37, as its Go client puts them on the wire.

    Go's net/http adds Host, User-Agent, Content-Length and `Accept-Encoding: gzip`; an
    unset token goes out as `Authorization: Bearer` (Go trims the space of "Bearer ").
    `invoke` sends no gateway credentials and `Content-Type: text/plain` by default.
    """

    UA = "Go-http-client/1.1"

    def __init__(self, gateway: str) -> None:
        parts = urlsplit(gateway)
        self.host, self.port = parts.hostname, parts.port

    def send(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None = None
    ) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.putheader("User-Agent", self.UA)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            for name, value in headers:
                conn.putheader(name, value)
            conn.putheader("Accept-Encoding", "gzip")
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.getheader("content-encoding") in (None, "identity")
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def list(self, namespace: str | None = None) -> Reply:
        query = f"?{urlencode({'namespace': namespace})}" if namespace else ""
        return self.send("GET", f"/system/functions{query}", [("Authorization", "Bearer")])

    def describe(self, name: str, namespace: str | None = None) -> Reply:
        query = {"namespace": namespace} if namespace else {}
        path = f"/system/function/{name}?{urlencode({**query, 'usage': '1'})}"
        return self.send("GET", path, [("Authorization", "Bearer")])

    def version(self) -> Reply:
        return self.send("GET", "/system/info", [("Authorization", "Bearer")])

    def invoke(
        self,
        name: str,
        body: bytes,
        *,
        is_async: bool = False,
        namespace: str = NAMESPACE,
        query: dict[str, str] | None = None,
        headers: list[tuple[str, str]] = (),
        content_type: str = "text/plain",
    ) -> Reply:
        route = "async-function" if is_async else "function"
        path = f"/{route}/{name}.{namespace}" + (f"?{urlencode(query)}" if query else "")
        return self.send("POST", path, [("Content-Type", content_type), *headers], body)


class Receiver:
    """A callback server: records each POST, answers the statuses it is told to."""

    def __init__(self, host: str, answers: list[int] | None = None) -> None:
        self.calls: queue.Queue[dict[str, Any]] = queue.Queue()
        self.answers = list(answers or [])
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.calls.put(
                    {
                        "path": self.path,
                        "headers": dict(self.headers.items()),
                        "body": body,
                        "at": time.monotonic(),
                    }
                )
                status = outer.answers.pop(0) if outer.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()

    def wait(self, timeout: float = CALLBACK_WAIT_S) -> dict[str, Any]:
        try:
            return self.calls.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no callback within {timeout} s") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def local_receiver() -> Iterator[Receiver]:
    receiver = Receiver("127.0.0.1")
    yield receiver
    receiver.close()


# --------------------------------------------------------------------------- no Ray


def test_function_status_has_go_types():
    state = openfaas.AppState(
        1_700_000_000.25,
        {"face-detect-pigo": openfaas.DeploymentState("HEALTHY", replicas=2, available=1)},
    )
    item = openfaas.function_status("face-detect-pigo", ModelSettings(), state, 7)
    assert_function_status(item)
    assert (item["replicas"], item["availableReplicas"], item["invocationCount"]) == (2, 1, 7)
    assert item["createdAt"] == "2023-11-14T22:13:20Z"
    # A disabled model is listed like a function scaled to zero; no deploy time, no key.
    off = openfaas.function_status(
        "sam-vit-h", ModelSettings(enabled=False), openfaas.AppState(None, {}), 0
    )
    assert_function_status(off)
    assert "createdAt" not in off and off["replicas"] == off["availableReplicas"] == 0
    assert off["annotations"]["visionserve.enabled"] == "false"


def test_system_info_shape():
    info = openfaas.system_info()
    assert set(info) == {"provider", "version", "arch"}
    assert set(info["provider"]) == {"provider", "orchestration", "version"}
    for version in (info["version"], info["provider"]["version"]):
        assert set(version) == {"sha", "release"}
        assert all(isinstance(v, str) and v for v in version.values())


def test_function_names():
    assert openfaas.split_function_name("face-detect-pigo.openfaas-fn") == (
        "face-detect-pigo",
        "openfaas-fn",
    )
    assert openfaas.split_function_name("sam-mobile") == ("sam-mobile", None)


def test_every_route_is_declared_in_the_router():
    """One place lists the service's routes; OpenFaaS's are plain functions it calls."""
    import ast

    declared = {}
    for path in (REPO / "serve_app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            for dec in getattr(node, "decorator_list", []):
                func = dec.func if isinstance(dec, ast.Call) else dec
                if (
                    isinstance(func, ast.Attribute)
                    and isinstance(func.value, ast.Name)
                    and func.value.id == "api"
                    and func.attr in ("get", "post", "put", "delete", "api_route")
                ):
                    declared.setdefault(path.name, []).append(dec.args[0].value)
    assert set(declared) == {"router.py"}, declared
    for route in (
        "/function/{name}",
        "/async-function/{name}",
        "/system/functions",
        "/system/function/{name}",
        "/system/namespaces",
        "/system/info",
    ):
        assert route in declared["router.py"]
    # openfaas.py is a library: importing it builds no app and registers no middleware.
    code = (
        "import sys\n"
        "import serve_app.openfaas\n"
        "assert 'serve_app.api' not in sys.modules and 'serve_app.router' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_middleware_is_registered_in_api_py():
    from serve_app.access import RequestObserver
    from serve_app.api import api

    # Outermost first: the observer sees every answer, the API key's 401s included.
    assert [m.cls for m in api.user_middleware] == [
        RequestObserver,
        openfaas.InvocationCounter,
        ApiKeyMiddleware,
    ]


def test_invocation_counter_counts_answers_not_refusals():
    """Counted: every answer of a known function, errors included. Not counted: what the
    API key, the router (unknown name) or the method check refused before it ran."""
    app = FastAPI()
    app.add_middleware(ApiKeyMiddleware, key_source=lambda: "k")
    app.add_middleware(openfaas.InvocationCounter)  # outermost, as in serve_app.api

    @app.post("/function/{name}")
    async def function(name: str, request: Request) -> dict:
        if await request.body() == b"bad":
            raise ServiceError(400, "bad", "bad")
        return {}

    @app.exception_handler(ServiceError)
    async def _err(_: Request, err: ServiceError):
        from fastapi.responses import JSONResponse

        return JSONResponse(err.body(), status_code=err.status)

    before = openfaas.INVOCATIONS["face-detect-opencv"]
    auth = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        assert (
            client.post("/function/face-detect-opencv.openfaas-fn", headers=auth).status_code == 200
        )
        assert (
            client.post("/function/face-detect-opencv", content=b"bad", headers=auth).status_code
            == 400
        )
        assert client.post("/function/face-detect-opencv").status_code == 401
        assert (
            client.post(
                "/function/face-detect-opencv", headers={"Authorization": "Bearer"}
            ).status_code
            == 401
        )
        assert client.post("/function/not-a-model", headers=auth).status_code == 200
        assert client.get("/function/face-detect-opencv", headers=auth).status_code == 405
    assert openfaas.INVOCATIONS["face-detect-opencv"] == before + 2
    assert "not-a-model" not in openfaas.INVOCATIONS


def test_post_url_keeps_the_fetch_rules(local_receiver):
    url = f"{local_receiver.url}/cb?x=1"
    post = {
        "headers": {"X-Call-Id": "abc", "Host": "evil.example"},
        "connect_timeout_s": 2,
        "read_timeout_s": 2,
    }
    with pytest.raises(ServiceError) as err:  # loopback without an allowlist entry
        asyncio.run(post_url(url, b"body", **post))
    assert err.value.code == "fetch_refused"
    with pytest.raises(ServiceError) as err:
        asyncio.run(
            post_url("http://169.254.169.254/", b"", allow_hosts=["169.254.0.0/16"], **post)
        )
    assert err.value.code == "fetch_refused"
    assert local_receiver.calls.empty()

    status = asyncio.run(post_url(url, b"body", allow_hosts=["127.0.0.1"], **post))
    call = local_receiver.wait(5)
    assert status == 200 and call["body"] == b"body" and call["path"] == "/cb?x=1"
    # The Host header names the checked endpoint; a caller's Host cannot redirect it.
    assert call["headers"]["Host"] == local_receiver.url.removeprefix("http://")
    assert call["headers"]["X-Call-Id"] == "abc"


def test_check_url_refuses_before_any_connection():
    asyncio.run(check_url("http://127.0.0.1:9/cb", allow_hosts=["127.0.0.1"]))
    for url, code in [
        ("http://127.0.0.1:9/cb", "fetch_refused"),
        ("http://[::1]:9/", "fetch_refused"),
        ("http://10.1.2.3/", "fetch_refused"),
        ("http://user:pw@127.0.0.1/", "bad_url"),
        ("ftp://example.com/", "bad_url"),
    ]:
        with pytest.raises(ServiceError) as err:
            asyncio.run(check_url(url))
        assert err.value.code == code, url


def _job(url: str, **fields: Any) -> Job:
    job = Job("call-1", "face-detect-pigo", "jpeg", callback_url=url)
    job.started, job.finished = 100.0, 101.5
    for key, value in fields.items():
        setattr(job, key, value)
    return job


def _settings(retries: int = 2) -> AppSettings:
    return AppSettings(
        fetch_allow_hosts=["127.0.0.1"], jobs={"callback_retries": retries, "callback_timeout_s": 2}
    )


def test_callback_retries_server_errors_then_delivers(local_receiver, monkeypatch):
    monkeypatch.setattr(callbacks, "BACKOFF_S", 0.01)
    local_receiver.answers = [500, 503]
    job = _job(
        f"{local_receiver.url}/cb",
        status="done",
        result={"image": b"\xff\xd8jpeg", "media_type": "image/jpeg", "count": 1},
    )
    assert asyncio.run(callbacks.post_callback(job, _settings())) == "delivered"
    calls = [local_receiver.wait(5) for _ in range(3)]
    assert local_receiver.calls.empty()
    for call in calls:
        h = call["headers"]
        assert call["body"] == b"\xff\xd8jpeg"
        assert (h["Content-Type"], h["X-Call-Id"], h["X-Function-Status"]) == (
            "image/jpeg",
            "call-1",
            "200",
        )
        assert h["X-Duration-Seconds"] == "1.500000" and h["X-Count"] == "1"


def test_callback_gives_up_after_the_retries(local_receiver, monkeypatch):
    monkeypatch.setattr(callbacks, "BACKOFF_S", 0.01)
    local_receiver.answers = [500, 500, 500]
    job = _job(
        f"{local_receiver.url}/cb", status="done", result={"image_base64": "QUJD"}, output="base64"
    )
    status = asyncio.run(callbacks.post_callback(job, _settings(retries=2)))
    assert status.startswith("failed:") and "HTTP 500" in status and "3 attempts" in status
    calls = [local_receiver.wait(5) for _ in range(3)]
    assert calls[0]["body"] == b"QUJD"
    assert calls[0]["headers"]["Content-Type"] == "text/plain; charset=utf-8"


def test_callback_does_not_retry_a_refusal(local_receiver, monkeypatch):
    monkeypatch.setattr(callbacks, "BACKOFF_S", 0.01)
    local_receiver.answers = [400]
    job = _job(
        f"{local_receiver.url}/cb",
        status="failed",
        error={"error": "bad_parameter", "detail": "no", "status": 422},
    )
    status = asyncio.run(callbacks.post_callback(job, _settings()))
    assert status.startswith("failed:") and "1 attempt)" in status
    call = local_receiver.wait(5)
    assert local_receiver.calls.empty()
    assert call["headers"]["X-Function-Status"] == "422"
    assert json.loads(call["body"]) == {"error": "bad_parameter", "detail": "no"}
    # A URL outside the allowlist is never contacted, and not retried.
    job = _job("http://127.0.0.3:9/cb", status="failed", error={"error": "timeout"})
    status = asyncio.run(callbacks.post_callback(job, _settings()))
    assert status.startswith("failed: refused") and "(1 attempt)" in status


def test_callback_timeout_error_is_504():
    assert (
        callbacks.callback_response(
            _job("x", status="failed", error={"error": "timeout", "detail": "slow"})
        )[0]
        == 504
    )


# --------------------------------------------------------------------------- through Serve


@pytest.fixture(scope="module")
def cli(service) -> FaasCli:
    return FaasCli(service["url"])


@pytest.fixture(scope="module")
def sample() -> bytes:
    return shared_file("images", "pigo_sample.jpg").read_bytes()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """On 127.0.0.2: the one address the test service allowlists."""
    server = Receiver(TEST_IMAGE_HOST)
    yield server
    server.close()


def configured(service) -> dict[str, Any]:
    return service["config"]["applications"][0]["args"]["models"]


def functions(cli: FaasCli, namespace: str | None = None) -> dict[str, dict[str, Any]]:
    r = cli.list(namespace)
    assert r.status == 200, r.body
    items = r.json()
    assert isinstance(items, list)
    return {item["name"]: item for item in items}


def test_list_is_what_faas_cli_decodes(cli, service):
    items = functions(cli)
    assert set(items) == set(configured(service))
    for name, item in items.items():
        assert_function_status(item)
        assert "createdAt" in item  # the app's deploy time is known to Serve
        assert item["labels"]["faas_function"] == name
        if configured(service)[name].get("enabled", True):
            assert 1 <= item["availableReplicas"] <= item["replicas"], item
    assert items["face-detect-pigo"]["labels"]["visionserve.kind"] == "detector"


def test_list_namespaces(cli, service):
    assert set(functions(cli, NAMESPACE)) == set(configured(service))
    assert functions(cli, "other-ns") == {}
    r = cli.send("GET", "/system/namespaces", [("Authorization", "Bearer")])
    assert r.status == 200 and r.json() == [NAMESPACE]


def test_describe(cli):
    r = cli.describe("face-detect-opencv")
    assert r.status == 200, r.body
    item = r.json()
    assert_function_status(item)
    assert item["name"] == "face-detect-opencv"
    assert cli.describe("face-detect-opencv", NAMESPACE).status == 200
    assert cli.describe("no-such-function").status == 404
    assert cli.describe("face-detect-opencv", "other-ns").status == 404


def test_version(cli):
    r = cli.version()
    assert r.status == 200
    info = r.json()
    assert set(info) == {"provider", "version", "arch"}
    assert set(info["provider"]) == {"provider", "orchestration", "version"}
    assert info["provider"]["provider"] == "visionserve"
    for version in (info["version"], info["provider"]["version"]):
        assert set(version) == {"sha", "release"}
        assert all(isinstance(v, str) and v for v in version.values())
    assert isinstance(info["arch"], str) and info["arch"]


def test_invoke_answers_the_functions_bytes(cli, sample, image_server):
    r = cli.invoke("face-detect-pigo", sample)
    assert r.status == 200, r.body
    assert r.headers["content-type"] == "image/jpeg"
    assert decode(r.body).shape == (400, 320, 3)
    # `echo URL | faas-cli invoke ...`: the URL arrives with its newline.
    r = cli.invoke("cnn-face-detection", f"{image_server}/pigo_sample.jpg\n".encode())
    assert r.status == 200 and r.headers["content-type"] == "image/jpeg", r.body
    assert decode(r.body).shape == (400, 320, 3)
    # basic-face-detection answered base64 JPEG text in OpenFaaS; it still does.
    r = cli.invoke("basic-face-detection", sample)
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    assert decode(base64.b64decode(r.body, validate=True)).shape == (400, 320, 3)
    # `--query` and `-n`.
    r = cli.invoke("face-detect-pigo", sample, query={"format": "png"}, namespace="team")
    assert r.status == 200 and r.headers["content-type"] == "image/png"


def test_invocation_count_increases(cli, sample):
    before = functions(cli)["face-detect-opencv"]["invocationCount"]
    assert cli.invoke("face-detect-opencv", sample).status == 200
    assert cli.invoke("face-detect-opencv", b"not an image").status == 415  # still an invocation
    assert cli.invoke("no-such-function", sample).status == 404  # not one
    after = functions(cli)["face-detect-opencv"]["invocationCount"]
    assert is_int(after) and after == before + 2


def poll_job(service, call_id: str, ready, timeout: float = 60) -> dict[str, Any]:
    """GET /v1/jobs/{call_id} until `ready(view)` or the timeout; the last view."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        view = httpx.get(f"{service['url']}/v1/jobs/{call_id}", timeout=30).json()
        if ready(view) or time.monotonic() > deadline:
            return view
        time.sleep(0.2)


def finished(view: dict[str, Any]) -> bool:
    return view["status"] in ("done", "failed")


def test_async_invoke_calls_back_with_the_result(cli, service, sample, receiver):
    before = functions(cli)["face-detect-pigo"]["invocationCount"]
    r = cli.invoke(
        "face-detect-pigo",
        sample,
        is_async=True,
        headers=[("X-Callback-Url", f"{receiver.url}/done?tag=1")],
    )
    assert r.status == 202, r.body
    call_id = r.headers["x-call-id"]
    assert call_id and r.json()["id"] == call_id

    call = receiver.wait()
    h = call["headers"]
    assert call["path"] == "/done?tag=1"
    assert h["X-Call-Id"] == call_id and h["X-Function-Name"] == "face-detect-pigo"
    assert h["X-Function-Status"] == "200" and h["Content-Type"] == "image/jpeg"
    assert float(h["X-Duration-Seconds"]) >= 0
    assert decode(call["body"]).shape == (400, 320, 3)

    # The callback status is recorded once the receiver has answered.
    view = poll_job(service, call_id, lambda v: v["callback"] is not None, timeout=10)
    assert view["status"] == "done" and view["callback"] == "delivered", view
    time.sleep(1.0)
    assert receiver.calls.empty(), "the callback came more than once"
    assert functions(cli)["face-detect-pigo"]["invocationCount"] == before + 1


def test_async_failure_calls_back_with_the_error(cli, service, sample, receiver):
    r = cli.invoke(
        "cnn-face-detection",
        sample,
        is_async=True,
        query={"confidence": "7"},
        headers=[("X-Callback-Url", f"{receiver.url}/failed")],
    )
    assert r.status == 202, r.body
    call = receiver.wait()
    assert call["headers"]["X-Call-Id"] == r.headers["x-call-id"]
    assert call["headers"]["X-Function-Status"] == "422"
    assert call["headers"]["Content-Type"] == "application/json"
    assert json.loads(call["body"])["error"] == "bad_parameter"
    assert poll_job(service, r.headers["x-call-id"], finished)["status"] == "failed"


def test_async_without_callback_is_a_pollable_job(cli, service, sample):
    import httpx

    r = cli.invoke("basic-face-detection", sample, is_async=True)
    assert r.status == 202
    call_id = r.headers["x-call-id"]
    view = poll_job(service, call_id, finished)
    assert view["status"] == "done" and view["callback"] is None, view
    result = httpx.get(f"{service['url']}/v1/jobs/{call_id}/result", timeout=30)
    assert decode(base64.b64decode(result.content)).shape == (400, 320, 3)


@pytest.mark.parametrize(
    "callback",
    [
        "http://127.0.0.1:9/cb",  # loopback, not allowlisted
        "http://localhost:9/cb",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/cb",
        "ftp://127.0.0.2/cb",
        "not a url",
    ],
)
def test_async_refuses_a_callback_before_any_work(cli, service, sample, callback):
    from ray import serve

    # Counted in the jobs replica: with auth off GET /v1/jobs lists no one's jobs.
    table = serve.get_deployment_handle("jobs", "visionserve")
    jobs = table.stats.remote().result(timeout_s=30)["jobs"]
    for body in (sample, b""):  # the URL is judged before the body is even read
        r = cli.invoke(
            "face-detect-pigo", body, is_async=True, headers=[("X-Callback-Url", callback)]
        )
        assert r.status == 400, r.body
        assert r.json()["error"] in ("callback_refused", "bad_callback_url")
        assert "x-call-id" not in r.headers
    assert table.stats.remote().result(timeout_s=30)["jobs"] == jobs


def test_async_unknown_function(cli, sample, receiver):
    r = cli.invoke(
        "no-such-function", sample, is_async=True, headers=[("X-Callback-Url", f"{receiver.url}/x")]
    )
    assert r.status == 404 and r.json()["error"] == "unknown_model"


def test_async_refuses_a_model_without_weights_at_once(cli, sample, receiver):
    """As /v1/jobs does: 503 now, not a 202 followed by a failed callback."""
    r = cli.invoke(
        "sam-vit-h", sample, is_async=True, headers=[("X-Callback-Url", f"{receiver.url}/x")]
    )
    assert r.status == 503 and r.json()["error"] == "weights_missing", r.body
    assert "x-call-id" not in r.headers and r.headers.get("retry-after")
    time.sleep(0.5)
    assert receiver.calls.empty()


def test_async_segmentation_calls_back_with_the_overlay(cli, service, sample, receiver):
    """The case OpenFaaS's async path exists for: SAM on a CPU."""
    import httpx

    name = "sam-segmentation-light"
    models = {
        m["name"]: m for m in httpx.get(f"{service['url']}/v1/models", timeout=60).json()["models"]
    }
    if models.get(name, {}).get("status") != "ready":
        pytest.skip(f"{name} is not ready in the test service")
    r = cli.invoke(name, sample, is_async=True, headers=[("X-Callback-Url", f"{receiver.url}/sam")])
    assert r.status == 202, r.body
    call = receiver.wait(300)
    assert call["headers"]["X-Call-Id"] == r.headers["x-call-id"]
    assert call["headers"]["X-Function-Status"] == "200", call["body"][:300]
    assert call["headers"]["Content-Type"] == "image/jpeg"
    assert decode(call["body"]).shape == (400, 320, 3)
