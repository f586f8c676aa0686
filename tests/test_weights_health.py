"""On KubeRay a model whose weights are missing must keep the Serve app from RUNNING (so the
RayService is not Ready), and the app must come up by itself once the weights Job has put the
files in place. Real Ray Serve, the real pigo detector deployment, its real weight file from
../shared (tests/conftest.py's session Serve; an application of its own, removed afterwards).
"""

from __future__ import annotations

import time

import pytest
from helpers import PICO

APP = "vs-weights-health"


@pytest.mark.slow
def test_missing_weights_keep_the_app_from_running_until_fetched(service, tmp_path):
    # `service`, not just `ray_session`: Serve must already run with the session's HTTP
    # options (started here first, it would take the default port 8000 for every test after).
    from ray import serve

    from serve_app.deployments.base import REQUIRE_WEIGHTS_ENV
    from serve_app.models import weights
    from serve_app.registry import MODELS

    if not (PICO / "facefinder").exists():
        pytest.skip(f"{PICO}/facefinder is absent: the shared test data is not here")
    model_dir = tmp_path / "models"  # the weights volume, still empty
    model_dir.mkdir()
    detector = (
        MODELS["face-detect-pigo"]
        .deployment_class()
        .options(
            name="face-detect-pigo",
            health_check_period_s=1,
            health_check_timeout_s=10,
            # What kuberay/generate.py sets on the worker pods. A tiny CPU share: the session's
            # service already holds nearly all of the test Ray's 2 CPUs.
            ray_actor_options={
                "num_cpus": 0.01,
                "runtime_env": {"env_vars": {REQUIRE_WEIGHTS_ENV: "1"}},
            },
        )
    )
    app = detector.bind("face-detect-pigo", {"weights": "facefinder"}, str(model_dir), 10**6)
    # Not serve.run: it would wait for RUNNING, which is what must not happen yet.
    from ray.serve.api import _run

    _run(app, name=APP, route_prefix=f"/{APP}", _blocking=False)
    try:
        seen = set()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP)
            if status is not None:
                seen.add(str(status.status))
                assert status.status != "RUNNING", "RUNNING without its weights"
                # Failed for good would never recover when the Job is done.
                assert status.status != "DEPLOY_FAILED", status.message
            time.sleep(1)
        assert seen == {"ApplicationStatus.DEPLOYING"}, seen

        # The Job fills the volume: the next replica passes its health check.
        weights.fetch(["facefinder"], model_dir=model_dir, from_dir=PICO, progress=False)
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP)
            if status is not None and status.status == "RUNNING":
                break
            time.sleep(1)
        assert status is not None and status.status == "RUNNING", (seen, status)
    finally:
        serve.delete(APP)
