"""What several test files share: paths, the shared test data, the test service's limits.

A plain module (tests import it as `helpers`); fixtures stay in conftest.py, which pytest
loads itself and no test imports.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; VISIONSERVE_SHARED_DATA points elsewhere (a worktree).
SHARED = Path(os.environ.get("VISIONSERVE_SHARED_DATA") or REPO.parent / "shared" / "data")
IMAGES = SHARED / "images"
PICO = SHARED / "pico"
YUNET = SHARED / "yunet"
TEST_IMAGE_HOST = "127.0.0.2"  # the only address the test service may fetch from
APP = "visionserve"
TEST_LIMITS = {
    "max_body_bytes": 8 * 2**20,
    # Below the body cap, so that tests can tell the JSON cap from the body cap.
    "max_json_bytes": 4 * 2**20,
    "fetch_max_bytes": 4 * 2**20,
    "max_pixels": 50_000_000,
    "fetch_connect_timeout_s": 2,
    "fetch_read_timeout_s": 5,
    "fetch_max_redirects": 3,
}
# Bodies tests add for the image server to answer at /extra/<name> (bombs, odd files), so
# that they need not be written into the shared data folder.
EXTRA_FILES: dict[str, bytes] = {}


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared test data (../shared/data) is not here")
    return path


def replica_details() -> dict[str, list[dict[str, Any]]]:
    """Deployment name -> its replicas as the Serve controller reports them.

    `serve.status()` only counts replicas per state; the controller's instance details
    (what `serve status -v` and the dashboard show) carry their ids and actor names.
    """
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    if not isinstance(details, dict):
        details = details.model_dump()
    deployments = details["applications"][APP]["deployments"]
    return {name: [dict(r) for r in dep["replicas"]] for name, dep in deployments.items()}


def running_replicas() -> dict[str, set[str]]:
    """Deployment name -> ids of its RUNNING replicas."""
    return {
        name: {r["replica_id"] for r in reps if str(r["state"]).endswith("RUNNING")}
        for name, reps in replica_details().items()
    }
