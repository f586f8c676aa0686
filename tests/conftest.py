"""One real Ray + Serve for the whole test session, started and stopped by this file only.

Ray gets its own temp dir and ports; it is shut down through its own handle (never
`ray stop`, which would kill every Ray on the machine, other sessions' included).
"""

from __future__ import annotations

import http.server as http_server
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from helpers import (
    EXTRA_FILES,
    IMAGES,
    PICO,
    REPO,
    TEST_IMAGE_HOST,
    TEST_LIMITS,
    YUNET,
    shared_file,
)

# Tests using any of these run against the real Ray + Serve service: marked `service`, so that
# `make test-fast` (-m "not slow and not service") runs the unit tests without starting Ray.
SERVICE_FIXTURES = frozenset({"ray_session", "service", "http", "sam_ready"})


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A model dir holding what can be installed here: pigo's facefinder and the YuNet files
    from ../shared."""
    from serve_app.models import weights

    path = tmp_path_factory.mktemp("models")
    if (PICO / "facefinder").exists():
        weights.fetch(["facefinder"], model_dir=path, from_dir=PICO, progress=False)
    if YUNET.is_dir():
        weights.fetch(
            ["yunet_n", "yunet_s"],
            model_dir=path,
            from_dir=YUNET,
            progress=False,
            skip_missing=True,
        )
    return path


def service_config(port: int, model_dir: Path) -> dict:
    from serve_app.config import load_config
    from serve_app.launch import with_overrides

    small = {
        "ray_actor_options": {"memory": 512 * 2**20},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    }
    sam = {
        "ray_actor_options": {"memory": 1024 * 2**20},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    }
    from serve_app.registry import names_of

    detectors = names_of("detector")
    return with_overrides(
        load_config(),
        port=port,
        args={
            "model_dir": str(model_dir),
            "fetch_allow_hosts": [TEST_IMAGE_HOST],
            "limits": TEST_LIMITS,
        },
        deployments={
            **{n: small for n in ("router", "jobs", *detectors)},
            **{n: sam for n in ("sam-segmentation-light", "sam-segmentation", "sam-mobile")},
            "sam-vit-h": {
                **sam,
                "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1},
            },
        },
        models=SAM_TEST_MODELS,
    )


# Real SAM code paths with random weights: no checkpoint reaches CI. The light model is a
# tiny ViT built by segment_anything's own builder (same code path, small dimensions);
# MobileSAM runs its real TinyViT; vit_l and vit_h keep the shipped options and so show
# the missing-weights behaviour (503 with the fetch command).
SAM_TEST_MODELS: dict = {
    # Load tests ask this detector for a fixed service time (`test_delay_s`), so that how
    # fast its queue drains does not depend on the machine (tests/test_faults.py).
    "cnn-face-detection": {"options": {"test_delay_param": True}},
    "sam-segmentation-light": {
        "options": {
            "variant": "tiny",
            "random_weights": True,
            "points_per_side": 8,
            "max_points_per_side": 16,
            "embedding_cache_bytes": 64 * 2**20,
            # 16x16 points with a crop layer (1,280 prompts) are over it: tests/test_cancel_http.py
            "max_decoder_prompts": 512,
        },
    },
    "sam-mobile": {
        "options": {
            "random_weights": True,
            "points_per_side": 4,
            "max_points_per_side": 8,
            "dtype": "float32",
        }
    },
    "sam-vit-h": {"enabled": True},
}


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Ray's Prometheus endpoint for the session: http://127.0.0.1:<port>/metrics."""
    from serve_app.launch import free_port

    return free_port()


@pytest.fixture(scope="session")
def ray_session(metrics_port):
    import ray

    from serve_app.proxy import proxy_env

    # Serve's proxy reads its body caps from its environment, inherited from this process:
    # those of the session service's config (its port and model folder do not matter here).
    os.environ.update(proxy_env(service_config(0, Path(tempfile.gettempdir()))))
    temp_dir = tempfile.mkdtemp(prefix="vs-ray-")
    ray.init(
        address="local",
        # Logical CPUs, for placement only (a replica's threads follow its own num_cpus): the
        # session service takes ~2, and a few tests deploy small apps of their own beside it.
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace="serve",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        # Processes push metrics to the agent every 2 s instead of 10 s: metrics tests
        # wait for them (with a deadline), and nothing else depends on the interval.
        _system_config={"metrics_report_interval_ms": 2000},
        # A key exported in the developer's shell must not turn the session service into
        # 401s everywhere (the CLI reads the same variable).
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "VISIONSERVE_API_KEY": ""}},
    )
    yield ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def service(ray_session, model_dir):
    """The app from config/serve.yaml (test-sized), deployed as `serve run` would."""
    from serve_app.launch import deploy_config, free_port

    port = free_port()
    cfg = service_config(port, model_dir)
    deploy_config(cfg, timeout_s=300)
    return {"url": f"http://127.0.0.1:{port}", "config": cfg, "model_dir": model_dir}


@pytest.fixture(scope="session")
def http(service):
    import httpx

    with httpx.Client(base_url=service["url"], timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def sam_ready(http) -> None:
    """The SAM route answers: fail here, once and clearly, rather than in every SAM test."""
    r = http.post(
        "/v1/segment/sam-segmentation-light",
        json={"image_base64": _TINY_PNG_B64, "points": [[0, 0]]},
    )
    assert r.status_code == 200, f"SAM route broken: {r.status_code} {r.text[:300]}"


# A 2x2 black PNG, enough to exercise the SAM path end to end.
_TINY_PNG_B64 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAIAAAACCAIAAAD91JpzAAAAD0lEQVQIHWNk"
    "AANGBjAAAAAjAAMz85CnAAAAAElFTkSuQmCC"
)


class _ImageHandler(http_server.SimpleHTTPRequestHandler):
    """Serves ../shared/data/images plus a few fixed answers for input tests."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=str(IMAGES), **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/text":
            body = b"this is not an image"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/extra/") and self.path[7:] in EXTRA_FILES:
            body = EXTRA_FILES[self.path[7:]]
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path.startswith("/redirect-to-loopback"):
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/pigo_sample.jpg")
            self.end_headers()
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def image_server() -> str:
    """A real HTTP server on 127.0.0.2 (loopback; the test service's only allowed host)."""
    server = http_server.ThreadingHTTPServer((TEST_IMAGE_HOST, 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    yield f"http://{TEST_IMAGE_HOST}:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def sample_url(image_server) -> str:
    """pigo_sample.jpg as the image server serves it, for tests that have the service fetch
    a face with pigo; skipped (not failed) where the shared data is absent."""
    shared_file("images", "pigo_sample.jpg")
    shared_file("pico", "facefinder")
    return f"{image_server}/pigo_sample.jpg"


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
