"""Every metric the service exports, in one table, and the hooks that record them.

Metrics are Ray Serve metrics (`ray.serve.metrics`): each process that records one sends it
to its node's metrics agent, which serves them all in Prometheus text on Ray's metrics
export port (`ray start --metrics-export-port`, KubeRay's `metrics` port 8080) as
`ray_<name>`, counters with a `_total` suffix. Serve adds `deployment`, `replica` and
`application` labels; the labels below are ours, each with a small fixed set of values
(model names, route templates, error codes), never anything a caller can choose freely.

Who records what:
- the router's middleware (`serve_app.access`): requests, latency, refusals, bytes in;
- the router's call policy (`observe_model_call`): the model call as the router sees it;
- model replicas (`record_answer`): decode/inference/render times, faces or masks, megapixels;
- URL fetching (`observe_fetch`): fetches by outcome;
- the jobs deployment (`watch_jobs`, `record_job`): queue depth, oldest job age, outcomes.

Recording never raises: a metrics failure is logged once and the request goes on. Outside
Ray (unit tests, the CLI) the hooks do nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger("ray.serve")

# Seconds: from a cached detector answer (ms) to a 10-minute SAM job.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Whole counts: Ray refuses a 0 boundary, so le="0.5" is "none found", le="1.5" "one", ...
COUNT_BUCKETS = (0.5, 1.5, 2.5, 4.5, 8.5, 16.5, 32.5, 64.5, 128.5, 256.5, 512.5)
MEGAPIXEL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 25.0, 50.0)
FETCH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_GAUGE_PERIOD_S = 2.0  # an age gauge is only as fresh as its last refresh

Kind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus sees (Ray prefixes `ray_`; counters end in `_total`)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


METRICS: tuple[MetricDef, ...] = (
    # -- router: one observation per HTTP request -------------------------------------------
    MetricDef(
        "visionserve_requests",
        "counter",
        "HTTP requests answered by the router",
        ("route", "model", "status"),
    ),
    MetricDef(
        "visionserve_request_seconds",
        "histogram",
        "Router time per request, from its arrival to its last answer chunk",
        ("route", "model", "status"),
        LATENCY_BUCKETS,
    ),
    MetricDef(
        "visionserve_refusals",
        "counter",
        "Requests answered 4xx/5xx, by the `error` code of the JSON body",
        ("route", "model", "status", "reason"),
    ),
    MetricDef(
        "visionserve_request_bytes", "counter", "Request body bytes received", ("route", "model")
    ),
    # -- router -> model ---------------------------------------------------------------------
    MetricDef(
        "visionserve_model_call_seconds",
        "histogram",
        "Model deployment call as the router sees it: queueing, transfer and the replica",
        ("model", "method", "outcome"),
        LATENCY_BUCKETS,
    ),
    # -- model replicas ---------------------------------------------------------------------
    MetricDef(
        "visionserve_stage_seconds",
        "histogram",
        "Time inside a model replica by stage (decode, inference, render, total)",
        ("model", "stage"),
        LATENCY_BUCKETS,
    ),
    MetricDef(
        "visionserve_objects_per_answer",
        "histogram",
        "Faces (detectors) or masks (segmenters) in one answer",
        ("model", "kind"),
        COUNT_BUCKETS,
    ),
    MetricDef(
        "visionserve_input_megapixels",
        "histogram",
        "Decoded input image size in megapixels",
        ("model",),
        MEGAPIXEL_BUCKETS,
    ),
    # -- URL inputs -------------------------------------------------------------------------
    MetricDef(
        "visionserve_url_fetches",
        "counter",
        "Image URL fetches by outcome (`ok` or the refusal's error code)",
        ("result",),
    ),
    MetricDef(
        "visionserve_url_fetch_seconds",
        "histogram",
        "Image URL fetch time, redirects included",
        ("result",),
        FETCH_BUCKETS,
    ),
    # -- jobs -------------------------------------------------------------------------------
    MetricDef(
        "visionserve_jobs",
        "gauge",
        "Jobs not finished, by model and state (queued, running)",
        ("model", "state"),
    ),
    MetricDef(
        "visionserve_job_oldest_age_seconds",
        "gauge",
        "Age of the oldest job in a state (0 when none)",
        ("state",),
    ),
    MetricDef(
        "visionserve_jobs_finished",
        "counter",
        "Finished jobs by outcome (`done` or the error code)",
        ("model", "result"),
    ),
    MetricDef(
        "visionserve_job_seconds",
        "histogram",
        "Job run time, start to result",
        ("model",),
        LATENCY_BUCKETS,
    ),
    # -- freshness --------------------------------------------------------------------------
    MetricDef(
        "visionserve_last_event_timestamp_seconds",
        "gauge",
        "Unix time of the last request (router), answer (replica) or finished job, "
        "per model: `time() - max by (model) (...)` is how long a model has been idle",
        ("source", "model"),
    ),
)
BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}
JOB_STATES = ("queued", "running")

_instances: dict[str, Any] = {}
_create_lock = threading.Lock()
_failed: set[str] = set()


def error_code(err: BaseException) -> str:
    """The stable code of a `ServiceError`; `internal` for anything else."""
    return str(getattr(err, "code", None) or "internal")


def _enabled() -> bool:
    import ray

    return ray.is_initialized()


def _metric(name: str) -> Any:
    """The process's instance of a metric, made on first use.

    Made lazily, not at import: the driver imports this module too, and Serve adds its
    deployment/replica labels only to metrics made inside a replica.
    """
    inst = _instances.get(name)
    if inst is None:
        with _create_lock:
            inst = _instances.get(name)
            if inst is None:
                from ray.serve import metrics as serve_metrics

                d = BY_NAME[name]
                if d.kind == "counter":
                    inst = serve_metrics.Counter(d.name, d.description, tag_keys=d.tags)
                elif d.kind == "gauge":
                    inst = serve_metrics.Gauge(d.name, d.description, tag_keys=d.tags)
                else:
                    inst = serve_metrics.Histogram(
                        d.name, d.description, boundaries=list(d.buckets), tag_keys=d.tags
                    )
                _instances[name] = inst
    return inst


def _record(name: str, value: float, **tags: Any) -> None:
    if not _enabled():
        return
    try:
        metric = _metric(name)
        labels = {k: str(v) for k, v in tags.items()}
        kind = BY_NAME[name].kind
        if kind == "counter":
            if value > 0:  # Ray refuses inc(0)
                metric.inc(value, tags=labels)
        elif kind == "gauge":
            metric.set(value, tags=labels)
        else:
            metric.observe(value, tags=labels)
    except Exception:  # metrics must never fail a request
        if name not in _failed:
            _failed.add(name)
            log.warning("metric %s could not be recorded", name, exc_info=True)


# -- router ----------------------------------------------------------------------------------
def record_request(
    route: str, model: str, status: int, code: str | None, seconds: float, bytes_in: int
) -> None:
    """One finished HTTP request (called by the router's middleware)."""
    _record("visionserve_requests", 1, route=route, model=model, status=status)
    _record("visionserve_request_seconds", seconds, route=route, model=model, status=status)
    _record("visionserve_request_bytes", bytes_in, route=route, model=model)
    _record("visionserve_last_event_timestamp_seconds", time.time(), source="request", model=model)
    if status >= 400:
        _record(
            "visionserve_refusals",
            1,
            route=route,
            model=model,
            status=status,
            reason=code or f"http_{status}",
        )


def record_model_call(model: str, method: str, outcome: str, seconds: float) -> None:
    _record("visionserve_model_call_seconds", seconds, model=model, method=method, outcome=outcome)


# -- model replicas --------------------------------------------------------------------------
def record_answer(model: str, kind: str, result: dict[str, Any]) -> None:
    """A replica's answer: its stage times (`timing_ms`), objects found and input size."""
    for stage, ms in (result.get("timing_ms") or {}).items():
        _record("visionserve_stage_seconds", float(ms) / 1e3, model=model, stage=stage)
    if "count" in result:
        objects = "faces" if kind == "detector" else "masks"
        _record("visionserve_objects_per_answer", int(result["count"]), model=model, kind=objects)
    if "width" in result and "height" in result:
        megapixels = int(result["width"]) * int(result["height"]) / 1e6
        _record("visionserve_input_megapixels", megapixels, model=model)
    _record("visionserve_last_event_timestamp_seconds", time.time(), source="answer", model=model)


# -- URL inputs ------------------------------------------------------------------------------
def observe_fetch(fetch: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates the async URL fetch: counts each fetch by outcome and times it."""

    @functools.wraps(fetch)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = "internal"
        try:
            data = await fetch(*args, **kwargs)
            result = "ok"
            return data
        except Exception as err:
            result = error_code(err)
            raise
        finally:
            _record("visionserve_url_fetches", 1, result=result)
            _record("visionserve_url_fetch_seconds", time.perf_counter() - t0, result=result)

    return wrapper


# -- jobs ------------------------------------------------------------------------------------
_jobs_seen: set[tuple[str, str]] = set()
_watcher: asyncio.Task | None = None


def refresh_jobs(jobs: Iterable[Any], now: float | None = None) -> None:
    """Set the job gauges from the job table (objects with model, status, created)."""
    now = time.time() if now is None else now
    counts: dict[tuple[str, str], int] = {}
    oldest: dict[str, float] = dict.fromkeys(JOB_STATES, now)
    for job in jobs:
        state = getattr(job, "status", None)
        if state not in JOB_STATES:
            continue
        key = (str(job.model), state)
        counts[key] = counts.get(key, 0) + 1
        oldest[state] = min(oldest[state], float(job.created))
    # Series once seen are set back to 0, so a drained queue reads 0, not its last depth.
    for key in _jobs_seen | set(counts):
        _record("visionserve_jobs", counts.get(key, 0), model=key[0], state=key[1])
    _jobs_seen.update(counts)
    for state, created in oldest.items():
        _record("visionserve_job_oldest_age_seconds", max(0.0, now - created), state=state)


def watch_jobs(snapshot: Callable[[], Iterable[Any]]) -> None:
    """Refresh the job gauges now, and every few seconds from a task started on first use.

    Called by the jobs deployment on each submit (one table per process: one replica).
    """
    global _watcher
    if not _enabled():
        return
    refresh_jobs(snapshot())
    if _watcher is None or _watcher.done():
        _watcher = asyncio.get_running_loop().create_task(_refresh_every(snapshot))


async def _refresh_every(snapshot: Callable[[], Iterable[Any]]) -> None:
    while True:
        await asyncio.sleep(JOB_GAUGE_PERIOD_S)
        try:
            refresh_jobs(snapshot())
        except Exception:  # keep refreshing: a bad row must not freeze the gauges
            log.warning("job gauges: refresh failed", exc_info=True)


def record_job(job: Any) -> None:
    """A finished job: its outcome and run time."""
    error = getattr(job, "error", None) or {}
    result = "done" if getattr(job, "status", None) == "done" else error.get("error", "failed")
    _record("visionserve_jobs_finished", 1, model=job.model, result=result)
    started, finished = getattr(job, "started", None), getattr(job, "finished", None)
    if started and finished:
        _record("visionserve_job_seconds", finished - started, model=job.model)
    _record("visionserve_last_event_timestamp_seconds", time.time(), source="job", model=job.model)
