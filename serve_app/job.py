"""One job's record: what the jobs deployment keeps and what a callback reports.

Apart from `serve_app.jobs` so that `serve_app.callbacks` can read it without importing
the deployment that calls it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.errors import ServiceError


@dataclass
class Job:
    id: str
    model: str
    output: str
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued | running | done | failed
    progress: float = 0.0
    stage: str = "queued"
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None
    # A failure as the direct call would have answered it: error, detail, status,
    # request_id (of the submission, under which the logs hold the rest), retry_after_s.
    error: dict[str, Any] | None = None
    callback_url: str | None = None
    callback_status: str | None = None
    request_id: str | None = None
    owner: str | None = None  # auth.caller_id of the submitter; None with auth off
    held_bytes: int = 0  # what the job table counts against jobs.max_result_bytes

    def fail(self, err: ServiceError) -> None:
        self.status = "failed"
        self.error = {**err.body(self.request_id), "status": err.status}
        if err.retry_after_s is not None:
            self.error["retry_after_s"] = err.retry_after_s

    def failure(self) -> ServiceError:
        """The error the job's result answers with: what the direct call would have raised."""
        err = self.error or {}
        return ServiceError(
            int(err.get("status", 500)),
            str(err.get("error", "failed")),
            str(err.get("detail", "job failed")),
            err.get("retry_after_s"),
        )

    def view(self) -> dict[str, Any]:
        end = self.finished or time.time()
        return {
            "id": self.id,
            "model": self.model,
            "status": self.status,
            "progress": round(self.progress, 4),
            "stage": self.stage,
            "created_at": self.created,
            "duration_s": round(end - self.started, 3) if self.started else None,
            "error": self.error,
            "callback": self.callback_status,
            "status_url": f"/v1/jobs/{self.id}",
            "result_url": f"/v1/jobs/{self.id}/result",
        }
