"""The jobs replica's table: bounded in count and bytes, and private to each caller.

Bounds (config `jobs`): `max_jobs` queued + running; `max_finished_jobs` finished ones kept,
the oldest evicted first; `max_result_bytes` for everything the table holds in memory (stored
results, plus the image bytes of jobs still waiting or running), so the replica's `memory`
budget holds whatever callers send. `ttl_s` still drops finished jobs after their time.

Privacy: each job records the caller that submitted it (`auth.caller_id`, a hash of the API
key; None when auth is off). Only that caller can see it: a lookup by anyone else answers
exactly as for an id that does not exist, and a listing shows only the caller's own jobs.
With auth off there is no caller to tell apart, so the listing is empty and a job is reached
only by its id (122 random bits, never chosen by the caller).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Protocol

from serve_app.config import JobSettings
from serve_app.errors import ServiceError, Unavailable

ACTIVE = ("queued", "running")


class TableJob(Protocol):
    id: str
    owner: str | None
    status: str
    finished: float | None
    result: dict[str, Any] | None
    held_bytes: int


def nbytes(value: Any) -> int:
    """Approximate bytes a plain-data result holds (payloads counted, containers at 8 a slot).

    Exact for what dominates (encoded images, base64 text, RLE strings); a walk rather than a
    pickle so that no copy of a large result is made to measure it.
    """
    stack, total = [value], 0
    while stack:
        v = stack.pop()
        if isinstance(v, bytes | bytearray | str):
            total += len(v) + 48
        elif isinstance(v, dict):
            total += 64 + 16 * len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            total += 56 + 8 * len(v)
            stack.extend(v)
        else:
            total += 32
    return total


class JobTable:
    def __init__(self, settings: JobSettings) -> None:
        self.settings = settings
        self._jobs: OrderedDict[str, TableJob] = OrderedDict()  # insertion = submission order
        self._finished: OrderedDict[str, None] = OrderedDict()  # finishing order, oldest first
        self.held_bytes = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[TableJob]:
        return iter(list(self._jobs.values()))

    def active(self) -> int:
        return sum(1 for j in self._jobs.values() if j.status in ACTIVE)

    # -- admission ---------------------------------------------------------------------
    def admit(self, job: TableJob, input_bytes: int) -> None:
        """Add a new job holding `input_bytes` of image data until it finishes, or 503."""
        self.expire()
        active = self.active()
        if active >= self.settings.max_jobs:
            raise Unavailable(
                "too_many_jobs",
                f"{active} jobs are queued or running (jobs.max_jobs); retry later",
            )
        budget = self.settings.max_result_bytes
        self._evict_finished_until(budget - input_bytes)
        if self.held_bytes + input_bytes > budget:
            raise Unavailable(
                "too_many_jobs",
                "the jobs waiting and running hold too many image bytes (jobs.max_result_bytes)"
                "; retry later",
            )
        job.held_bytes = input_bytes
        self.held_bytes += input_bytes
        self._jobs[job.id] = job

    def finish(self, job: TableJob) -> None:
        """Account a job that has just finished: its input is released, its result stored if
        it fits (older finished jobs make room), else the job fails as too large."""
        self.held_bytes -= job.held_bytes
        job.held_bytes = 0
        budget = self.settings.max_result_bytes
        if job.result is not None:
            size = nbytes(job.result)
            if size > budget:
                job.result = None
                raise ServiceError(
                    413,
                    "result_too_large",
                    f"the result ({size} bytes) is over what the jobs table keeps "
                    f"(jobs.max_result_bytes = {budget}); use the direct route",
                )
            self._evict_finished_until(budget - size)
            job.held_bytes = size
            self.held_bytes += size
        if job.id in self._jobs:
            self._finished[job.id] = None
        while len(self._finished) > self.settings.max_finished_jobs:
            self._drop(next(iter(self._finished)))

    # -- lookups -----------------------------------------------------------------------
    def get(self, job_id: str, caller: str | None) -> TableJob:
        self.expire()
        job = self._jobs.get(job_id)
        if job is None or job.owner != caller:
            s = self.settings
            raise ServiceError(
                404,
                "unknown_job",
                f"no job {job_id[:64]!r} for this caller (finished jobs are kept up to "
                f"{s.ttl_s:.0f} s, the newest {s.max_finished_jobs} of them)",
            )
        return job

    def owned_by(self, caller: str | None) -> list[TableJob]:
        """The caller's jobs; none when auth is off (no caller to tell apart)."""
        self.expire()
        if caller is None:
            return []
        return [j for j in self._jobs.values() if j.owner == caller]

    # -- eviction ----------------------------------------------------------------------
    def expire(self) -> None:
        now = time.time()
        ttl = self.settings.ttl_s
        for job_id in list(self._finished):
            job = self._jobs[job_id]
            if job.finished is None or now - job.finished <= ttl:
                break  # finishing order: the rest are younger
            self._drop(job_id)

    def _evict_finished_until(self, target: int) -> None:
        while self.held_bytes > max(target, 0) and self._finished:
            self._drop(next(iter(self._finished)))

    def _drop(self, job_id: str) -> None:
        self._finished.pop(job_id, None)
        job = self._jobs.pop(job_id, None)
        if job is not None:
            self.held_bytes -= job.held_bytes
            job.held_bytes = 0
            job.result = None
