"""The HTTP ingress: one Serve deployment that sends each request to the right model.

It parses the request into image bytes + parameters (fetching URLs itself, since that is
I/O and the router is async), calls the model deployment through its handle, and turns the
plain-data answer into an HTTP response. It knows model names and kinds, nothing more.
"""

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api import api
from serve_app.auth import configure_auth
from serve_app.calls import call_model
from serve_app.config import AppSettings
from serve_app.errors import ServiceError, Unavailable
from serve_app.inputs.fetch import fetch_url
from serve_app.inputs.request import parse_image_request
from serve_app.openfaas import OpenFaaSRoutes
from serve_app.registry import MODELS
from serve_app.responses import answer

log = logging.getLogger("ray.serve")
INFO_TIMEOUT_S = 5.0
WEB_DIR = Path(__file__).resolve().parent / "web"
# Request fields that make a segmentation request prompted rather than automatic.
PROMPT_KEYS = ("points", "boxes")


@serve.deployment
@serve.ingress(api)
class Router(OpenFaaSRoutes):
    def __init__(
        self,
        settings: dict[str, Any],
        models: dict[str, DeploymentHandle],
        jobs: DeploymentHandle,
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        configure_auth(self.settings.api_key_env)
        self.models = models
        self.jobs = jobs
        self.limits = self.settings.limits

    # -- helpers -----------------------------------------------------------------------
    def _handle(self, name: str, kind: str | None = None) -> DeploymentHandle:
        model = self.settings.models.get(name)
        if model is None or (kind is not None and MODELS[name].kind != kind):
            known = sorted(
                n for n in self.settings.models if kind is None or MODELS[n].kind == kind
            )
            raise ServiceError(
                404, "unknown_model", f"no {kind or 'model'} named {name!r}; known: {known}"
            )
        if not model.enabled:
            raise Unavailable(
                "model_disabled",
                f"{name} is disabled; set args.models.{name}.enabled: true in config/serve.yaml",
            )
        return self.models[name]

    async def _fetch(self, url: str) -> bytes:
        lim = self.limits
        return await fetch_url(
            url,
            max_bytes=lim.fetch_max_bytes,
            connect_timeout_s=lim.fetch_connect_timeout_s,
            read_timeout_s=lim.fetch_read_timeout_s,
            allow_hosts=self.settings.fetch_allow_hosts,
            max_redirects=lim.fetch_max_redirects,
        )

    async def _call(self, name: str, method: str, *args: Any) -> Any:
        """Call a model under the shared call policy (timeout, overload, one retry)."""
        handle = getattr(self._handle(name), method)
        timeout = self.settings.models[name].timeout_s
        return await call_model(name, timeout, lambda: handle.remote(*args))

    # -- routes ------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {
            "models": await asyncio.gather(*(self._model_info(n) for n in self.settings.models))
        }

    async def _require_ready(self, model: str) -> None:
        """Refuse work now, not after a poll, when the model cannot serve it."""
        self._handle(model)
        info = await self._model_info(model)
        if info["status"] == "missing weights":
            raise Unavailable(
                "weights_missing",
                f"{model} needs weight file(s) {info['missing_weights']}; fetch them with: "
                f"{info['fetch_command']}",
            )

    async def _model_info(self, name: str) -> dict[str, Any]:
        spec = MODELS[name]
        base = {
            "name": name,
            "kind": spec.kind,
            "default_output": spec.default_output,
            "box_color": spec.box_color,
        }
        if not self.settings.models[name].enabled:
            return {**base, "status": "disabled"}
        try:
            info = await asyncio.wait_for(self.models[name].info.remote(), INFO_TIMEOUT_S)
        except Exception as err:  # scaled to zero, starting, or crashed: say so, don't fail
            return {**base, "status": "unavailable", "detail": type(err).__name__}
        return {**base, **info}

    @api.post("/v1/detect/{model}")
    async def detect(self, model: str, request: Request) -> Response:
        self._handle(model, "detector")
        return await self._run(model, "detect", request, request.query_params.get("format", "json"))

    @api.post("/function/{name}")
    async def function(self, name: str, request: Request) -> Response:
        """OpenFaaS-compatible: body = image URL or bytes; answer = the annotated image."""
        # faas-cli appends the namespace (`.openfaas-fn`); model names have no dots.
        model = name.split(".", 1)[0]
        self._handle(model)
        output = request.query_params.get("format", MODELS[model].default_output)
        method = "detect" if MODELS[model].kind == "detector" else "generate"
        return await self._run(model, method, request, output)

    async def _run(self, model: str, method: str, request: Request, output: str) -> Response:
        image = await parse_image_request(
            request, max_bytes=self.limits.max_body_bytes, fetch=self._fetch
        )
        result = await self._call(model, method, image.data, image.params, output, image.filename)
        return answer(result, output)

    # -- Segment Anything --------------------------------------------------------------
    @api.post("/v1/segment/{model}")
    async def segment(self, model: str, request: Request) -> Response:
        """Masks for an image: prompted (points/labels/boxes given) or automatic (none)."""
        self._handle(model, "segmenter")
        output = request.query_params.get("format", "json")
        image = await parse_image_request(
            request, max_bytes=self.limits.max_body_bytes, fetch=self._fetch
        )
        prompted = any(k in image.params for k in PROMPT_KEYS)
        method = "segment" if prompted else "generate"
        result = await self._call(model, method, image.data, image.params, output, image.filename)
        return answer(result, output)

    # -- jobs: long requests with progress ---------------------------------------------
    @api.post("/v1/jobs/{model}", status_code=202)
    async def submit_job(self, model: str, request: Request) -> JSONResponse:
        await self._require_ready(model)
        output = request.query_params.get("format", "json")
        image = await parse_image_request(
            request, max_bytes=self.limits.max_body_bytes, fetch=self._fetch
        )
        view = await self.jobs.submit.remote(
            model, image.data, image.params, output, image.filename
        )
        return JSONResponse(view, status_code=202, headers={"Location": view["status_url"]})

    @api.get("/v1/jobs")
    async def list_jobs(self) -> dict[str, Any]:
        return {"jobs": await self.jobs.list.remote()}

    @api.get("/v1/jobs/{job_id}")
    async def job_status(self, job_id: str) -> dict[str, Any]:
        return await self.jobs.status.remote(job_id)

    @api.get("/v1/jobs/{job_id}/result")
    async def job_result(self, job_id: str) -> Response:
        done = await self.jobs.result.remote(job_id)
        return answer(done["result"], done["output"])

    # -- web page ----------------------------------------------------------------------
    @api.get("/", include_in_schema=False)
    async def index(self) -> Response:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        path = (WEB_DIR / name).resolve()
        if path.parent != WEB_DIR or not path.is_file():
            raise ServiceError(404, "not_found", f"no static file {name!r}")
        return FileResponse(path)
