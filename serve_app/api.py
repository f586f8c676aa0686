"""The FastAPI app behind the router: its middleware, and how errors become JSON answers.

Every error leaves as `{"error": <code>, "detail": <message>, "request_id": <id>}` with a
4xx/5xx status: `ServiceError`s from the router, the input layer and the model deployments
(which cross Ray as exceptions of the same class), and Starlette's 404/405. The request id
is Serve's (also in the `X-Request-Id` header and on every replica log line of the call),
so an operator finds the internal detail an answer leaves out. A model's full queue is
turned into a 503 by `serve_app.calls`, not here: Serve installs its own handler for
BackPressureError on the ingress app, which would override one registered here.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.access import RequestObserver
from serve_app.auth import ApiKeyMiddleware
from serve_app.errors import ServiceError, request_id
from serve_app.openfaas import InvocationCounter

log = logging.getLogger("ray.serve")

api = FastAPI(
    title="visionserve",
    version="0.1.0",
    description="Face detection and Segment Anything as HTTP functions (Ray Serve).",
)
# Here, not in router.py: serve.ingress freezes a copy of the app when it decorates Router.
# The last added is the outermost: the invocation counter also sees what the API key
# refused (and leaves that uncounted).
api.add_middleware(ApiKeyMiddleware)
api.add_middleware(InvocationCounter)
api.add_middleware(RequestObserver)  # outermost: metrics and the access log see every answer


def error_response(request: Request, err: ServiceError) -> JSONResponse:
    headers = None
    if err.retry_after_s is not None:
        headers = {"Retry-After": str(err.retry_after_s)}
    body = err.body(request_id(request.headers.get("x-request-id")))
    return JSONResponse(body, status_code=err.status, headers=headers)


@api.exception_handler(ServiceError)
async def _service_error(request: Request, err: ServiceError) -> JSONResponse:
    return error_response(request, err)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    response = error_response(
        request,
        ServiceError(err.status_code, codes.get(err.status_code, "http_error"), str(err.detail)),
    )
    response.headers.update(getattr(err, "headers", None) or {})
    return response


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(request, ServiceError(422, "bad_request", str(err.errors())))


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    # A bug, or a replica that died mid-call: still JSON, but its text (Ray's includes pids,
    # node addresses and paths) goes to the log only, under the request id.
    rid = request_id(request.headers.get("x-request-id"))
    log.error("request %s: unhandled %s", rid, type(err).__name__, exc_info=err)
    internal = ServiceError(500, "internal", f"the server failed; see the logs for request {rid}")
    return JSONResponse(internal.body(rid), status_code=500)
