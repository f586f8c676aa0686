"""The HTTP ingress: one Serve deployment that sends each request to the right model.

It parses the request into image bytes + parameters (fetching URLs itself, since that is
I/O and the router is async), calls the model deployment through its handle, and turns the
plain-data answer into an HTTP response. It knows model names and kinds, nothing more.
Every route of the service is declared here; the OpenFaaS ones delegate to
`serve_app.openfaas`.
"""

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import openfaas
from serve_app.access import observe_model_call
from serve_app.api import api
from serve_app.auth import configure_auth, request_caller
from serve_app.batch import BatchLimits, batch_answer, parse_batch_request, run_batch
from serve_app.calls import call_model
from serve_app.config import AppSettings
from serve_app.errors import ServiceError, Unavailable
from serve_app.inputs.fetch import fetch_url
from serve_app.inputs.request import ImageRequest, parse_image_request
from serve_app.registry import MODELS
from serve_app.responses import answer

log = logging.getLogger("ray.serve")
INFO_TIMEOUT_S = 5.0
WEB_DIR = Path(__file__).resolve().parent / "web"
# Request fields that make a segmentation request prompted rather than automatic.
PROMPT_KEYS = ("points", "boxes")


@serve.deployment
@serve.ingress(api)
class Router:
    def __init__(
        self,
        settings: dict[str, Any],
        models: dict[str, DeploymentHandle],
        jobs: DeploymentHandle,
    ) -> None:
        self.settings = AppSettings.model_validate(settings)
        configure_auth(self.settings.api_key_env, required=self.settings.require_api_key)
        self.models = models
        self.jobs = jobs
        self.limits = self.settings.limits
        self.app_state = openfaas.app_state_cache()

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

    @observe_model_call
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

    async def _read(self, request: Request, default_output: str) -> tuple[ImageRequest, str]:
        """The image and parameters of a request, and the answer format it asks for."""
        image = await parse_image_request(
            request,
            max_bytes=self.limits.max_body_bytes,
            fetch=self._fetch,
            max_json_bytes=self.limits.max_json_bytes,
        )
        return image, request.query_params.get("format", default_output)

    async def _run(self, model: str, request: Request, default_output: str = "json") -> Response:
        """Read the image, call the model's method for it, answer its result."""
        image, output = await self._read(request, default_output)
        if MODELS[model].kind == "detector":
            method = "detect"
        else:  # prompted when points or boxes are given, automatic otherwise
            method = "segment" if any(k in image.params for k in PROMPT_KEYS) else "generate"
        result = await self._call(model, method, image.data, image.params, output, image.filename)
        return answer(result, output)

    async def _submit(self, model: str, request: Request, default_output: str, *extra: Any) -> Any:
        """Read the image and hand it to the jobs deployment; the job's first view."""
        image, output = await self._read(request, default_output)
        args = (model, image.data, image.params, output, image.filename, *extra)
        # The job is the caller's own (serve_app/jobtable.py): None with auth off.
        return await self.jobs.submit.remote(*args, owner=request_caller(request.scope))

    @api.post("/v1/detect/{model}")
    async def detect(self, model: str, request: Request) -> Response:
        self._handle(model, "detector")
        return await self._run(model, request)

    @api.post("/v1/detect/{model}/batch")
    async def detect_batch(self, model: str, request: Request) -> Response:
        """Many images, one JSON result (or error) each, in order; see serve_app/batch.py."""
        self._handle(model, "detector")
        lim = BatchLimits(**self.limits.model_dump(include=set(BatchLimits.__annotations__)))
        batch = await parse_batch_request(request, lim, self._fetch)

        async def call(images: list[tuple[bytes, str | None]]) -> list[dict[str, Any]]:
            return await self._call(model, "detect_batch", images, batch.params, batch.output)

        results = await run_batch(batch, call, lim.batch_chunk_images)
        return JSONResponse(batch_answer(model, results))

    @api.post("/v1/segment/{model}")
    async def segment(self, model: str, request: Request) -> Response:
        """Masks for an image: prompted (points/labels/boxes given) or automatic (none)."""
        self._handle(model, "segmenter")
        return await self._run(model, request)

    # -- jobs: long requests with progress ---------------------------------------------
    @api.post("/v1/jobs/{model}", status_code=202)
    async def submit_job(self, model: str, request: Request) -> JSONResponse:
        await self._require_ready(model)
        view = await self._submit(model, request, "json")
        return JSONResponse(view, status_code=202, headers={"Location": view["status_url"]})

    # Jobs are private to the caller that submitted them (serve_app/jobtable.py).
    @api.get("/v1/jobs")
    async def list_jobs(self, request: Request) -> dict[str, Any]:
        return {"jobs": await self.jobs.list.remote(request_caller(request.scope))}

    @api.get("/v1/jobs/{job_id}")
    async def job_status(self, job_id: str, request: Request) -> dict[str, Any]:
        return await self.jobs.status.remote(job_id, request_caller(request.scope))

    @api.get("/v1/jobs/{job_id}/result")
    async def job_result(self, job_id: str, request: Request) -> Response:
        done = await self.jobs.result.remote(job_id, request_caller(request.scope))
        return answer(done["result"], done["output"])

    # -- OpenFaaS gateway API (faas-cli) ------------------------------------------------
    @api.post("/function/{name}")
    async def function(self, name: str, request: Request) -> Response:
        """`faas-cli invoke`: body = image URL or bytes; answer = the annotated image."""
        model, _ = openfaas.split_function_name(name)
        self._handle(model)
        return await self._run(model, request, MODELS[model].default_output)

    @api.post("/async-function/{name}", status_code=202, tags=["openfaas"])
    async def openfaas_async(self, name: str, request: Request) -> JSONResponse:
        """`faas-cli invoke --async`: accept the call as a job; 202 with its X-Call-Id.

        The callback URL and the model's readiness are checked before the body is read.
        """
        model, _ = openfaas.split_function_name(name)
        self._handle(model)
        callback_url = request.headers.get("x-callback-url") or None
        if callback_url is not None:
            await openfaas.check_callback(self.settings, callback_url)
        await self._require_ready(model)
        # The id is the job's: an incoming X-Call-Id is not reused, since a caller-chosen one
        # could replace another caller's job.
        call_id = str(uuid.uuid4())
        view = await self._submit(
            model, request, MODELS[model].default_output, callback_url, call_id
        )
        headers = {"X-Call-Id": view["id"], "Location": view["status_url"]}
        return JSONResponse(view, status_code=202, headers=headers)

    @api.get("/system/functions", tags=["openfaas"])
    async def openfaas_list(self, namespace: str | None = None) -> JSONResponse:
        """`faas-cli list`: every configured function, disabled ones with 0 replicas."""
        items = await openfaas.list_functions(self.settings, self.app_state, namespace)
        return JSONResponse(items)

    @api.get("/system/function/{name}", tags=["openfaas"])
    async def openfaas_describe(self, name: str, namespace: str | None = None) -> JSONResponse:
        """`faas-cli describe NAME`: one FunctionStatus, or 404."""
        item = await openfaas.describe_function(self.settings, self.app_state, name, namespace)
        return JSONResponse(item)

    @api.get("/system/namespaces", tags=["openfaas"])
    async def openfaas_namespaces(self) -> list[str]:
        return [openfaas.NAMESPACE]

    @api.get("/system/info", tags=["openfaas"])
    async def openfaas_info(self) -> dict[str, Any]:
        """`faas-cli version`: the gateway and provider versions."""
        return openfaas.system_info()

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
