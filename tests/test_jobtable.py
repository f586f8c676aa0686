"""The jobs table in process: byte and count bounds, eviction order, privacy (no Ray)."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

import pytest

from serve_app.auth import caller_id
from serve_app.config import JobSettings
from serve_app.errors import ServiceError, Unavailable
from serve_app.jobtable import JobTable, nbytes

MIB = 2**20


@dataclass
class FakeJob:
    """The fields the table reads, as serve_app.jobs.Job has them."""

    id: str
    owner: str | None = None
    status: str = "queued"
    finished: float | None = None
    result: dict[str, Any] | None = None
    held_bytes: int = 0


def run_to_end(table: JobTable, job: FakeJob, result: dict[str, Any] | None) -> None:
    job.status, job.result, job.finished = "done", result, time.time()
    table.finish(job)


def test_a_thousand_1mib_results_stay_within_the_byte_budget() -> None:
    budget = 64 * MIB
    table = JobTable(JobSettings(max_result_bytes=budget, max_finished_jobs=1024))
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(1000):
            job = FakeJob(f"j{i}")
            table.admit(job, input_bytes=100_000)
            run_to_end(table, job, {"image": bytes(MIB), "media_type": "image/jpeg"})
            assert table.held_bytes <= budget
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = [j.id for j in table]
    print(
        f"\n1000 jobs of 1 MiB: {len(kept)} kept, table {table.held_bytes / MIB:.1f} MiB, "
        f"traced {(held - base) / MIB:.1f} MiB (budget {budget / MIB:.0f} MiB)"
    )
    assert (held - base) < budget * 1.1
    # the newest survive, oldest evicted first
    assert kept == [f"j{i}" for i in range(1000 - len(kept), 1000)]
    assert 50 <= len(kept) <= 64
    with pytest.raises(ServiceError) as exc:
        table.get("j0", None)
    assert exc.value.status == 404


def test_finished_job_count_is_capped_oldest_first() -> None:
    table = JobTable(JobSettings(max_finished_jobs=3))
    jobs = [FakeJob(f"j{i}") for i in range(5)]
    for job in jobs:
        table.admit(job, 10)
    for job in jobs:
        run_to_end(table, job, {"count": 0})
    assert [j.id for j in table] == ["j2", "j3", "j4"]


def test_running_jobs_are_never_evicted_and_inputs_count() -> None:
    table = JobTable(JobSettings(max_result_bytes=10 * MIB, max_finished_jobs=100, max_jobs=8))
    running = FakeJob("running")
    table.admit(running, 6 * MIB)
    done = FakeJob("done")
    table.admit(done, MIB)
    run_to_end(table, done, {"image": bytes(MIB)})
    # A 5 MiB upload does not fit beside the running job's 6 MiB: the finished job goes, and
    # still it does not fit, so the submit is refused (503, retry later).
    with pytest.raises(Unavailable) as exc:
        table.admit(FakeJob("big"), 5 * MIB)
    assert exc.value.status == 503
    assert [j.id for j in table] == ["running"]
    table.admit(FakeJob("small"), 3 * MIB)


def test_a_result_over_the_whole_budget_fails_the_job() -> None:
    table = JobTable(JobSettings(max_result_bytes=MIB))
    job = FakeJob("x")
    table.admit(job, 10)
    job.result, job.finished = {"image": bytes(2 * MIB)}, time.time()
    with pytest.raises(ServiceError) as exc:
        table.finish(job)
    assert (exc.value.status, exc.value.code) == (413, "result_too_large")
    assert job.result is None and table.held_bytes == 0


def test_active_jobs_are_capped() -> None:
    table = JobTable(JobSettings(max_jobs=2))
    table.admit(FakeJob("a"), 1)
    table.admit(FakeJob("b"), 1)
    with pytest.raises(Unavailable):
        table.admit(FakeJob("c"), 1)


def test_jobs_are_private_to_their_caller() -> None:
    table = JobTable(JobSettings())
    first, second = caller_id("key-one"), caller_id("key-two")
    assert first != second and "key-one" not in first
    mine = FakeJob("mine", owner=first)
    table.admit(mine, 1)
    table.admit(FakeJob("theirs", owner=second), 1)
    assert table.get("mine", first) is mine
    for caller in (second, None):  # another key, or no key at all
        with pytest.raises(ServiceError) as exc:
            table.get("mine", caller)
        assert exc.value.status == 404  # as if it did not exist
    assert [j.id for j in table.owned_by(first)] == ["mine"]
    assert [j.id for j in table.owned_by(second)] == ["theirs"]


def test_with_auth_off_nothing_is_listed_but_an_id_still_reads() -> None:
    table = JobTable(JobSettings())
    job = FakeJob("anon")
    table.admit(job, 1)
    assert table.owned_by(None) == []
    assert table.get("anon", None) is job


def test_ttl_expires_finished_jobs() -> None:
    table = JobTable(JobSettings(ttl_s=1))
    job = FakeJob("old")
    table.admit(job, 1)
    run_to_end(table, job, {"count": 0})
    job.finished = time.time() - 5
    with pytest.raises(ServiceError):
        table.get("old", None)
    assert table.held_bytes == 0


def test_nbytes_counts_payloads() -> None:
    assert nbytes({"image": bytes(MIB)}) >= MIB
    assert nbytes({"masks": [{"segmentation": {"counts": "x" * 1000}}] * 100}) >= 100_000
