"""Long requests as jobs: submit -> id -> status with progress -> result.

One `jobs` deployment (a single replica, so every router replica sees the same jobs) runs
each job as an asyncio task that calls the model deployment. Segmenters stream progress
events while they work; detectors answer in one step. A job may name a callback URL, which
gets the result POSTed once it is done (OpenFaaS's async-function contract).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app import metrics
from serve_app.callbacks import post_callback
from serve_app.calls import call_model
from serve_app.config import AppSettings
from serve_app.errors import ServiceError, Unavailable, request_id
from serve_app.job import Job
from serve_app.registry import MODELS

log = logging.getLogger("ray.serve")


@serve.deployment
class JobManager:
    def __init__(self, settings: dict[str, Any], models: dict[str, DeploymentHandle]) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.models = models
        self.jobs: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()

    def _evict(self) -> None:
        now = time.time()
        ttl = self.settings.jobs.ttl_s
        for job_id, job in list(self.jobs.items()):
            if job.finished and now - job.finished > ttl:
                del self.jobs[job_id]

    async def submit(
        self,
        model: str,
        data: bytes,
        params: dict[str, Any],
        output: str,
        filename: str | None = None,
        callback_url: str | None = None,
        job_id: str | None = None,
    ) -> dict[str, Any]:
        self._evict()
        active = sum(1 for j in self.jobs.values() if j.status in ("queued", "running"))
        if active >= self.settings.jobs.max_jobs:
            raise Unavailable(
                "too_many_jobs",
                f"{active} jobs are queued or running (jobs.max_jobs); retry later",
            )
        job = Job(
            job_id or uuid.uuid4().hex,
            model,
            output,
            callback_url=callback_url,
            request_id=request_id(),
        )
        self.jobs[job.id] = job
        metrics.watch_jobs(lambda: list(self.jobs.values()))
        task = asyncio.create_task(self._run(job, data, params, filename))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job.view()

    async def _run(
        self, job: Job, data: bytes, params: dict[str, Any], filename: str | None
    ) -> None:
        job.status, job.started, job.stage = "running", time.time(), "starting"
        handle = self.models[job.model]
        timeout = self.settings.models[job.model].timeout_s
        try:
            if MODELS[job.model].kind == "segmenter":
                result = await call_model(
                    job.model,
                    timeout,
                    lambda: handle.options(stream=True).generate_stream.remote(
                        data, params, job.output, filename
                    ),
                    lambda stream: _follow(job, stream),
                )
            else:
                result = await call_model(
                    job.model,
                    timeout,
                    lambda: handle.detect.remote(data, params, job.output, filename),
                )
            if result is None:
                raise RuntimeError("the model finished without a result")
            job.result = result
            job.status, job.progress, job.stage = "done", 1.0, "done"
        except ServiceError as err:
            job.fail(err)
        except Exception:  # a crashed replica must not take the job table with it
            # Its text (Ray's names pids, node addresses, paths) stays in this log.
            log.exception("job %s (request %s) failed", job.id, job.request_id)
            job.fail(
                ServiceError(500, "internal", f"the job failed; see the logs for job {job.id}")
            )
        finally:
            job.finished = time.time()
        metrics.record_job(job)
        if job.callback_url:
            job.callback_status = await post_callback(job, self.settings)

    async def status(self, job_id: str) -> dict[str, Any]:
        return self._get(job_id).view()

    async def result(self, job_id: str) -> dict[str, Any]:
        job = self._get(job_id)
        if job.status == "failed":
            raise job.failure()
        if job.status != "done":
            raise ServiceError(
                409,
                "not_done",
                f"job {job_id} is {job.status} ({job.progress:.0%}); poll /v1/jobs/{job_id}",
            )
        return {"output": job.output, "result": job.result or {}}

    async def list(self) -> list[dict[str, Any]]:
        self._evict()
        return [j.view() for j in self.jobs.values()]

    def _get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ServiceError(
                404,
                "unknown_job",
                f"no job {job_id!r} (finished jobs are kept {self.settings.jobs.ttl_s:.0f} s)",
            )
        return job


async def _follow(job: Job, stream: Any) -> dict[str, Any] | None:
    """A segmenter's event stream: progress into the job, then the result."""
    result = None
    async for event in stream:
        if "result" in event:
            result = event["result"]
        else:
            job.progress = float(event.get("progress", job.progress))
            job.stage = str(event.get("stage", job.stage))
    return result
