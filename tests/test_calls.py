"""The shared call policy, and the jobs deployment answering failures as the direct path.

No Ray cluster: the model handles are stand-ins with the same call shape, and every
outcome is forced (a call that never ends, a full queue, a dead replica), not raced.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from serve_app.calls import call_model
from serve_app.config import AppSettings
from serve_app.errors import ServiceError
from serve_app.jobs import JobManager

# What Ray's own text carries: must never reach an answer.
INTERNAL = "10.1.2.3"


class Response:
    """A DeploymentResponse stand-in: awaited for its outcome, cancellable."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self):
        return self._run().__await__()

    async def _run(self) -> Any:
        if self.outcome == "hang":
            await asyncio.Event().wait()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


def died() -> ActorDiedError:
    """What a replica killed mid-call raises: its text names the pid, actor id and node IP."""
    from ray._raylet import ActorID
    from ray.core.generated.common_pb2 import ActorDiedErrorContext

    context = ActorDiedErrorContext(
        class_name="ServeReplica:visionserve:m",
        actor_id=ActorID.from_random().binary(),
        pid=4242,
        node_ip_address=INTERNAL,
        error_message="the worker exited",
    )
    err = ActorDiedError(context)
    assert INTERNAL in str(err) and "pid: 4242" in str(err)
    return err


class Calls:
    """`start` for call_model: hands out one scripted outcome per call."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.made: list[Response] = []

    def __call__(self) -> Response:
        self.made.append(Response(self.outcomes.pop(0)))
        return self.made[-1]


def run(calls: Calls, timeout_s: float = 5.0) -> Any:
    return asyncio.run(call_model("m", timeout_s, calls))


def refused(calls: Calls, timeout_s: float = 5.0) -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        run(calls, timeout_s)
    assert INTERNAL not in str(exc.value) and "pid" not in exc.value.message
    return exc.value


def test_an_answer_passes_through():
    assert run(Calls({"count": 1})) == {"count": 1}


def test_timeout_is_504_and_cancels_the_call():
    calls = Calls("hang")
    err = refused(calls, timeout_s=0.05)
    assert (err.status, err.code, err.retry_after_s) == (504, "timeout", None)
    assert "args.models.m.timeout_s" in err.message
    assert calls.made[0].cancelled


def test_full_queue_is_503_overloaded_with_retry_after():
    calls = Calls(BackPressureError(num_queued_requests=8, max_queued_requests=8))
    err = refused(calls)
    assert (err.status, err.code, err.retry_after_s) == (503, "overloaded", 2)
    assert len(calls.made) == 1  # an overload is not retried


@pytest.mark.parametrize("first", [died(), ActorUnavailableError(f"unreachable: {INTERNAL}", None)])
def test_a_dead_replica_is_retried_once(first):
    calls = Calls(first, {"count": 2})
    assert run(calls) == {"count": 2}
    assert len(calls.made) == 2


def test_a_second_death_is_503_replica_died_without_ray_text():
    calls = Calls(died(), died(), {"never": "reached"})
    err = refused(calls)
    assert (err.status, err.code, err.retry_after_s) == (503, "replica_died", 2)
    assert len(calls.made) == 2


def test_the_retry_shares_the_first_calls_deadline():
    calls = Calls(died(), "hang")
    err = refused(calls, timeout_s=0.1)
    assert err.code == "timeout" and calls.made[1].cancelled


# -- the jobs deployment uses the same policy ------------------------------------------------


class Method:
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def remote(self, *args: Any) -> Response:
        return self.calls()


class DetectorHandle:
    def __init__(self, *outcomes: Any) -> None:
        self.detect = Method(Calls(*outcomes))


def finished_job(*outcomes: Any, timeout_s: float = 5.0) -> tuple[Any, dict[str, Any]]:
    """Submit one detector job whose model calls end as `outcomes`; wait for it to end."""
    settings = AppSettings(models={"face-detect-opencv": {"timeout_s": timeout_s}})
    manager = JobManager.func_or_class(
        settings.model_dump(), {"face-detect-opencv": DetectorHandle(*outcomes)}
    )

    async def go() -> dict[str, Any]:
        view = await manager.submit("face-detect-opencv", b"img", {}, "json")
        await asyncio.gather(*manager._tasks)
        return view

    view = asyncio.run(go())
    return manager, (asyncio.run(manager.status(view["id"])))


def job_result_error(manager: Any, job_id: str) -> ServiceError:
    with pytest.raises(ServiceError) as exc:
        asyncio.run(manager.result(job_id))
    return exc.value


def test_a_job_that_times_out_fails_with_504():
    manager, view = finished_job("hang", timeout_s=0.05)
    assert view["status"] == "failed" and view["error"]["error"] == "timeout"
    assert view["error"]["status"] == 504
    err = job_result_error(manager, view["id"])
    assert (err.status, err.code) == (504, "timeout")


def test_a_job_on_a_full_queue_fails_as_the_direct_path():
    manager, view = finished_job(BackPressureError(num_queued_requests=1, max_queued_requests=1))
    err = job_result_error(manager, view["id"])
    assert (err.status, err.code, err.retry_after_s) == (503, "overloaded", 2)


def test_a_job_survives_one_replica_death():
    manager, view = finished_job(died(), {"count": 0, "faces": []})
    assert view["status"] == "done", view
    assert asyncio.run(manager.result(view["id"]))["result"] == {"count": 0, "faces": []}


def test_a_job_whose_replica_dies_twice_is_503_without_ray_text():
    manager, view = finished_job(died(), died())
    assert view["error"]["error"] == "replica_died" and INTERNAL not in str(view["error"])
    assert job_result_error(manager, view["id"]).status == 503


def test_an_internal_job_error_keeps_its_text_in_the_log(caplog):
    manager, view = finished_job(RuntimeError(f"cv2 failed in /opt/build {INTERNAL}"))
    assert view["error"]["error"] == "internal" and view["error"]["status"] == 500
    assert INTERNAL not in str(view) and "/opt/build" not in str(view)
    assert job_result_error(manager, view["id"]).status == 500
    assert INTERNAL in caplog.text  # ... but the operator finds it
