"""One real Ray + Serve for the whole test session, started and stopped by this file only.

Ray gets its own temp dir and ports; it is shut down through its own handle (never
`ray stop`, which would kill every Ray on the machine, other sessions' included).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGES = SHARED / "images"
PICO = SHARED / "pico"
TEST_IMAGE_HOST = "127.0.0.2"  # the only address the test service may fetch from


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared test data (../shared/data) is not here")
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A model dir holding what can be installed here: pigo's facefinder from ../shared."""
    from serve_app.models import weights

    path = tmp_path_factory.mktemp("models")
    if (PICO / "facefinder").exists():
        weights.fetch(["facefinder"], model_dir=path, from_dir=PICO, progress=False)
    return path


def test_config(port: int, model_dir: Path) -> dict:
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
    return with_overrides(
        load_config(),
        port=port,
        args={"model_dir": str(model_dir), "fetch_allow_hosts": [TEST_IMAGE_HOST]},
        deployments={
            **{
                n: small
                for n in (
                    "router",
                    "face-detect-pigo",
                    "face-detect-opencv",
                    "basic-face-detection",
                    "cnn-face-detection",
                )
            },
            **{n: sam for n in ("sam-segmentation-light", "sam-segmentation", "sam-mobile")},
        },
        models=SAM_TEST_MODELS,
    )


# Real SAM code paths with random weights and a tiny ViT: no checkpoint reaches CI.
SAM_TEST_MODELS: dict = {
    "sam-segmentation-light": None,
    "sam-segmentation": None,
    "sam-mobile": None,
    "sam-vit-h": None,
}


@pytest.fixture(scope="session")
def ray_session():
    import ray

    temp_dir = tempfile.mkdtemp(prefix="vs-ray-")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace="serve",
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
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
    cfg = test_config(port, model_dir)
    deploy_config(cfg, timeout_s=300)
    return {"url": f"http://127.0.0.1:{port}", "config": cfg, "model_dir": model_dir}


@pytest.fixture(scope="session")
def http(service):
    import httpx

    with httpx.Client(base_url=service["url"], timeout=120) as client:
        yield client


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
