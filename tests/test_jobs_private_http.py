"""Jobs with auth on, over HTTP: private to the key that submitted them, bounded in bytes.

The session service runs without a key, so this file deploys a second, small application
next to it on the same Serve (router + jobs + one Haar detector, under /keys) whose router
reads two keys from its own environment variable. It also checks that a router required to
have a key refuses to start without one, and, in a third app, that callback deliveries in
flight never exceed `jobs.max_callbacks`.
"""

from __future__ import annotations

import http.server as http_server
import threading
import time

import httpx
import pytest
from helpers import TEST_IMAGE_HOST, shared_file

KEYS_APP, PREFIX, KEY_ENV = "vs-keys", "/keys", "VS_TEST_KEYS"
KEY_ONE, KEY_TWO = "key-one-Abc123", "key-two-Xyz789"
MODEL = "face-detect-opencv"
JOBS_BUDGET = 8 * 2**20  # jobs.max_result_bytes of this app
JOBS_MEMORY = 512 * 2**20


def small_app(
    app_name: str,
    env: dict[str, str],
    require: bool,
    max_result_bytes: int,
    jobs: dict | None = None,
):
    from serve_app.config import parse_app_settings
    from serve_app.jobs import JobManager
    from serve_app.registry import MODELS
    from serve_app.router import Router

    args = {
        "api_key_env": KEY_ENV,
        "require_api_key": require,
        "fetch_allow_hosts": [TEST_IMAGE_HOST],
        "jobs": {"max_result_bytes": max_result_bytes, "max_finished_jobs": 100, **(jobs or {})},
        "models": {MODEL: {"timeout_s": 60}},
    }
    plain = parse_app_settings(args).model_dump()
    small = {"num_cpus": 0.02, "memory": JOBS_MEMORY}
    detector = (
        MODELS[MODEL]
        .deployment_class()
        .options(name=MODEL, ray_actor_options=small, max_ongoing_requests=4)
        .bind(MODEL, {}, None, 50_000_000)
    )
    handles = {MODEL: detector}
    jobs = JobManager.options(name="jobs", ray_actor_options=small).bind(plain, handles)
    return Router.options(
        name="router",
        ray_actor_options={**small, "runtime_env": {"env_vars": env}},
    ).bind(plain, handles, jobs)


def wait_status(app_name: str, timeout_s: float = 180) -> tuple[str, str]:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status in ("RUNNING", "DEPLOY_FAILED"):
            # The app says which deployment failed; the deployment says why.
            why = " ".join(d.message for d in status.deployments.values())
            return status.status, f"{status.message} {why}"
        time.sleep(0.5)
    raise TimeoutError(f"{app_name} neither running nor failed after {timeout_s} s")


@pytest.fixture(scope="module")
def keys_app(service):
    from ray import serve

    app = small_app(KEYS_APP, {KEY_ENV: f"{KEY_ONE},{KEY_TWO}"}, True, JOBS_BUDGET)
    serve._run(app, name=KEYS_APP, route_prefix=PREFIX, _blocking=False)
    state, message = wait_status(KEYS_APP)
    assert state == "RUNNING", message
    with httpx.Client(base_url=service["url"] + PREFIX, timeout=120) as client:
        yield client
    serve.delete(KEYS_APP)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def poll(client: httpx.Client, job_id: str, key: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if view.get("status") in ("done", "failed"):
            return view
        time.sleep(0.2)
    raise TimeoutError(job_id)


def test_a_second_key_cannot_list_or_read_the_first_keys_jobs(keys_app):
    sample = shared_file("images", "pigo_sample.jpg").read_bytes()
    assert keys_app.post(f"/v1/jobs/{MODEL}", content=sample).status_code == 401
    r = keys_app.post(f"/v1/jobs/{MODEL}", content=sample, headers=auth(KEY_ONE))
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert poll(keys_app, job, KEY_ONE)["status"] == "done"

    mine = keys_app.get("/v1/jobs", headers=auth(KEY_ONE)).json()["jobs"]
    assert [j["id"] for j in mine] == [job]
    assert keys_app.get("/v1/jobs", headers=auth(KEY_TWO)).json()["jobs"] == []
    for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/result"):
        r = keys_app.get(path, headers=auth(KEY_TWO))
        assert r.status_code == 404 and r.json()["error"] == "unknown_job", r.text
        assert keys_app.get(path).status_code == 401
    r = keys_app.get(f"/v1/jobs/{job}/result", headers=auth(KEY_ONE))
    assert r.status_code == 200 and r.json()["count"] == 1, r.text


def test_stored_results_stay_within_the_jobs_budget(keys_app):
    """PNG answers of truck.jpg are ~4 MiB each: 12 of them are 6x the 8 MiB budget."""
    from ray import serve

    truck = shared_file("images", "truck.jpg").read_bytes()
    ids = []
    for _ in range(12):
        r = keys_app.post(f"/v1/jobs/{MODEL}?format=png", content=truck, headers=auth(KEY_ONE))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        poll(keys_app, ids[-1], KEY_ONE)  # one at a time: the table holds finished results
    stats = serve.get_deployment_handle("jobs", KEYS_APP).stats.remote().result(timeout_s=30)
    print(
        f"\n12 PNG results: the jobs table holds {stats['jobs']} jobs, "
        f"{stats['held_bytes'] / 2**20:.1f} MiB (budget {JOBS_BUDGET / 2**20:.0f} MiB); "
        f"replica peak RSS {stats['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    assert stats["held_bytes"] <= JOBS_BUDGET
    assert stats["peak_rss_bytes"] < JOBS_MEMORY
    # The newest result is there, the oldest was evicted (404 as for an unknown job).
    assert keys_app.get(f"/v1/jobs/{ids[-1]}/result", headers=auth(KEY_ONE)).status_code == 200
    assert keys_app.get(f"/v1/jobs/{ids[0]}/result", headers=auth(KEY_ONE)).status_code == 404


def test_a_router_that_requires_a_key_does_not_start_without_one(service):
    from ray import serve

    name = "vs-nokey"
    app = small_app(name, {KEY_ENV: ""}, True, JOBS_BUDGET)
    serve._run(app, name=name, route_prefix="/nokey", _blocking=False)
    try:
        state, message = wait_status(name)
        assert state == "DEPLOY_FAILED", message
        assert "require_api_key" in message and KEY_ENV in message, message
    finally:
        serve.delete(name)


# -- callbacks in flight ------------------------------------------------------------------
CALLBACKS_APP, CALLBACKS_PREFIX, MAX_CALLBACKS = "vs-callbacks", "/cbcap", 3


class SlowReceiver:
    """A loopback callback receiver that holds every delivery until the test opens its gate,
    counting the deliveries open at once: what `jobs.max_callbacks` must bound."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.open = self.peak = self.total = 0
        self.call_ids: list[str] = []
        receiver = self

        class Handler(http_server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.open += 1
                    receiver.total += 1
                    receiver.peak = max(receiver.peak, receiver.open)
                    receiver.call_ids.append(self.headers.get("X-Call-Id", ""))
                try:
                    receiver.gate.wait(120)
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with receiver.lock:
                        receiver.open -= 1

            def log_message(self, *args):
                pass

        self.server = http_server.ThreadingHTTPServer((TEST_IMAGE_HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{TEST_IMAGE_HOST}:{self.server.server_address[1]}/cb"
        threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True).start()

    def counts(self) -> tuple[int, int, int]:
        with self.lock:
            return self.open, self.peak, self.total

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def callbacks_app(service):
    from ray import serve

    jobs = {"max_callbacks": MAX_CALLBACKS, "callback_timeout_s": 120, "callback_retries": 0}
    app = small_app(CALLBACKS_APP, {KEY_ENV: ""}, False, JOBS_BUDGET, jobs=jobs)
    serve._run(app, name=CALLBACKS_APP, route_prefix=CALLBACKS_PREFIX, _blocking=False)
    state, message = wait_status(CALLBACKS_APP)
    assert state == "RUNNING", message
    with httpx.Client(base_url=service["url"] + CALLBACKS_PREFIX, timeout=120) as client:
        yield client
    serve.delete(CALLBACKS_APP)


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(0.05)


def test_callbacks_in_flight_never_exceed_max_callbacks(callbacks_app):
    """8 finished jobs, a receiver that holds every delivery: exactly 3 (jobs.max_callbacks)
    are open while the other 5 wait their turn; once it answers, all 8 are delivered."""
    receiver = SlowReceiver()
    try:
        sample = shared_file("images", "pigo_sample.jpg").read_bytes()
        ids = []
        for _ in range(8):
            r = callbacks_app.post(
                f"/async-function/{MODEL}", content=sample, headers={"X-Callback-Url": receiver.url}
            )
            assert r.status_code == 202, r.text
            ids.append(r.headers["X-Call-Id"])

        def views() -> list[dict]:
            return [callbacks_app.get(f"/v1/jobs/{i}").json() for i in ids]

        wait_for(lambda: all(v["status"] == "done" for v in views()), 120, "jobs not done")
        wait_for(lambda: receiver.counts()[0] >= MAX_CALLBACKS, 60, "no delivery came")
        time.sleep(1.0)  # room for a delivery over the cap to show up
        held = receiver.counts()
        print(f"\n8 jobs done, receiver held: open {held[0]}, peak {held[1]}, seen {held[2]}")
        assert held == (MAX_CALLBACKS, MAX_CALLBACKS, MAX_CALLBACKS)
        assert all(v["callback"] is None for v in views())  # none given up: queued, not dropped

        receiver.gate.set()
        wait_for(lambda: all(v["callback"] for v in views()), 120, "callbacks not all delivered")
        open_, peak, total = receiver.counts()
        assert (open_, peak, total) == (0, MAX_CALLBACKS, 8)
        assert sorted(receiver.call_ids) == sorted(ids)
        assert {v["callback"] for v in views()} == {"delivered"}
    finally:
        receiver.close()
