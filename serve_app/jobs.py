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
from serve_app.errors import ServiceError, request_id
from serve_app.job import Job
from serve_app.jobtable import JobTable
from serve_app.registry import MODELS

log = logging.getLogger("ray.serve")


@serve.deployment
class JobManager:
    def __init__(self, settings: dict[str, Any], models: dict[str, DeploymentHandle]) -> None:
        self.settings = AppSettings.model_validate(settings)
        self.models = models
        # Bounded and private: see serve_app/jobtable.py.
        self.jobs = JobTable(self.settings.jobs)
        self._tasks: set[asyncio.Task] = set()
        self._callback_slots = asyncio.Semaphore(self.settings.jobs.max_callbacks)

    async def submit(
        self,
        model: str,
        data: bytes,
        params: dict[str, Any],
        output: str,
        filename: str | None = None,
        callback_url: str | None = None,
        job_id: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        job = Job(
            job_id or uuid.uuid4().hex,
            model,
            output,
            callback_url=callback_url,
            request_id=request_id(),
            owner=owner,
        )
        self.jobs.admit(job, len(data))
        metrics.watch_jobs(lambda: list(self.jobs))
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
            try:
                self.jobs.finish(job)
            except ServiceError as err:  # the result is over the table's byte budget
                job.fail(err)
        metrics.record_job(job)
        if job.callback_url:
            async with self._callback_slots:  # jobs.max_callbacks deliveries at once
                job.callback_status = await post_callback(job, self.settings)

    async def status(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        return self._get(job_id, owner).view()

    async def result(self, job_id: str, owner: str | None = None) -> dict[str, Any]:
        job = self._get(job_id, owner)
        if job.status == "failed":
            raise job.failure()
        if job.status != "done":
            raise ServiceError(
                409,
                "not_done",
                f"job {job_id} is {job.status} ({job.progress:.0%}); poll /v1/jobs/{job_id}",
            )
        return {"output": job.output, "result": job.result or {}}

    async def list(self, owner: str | None = None) -> list[dict[str, Any]]:
        return [j.view() for j in self.jobs.owned_by(owner)]

    def _get(self, job_id: str, owner: str | None) -> Job:
        return self.jobs.get(job_id, owner)  # type: ignore[return-value]

    def stats(self) -> dict[str, int]:
        """What the table holds (for tests and operators): jobs, bytes, the replica's peak."""
        import resource

        return {
            "jobs": len(self.jobs),
            "active": self.jobs.active(),
            "held_bytes": self.jobs.held_bytes,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }


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
