"""The OpenFaaS gateway API, so that faas-cli and existing curl scripts work unchanged.

`faas-cli list/describe/version` read `/system/*`; `faas-cli invoke [--async]` posts to
`/function/NAME.NAMESPACE` (the router's route) or `/async-function/NAME.NAMESPACE` (here,
run as a job with an optional `X-Callback-Url`). The client is written in Go and parses
strictly: integers stay integers, `createdAt` is RFC 3339 or absent, and every key of
`/system/info` must be there.

The routes are methods of a mixin that `Router` inherits: Serve's ingress collects routes
through the class's MRO, so they run in the router replica with its settings and handles.
Invocations are counted by an ASGI middleware (the sync route is the router's own), in the
router replica's memory: with several router replicas each one counts what it served.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import logging
import os
import platform
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import ray
from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.api import api
from serve_app.config import AppSettings, Limits, ModelSettings
from serve_app.errors import ServiceError, Unavailable
from serve_app.inputs.fetch import check_url
from serve_app.inputs.request import parse_image_request
from serve_app.registry import MODELS

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger("ray.serve")
F = TypeVar("F", bound=Callable[..., Any])

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


# Import time, before Serve freezes the app for the ingress; outermost of the user
# middleware, so it also sees what an auth middleware refused (and leaves that uncounted).
api.add_middleware(InvocationCounter)


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


# -- routes ----------------------------------------------------------------------------
def _servable() -> Any:
    return serve.get_replica_context().servable_object


def replica_method(func: F) -> F:
    """Bind a mixin route's `self` to the replica's instance, in every process.

    `@serve.ingress` does this by rewriting each method's signature, but only in the
    process that applies the decorator. The ingress class's own methods reach the replica
    pickled by value, rewrite included; a mixin importable by name is pickled by reference,
    so the replica imports it afresh and FastAPI would read `self` as a required query
    parameter (422). Rewriting here, at import, holds wherever the module is imported.
    """
    sig = inspect.signature(func)
    first, *rest = sig.parameters.values()
    params = [first.replace(default=Depends(_servable))]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest]
    func.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return func


class OpenFaaSRoutes:
    """The OpenFaaS gateway routes; mixed into `Router`, whose state they use."""

    settings: AppSettings
    limits: Limits
    models: dict[str, DeploymentHandle]
    jobs: DeploymentHandle
    _handle: Callable[..., DeploymentHandle]
    _require_ready: Callable[[str], Awaitable[None]]
    _fetch: Callable[[str], Awaitable[bytes]]

    def _openfaas_state(self) -> CachedState:
        # The mixin has no __init__ of its own (Router's does not chain up): made on first use.
        cache = self.__dict__.get("_openfaas_cache")
        if cache is None:
            app_name = serve.get_replica_context().app_name
            cache = self._openfaas_cache = CachedState(lambda: read_app_state(app_name))
        return cache

    async def _openfaas_functions(self, namespace: str | None) -> list[dict[str, Any]]:
        # Everything lives in one namespace; asking for another finds nothing there.
        if namespace not in (None, "", NAMESPACE):
            return []
        state = await self._openfaas_state().get()
        return [
            function_status(name, model, state, INVOCATIONS[name])
            for name, model in self.settings.models.items()
        ]

    @api.get("/system/functions", tags=["openfaas"])
    @replica_method
    async def openfaas_list(self, namespace: str | None = None) -> JSONResponse:
        """`faas-cli list`: every configured function, disabled ones with 0 replicas."""
        return JSONResponse(await self._openfaas_functions(namespace))

    @api.get("/system/function/{name}", tags=["openfaas"])
    @replica_method
    async def openfaas_describe(self, name: str, namespace: str | None = None) -> JSONResponse:
        """`faas-cli describe NAME`: one FunctionStatus, or 404."""
        model, suffix = split_function_name(name)
        for item in await self._openfaas_functions(namespace or suffix):
            if item["name"] == model:
                return JSONResponse(item)
        raise ServiceError(404, "not_found", f"no function {name!r} in namespace {NAMESPACE!r}")

    @api.get("/system/namespaces", tags=["openfaas"])
    @replica_method
    async def openfaas_namespaces(self) -> list[str]:
        return [NAMESPACE]

    @api.get("/system/info", tags=["openfaas"])
    @replica_method
    async def openfaas_info(self) -> dict[str, Any]:
        """`faas-cli version`: the gateway and provider versions."""
        return system_info()

    @api.post("/async-function/{name}", status_code=202, tags=["openfaas"])
    @replica_method
    async def openfaas_async(self, name: str, request: Request) -> JSONResponse:
        """`faas-cli invoke --async`: accept the call as a job; 202 with its X-Call-Id.

        The body is read like `/function/{name}`'s. An `X-Callback-Url` gets the answer
        POSTed once the job is done; it must pass the image-URL rules (allowlist for
        private addresses), checked before anything else is done. An incoming `X-Call-Id`
        is not reused: the id is the job's, and a caller-chosen one could replace another
        caller's job.
        """
        model, _ = split_function_name(name)
        self._handle(model)
        callback_url = request.headers.get("x-callback-url") or None
        if callback_url is not None:
            await self._openfaas_check_callback(callback_url)
        await self._require_ready(model)
        output = request.query_params.get("format", MODELS[model].default_output)
        image = await parse_image_request(
            request, max_bytes=self.limits.max_body_bytes, fetch=self._fetch
        )
        view = await self.jobs.submit.remote(
            model, image.data, image.params, output, image.filename, callback_url, str(uuid.uuid4())
        )
        headers = {"X-Call-Id": view["id"], "Location": view["status_url"]}
        return JSONResponse(view, status_code=202, headers=headers)

    async def _openfaas_check_callback(self, url: str) -> None:
        try:
            await check_url(
                url,
                allow_hosts=self.settings.fetch_allow_hosts,
                resolve_timeout_s=self.limits.fetch_connect_timeout_s,
            )
        except ServiceError as err:
            code = "callback_refused" if err.code == "fetch_refused" else "bad_callback_url"
            raise ServiceError(400, code, f"X-Callback-Url: {err.message}") from None
