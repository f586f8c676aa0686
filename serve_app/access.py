"""Per-request observation at the router: request id, metrics and one JSON log line.

`RequestObserver` wraps the router's ASGI app (outermost of our middleware, so refusals by
the API-key check count too). For each HTTP request it
- takes the request id Serve's proxy put in the `x-request-id` header (the client's own,
  or one Serve generated; Serve returns it as `X-Request-ID`), or makes one when the app
  runs without Serve's proxy and returns it in the same header;
- counts the body bytes in and out, and reads the `error` code from a 4xx/5xx JSON body;
- records the request metrics (`serve_app.metrics`) and writes one JSON line to the
  `visionserve.access` logger (stderr of the router replica): no image data, no query.

The call policy's `observe_model_call` adds the model-call time and the replica's own
stage times (`timing_ms` of the answer) to the current request's line.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from serve_app import metrics
from serve_app.registry import MODELS

ACCESS_LOG = logging.getLogger("visionserve.access")
REQUEST_ID_HEADER = b"x-request-id"
MAX_ID_CHARS = 128
MAX_PATH_CHARS = 256
MAX_ERROR_BODY = 16 * 1024  # error bodies are a code and a sentence; never buffer more

# Fields the call policy adds to the current request's record (model time, replica stages).
_notes: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "visionserve_request_notes", default=None
)


_STDERR = logging.StreamHandler(sys.stderr)
_STDERR.setFormatter(logging.Formatter("%(message)s"))


def _setup_logger() -> None:
    # Own handler, raw message: each line is a JSON document, not Serve's log format.
    if _STDERR not in ACCESS_LOG.handlers:
        ACCESS_LOG.addHandler(_STDERR)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False


def model_label(path_params: dict[str, Any]) -> str:
    """The model a request names, if any; anything not a configured model is `unknown`."""
    raw = path_params.get("model")
    if raw is None and "name" in path_params:  # /function/{name}: OpenFaaS `name.namespace`
        raw = str(path_params["name"]).split(".", 1)[0]
    if raw is None:
        return "none"
    return raw if raw in MODELS else "unknown"


def access_line(record: dict[str, Any]) -> str:
    """One log line: compact JSON, keys in a fixed order, no image data.

    Only the fields below are written, whatever else `record` holds.
    """
    keys = (
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
    )
    return json.dumps({k: record.get(k) for k in keys}, separators=(",", ":"), ensure_ascii=True)


def note(**fields: Any) -> None:
    """Add fields to the current request's log line (no-op outside a request)."""
    current = _notes.get()
    if current is not None:
        current.update(fields)


def observe_model_call(call: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates the call policy `(self, model, method, *args)`: time it, by outcome."""

    @functools.wraps(call)
    async def wrapper(self: Any, model: str, method: str, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        outcome = "internal"
        try:
            result = await call(self, model, method, *args, **kwargs)
            outcome = "ok"
            if isinstance(result, dict):
                note(replica_ms=result.get("timing_ms"), count=result.get("count"))
            return result
        except Exception as err:
            outcome = metrics.error_code(err)
            raise
        finally:
            seconds = time.perf_counter() - t0
            metrics.record_model_call(model, method, outcome, seconds)
            note(model_call_ms=round(seconds * 1e3, 2))

    return wrapper


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestObserver:
    """Pure ASGI middleware (not BaseHTTPMiddleware: it must not buffer answers)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        _setup_logger()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = _header(scope, REQUEST_ID_HEADER)
        request_id = (given or uuid.uuid4().hex)[:MAX_ID_CHARS]
        scope.setdefault("state", {})["request_id"] = request_id
        if given is None:  # as Serve's proxy does: the app reads the id from the header
            scope["headers"] = [*scope.get("headers", ()), (REQUEST_ID_HEADER, request_id.encode())]
        io: dict[str, Any] = {"in": 0, "out": 0, "status": None, "json": False, "done": False}
        error_body = bytearray()
        notes: dict[str, Any] = {}

        def finish() -> None:
            if not io["done"]:
                io["done"] = True
                self._finish(scope, request_id, io, bytes(error_body), notes, t0)

        async def counting_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                io["in"] += len(message.get("body", b""))
            return message

        async def observing_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                io["status"] = int(message["status"])
                headers = list(message.get("headers") or ())
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                io["json"] = ctype.startswith(b"application/json")
                if given is None:  # Serve's proxy adds the header itself when it made the id
                    message = {
                        **message,
                        "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())],
                    }
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                io["out"] += len(body)
                if io["status"] >= 400 and io["json"] and len(error_body) < MAX_ERROR_BODY:
                    error_body.extend(body[: MAX_ERROR_BODY - len(error_body)])
                if not message.get("more_body", False):
                    # Recorded before the last byte leaves: once a client has its answer,
                    # the request is in the metrics (tests rely on that ordering).
                    finish()
            await send(message)

        token = _notes.set(notes)
        try:
            await self.app(scope, counting_receive, observing_send)
        except asyncio.CancelledError:
            if io["status"] is None:  # the client went away before an answer (nginx's 499)
                io["status"], notes["error"] = 499, "client_closed"
            raise
        except BaseException:
            # Unhandled: the outer error middleware answers 500 after we return.
            if io["status"] is None:
                io["status"], notes["error"] = 500, "internal"
            raise
        finally:
            _notes.reset(token)
            finish()

    @staticmethod
    def _finish(
        scope: dict[str, Any],
        request_id: str,
        io: dict[str, Any],
        error_body: bytes,
        notes: dict[str, Any],
        t0: float,
    ) -> None:
        seconds = time.perf_counter() - t0
        status = io["status"] or 500
        route_obj = scope.get("route")
        route = getattr(route_obj, "path", None) or "unmatched"
        model = model_label(scope.get("path_params") or {})
        error = notes.get("error")
        if status >= 400 and error_body:
            try:
                doc = json.loads(error_body)
                error = str(doc.get("error")) if isinstance(doc, dict) else error
                # An id the error body carries is the one the caller sees: log that one.
                if isinstance(doc, dict) and isinstance(doc.get("request_id"), str):
                    request_id = doc["request_id"][:MAX_ID_CHARS]
            except ValueError:
                pass
        metrics.record_request(route, model, status, error, seconds, io["in"])
        ms: dict[str, Any] = {"total": round(seconds * 1e3, 2)}
        if "model_call_ms" in notes:
            ms["model_call"] = notes["model_call_ms"]
        if isinstance(notes.get("replica_ms"), dict):
            ms["replica"] = notes["replica_ms"]
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": request_id,
            "method": scope.get("method"),
            "route": route,
            "path": str(scope.get("path", ""))[:MAX_PATH_CHARS],
            "model": model,
            "status": status,
            "error": error if status >= 400 else None,
            "ms": ms,
            "bytes_in": io["in"],
            "bytes_out": io["out"],
            "count": notes.get("count"),
        }
        try:
            ACCESS_LOG.info(access_line(record))
        except Exception:  # a log failure must not turn into a failed request
            pass
