"""Faults: a replica killed under load, concurrency on one replica, and overload far past capacity.

Everything runs against the session service (one replica per deployment in the test config)
on loopback, with bounded client counts and durations. The test process is a driver of the
same Ray, so it can read the controller's view of the replicas and kill one of their actors.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest
from helpers import replica_details, running_replicas, shared_file

CNN = "cnn-face-detection"
CNN_ROUTE = f"/v1/detect/{CNN}"


def wait_for(predicate, timeout_s: float, interval_s: float = 0.25) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval_s)
    return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Call:
    start: float  # seconds since the load began
    seconds: float
    status: int  # 599: no HTTP answer at all (connection dropped)
    error: str = ""
    retry_after: str | None = None
    json_error: bool = False  # the body is the API's {"error", "detail"}


@pytest.fixture(scope="module")
def sample() -> bytes:
    return shared_file("images", "pigo_sample.jpg").read_bytes()


@pytest.fixture(scope="module")
def cnn_ready(service, http, sample) -> None:
    r = http.post(CNN_ROUTE, content=sample)
    assert r.status_code == 200, r.text


def post_loop(
    base_url: str,
    data: bytes,
    t0: float,
    stop: threading.Event,
    calls: list[Call],
    pause_s: float = 0.0,
) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                r = client.post(CNN_ROUTE, content=data)
                status, error = r.status_code, ("" if r.status_code == 200 else r.text[:160])
            except httpx.HTTPError as err:
                status, error = 599, repr(err)[:160]
            calls.append(Call(start - t0, time.monotonic() - start, status, error))
            if pause_s:
                stop.wait(pause_s)


# -- a replica killed under steady load -----------------------------------------------------


@pytest.mark.slow
def test_replica_killed_under_load_is_replaced(service, http, sample, cnn_ready):
    import ray

    clients, load_s, kill_at_s = 3, 18.0, 5.0
    before = replica_details()[CNN]
    assert len(before) == 1, before
    victim = before[0]
    calls: list[Call] = []
    stop = threading.Event()
    t0 = time.monotonic()
    threads = [
        threading.Thread(
            target=post_loop, args=(service["url"], sample, t0, stop, calls), daemon=True
        )
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    time.sleep(kill_at_s)
    ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)
    killed_at = time.monotonic() - t0

    def replaced() -> bool:
        return any(r != victim["replica_id"] for r in running_replicas().get(CNN, ()))

    back_after = wait_for(replaced, timeout_s=60)
    remaining = load_s - (time.monotonic() - t0)
    if remaining > 0:
        time.sleep(remaining)
    stop.set()
    for t in threads:
        t.join(timeout=70)

    ok = [c for c in calls if c.status == 200]
    failed = [c for c in calls if c.status != 200]
    rate = len(ok) / len(calls)
    in_flight = [c for c in calls if c.start < killed_at < c.start + c.seconds]
    print(
        f"\nreplica kill: {len(calls)} requests from {clients} clients over {load_s:.0f} s; "
        f"killed {victim['replica_id']} at {killed_at:.1f} s; new replica RUNNING "
        f"{back_after if back_after is None else round(back_after, 1)} s after the kill; "
        f"2xx {len(ok)} ({rate:.1%}); failures {Counter(c.status for c in failed)}"
    )
    for c in failed:
        print(f"  t={c.start:5.1f}s +{c.seconds:.2f}s {c.status} {c.error}")
    slowest = max(calls, key=lambda c: c.seconds)
    print(
        f"  slowest answer {slowest.seconds:.1f} s (sent at t={slowest.start:.1f} s); "
        f"in flight at the kill: {len(in_flight)}, answered "
        f"{dict(Counter(c.status for c in in_flight))}"
    )

    assert back_after is not None, "Serve did not bring the replica back within 60 s"
    now = running_replicas()[CNN]
    assert len(now) == 1 and victim["replica_id"] not in now
    for _ in range(3):
        r = http.post(CNN_ROUTE, content=sample)
        assert r.status_code == 200 and r.json()["count"] == 1
    assert rate >= 0.99, f"only {rate:.1%} of requests succeeded across the replica kill"


# -- concurrent calls into one replica --------------------------------------------------------

# Runs in a fresh interpreter: a data race in native code may segfault, which must fail one
# test, not take the whole session down.
CONCURRENCY_SCRIPT = """
import asyncio, sys
import cv2, numpy as np
from serve_app.registry import MODELS

name, model_dir, path = sys.argv[1:4]
deployment = MODELS[name].deployment_class().func_or_class(name, {}, model_dir, 50_000_000)
sample = cv2.imread(path)
images = [cv2.imencode(".jpg", cv2.resize(sample, size))[1].tobytes()
          for size in ((320, 400), (120, 150), (640, 800), (64, 80))]

async def main():
    expected = [(await deployment.detect(data, {}))["count"] for data in images]
    wrong = 0
    for round in range(4):
        # As Serve does with max_ongoing_requests > 1: several calls in flight at once.
        calls = [deployment.detect(images[(round + i) % 4], {}) for i in range(8)]
        results = await asyncio.gather(*calls)
        wrong += sum(r["count"] != expected[(round + i) % 4] for i, r in enumerate(results))
    print("wrong answers:", wrong)
    sys.exit(1 if wrong else 0)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    "model",
    [
        "face-detect-opencv",
        "basic-face-detection",
        CNN,
        "face-detect-pigo",
        "yunet-face-detection",
    ],  # cv2.FaceDetectorYN keeps per-input-size state too
)
def test_concurrent_calls_share_one_model_safely(model_dir, model):
    """A replica's concurrent requests share its model object: answers stay right, no crash.

    Without the per-instance model lock (bd90c6b) this failed every run for the OpenCV
    models: cv2.error from detectMultiScale/dnn forward, or an abort.
    """
    import subprocess
    import sys
    from pathlib import Path

    path = shared_file("images", "pigo_sample.jpg")
    out = subprocess.run(
        [sys.executable, "-c", CONCURRENCY_SCRIPT, model, str(model_dir), str(path)],
        capture_output=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
    )
    tail = (out.stdout + out.stderr).decode(errors="replace").strip().splitlines()[-3:]
    print(f"\n{model}: exit {out.returncode}; {tail}")
    assert out.returncode == 0, f"exit {out.returncode} (-11: segfault): {tail}"


# -- overload ---------------------------------------------------------------------------------


# Each overload request holds the cnn model this long (a test-only parameter the test config
# enables), so the replica serves at most 1/SERVICE_S requests a second on any machine: the
# queue is still full when the probes arrive, however fast the CPU.
SERVICE_S = 0.5


async def overload(
    base_url: str, data: bytes, fill: int, probes: int, waves: int
) -> tuple[list[Call], list[Call]]:
    """`fill` requests at once, then, with the queue full, `probes` more in `waves` waves.

    The fill burst measures what a sudden spike gets; the probes measure what a client gets
    from a service that is already saturated, the case shedding exists for.
    """
    n = fill + probes
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url, timeout=90, limits=limits) as client:
        t0 = time.monotonic()

        async def one() -> Call:
            start = time.monotonic()
            try:
                r = await client.post(CNN_ROUTE, content=data, params={"test_delay_s": SERVICE_S})
            except httpx.HTTPError as err:
                return Call(start - t0, time.monotonic() - start, 599, repr(err)[:160])
            return Call(
                start - t0,
                time.monotonic() - start,
                r.status_code,
                "" if r.status_code == 200 else r.text[:160],
                r.headers.get("retry-after"),
                is_json_error(r),
            )

        burst = [asyncio.create_task(one()) for _ in range(fill)]
        await asyncio.sleep(3.0)  # the spike's 503s are out; the admitted ones queue
        probed = []
        for _ in range(waves):  # fired without waiting for answers: the queue stays full
            probed += [asyncio.create_task(one()) for _ in range(probes // waves)]
            await asyncio.sleep(0.25)
        return list(await asyncio.gather(*burst)), list(await asyncio.gather(*probed))


def is_json_error(r: httpx.Response) -> bool:
    if not r.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and set(body) == {"error", "detail", "request_id"}


def describe(title: str, calls: list[Call]) -> str:
    statuses = Counter(c.status for c in calls)
    shed = [c.seconds for c in calls if c.status == 503]
    ok = [c.seconds for c in calls if c.status == 200]
    line = f"  {title}: {len(calls)} sent; status {dict(sorted(statuses.items()))}"
    if shed:
        line += (
            f"; 503 answer time p50 {percentile(shed, 0.5):.3f} s, "
            f"p95 {percentile(shed, 0.95):.3f} s, max {max(shed):.3f} s"
        )
    if ok:
        line += (
            f"; 2xx answer time p50 {percentile(ok, 0.5):.1f} s, "
            f"p95 {percentile(ok, 0.95):.1f} s, max {max(ok):.1f} s"
        )
    return line


@pytest.mark.slow
def test_overload_sheds_fast_503s(service, http, sample, cnn_ready):
    """~3x what one cnn replica admits (8 ongoing + 32 queued): the rest get quick 503s.

    Deterministic: every request holds the model SERVICE_S (one at a time), so the replica
    frees at most 1 / SERVICE_S places a second however fast the machine, and the probes
    (sent from 3 s to 3.75 s) meet a full queue. Measured: 48-59 of the 64 probes shed, while
    the places freed by then were at most ~8; Serve's queue limit admits more than that bound
    now and then (once a whole wave of 16), so the test asserts the margin it had, half.
    """
    fill, probes = 64, 64
    before = running_replicas()
    t0 = time.monotonic()
    burst, probed = asyncio.run(overload(service["url"], sample, fill, probes, waves=4))
    calls = burst + probed
    wall = time.monotonic() - t0
    by_status = Counter(c.status for c in calls)
    print(
        f"\noverload: {len(calls)} requests to {CNN} (1 replica, admits 8 + 32) in "
        f"{wall:.1f} s: 2xx {by_status[200]}, 503 {by_status[503]}, other "
        f"{ {s: n for s, n in by_status.items() if s not in (200, 503)} }"
    )
    print(describe("spike of 64 at once", burst))
    print(describe("64 more while saturated, 4 waves of 16 at 0.25 s", probed))
    for c in [c for c in calls if c.status not in (200, 503)][:5]:
        print(f"  other: t={c.start:.1f}s +{c.seconds:.1f}s {c.status} {c.error}")

    shed = [c for c in calls if c.status == 503]
    # A 504 is an admitted request that waited past the model's timeout_s in the queue: the
    # queue is deeper than this machine drains in time, not a failure to shed.
    assert set(by_status) <= {200, 503, 504}, by_status
    assert shed and by_status[200] >= 8, by_status
    bare = [c for c in shed if not (c.retry_after and c.retry_after.isdigit() and c.json_error)]
    assert not bare, f"{len(bare)} 503s without JSON or Retry-After, e.g. {bare[0].error!r}"
    probe_shed = [c.seconds for c in probed if c.status == 503]
    decided = max((c.start + c.seconds for c in probed if c.status == 503), default=0.0)
    print(
        f"  probes decided by t={decided:.1f} s: the model freed at most "
        f"{int(decided / SERVICE_S) + 1} places by then"
    )
    assert len(probe_shed) >= probes // 2, "a saturated service must shed most new requests"
    # Fast means well under a second on a quiet machine (0.25 s measured at load 13); on a
    # shared 2-core box at load 20+ everything slows, so: or 5x faster than being served.
    served_p50 = percentile([c.seconds for c in calls if c.status == 200], 0.5)
    limit = max(1.0, served_p50 / 5)
    assert percentile(probe_shed, 0.95) < limit, (
        f"503s must be fast (p95 < {limit:.1f} s): they are the point of shedding"
    )
    assert running_replicas() == before, "a replica died under overload"
    r = http.post(CNN_ROUTE, content=sample)
    assert r.status_code == 200 and r.json()["count"] == 1
