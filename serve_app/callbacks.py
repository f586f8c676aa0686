"""Deliver a finished job to its callback URL, as OpenFaaS's queue-worker does.

The body is what `POST /function/{name}` would have answered (the JPEG, the base64 text,
the overlay or the JSON), or on failure the error JSON; `X-Function-Status` carries the
status that call would have had. Delivery is at least once: a receiver that takes longer
than the timeout to answer may see the same call id twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import JSONResponse, Response

from serve_app.config import AppSettings
from serve_app.errors import ServiceError
from serve_app.inputs.fetch import post_url
from serve_app.job import Job
from serve_app.responses import answer

log = logging.getLogger("ray.serve")

BACKOFF_S = 1.0  # first pause between attempts; doubles each time
MAX_BACKOFF_S = 30.0
# Refusals that another attempt cannot change: the URL itself is unusable.
PERMANENT_ERRORS = frozenset({"bad_url", "fetch_refused"})
# Receiver answers worth retrying; any other 4xx means it will refuse the same body again.
RETRY_STATUSES = frozenset({408, 425, 429})


def error_status(error: dict[str, Any]) -> int:
    if error.get("status"):
        return int(error["status"])
    # A record without a status (an older job table): the sync route answers a timeout 504.
    return 504 if error.get("error") == "timeout" else 500


def callback_response(job: Job) -> tuple[int, Response]:
    """(function status, the response the sync call would have sent) for a finished job."""
    if job.status == "done" and job.result is not None:
        return 200, answer(job.result, job.output)
    error = job.error or {"error": "internal", "detail": "the job ended without a result"}
    body = {"error": str(error.get("error", "failed")), "detail": str(error.get("detail", ""))}
    if error.get("request_id"):
        body["request_id"] = str(error["request_id"])
    return error_status(error), JSONResponse(body)


def callback_headers(job: Job, status: int, response: Response) -> dict[str, str]:
    duration = (job.finished - job.started) if job.started and job.finished else 0.0
    headers = {
        "Content-Type": response.headers["content-type"],
        "X-Call-Id": job.id,
        "X-Function-Name": job.model,
        "X-Function-Status": str(status),
        # The queue-worker's format: Go's %f, seconds with six decimals.
        "X-Duration-Seconds": f"{duration:f}",
    }
    if response.headers.get("x-count"):
        headers["X-Count"] = response.headers["x-count"]
    return headers


async def post_callback(job: Job, settings: AppSettings) -> str:
    """POST the job's outcome to `job.callback_url`; return "delivered" or "failed: why"."""
    if not job.callback_url:
        return "failed: the job has no callback URL"
    status, response = callback_response(job)
    headers = callback_headers(job, status, response)
    timeout = settings.jobs.callback_timeout_s
    attempts = settings.jobs.callback_retries + 1
    reason = "not attempted"
    for attempt in range(1, attempts + 1):
        try:
            code = await post_url(
                job.callback_url,
                response.body,
                headers=headers,
                allow_hosts=settings.fetch_allow_hosts,
                connect_timeout_s=min(settings.limits.fetch_connect_timeout_s, timeout),
                read_timeout_s=timeout,
                total_timeout_s=timeout,
            )
        except ServiceError as err:
            reason = err.message
            if err.code in PERMANENT_ERRORS:
                return _failed(job, reason, attempt)
        else:
            if 200 <= code < 300:
                return "delivered"
            reason = f"the receiver answered HTTP {code}"
            if code < 500 and code not in RETRY_STATUSES:
                return _failed(job, reason, attempt)
        if attempt < attempts:
            await asyncio.sleep(min(BACKOFF_S * 2 ** (attempt - 1), MAX_BACKOFF_S))
    return _failed(job, reason, attempts)


def _failed(job: Job, reason: str, attempts: int) -> str:
    tries = f"{attempts} attempt" + ("s" if attempts != 1 else "")
    log.warning("job %s: callback not delivered (%s, %s)", job.id, reason, tries)
    return f"failed: {reason} ({tries})"
