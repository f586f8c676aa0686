"""One HTTP request -> image bytes + the caller's parameters, whatever form the image came in.

Accepted forms: raw image bytes; multipart upload (field `file` or `image`); JSON with `url`
or `image_base64`; or a bare image URL as the body (the OpenFaaS functions' habit). Every
other field (query string, form fields, JSON keys) is a model parameter, validated later by
the model. The image's pixels are not decoded here: the model replica does that.

JSON bodies have their own, smaller cap (`limits.max_json_bytes`) and a cap on structural
tokens, checked with a byte count before parsing: `json.loads` holds the GIL for its whole
run (so a worker thread alone would not keep the router's event loop free), and parse time
and memory grow with the number of values, not the bytes. Within both caps the parse runs
in a worker thread, costing the event loop at most tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serve_app.errors import ServiceError

# Query keys that steer the answer rather than the model.
RESERVED_QUERY = {"format"}
FILE_FIELDS = ("file", "image")
MAX_URL_BODY = 4096
# Commas and colons a JSON body may hold: a request carries an image (one string) and a few
# parameters (SAM: at most max_prompts points or boxes). Values without a separator can only
# nest, which the parser stops at its recursion limit (a 400), so these bound the values.
MAX_JSON_TOKENS = 65536
_JSON_TOKENS = (b",", b":")

Fetcher = Callable[[str], Awaitable[bytes]]


@dataclass
class ImageRequest:
    data: bytes
    source: str  # "body" | "upload" | "url" | "base64"
    filename: str | None = None
    url: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > max_bytes
        except ValueError:
            raise ServiceError(400, "bad_request", "Content-Length is not a number") from None
        if too_big:
            raise ServiceError(413, "too_large", f"request body over {max_bytes} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise ServiceError(413, "too_large", f"request body over {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def looks_like_url(body: bytes) -> str | None:
    if len(body) > MAX_URL_BODY:
        return None
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.lower().startswith(("http://", "https://")) and not any(c.isspace() for c in text):
        return text
    return None


def decode_base64(text: Any) -> bytes:
    if not isinstance(text, str) or not text:
        raise ServiceError(400, "bad_base64", "image_base64 must be a non-empty string")
    if text.startswith("data:"):  # data:image/png;base64,....
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "bad_base64", "image_base64 is not valid base64") from None


async def _replay(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _from_multipart(
    request: Request, body: bytes, max_bytes: int, fetch: Fetcher
) -> ImageRequest:
    parser = MultiPartParser(
        request.headers, _replay(body), max_files=4, max_fields=64, max_part_size=max_bytes
    )
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ServiceError(400, "bad_multipart", f"malformed multipart body: {err}") from None
    params: dict[str, Any] = {}
    upload: UploadFile | None = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key in FILE_FIELDS and upload is None:
                upload = value
            continue
        params[key] = value
    url = params.pop("url", None)
    if upload is None and url:
        return ImageRequest(await fetch(url), "url", url=url, params=params)
    if upload is None:
        raise ServiceError(
            400, "no_file", f"multipart body has no file field (expected one of {FILE_FIELDS})"
        )
    data = await upload.read()
    return ImageRequest(data, "upload", filename=upload.filename, params=params)


def check_json_tokens(body: bytes) -> None:
    """Refuse a JSON body of too many values before parsing it (C-speed byte counts)."""
    tokens = sum(body.count(t) for t in _JSON_TOKENS)
    if tokens > MAX_JSON_TOKENS:
        raise ServiceError(
            413,
            "too_many_json_values",
            f"the JSON body has {tokens} commas and colons; the limit is {MAX_JSON_TOKENS}"
            " (send the image as bytes, multipart or base64, not as a list of numbers)",
        )


def load_json(body: bytes) -> Any:
    """Parse, and check that what was parsed can be echoed back; ServiceError if not."""
    try:
        doc = json.loads(body)
        # Valid JSON may still hold lone surrogates, which no answer that echoes them
        # (a filename, a URL in an error detail) could encode.
        json.dumps(doc, ensure_ascii=False).encode()
    except RecursionError:
        raise ServiceError(400, "bad_json", "invalid JSON: nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeError, over-long integers
        raise ServiceError(400, "bad_json", f"invalid JSON: {str(err)[:200]}") from None
    return doc


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower-case."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def body_cap(ctype: str, max_bytes: int, max_json_bytes: int | None) -> int:
    """The byte cap for a body of this media type: JSON is parsed whole, so it has its own,
    smaller cap. Every route that reads a body (single image, batch) asks here."""
    if ctype == "application/json" and max_json_bytes is not None:
        return min(max_bytes, max_json_bytes)
    return max_bytes


async def parse_json(body: bytes) -> Any:
    """A JSON body under the token cap, parsed in a worker thread; ServiceError if not."""
    check_json_tokens(body)
    return await asyncio.to_thread(load_json, body)


async def _from_json(body: bytes, fetch: Fetcher) -> ImageRequest:
    doc = await parse_json(body)
    if not isinstance(doc, dict):
        raise ServiceError(400, "bad_json", "the JSON body must be an object")
    url, b64 = doc.pop("url", None), doc.pop("image_base64", None)
    filename = doc.pop("filename", None)
    if (url is None) == (b64 is None):
        raise ServiceError(400, "no_image", "give exactly one of `url` or `image_base64`")
    if url is not None:
        if not isinstance(url, str):
            raise ServiceError(400, "bad_url", "`url` must be a string")
        return ImageRequest(await fetch(url), "url", url=url, params=doc)
    data = await asyncio.to_thread(decode_base64, b64)
    return ImageRequest(data, "base64", filename=filename, params=doc)


async def parse_image_request(
    request: Request, *, max_bytes: int, fetch: Fetcher, max_json_bytes: int | None = None
) -> ImageRequest:
    ctype = media_type(request)
    max_bytes = body_cap(ctype, max_bytes, max_json_bytes)
    body = await read_body(request, max_bytes)
    if ctype == "multipart/form-data":
        image = await _from_multipart(request, body, max_bytes, fetch)
    elif ctype == "application/json":
        image = await _from_json(body, fetch)
    elif (url := looks_like_url(body)) is not None:
        image = ImageRequest(await fetch(url), "url", url=url)
    elif not body:
        raise ServiceError(
            400,
            "empty_body",
            "no image: send image bytes, a multipart upload, JSON or an image URL",
        )
    else:
        image = ImageRequest(body, "body")
    query = {k: v for k, v in request.query_params.items() if k not in RESERVED_QUERY}
    image.params = {**query, **image.params}
    return image
