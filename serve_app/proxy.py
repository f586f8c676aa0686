"""Body caps enforced in Serve's HTTP proxy, before a request reaches the router.

The router refuses a body whose Content-Length is over its cap (serve_app/inputs/request.py),
but by then Serve's proxy has already accepted the request and streams the body towards
the router's replica chunk by chunk on the proxy's event loop, the same loop every small
request goes through: one client sending 50 MiB bodies slowed every other request several
times over (bench/hardening.py). Refusing in the proxy, from the headers alone, keeps that
body off the event loop and out of Ray entirely.

Serve loads proxy middlewares from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, read in the
proxy's process, so the caps travel as environment variables that `proxy_env()` derives
from `limits` in config/serve.yaml: the launcher (`make run`, tests, benchmarks) and the
KubeRay generator set them where Ray starts. Without them Serve runs no proxy middleware
and the router's own checks still hold; this is the first line, not the only one.

Only the declared length is checked here: a chunked body (no Content-Length) passes and is
counted by the router as it streams. The answer is the service's usual error body, and the
connection is kept: the proxy's HTTP parser (httptools, in C) discards the rest of the
body, so the caller reads a clear 413 instead of a reset.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import ServiceError

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve_app.proxy.middlewares"
MAX_BODY_ENV = "VISIONSERVE_PROXY_MAX_BODY_BYTES"
MAX_JSON_ENV = "VISIONSERVE_PROXY_MAX_JSON_BYTES"


def proxy_env(cfg: dict[str, Any]) -> dict[str, str]:
    """The environment that turns the proxy caps on, from a serve config's `limits`."""
    from serve_app.config import Limits

    args = cfg["applications"][0].get("args") or {}
    limits = Limits.model_validate(args.get("limits") or {})
    return {
        CALLBACK_ENV: CALLBACK,
        MAX_BODY_ENV: str(limits.max_body_bytes),
        MAX_JSON_ENV: str(limits.max_json_bytes),
    }


def middlewares() -> list[Middleware]:
    """Serve's proxy callback: the body-cap middleware with the caps from the environment."""
    from serve_app.config import Limits

    default = Limits()
    return [
        Middleware(
            BodyCap,
            max_body_bytes=int(os.environ.get(MAX_BODY_ENV, default.max_body_bytes)),
            max_json_bytes=int(os.environ.get(MAX_JSON_ENV, default.max_json_bytes)),
        )
    ]


class BodyCap:
    """413 for a request whose Content-Length is over its cap: `max_json_bytes` for a JSON
    body, `max_body_bytes` for any other. Everything else passes untouched."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = min(max_json_bytes, max_body_bytes)

    def cap(self, headers: dict[bytes, bytes]) -> int:
        ctype = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        return self.max_json_bytes if ctype == b"application/json" else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # ASGI: lower-case names
        declared = headers.get(b"content-length", b"").strip()
        cap = self.cap(headers)
        # A malformed length is the router's to answer (400); only a clear excess stops here.
        if not (declared.isdigit() and int(declared) > cap):
            await self.app(scope, receive, send)
            return
        # Serve's request-id middleware runs inside this one: take the caller's id as it would.
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        err = ServiceError(413, "too_large", f"request body over {cap} bytes")
        body = json.dumps(err.body(rid)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": err.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", rid.encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    """`python -m serve_app.proxy [CONFIG]`: the proxy's environment as NAME=VALUE lines, for
    `env $(...) serve run CONFIG` (the Makefile's `run`)."""
    import argparse

    from serve_app.config import DEFAULT_CONFIG, load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    for name, value in proxy_env(load_config(args.config)).items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
