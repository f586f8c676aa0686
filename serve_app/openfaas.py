"""The OpenFaaS gateway API, so that faas-cli and existing curl scripts work unchanged.

`faas-cli list/describe/version` read `/system/*`; `faas-cli invoke [--async]` posts to
`/function/NAME.NAMESPACE` or `/async-function/NAME.NAMESPACE` (run as a job with an
optional `X-Callback-Url`). The client is written in Go and parses strictly: integers stay
integers, `createdAt` is RFC 3339 or absent, and every key of `/system/info` must be there.

The routes are declared in `serve_app.router`; this module holds what they delegate to,
as plain functions. Invocations are counted by an ASGI middleware (registered in
`serve_app.api`), in the router replica's memory: with several router replicas each one
counts what it served.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.config import AppSettings, ModelSettings
from serve_app.errors import ServiceError, Unavailable
from serve_app.inputs.addresses import check_url
from serve_app.registry import MODELS

log = logging.getLogger("ray.serve")

NAMESPACE = "openfaas-fn"  # the namespace faas-cli appends when none is given
PROVIDER = "visionserve"
ORCHESTRATION = "ray-serve"
# `faas-cli list` in a watch loop must not turn into a controller query per call, yet
# should still show autoscaling within a second or two.
STATUS_TTL_S = 1.5
# A replica that is leaving no longer counts as wanted; every other state does.
GONE_STATES = frozenset({"STOPPING", "STOPPED"})
# Answers that never reached the function: unknown name, wrong method, refused credentials.
NOT_INVOKED = frozenset({401, 403, 404, 405})
GIT_SHA_ENV = "VISIONSERVE_GIT_SHA"  # set by image builds; there is no .git in a replica


def _version() -> str:
    try:
        return metadata.version("visionserve")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0.0.0+unknown"


VERSION = _version()


def split_function_name(name: str) -> tuple[str, str | None]:
    """`face-detect-pigo.openfaas-fn` -> ("face-detect-pigo", "openfaas-fn")."""
    model, _, namespace = name.partition(".")
    return model, namespace or None


# -- invocation counts -----------------------------------------------------------------
INVOCATIONS: collections.Counter[str] = collections.Counter()
_FUNCTION_PATH = re.compile(r"/(?:async-)?function/([^/]+)/?")


class InvocationCounter:
    """Counts each POST to /function/NAME or /async-function/NAME per function.

    A middleware because the sync route belongs to the router; like the OpenFaaS gateway
    it counts every answer the function gave, errors included, but not requests that
    never reached it (unknown name, refused credentials).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = self._function(scope)
        if name is None:
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            if status not in NOT_INVOKED:
                INVOCATIONS[name] += 1

    @staticmethod
    def _function(scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        match = _FUNCTION_PATH.fullmatch(path)
        if match is None:
            return None
        model, _ = split_function_name(match.group(1))
        return model if model in MODELS else None


# -- Serve's view of the deployments ---------------------------------------------------
@dataclass(frozen=True)
class DeploymentState:
    status: str
    replicas: int  # wanted: every replica not on its way out
    available: int  # RUNNING


@dataclass(frozen=True)
class AppState:
    deployed_at: float | None
    deployments: dict[str, DeploymentState]


def read_app_state(app_name: str) -> AppState:
    """One controller query (blocking: call it in a thread)."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return AppState(None, {})
    deployments = {}
    for name, dep in app.deployments.items():
        states = {str(getattr(s, "value", s)): int(n) for s, n in dep.replica_states.items()}
        deployments[name] = DeploymentState(
            status=str(getattr(dep.status, "value", dep.status)),
            replicas=sum(n for s, n in states.items() if s not in GONE_STATES),
            available=states.get("RUNNING", 0),
        )
    deployed_at = app.last_deployed_time_s if app.last_deployed_time_s > 0 else None
    return AppState(deployed_at, deployments)


class CachedState:
    """The last `read_app_state` answer for `ttl_s`; concurrent callers share one query."""

    def __init__(self, read: Callable[[], AppState], ttl_s: float = STATUS_TTL_S) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._value: AppState | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> AppState:
        async with self._lock:
            if self._value is not None and time.monotonic() - self._at < self._ttl_s:
                return self._value
            try:
                self._value = await asyncio.to_thread(self._read)
            except Exception as err:
                if self._value is None:
                    log.warning("serve.status() failed: %r", err)
                    raise Unavailable(
                        "status_unavailable", "the Serve controller did not answer; retry"
                    ) from None
                log.warning("serve.status() failed (%s); answering the last known state", err)
                return self._value  # stale, but retried on the next call
            self._at = time.monotonic()
            return self._value


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")[:-6] + "Z"


def function_status(
    name: str, model: ModelSettings, state: AppState, invocations: int
) -> dict[str, Any]:
    """One FunctionStatus, typed the way faas-provider's Go struct decodes it."""
    dep = state.deployments.get(name, DeploymentState("NOT_DEPLOYED", 0, 0))
    item: dict[str, Any] = {
        "name": name,
        "image": f"{PROVIDER}/{name}:{VERSION}",
        "namespace": NAMESPACE,
        "invocationCount": int(invocations),
        "replicas": int(dep.replicas),
        "availableReplicas": int(dep.available),
        # map[string]string on the Go side: every value must be a string.
        "labels": {"faas_function": name, "visionserve.kind": MODELS[name].kind},
        "annotations": {
            "visionserve.enabled": "true" if model.enabled else "false",
            "visionserve.deployment_status": dep.status,
            "visionserve.timeout_s": f"{model.timeout_s:g}",
            "visionserve.options": json.dumps(model.options, sort_keys=True),
        },
    }
    if state.deployed_at is not None:  # Go's time.Time refuses "", so absent instead
        item["createdAt"] = rfc3339(state.deployed_at)
    return item


def system_info() -> dict[str, Any]:
    return {
        "provider": {
            "provider": PROVIDER,
            "orchestration": ORCHESTRATION,
            "version": {"sha": ray.__commit__, "release": ray.__version__},
        },
        "version": {"sha": os.environ.get(GIT_SHA_ENV, "unknown"), "release": VERSION},
        "arch": platform.machine(),
    }


# -- what the routes do -----------------------------------------------------------------
def app_state_cache() -> CachedState:
    """Serve's view of the application of the replica that asks, cached."""
    return CachedState(lambda: read_app_state(serve.get_replica_context().app_name))


async def list_functions(
    settings: AppSettings, state: CachedState, namespace: str | None
) -> list[dict[str, Any]]:
    """`faas-cli list`: every configured function, disabled ones with 0 replicas."""
    # Everything lives in one namespace; asking for another finds nothing there.
    if namespace not in (None, "", NAMESPACE):
        return []
    app = await state.get()
    return [
        function_status(name, model, app, INVOCATIONS[name])
        for name, model in settings.models.items()
    ]


async def describe_function(
    settings: AppSettings, state: CachedState, name: str, namespace: str | None
) -> dict[str, Any]:
    """`faas-cli describe NAME`: one FunctionStatus, or 404."""
    model, suffix = split_function_name(name)
    for item in await list_functions(settings, state, namespace or suffix):
        if item["name"] == model:
            return item
    raise ServiceError(404, "not_found", f"no function {name!r} in namespace {NAMESPACE!r}")


async def check_callback(settings: AppSettings, url: str) -> None:
    """An `X-Callback-Url` must pass the image-URL rules (allowlist for private addresses)."""
    try:
        await check_url(
            url,
            allow_hosts=settings.fetch_allow_hosts,
            resolve_timeout_s=settings.limits.fetch_connect_timeout_s,
        )
    except ServiceError as err:
        code = "callback_refused" if err.code == "fetch_refused" else "bad_callback_url"
        raise ServiceError(400, code, f"X-Callback-Url: {err.message}") from None
