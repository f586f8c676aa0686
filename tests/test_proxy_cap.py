"""Over-cap bodies are refused in Serve's proxy, from the headers, before the router.

The middleware alone (no Ray), then the real proxy of the session service: an over-cap
body to /function/NAME gets the usual 413 error body and is not an invocation (the router,
which counts invocations, never saw it), while a within-cap body still reaches the router.
"""

from __future__ import annotations

import asyncio
import json
import socket
from urllib.parse import urlsplit

import pytest

from serve_app.config import load_config
from serve_app.proxy import CALLBACK, CALLBACK_ENV, MAX_BODY_ENV, MAX_JSON_ENV, BodyCap, proxy_env


def run(cap: BodyCap, headers: list[tuple[bytes, bytes]]) -> tuple[list[dict], bool]:
    """(messages the middleware sent, whether it passed the request on)."""
    sent, passed = [], []

    async def app(scope, receive, send) -> None:
        passed.append(True)

    async def receive() -> dict:
        raise AssertionError("the body must not be read")

    async def send(message: dict) -> None:
        sent.append(message)

    cap.app = app
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    asyncio.run(cap(scope, receive, send))
    return sent, bool(passed)


def headers(length: int | str | None, ctype: bytes = b"image/jpeg", rid: bytes = b"") -> list:
    out = [(b"content-type", ctype)]
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    if rid:
        out.append((b"x-request-id", rid))
    return out


def test_over_cap_is_refused_from_the_headers() -> None:
    cap = BodyCap(None, max_body_bytes=1000, max_json_bytes=100)
    sent, passed = run(cap, headers(1001, rid=b"abc"))
    assert not passed
    start, body = sent
    assert start["status"] == 413
    hdrs = dict(start["headers"])
    assert hdrs[b"content-type"] == b"application/json"
    assert hdrs[b"x-request-id"] == b"abc"
    # Closing stops the proxy reading the rest of the body; the caller still gets the 413.
    assert hdrs[b"connection"] == b"close"
    assert json.loads(body["body"]) == {
        "error": "too_large",
        "detail": "request body over 1000 bytes",
        "request_id": "abc",
    }


@pytest.mark.parametrize(
    ("length", "ctype", "passes"),
    [
        (1000, b"image/jpeg", True),  # at the cap
        (101, b"application/json", False),  # JSON has its own, smaller cap
        (101, b"application/json; charset=utf-8", False),
        (100, b"application/json", True),
        (101, b"multipart/form-data; boundary=x", True),
        (None, b"image/jpeg", True),  # chunked: the router counts it as it streams
        ("12x", b"image/jpeg", True),  # malformed: the router answers 400
    ],
)
def test_which_requests_pass(length, ctype: bytes, passes: bool) -> None:
    cap = BodyCap(None, max_body_bytes=1000, max_json_bytes=100)
    sent, passed = run(cap, headers(length, ctype))
    assert passed == passes
    assert (sent == []) == passes


def test_request_id_is_made_when_not_given() -> None:
    sent, _ = run(BodyCap(None, 10, 10), headers(11))
    rid = json.loads(sent[1]["body"])["request_id"]
    assert len(rid) == 32 and dict(sent[0]["headers"])[b"x-request-id"] == rid.encode()


def test_env_follows_the_config_limits() -> None:
    cfg = load_config()
    limits = cfg["applications"][0]["args"]["limits"]
    env = proxy_env(cfg)
    assert env == {
        CALLBACK_ENV: CALLBACK,
        MAX_BODY_ENV: str(limits["max_body_bytes"]),
        MAX_JSON_ENV: str(limits["max_json_bytes"]),
    }


# -- the real proxy ----------------------------------------------------------------------


def invocations(http) -> int:
    r = http.get("/system/functions")
    assert r.status_code == 200
    return {f["name"]: f for f in r.json()}["face-detect-opencv"]["invocationCount"]


def raw_post(url: str, path: str, length: int, ctype: str, body: bytes = b"") -> bytes:
    """Send only the headers (and `body`), announcing `length`; the answer's bytes."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        s.sendall(head.encode() + body)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_proxy_refuses_before_the_router(service, http) -> None:
    from serve_app.config import Limits

    limits = Limits.model_validate(service["config"]["applications"][0]["args"]["limits"])
    before = invocations(http)
    # The answer comes from the headers alone: not one body byte is sent.
    answer = raw_post(
        service["url"], "/function/face-detect-opencv", limits.max_body_bytes + 1, "image/jpeg"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"] == "too_large"
    r = http.post(
        "/function/face-detect-opencv",
        content=b"{" + b" " * limits.max_json_bytes + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"] == "too_large"
    assert set(r.json()) == {"error", "detail", "request_id"}
    assert r.headers["x-request-id"] == r.json()["request_id"]
    assert invocations(http) == before  # neither reached the router
    # Within the caps the router answers, and counts it.
    r = http.post("/function/face-detect-opencv", content=b"not an image")
    assert r.status_code == 415
    assert invocations(http) == before + 1
