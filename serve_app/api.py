"""The FastAPI app behind the router, and how errors become JSON answers.

Every error leaves as `{"error": <code>, "detail": <message>}` with a 4xx/5xx status:
the router's own refusals, model deployments' `InputError`/`ModelUnavailable` (which
cross Ray as exceptions of the same class) and Starlette's 404/405. A model's full queue is
turned into a 503 by `Router._call`, not here: Serve installs its own handler for
BackPressureError on the ingress app, which would override one registered here.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.auth import ApiKeyMiddleware
from serve_app.errors import ModelUnavailable
from serve_app.inputs.errors import InputError

log = logging.getLogger("ray.serve")
RETRY_AFTER_S = 2

api = FastAPI(
    title="visionserve",
    version="0.1.0",
    description="Face detection and Segment Anything as HTTP functions (Ray Serve).",
)
# Here, not in router.py: serve.ingress freezes a copy of the app when it decorates Router.
api.add_middleware(ApiKeyMiddleware)


def error_response(
    status: int, error: str, detail: str, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


@api.exception_handler(InputError)
async def _input_error(_: Request, err: InputError) -> JSONResponse:
    return error_response(err.status, err.error, err.detail)


@api.exception_handler(ModelUnavailable)
async def _unavailable(_: Request, err: ModelUnavailable) -> JSONResponse:
    # Overload clears in seconds; missing weights or a disabled model take an operator.
    retry = RETRY_AFTER_S if err.error in ("overloaded", "replica_died") else 30
    return error_response(err.status, err.error, err.detail, {"Retry-After": str(retry)})


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        err.status_code,
        codes.get(err.status_code, "http_error"),
        str(err.detail),
        getattr(err, "headers", None),
    )


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(422, "bad_request", str(err.errors()))


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    # A bug, or a replica that died mid-call: still JSON, and logged with its traceback.
    log.error("unhandled %s", type(err).__name__, exc_info=err)
    return error_response(500, "internal", f"{type(err).__name__}: the server failed; see logs")
