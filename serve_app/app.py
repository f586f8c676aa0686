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


def weights_needed(cfg: dict[str, Any], deployment_names: list[str] | None = None) -> list[str]:
    """Weight files the enabled models of a serve config need, in registry order.

    Asks each deployment class with its configured options, so `make models` and the
    KubeRay init containers fetch exactly what the service will look for.
    """
    from types import SimpleNamespace

    from serve_app.models.weights import REGISTRY

    models = parse_app_settings(cfg["applications"][0].get("args")).models
    names = deployment_names if deployment_names is not None else list(models)
    needed: set[str] = set()
    for name in names:
        if name not in models or not models[name].enabled:
            continue
        cls = deployment_class(name).func_or_class
        options = validate_options(cls, name, models[name].options)
        needed.update(cls.required_weights(SimpleNamespace(options=options)))
    return [w for w in REGISTRY if w in needed]
