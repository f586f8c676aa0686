"""Optional API key: when configured, every route but the health check and the web page needs it.

The key comes from the environment variable named by ``AppSettings.api_key_env`` (default
``VISIONSERVE_API_KEY``; on Kubernetes, filled from a Secret). It is read once, when the router
replica starts, so a request never sees half of a change. Rotating the key means new
processes with the new environment: on Kubernetes, restarting the pods (a rolling update),
since Ray's worker processes inherit the container's environment fixed at pod start.

The variable may hold several keys separated by commas (one per client, say): each is valid,
and jobs are private to the key that submitted them (the jobs table keeps a hash of it, see
``caller_id``).

Accepted credentials: ``Authorization: Bearer <key>``, or HTTP Basic whose *password* is the
key (the user name is ignored) because ``faas-cli login`` sends Basic. ``Bearer`` with an
empty token is what faas-cli sends when it is not logged in: it counts as no credentials.

This is a pure ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``: it answers
401 before the app reads the body (an unauthenticated 8 MiB upload is not buffered) and
leaves streaming responses alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from serve_app.errors import ServiceError, request_id

DEFAULT_ENV = "VISIONSERVE_API_KEY"
# Load balancers and Kubernetes probes cannot send a key; the health check reveals nothing.
EXEMPT_PATHS = frozenset({"/healthz"})
# The web page and its static files hold no data, and the page itself asks for the key
# (sent as Bearer by app.js): a browser cannot send a header to load the page.
PUBLIC_PAGES = frozenset({"/"})
PUBLIC_PREFIX = "/static/"
REALM = "visionserve"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


log = logging.getLogger("ray.serve")
Keys = tuple[str, ...]


def api_key(env_name: str = DEFAULT_ENV) -> str | None:
    """The key held in ``env_name``, or None when unset or blank (auth off).

    Surrounding whitespace is dropped: a Secret made with ``echo key | kubectl ...`` ends in
    a newline that no client would send.
    """
    value = os.environ.get(env_name, "").strip()
    return value or None


def api_keys(env_name: str = DEFAULT_ENV) -> Keys | None:
    """The comma-separated keys in ``env_name`` (blanks dropped), or None: auth off."""
    value = api_key(env_name)
    keys = tuple(k.strip() for k in (value or "").split(",") if k.strip())
    return keys or None


class AuthConfigError(RuntimeError):
    """require_api_key is set but no key is there: the router must not start open."""


# The keys this process enforces; set at import (default name) and again by configure_auth()
# with the configured name when the router replica starts.
_configured: dict[str, str | Keys | None] = {"env": DEFAULT_ENV, "key": api_keys(DEFAULT_ENV)}


def configure_auth(env_name: str, required: bool = False) -> bool:
    """Read the keys from ``env_name`` now; returns whether auth is on. Call at replica start.

    Logs whether auth is on either way; with ``required`` and no key, raises AuthConfigError
    rather than serve every route to anyone.
    """
    keys = api_keys(env_name)
    if keys is None and required:
        raise AuthConfigError(
            f"require_api_key is true but ${env_name} is unset or blank: refusing to start "
            f"without auth. Put the key(s) in ${env_name} (on KubeRay: the Secret named in "
            "kuberay/cluster.yaml), or set require_api_key: false in config/serve.yaml"
        )
    _configured["env"] = env_name
    _configured["key"] = keys
    if keys is None:
        log.warning("API key auth is OFF: $%s is unset or blank, every route is open", env_name)
    else:
        log.info("API key auth is ON: %d key(s) from $%s", len(keys), env_name)
    return keys is not None


def current_key() -> str | Keys | None:
    return _configured["key"]


def caller_id(key: str) -> str:
    """A stable, non-reversible name for the holder of ``key`` (jobs are private to it)."""
    return hashlib.sha256(b"visionserve-caller:" + key.encode("utf-8")).hexdigest()


# A key of its own in the request's scope (a fresh dict per request), not scope["state"],
# which servers may fill from state shared by every request.
CALLER_SCOPE_KEY = "visionserve.caller"


def request_caller(scope: Scope) -> str | None:
    """The caller id the middleware recorded for this request; None when auth is off."""
    return scope.get(CALLER_SCOPE_KEY)


def credentials(header: str | None) -> str | None:
    """The secret presented in an Authorization header value: a Bearer token or a Basic password.

    None means "no credentials" (absent header, or an empty Bearer token); a malformed header
    raises ValueError with the reason.
    """
    if header is None:
        return None
    scheme, _, rest = header.strip().partition(" ")
    token = rest.strip()
    scheme = scheme.lower()
    if scheme == "bearer":
        return token or None
    if scheme == "basic":
        if not token:
            return None
        try:
            decoded = base64.b64decode(token, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ValueError("malformed Basic credentials") from None
        user, colon, password = decoded.partition(":")
        if not colon:
            raise ValueError("malformed Basic credentials (no ':')")
        return password or None
    raise ValueError(f"unsupported Authorization scheme {scheme[:20]!r}; use Bearer")


def key_matches(presented: str, key: str) -> bool:
    # Bytes, because compare_digest refuses non-ASCII str; it leaks only the length.
    return hmac.compare_digest(presented.encode("utf-8"), key.encode("utf-8"))


class ApiKeyMiddleware:
    """401 for any HTTP/WebSocket request without the right key, but for the health check
    and GETs of the web page's files.

    ``key_source`` is asked per request (a dict lookup), so configure_auth() at replica start
    takes effect although the app, middleware included, was built earlier; tests pass their
    own source.
    """

    def __init__(
        self, app: ASGIApp, key_source: Callable[[], str | Keys | None] = current_key
    ) -> None:
        self.app = app
        self.key_source = key_source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.key_source()
        if key is None or scope["type"] not in ("http", "websocket") or _exempt(scope):
            await self.app(scope, receive, send)
            return
        keys = (key,) if isinstance(key, str) else tuple(key)
        problem = _problem(scope, keys)
        if problem is None:
            await self.app(scope, receive, send)
            return
        await _refuse(scope, send, problem)


def _exempt(scope: Scope) -> bool:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if path in EXEMPT_PATHS:
        return True
    page = path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIX)
    return page and scope["type"] == "http" and scope.get("method") in ("GET", "HEAD")


def _problem(scope: Scope, keys: Keys) -> tuple[str, str | None] | None:
    """None if the request carries a key (recorded in the scope as the caller, see
    ``request_caller``), else (detail, RFC 6750 error code or None)."""
    values = [v for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
    if len(values) > 1:
        return "more than one Authorization header", "invalid_request"
    header = values[0].decode("latin-1") if values else None
    try:
        presented = credentials(header)
    except ValueError as err:
        return str(err), "invalid_request"
    if presented is None:
        return "this service needs an API key: send Authorization: Bearer <key>", None
    # Every key is compared (no early exit), so timing shows no more than one comparison.
    matched = [key_matches(presented, key) for key in keys]
    if not any(matched):
        return "invalid API key", "invalid_token"
    scope[CALLER_SCOPE_KEY] = caller_id(presented)
    return None


async def _refuse(scope: Scope, send: Send, problem: tuple[str, str | None]) -> None:
    detail, code = problem
    challenge = f'Bearer realm="{REALM}"' + (f', error="{code}"' if code else "")
    if scope["type"] == "websocket":
        # Closing before accept makes the server answer the handshake with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
        return
    given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
    body = json.dumps(ServiceError(401, "unauthorized", detail).body(request_id(given))).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
