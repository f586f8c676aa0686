"""JSON bodies: their own cap, a value-count cap before parsing, and parsing off the event
loop; SAM prompt counts checked before any conversion. In process, no Ray."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from starlette.requests import Request

from serve_app.errors import ServiceError
from serve_app.inputs import request as request_mod
from serve_app.inputs.request import MAX_JSON_TOKENS, parse_image_request

ONE_PX_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def make_request(body: bytes, ctype: str = "application/json") -> Request:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}
    return Request(scope, receive)


async def no_fetch(url: str) -> bytes:
    raise AssertionError("no fetch expected")


def parse(
    body: bytes,
    *,
    max_bytes: int = 50 * 2**20,
    max_json_bytes: int = 2**20,
    ctype: str = "application/json",
):
    return asyncio.run(
        parse_image_request(
            make_request(body, ctype),
            max_bytes=max_bytes,
            fetch=no_fetch,
            max_json_bytes=max_json_bytes,
        )
    )


def test_json_has_its_own_smaller_cap() -> None:
    body = json.dumps({"image_base64": "A" * (2 * 2**20)}).encode()
    with pytest.raises(ServiceError) as exc:
        parse(body, max_json_bytes=2**20)
    assert exc.value.status == 413
    # the same bytes as a raw body are only held to max_bytes (then refused as no image later)
    assert parse(body, ctype="application/octet-stream").source == "body"


def test_json_of_too_many_values_is_refused_before_parsing(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(request_mod, "load_json", lambda body: calls.append(1))
    body = json.dumps(
        {"image_base64": ONE_PX_PNG_B64, "points": [[1, 2]] * (MAX_JSON_TOKENS // 2)}
    ).encode()
    with pytest.raises(ServiceError) as exc:
        parse(body)
    assert (exc.value.status, exc.value.code) == (413, "too_many_json_values")
    assert calls == []


def test_a_normal_json_request_parses() -> None:
    image = parse(json.dumps({"image_base64": ONE_PX_PNG_B64, "points": [[0, 0]]}).encode())
    assert image.source == "base64" and image.params == {"points": [[0, 0]]}
    assert image.data.startswith(b"\x89PNG")


def test_the_parse_runs_off_the_event_loop(monkeypatch) -> None:
    """While the parse is held on an event, the loop still runs other work (the /healthz of
    the router replica, here a plain coroutine), which then releases the parse."""
    release = threading.Event()
    parsing = threading.Event()
    real = request_mod.load_json

    def blocked(body: bytes):
        parsing.set()
        assert release.wait(10), "the event loop never ran while the parse was blocked"
        return real(body)

    monkeypatch.setattr(request_mod, "load_json", blocked)
    body = json.dumps({"image_base64": ONE_PX_PNG_B64}).encode()

    async def main() -> tuple[str, str]:
        order: list[str] = []

        async def other_request() -> None:
            while not parsing.is_set():
                await asyncio.sleep(0.01)
            order.append("loop answered while parsing")
            release.set()

        async def big() -> None:
            await parse_image_request(
                make_request(body), max_bytes=2**20, fetch=no_fetch, max_json_bytes=2**20
            )
            order.append("parsed")

        await asyncio.wait_for(asyncio.gather(big(), other_request()), 20)
        return tuple(order)

    assert asyncio.run(main()) == ("loop answered while parsing", "parsed")


def test_sam_prompt_count_is_checked_before_conversion(monkeypatch) -> None:
    from serve_app.deployments import segmenters

    def no_numpy(*args, **kwargs):
        raise AssertionError("converted before the count was checked")

    monkeypatch.setattr(segmenters, "_numbers", no_numpy)
    for field in ("points", "boxes", "labels"):
        kwargs = {"points": [[1, 2]], "labels": None, "boxes": None, "multimask": None}
        kwargs[field] = [[1, 2, 3, 4]] * 100_000
        with pytest.raises(ServiceError) as exc:
            segmenters.parse_prompts(**kwargs, max_prompts=64)
        assert exc.value.status == 422 and "at most 64" in exc.value.message
    with pytest.raises(ServiceError) as exc:  # JSON text: its length first
        segmenters.parse_prompts("[" * 100_000, None, None, None, max_prompts=64)
    assert exc.value.status == 422
