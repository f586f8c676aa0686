"""What every model deployment shares: options, threads, weights and the `info()` answer.

Deployments know nothing of HTTP: they take bytes and parameters and return plain data,
raising `ServiceError` (4xx for the caller's mistakes, `Unavailable` 503 for missing weights).
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from typing import Any

import cv2
import ray

from serve_app.config import cpu_threads, validate_options
from serve_app.errors import Unavailable
from serve_app.inputs.decode import check_opencv_limit, opencv_pixel_limit
from serve_app.models import weights
from serve_app.registry import MODELS

log = logging.getLogger("ray.serve")
REQUIRE_WEIGHTS_ENV = "VISIONSERVE_REQUIRE_WEIGHTS"


class ModelDeployment:
    def __init__(
        self, name: str, options: dict[str, Any], model_dir: str | None, max_pixels: int
    ) -> None:
        self.name = name
        self.spec = MODELS[name]
        self.options: Any = validate_options(name, options)
        self.model_dir = model_dir
        self.max_pixels = max_pixels
        check_opencv_limit(max_pixels)
        self.resources = _assigned_resources()
        self.threads = self.options.threads or cpu_threads(self.resources.get("CPU"))
        cv2.setNumThreads(self.threads)
        self.model: Any = None
        self._load_lock = threading.Lock()
        if os.environ.get(REQUIRE_WEIGHTS_ENV) == "1":
            _wait_for(self.missing_weights, self.name)
        self._try_load()

    # -- to override -------------------------------------------------------------------
    def load(self) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Model-specific fields for /v1/models (parameters, variant, ...)."""
        return {}

    # -- shared ------------------------------------------------------------------------
    def missing_weights(self) -> list[str]:
        needed = self.spec.weights(self.options)
        return [w for w in needed if weights.find(w, self.model_dir) is None]

    def _try_load(self) -> None:
        # Weights may be fetched while the service runs; the next request then loads them
        # without a restart, so a missing file is re-checked rather than remembered.
        with self._load_lock:
            if self.model is None and not self.missing_weights():
                self.model = self.load()
                log.info("%s: model loaded (%d threads)", self.name, self.threads)

    def ready_model(self) -> Any:
        if self.model is None:
            self._try_load()
        if self.model is None:
            missing = self.missing_weights()
            commands = "; ".join(weights.fetch_command(w, self.model_dir) for w in missing)
            raise Unavailable(
                "weights_missing",
                f"{self.name} needs weight file(s) {missing}; fetch them with: {commands}",
            )
        return self.model

    def info(self) -> dict[str, Any]:
        missing = [] if self.model is not None else self.missing_weights()
        return {
            "name": self.name,
            "kind": self.spec.kind,
            "status": "ready" if not missing else "missing weights",
            "missing_weights": missing,
            "fetch_command": " && ".join(weights.fetch_command(w, self.model_dir) for w in missing)
            or None,
            "resources": {
                "num_cpus": self.resources.get("CPU"),
                "memory_bytes": self.resources.get("memory"),
                "num_gpus": self.resources.get("GPU", 0),
                "threads": self.threads,
            },
            "limits": {"max_pixels": self.max_pixels, "decoder_max_pixels": opencv_pixel_limit()},
            # The replica's high-water mark: what its `memory` budget must cover.
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            **self.describe(),
        }

    def check_health(self) -> None:
        # Locally, missing weights are a 503 per request, not a reason for Serve to restart
        # us. On KubeRay (REQUIRE_WEIGHTS_ENV=1, set by kuberay/generate.py) the replica
        # waits for them before it starts (above), and files gone since make it unhealthy.
        if os.environ.get(REQUIRE_WEIGHTS_ENV) == "1":
            missing = self.missing_weights()
            if missing:
                raise RuntimeError(f"{self.name}: weight file(s) {missing} missing")


def _wait_for(missing: Any, name: str, poll_s: float = 5.0) -> None:
    """Block the replica's start until `missing()` is empty. On KubeRay the weights Job may
    still be filling the volume: the replica stays STARTING and the RayService not Ready. Not a
    failing check: Serve counts a failing first health check as a start failure and, after 3,
    marks the app DEPLOY_FAILED for good (tests/test_weights_health.py found that)."""
    waited = 0.0
    while files := missing():
        if waited % 60 == 0:
            log.warning(
                "%s: waiting for weight file(s) %s (the weights Job fills MODEL_DIR)", name, files
            )
        time.sleep(poll_s)
        waited += poll_s


def _assigned_resources() -> dict[str, float]:
    # Outside a Ray worker (benchmarks, unit use) there is no assignment; asking for the
    # runtime context there would start a Ray instance as a side effect.
    if not ray.is_initialized():
        return {}
    try:
        return dict(ray.get_runtime_context().get_assigned_resources())
    except AssertionError:  # a driver, not a worker: nothing is assigned to it
        return {}
