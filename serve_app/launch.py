"""Deploy a serve config from Python exactly as `serve run config.yaml` does.

Tests and benchmarks use this to run the real config (Serve applies its `deployments`
overrides) inside a Ray they started themselves, with their own temp dir and ports.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from typing import Any

from serve_app.config import validate_config

APP_NAME = "visionserve"


def start_local_ray(
    prefix: str = "vs-bench-", *, num_cpus: int | None = None, cfg: dict[str, Any] | None = None
) -> None:
    """A Ray of its own (own temp dir and ports) for a benchmark or tool; stop it with
    `ray.shutdown()`, never `ray stop`. Its workers import this checkout, a key in the
    caller's shell does not turn the service into 401s, and Serve's proxy gets the body caps
    of `cfg` (default config/serve.yaml; see serve_app/proxy.py)."""
    import tempfile
    from pathlib import Path

    import ray

    from serve_app.config import load_config
    from serve_app.proxy import proxy_env

    root = Path(__file__).resolve().parents[1]
    # The proxy reads them from its process environment, which Ray's processes inherit.
    os.environ.update(proxy_env(cfg if cfg is not None else load_config()))
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix=prefix),
        namespace="serve",
        runtime_env={"env_vars": {"PYTHONPATH": str(root), "VISIONSERVE_API_KEY": ""}},
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_config(cfg: dict[str, Any], *, timeout_s: float = 300.0) -> None:
    """Start Serve on the connected Ray and deploy `cfg`; block until the app is RUNNING."""
    from ray.serve._private import api as serve_api
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import ServeDeploySchema

    validate_config(cfg)
    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=ProxyLocation(schema.proxy_location),
    )
    client.deploy_apps(schema, _blocking=False)
    wait_running(timeout_s=timeout_s)


def wait_running(app: str = APP_NAME, *, timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"{app} failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"{app} not RUNNING after {timeout_s} s: {status}")


def with_overrides(
    cfg: dict[str, Any],
    *,
    port: int | None = None,
    args: dict[str, Any] | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
    models: dict[str, dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """A copy of `cfg` with the given changes; a model mapped to None is removed entirely."""
    out = copy.deepcopy(cfg)
    app = out["applications"][0]
    if port is not None:
        out.setdefault("http_options", {})["port"] = port
    app_args = app.setdefault("args", {})
    for key, value in (args or {}).items():
        app_args[key] = value
    pixels = (app_args.get("limits") or {}).get("max_pixels")
    if pixels is not None:  # OpenCV's own limit follows the service's (see config.py)
        env = app.setdefault("runtime_env", {}).setdefault("env_vars", {})
        env["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(pixels)
    deps = {d["name"]: d for d in app["deployments"]}
    for name, change in (models or {}).items():
        if change is None:
            app_args["models"].pop(name, None)
            deps.pop(name, None)
        else:
            _merge(app_args["models"].setdefault(name, {}), change)
    for name, change in (deployments or {}).items():
        if name in deps:  # a removed model's overrides are moot
            _merge(deps[name], change)
    app["deployments"] = list(deps.values())
    return out


def _merge(target: dict[str, Any], change: dict[str, Any]) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
