"""POST /v1/detect/{model}/batch through the running service, and the splitting logic itself."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib

import pytest
from helpers import shared_file

from serve_app.batch import Batch, BatchItem, chunks, run_batch
from serve_app.config import Limits
from serve_app.errors import ServiceError, Unavailable

MODEL = "face-detect-pigo"
ROUTE = f"/v1/detect/{MODEL}/batch"


def png_header(width: int, height: int) -> bytes:
    """A PNG that announces width x height (and holds no pixels): sniffed, never decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\0" * 64
    )


@pytest.fixture(scope="module")
def face() -> bytes:
    return shared_file("images", "pigo_sample.jpg").read_bytes()


@pytest.fixture(scope="module")
def no_face() -> bytes:
    return shared_file("images", "skimage_chelsea.png").read_bytes()


def assert_item_error(item: dict, status: int, code: str) -> None:
    assert item["status"] == status and item["error"] == code, item
    assert item["detail"] and "faces" not in item


# -- through the service -----------------------------------------------------------------
def test_mixed_multipart_batch_answers_each_image_in_order(http, face, no_face):
    files = [
        ("file", ("face.jpg", face, "image/jpeg")),
        ("file", ("corrupt.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 100, "image/jpeg")),
        ("file", ("cat.png", no_face, "image/png")),
        ("file", ("huge.png", png_header(60000, 60000), "image/png")),
        ("file", ("text.txt", b"not an image at all", "text/plain")),
        ("file", ("face-again.jpg", face, "image/jpeg")),
    ]
    r = http.post(ROUTE, files=files, data={"min_size": "40"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["images"] == 6 and body["failed"] == 3
    res = body["results"]
    assert [x["index"] for x in res] == list(range(6))
    assert [x["filename"] for x in res] == [f[1][0] for f in files]
    assert res[0]["count"] == 1 and res[0]["parameters"]["min_size"] == 40
    # No frame header: its size cannot be read, so it is refused before any decoding.
    assert_item_error(res[1], 422, "unknown_image_size")
    assert res[2]["count"] == 0 and res[2]["width"] > 0
    assert_item_error(res[3], 413, "too_many_pixels")
    assert_item_error(res[4], 415, "unsupported_media_type")
    assert res[5]["faces"] == res[0]["faces"]


def test_json_batch_with_urls_base64_and_an_ssrf_url(http, face, image_server):
    images = [
        f"{image_server}/pigo_sample.jpg",
        {"url": "http://169.254.169.254/latest/meta-data/"},  # cloud metadata: refused
        {"image_base64": base64.b64encode(face).decode(), "filename": "b64.jpg"},
        {"url": "http://127.0.0.1:9/x.jpg"},  # loopback: refused
        {"image_base64": "@@@"},
        {"url": f"{image_server}/redirect-to-loopback"},
        {"url": f"{image_server}/missing.jpg"},
    ]
    r = http.post(ROUTE, json={"images": images})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["index"] for x in res] == list(range(7))
    assert res[0]["count"] == 1 and res[0]["url"].endswith("/pigo_sample.jpg")
    assert_item_error(res[1], 400, "fetch_refused")
    assert res[2]["count"] == 1 and res[2]["filename"] == "b64.jpg"
    assert res[2]["faces"] == res[0]["faces"]
    assert_item_error(res[3], 400, "fetch_refused")
    assert_item_error(res[4], 400, "bad_base64")
    assert_item_error(res[5], 400, "fetch_refused")
    assert_item_error(res[6], 422, "fetch_failed")
    for item in res:  # no internals in per-image errors either
        assert "Traceback" not in str(item) and "pid" not in item.get("detail", "")


def test_batch_answers_match_single_requests(http, face, no_face):
    single = [http.post(f"/v1/detect/{MODEL}", content=img).json() for img in (face, no_face)]
    r = http.post(
        ROUTE,
        files=[("file", ("a.jpg", face, "image/jpeg")), ("file", ("b.png", no_face, "image/png"))],
    )
    batch = r.json()["results"]
    for one, many in zip(single, batch, strict=True):
        assert many["faces"] == one["faces"] and many["width"] == one["width"]


def test_base64_format_returns_an_annotated_image_per_item(http, face):
    r = http.post(f"{ROUTE}?format=base64", files=[("file", ("a.jpg", face, "image/jpeg"))])
    assert r.status_code == 200, r.text
    item = r.json()["results"][0]
    assert base64.b64decode(item["image_base64"])[:3] == b"\xff\xd8\xff"
    assert http.post(f"{ROUTE}?format=png", files=[("file", ("a.jpg", face))]).status_code == 422
    blurred = http.post(f"{ROUTE}?format=base64&draw=blur", files=[("file", ("a.jpg", face))])
    assert blurred.status_code == 200, blurred.text
    assert blurred.json()["results"][0]["image_base64"] != item["image_base64"]
    r = http.post(f"{ROUTE}?draw=sparkles", files=[("file", ("a.jpg", face))])
    assert r.status_code == 422 and r.json()["error"] == "bad_parameter", r.text


def test_too_many_images_is_413(http):
    cap = Limits().max_batch_images  # the test service keeps the default cap
    tiny = png_header(2, 2)
    r = http.post(ROUTE, files=[("file", (f"{i}.png", tiny, "image/png")) for i in range(cap + 1)])
    assert r.status_code == 413 and r.json()["error"] == "too_many_images", r.text
    b64 = base64.b64encode(tiny).decode()
    r = http.post(ROUTE, json={"images": [{"image_base64": b64}] * (cap + 1)})
    assert r.status_code == 413 and r.json()["error"] == "too_many_images", r.text


def test_batch_pixel_budget_is_413(http):
    lim = Limits()
    side = int((lim.max_pixels * 0.9) ** 0.5)  # each image under the per-image limit
    count = lim.max_batch_pixels // (side * side) + 1  # together over the batch's
    assert count <= lim.max_batch_images
    r = http.post(
        ROUTE,
        files=[("file", (f"{i}.png", png_header(side, side), "image/png")) for i in range(count)],
    )
    assert r.status_code == 413 and r.json()["error"] == "too_many_pixels", r.text
    assert "max_batch_pixels" in r.json()["detail"]


def test_json_batch_is_held_to_the_json_caps(http, service):
    """The single routes' JSON rules (serve_app/inputs/request.py) hold for a batch: a JSON
    body over `limits.max_json_bytes` is 413 `too_large` though under the body cap, and one
    of too many values is 413 `too_many_json_values` before it is parsed. Sent chunked (no
    Content-Length), so that the router counts it, not Serve's proxy (serve_app/proxy.py,
    which refuses a declared length first)."""
    import json

    limits = service["config"]["applications"][0]["args"]["limits"]
    json_cap, body_cap = limits["max_json_bytes"], limits["max_body_bytes"]
    assert json_cap < body_cap  # else this test could not tell the two apart
    filler = "A" * (json_cap + 1024)  # valid base64, as bytes under the body cap
    assert len(filler) < body_cap - 4096
    headers = {"Content-Type": "application/json"}

    def chunked(doc: dict):
        data = json.dumps(doc).encode()
        return (data[i : i + 2**16] for i in range(0, len(data), 2**16))

    for route in (ROUTE, f"/v1/detect/{MODEL}"):
        doc = {"images": [{"image_base64": filler}]} if route == ROUTE else {"image_base64": filler}
        for how in ("chunked", "declared"):
            if how == "chunked":
                r = http.post(route, content=chunked(doc), headers=headers)
                assert "content-length" not in r.request.headers
            else:
                r = http.post(route, json=doc)
            assert r.status_code == 413 and r.json()["error"] == "too_large", (route, how, r.text)
            assert set(r.json()) == {"error", "detail", "request_id"}
    # The same bytes as a multipart batch are only held to the body cap.
    r = http.post(ROUTE, files=[("file", ("big.bin", filler.encode()))])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["error"] == "unsupported_media_type"
    tiny = base64.b64encode(png_header(2, 2)).decode()
    many = {"images": [{"image_base64": tiny}], "pad": [[0, 0]] * 40_000}  # ~120k separators
    r = http.post(ROUTE, json=many)
    assert r.status_code == 413 and r.json()["error"] == "too_many_json_values", r.text
    assert set(r.json()) == {"error", "detail", "request_id"}


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b"raw bytes"}, 415, "unsupported_media_type"),
        ({"json": {"url": "http://x/y.jpg"}}, 400, "bad_json"),
        ({"json": {"images": []}}, 400, "no_image"),
        ({"files": [("other", ("a.txt", b"hi", "text/plain"))]}, 400, "no_image"),
    ],
)
def test_bad_batches_are_refused_whole(http, kwargs, status, code):
    r = http.post(ROUTE, **kwargs)
    assert r.status_code == status and r.json()["error"] == code, r.text


def test_bad_shared_parameter_fails_the_batch(http, face):
    r = http.post(f"{ROUTE}?min_size=1", files=[("file", ("a.jpg", face))])
    assert r.status_code == 422 and r.json()["error"] == "bad_parameter", r.text
    r = http.post("/v1/detect/sam-mobile/batch", files=[("file", ("a.jpg", face))])
    assert r.status_code == 404 and r.json()["error"] == "unknown_model", r.text


# -- splitting, without a service ---------------------------------------------------------
def test_chunks_are_contiguous_and_even():
    assert chunks(list(range(16)), 8) == [list(range(8)), list(range(8, 16))]
    assert [len(c) for c in chunks(list(range(9)), 8)] == [5, 4]
    assert chunks([3], 8) == [[3]] and chunks([], 8) == []
    assert sum(chunks(list(range(37)), 8), []) == list(range(37))


def _batch(n: int, bad: set[int]) -> Batch:
    return Batch(
        [
            BatchItem(
                filename=f"{i}.jpg",
                data=b"x",
                error={"error": "bad", "detail": "d", "status": 400} if i in bad else None,
            )
            for i in range(n)
        ]
    )


def test_run_batch_calls_once_per_chunk_and_keeps_order():
    calls: list[list[str]] = []

    async def call(images):
        calls.append([name for _, name in images])
        return [{"name": name} for _, name in images]

    batch = _batch(16, bad={3})
    results = asyncio.run(run_batch(batch, call, 8))
    assert len(calls) == 2 and sum(len(c) for c in calls) == 15  # not one call per image
    assert [r["index"] for r in results] == list(range(16))
    assert results[3]["error"] == "bad"
    assert all(r["name"] == f"{i}.jpg" for i, r in enumerate(results) if i != 3)


def test_a_failed_chunk_becomes_per_image_errors_unless_all_fail():
    async def half(images):
        if images[0][1] == "0.jpg":
            raise Unavailable("replica_died", "gone")
        return [{"ok": True} for _ in images]

    results = asyncio.run(run_batch(_batch(4, set()), half, 2))
    assert [r.get("error") for r in results] == ["replica_died", "replica_died", None, None]

    async def never(images):
        raise ServiceError(504, "timeout", "slow")

    with pytest.raises(ServiceError):
        asyncio.run(run_batch(_batch(4, set()), never, 2))
