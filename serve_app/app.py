"""The Serve application graph: a router in front of one deployment per model.

`serve run config/serve.yaml` imports `build_app` with the config's `args`; Serve then
applies the config's `deployments` entries (resources, autoscaling, queues) by name.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import (
    JOBS_DEPLOYMENT,
    MODEL_KINDS,
    ROUTER_DEPLOYMENT,
    parse_app_settings,
)
from serve_app.deployments.base import validate_options
from serve_app.deployments.detectors import DETECTORS
from serve_app.jobs import JobManager
from serve_app.router import Router


def deployment_class(name: str) -> Any:
    if MODEL_KINDS[name] == "detector":
        return DETECTORS[name]
    # Imported only when configured: it pulls in torch and segment_anything.
    from serve_app.deployments.segmenters import SEGMENTERS

    return SEGMENTERS[name]


def build_app(args: dict[str, Any]) -> Application:
    settings = parse_app_settings(args)
    handles = {}
    for name, model in settings.models.items():
        cls = deployment_class(name)
        validate_options(cls.func_or_class, name, model.options)  # fail at deploy, not at call
        handles[name] = cls.options(name=name).bind(
            name, model.options, settings.model_dir, settings.limits.max_pixels
        )
    plain = settings.model_dump()
    jobs = JobManager.options(name=JOBS_DEPLOYMENT).bind(plain, handles)
    return Router.options(name=ROUTER_DEPLOYMENT).bind(plain, handles, jobs)
