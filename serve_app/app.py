"""The Serve application graph: a router in front of one deployment per model.

`serve run config/serve.yaml` imports `build_app` with the config's `args`; Serve then
applies the config's `deployments` entries (resources, autoscaling, queues) by name.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import (
    JOBS_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    parse_app_settings,
    validate_options,
)
from serve_app.jobs import JobManager
from serve_app.registry import MODELS
from serve_app.router import Router


def build_app(args: dict[str, Any]) -> Application:
    settings = parse_app_settings(args)
    handles = {}
    for name, model in settings.models.items():
        validate_options(name, model.options)  # fail at deploy, not at call
        # Imported only when configured: the segmenters pull in torch and segment_anything.
        cls = MODELS[name].deployment_class()
        handles[name] = cls.options(name=name).bind(
            name, model.options, settings.model_dir, settings.limits.max_pixels
        )
    plain = settings.model_dump()
    jobs = JobManager.options(name=JOBS_DEPLOYMENT).bind(plain, handles)
    return Router.options(name=ROUTER_DEPLOYMENT).bind(plain, handles, jobs)
