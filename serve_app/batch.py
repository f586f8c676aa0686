"""Many images in one request: parse a batch, split it into model calls, assemble the answer.

`POST /v1/detect/{model}/batch` takes a multipart body with several files (and/or `url`
fields), or JSON `{"images": [...], <params>}` where each entry is a URL string, `{"url":
...}` or `{"image_base64": ..., "filename": ...}`. Parameters (form fields, JSON keys, query)
apply to every image. The answer is one JSON result per image, in the order sent; an image
that cannot be used gets an error object (`{"error", "detail", "status"}`, the shape of a
normal error answer) in its place and the batch still answers 200.

Refused as a whole: more than `limits.max_batch_images` images (413), a body over
`limits.max_body_bytes` (413; a JSON body over `limits.max_json_bytes` or of too many values,
as on the single routes), images whose announced pixels add up to more than
`limits.max_batch_pixels` (413; each image is also held to `limits.max_pixels`, as a
per-image error), and bad shared parameters (422, from the model).

The router makes one model call per `limits.batch_chunk_images` images (a batch of 16 with
chunks of 8 is two calls, which Serve spreads over two replicas when there are two), never
one call per image. Plain functions: the router supplies the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serve_app.errors import ServiceError
from serve_app.inputs.imageinfo import check_accepted, check_pixels, sniff
from serve_app.inputs.request import (
    RESERVED_QUERY,
    _replay,
    body_cap,
    decode_base64,
    media_type,
    parse_json,
    read_body,
)

log = logging.getLogger("ray.serve")

# Multipart fields that carry an image file; every one of them is an image of the batch.
FILE_FIELDS = ("file", "files", "image", "images")
BATCH_OUTPUTS = ("json", "base64")  # per-image answers travel inside one JSON document
FETCH_CONCURRENCY = 8  # URLs of one batch fetched at once: bounded, not one task per URL

Fetcher = Callable[[str], Awaitable[bytes]]
# What the router supplies: run the model on one chunk of (bytes, filename) pairs.
ChunkCall = Callable[[list[tuple[bytes, str | None]]], Awaitable[list[dict[str, Any]]]]


@dataclass
class BatchItem:
    """One image of a batch: where it came from, then its bytes or why it has none."""

    filename: str | None = None
    url: str | None = None
    data: bytes | None = None
    b64: str | None = None  # decoded lazily, so that a bad entry fails alone
    error: dict[str, Any] | None = None

    def label(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.filename is not None:
            out["filename"] = self.filename
        if self.url is not None:
            out["url"] = self.url
        return out


@dataclass
class Batch:
    items: list[BatchItem]
    params: dict[str, Any] = field(default_factory=dict)
    output: str = "json"


@dataclass(frozen=True)
class BatchLimits:
    max_body_bytes: int
    max_json_bytes: int
    max_pixels: int
    max_batch_images: int
    max_batch_pixels: int
    batch_chunk_images: int


def error_item(err: ServiceError) -> dict[str, Any]:
    return {"error": err.code, "detail": err.message, "status": err.status}


def _too_many(count: int | str, cap: int) -> ServiceError:
    return ServiceError(
        413,
        "too_many_images",
        f"a batch holds at most {cap} images (limits.max_batch_images); got {count}: "
        "send several batches",
    )


# -- parsing -----------------------------------------------------------------------------
async def _from_multipart(request: Request, body: bytes, lim: BatchLimits) -> Batch:
    parser = MultiPartParser(
        request.headers,
        _replay(body),
        max_files=lim.max_batch_images,
        max_fields=64 + lim.max_batch_images,
        max_part_size=lim.max_body_bytes,
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        if "too many files" in str(err).lower():
            raise _too_many(f"more than {lim.max_batch_images}", lim.max_batch_images) from None
        raise ServiceError(400, "bad_multipart", f"malformed multipart body: {err}") from None
    items: list[BatchItem] = []
    params: dict[str, Any] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key in FILE_FIELDS:
                items.append(BatchItem(filename=value.filename, data=await value.read()))
        elif key == "url":
            items.append(BatchItem(url=value))
        else:
            params[key] = value
    return Batch(items, params)


def _json_entry(entry: Any) -> BatchItem:
    if isinstance(entry, str):
        return BatchItem(url=entry)
    if not isinstance(entry, dict):
        return BatchItem(
            error=error_item(
                ServiceError(400, "bad_item", "an entry of `images` must be a URL or an object")
            )
        )
    url, b64, filename = entry.get("url"), entry.get("image_base64"), entry.get("filename")
    filename = filename if isinstance(filename, str) else None
    if (url is None) == (b64 is None):
        err = ServiceError(400, "no_image", "give exactly one of `url` or `image_base64`")
        return BatchItem(filename=filename, error=error_item(err))
    if url is not None and not isinstance(url, str):
        return BatchItem(error=error_item(ServiceError(400, "bad_url", "`url` must be a string")))
    return BatchItem(filename=filename, url=url, b64=b64 if url is None else None)


async def _from_json(body: bytes, lim: BatchLimits) -> Batch:
    # The single routes' rules (serve_app/inputs/request.py): token cap, parse off the loop.
    doc = await parse_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ServiceError(400, "bad_json", "the JSON body must be an object with an `images` list")
    entries = doc.pop("images")
    if len(entries) > lim.max_batch_images:
        raise _too_many(len(entries), lim.max_batch_images)
    return Batch([_json_entry(e) for e in entries], doc)


async def parse_batch_request(request: Request, lim: BatchLimits, fetch: Fetcher) -> Batch:
    """The batch's images (bytes, or a per-image error) and its shared parameters."""
    output = request.query_params.get("format", "json")
    if output not in BATCH_OUTPUTS:
        raise ServiceError(
            422, "bad_parameter", f"a batch's format must be one of {list(BATCH_OUTPUTS)}"
        )
    ctype = media_type(request)
    body = await read_body(request, body_cap(ctype, lim.max_body_bytes, lim.max_json_bytes))
    if ctype == "multipart/form-data":
        batch = await _from_multipart(request, body, lim)
    elif ctype == "application/json":
        batch = await _from_json(body, lim)
    else:
        raise ServiceError(
            415,
            "unsupported_media_type",
            "a batch is multipart/form-data (several files) or JSON with an `images` list",
        )
    if not batch.items:
        raise ServiceError(400, "no_image", "the batch holds no image")
    if len(batch.items) > lim.max_batch_images:
        raise _too_many(len(batch.items), lim.max_batch_images)
    query = {k: v for k, v in request.query_params.items() if k not in RESERVED_QUERY}
    batch.params = {**query, **batch.params}
    batch.output = output
    await _load(batch.items, fetch)
    _check_pixels(batch.items, lim)
    return batch


async def _load(items: list[BatchItem], fetch: Fetcher) -> None:
    """Decode base64 entries and fetch URLs (a few at a time); failures stay per image."""
    gate = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def one(item: BatchItem) -> None:
        if item.error is not None or item.data is not None:
            return
        try:
            if item.b64 is not None:
                item.data, item.b64 = decode_base64(item.b64), None
            elif item.url is not None:
                async with gate:
                    item.data = await fetch(item.url)
        except ServiceError as err:
            item.error = error_item(err)

    await asyncio.gather(*(one(i) for i in items))


def _check_pixels(items: list[BatchItem], lim: BatchLimits) -> None:
    """Each image against `max_pixels` (its own error); the rest together against the batch's."""
    total = 0
    for item in items:
        if item.data is None:
            continue
        try:
            # The same order as decoding: no image at all (415) before an unreadable size (422).
            info = check_accepted(sniff(item.data))
            check_pixels(info, lim.max_pixels)
        except ServiceError as err:
            item.error, item.data = error_item(err), None
            continue
        total += info.width * info.height
    if total > lim.max_batch_pixels:
        raise ServiceError(
            413,
            "too_many_pixels",
            f"the batch's images add up to {total / 1e6:.1f} MP; a batch may hold "
            f"{lim.max_batch_pixels / 1e6:.1f} MP (limits.max_batch_pixels): send smaller batches",
        )


# -- splitting and assembling ------------------------------------------------------------
def chunks(indices: list[int], size: int) -> list[list[int]]:
    """Contiguous runs of at most `size`, as even as possible (16 by 8 -> 8+8, 9 by 8 -> 5+4)."""
    if not indices:
        return []
    count = -(-len(indices) // max(1, size))
    base, extra = divmod(len(indices), count)
    out, start = [], 0
    for k in range(count):
        end = start + base + (1 if k < extra else 0)
        out.append(indices[start:end])
        start = end
    return out


async def run_batch(batch: Batch, call: ChunkCall, chunk_images: int) -> list[dict[str, Any]]:
    """One result or error per image, in order; the model is called once per chunk.

    A chunk whose call fails (timeout, replica gone) turns into per-image errors for its
    images; when every chunk fails the same way the batch itself fails with that error.
    """
    results: list[dict[str, Any] | None] = [None] * len(batch.items)
    for i, item in enumerate(batch.items):
        if item.error is not None:
            results[i] = item.error
    ready = [i for i, item in enumerate(batch.items) if item.error is None]
    groups = chunks(ready, chunk_images)

    async def one(group: list[int]) -> list[dict[str, Any]]:
        return await call([(batch.items[i].data or b"", batch.items[i].filename) for i in group])

    outcomes = await asyncio.gather(*(one(g) for g in groups), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures and len(failures) == len(outcomes):
        raise failures[0]
    for group, outcome in zip(groups, outcomes, strict=True):
        if isinstance(outcome, ServiceError):
            for i in group:
                results[i] = error_item(outcome)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            for i, result in zip(group, outcome, strict=True):
                results[i] = result
    return [{"index": i, **batch.items[i].label(), **(r or {})} for i, r in enumerate(results)]


def batch_answer(model: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    failed = sum(1 for r in results if "error" in r)
    return {"model": model, "images": len(results), "failed": failed, "results": results}
