"""Load and strictly validate `config/serve.yaml`.

The file is a plain Ray Serve config (what `serve run` and a KubeRay RayService's
`serveConfigV2` take). Ray's own schema ignores unknown keys, so a typo such as
`num_cpu:` silently falls back to a default; `validate_config` walks the file against
Ray's pydantic schemas and our own `AppSettings` and refuses any key it does not know.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app import DEFAULT_MAX_PIXELS
from serve_app.registry import MODELS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "config" / "serve.yaml"

ROUTER_DEPLOYMENT = "router"
JOBS_DEPLOYMENT = "jobs"


class ConfigError(ValueError):
    """The config file is not usable; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    max_body_bytes: int = Field(50 * 2**20, gt=0)
    # JSON bodies are parsed whole into Python objects (~10x their size in memory, seconds
    # of CPU at 50 MiB), so they get a much smaller cap than raw image bytes.
    max_json_bytes: int = Field(8 * 2**20, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0)
    fetch_max_bytes: int = Field(50 * 2**20, gt=0)
    fetch_connect_timeout_s: float = Field(5.0, gt=0)
    fetch_read_timeout_s: float = Field(30.0, gt=0)
    fetch_max_redirects: int = Field(3, ge=0, le=10)
    # Batches (POST /v1/detect/{model}/batch): images per request, their summed pixels, and
    # images per model call (a batch is split into calls of this size across replicas).
    max_batch_images: int = Field(64, gt=0)
    max_batch_pixels: int = Field(200_000_000, gt=0)
    batch_chunk_images: int = Field(8, gt=0)


class ModelSettings(_Strict):
    enabled: bool = True
    # Seconds the router waits for one call; the proxy's request_timeout_s must cover it.
    timeout_s: float = Field(60.0, gt=0)
    # Model-specific options, validated by the model's deployment class (strict too).
    options: dict[str, Any] = Field(default_factory=dict)


class JobSettings(_Strict):
    max_jobs: int = Field(64, gt=0)  # queued + running
    ttl_s: float = Field(3600.0, gt=0)
    # Finished jobs kept (oldest evicted first) and the bytes their results may hold in all;
    # both must fit the jobs replica's `memory`.
    max_finished_jobs: int = Field(1024, gt=0)
    max_result_bytes: int = Field(256 * 2**20, gt=0)
    max_callbacks: int = Field(16, gt=0)  # callback deliveries in flight at once
    callback_timeout_s: float = Field(10.0, gt=0)
    callback_retries: int = Field(3, ge=0, le=10)


class AppSettings(_Strict):
    """`applications[0].args`: everything the app needs beyond Serve's own keys."""

    model_dir: str | None = None
    limits: Limits = Field(default_factory=Limits)
    # Hosts, IPs or CIDRs exempt from the private-address refusal (tests, intranets).
    fetch_allow_hosts: list[str] = Field(default_factory=list)
    # Name of the environment variable holding the API key; unset or empty = no auth,
    # unless require_api_key, when the router refuses to start without a key.
    api_key_env: str = "VISIONSERVE_API_KEY"
    require_api_key: bool = False
    jobs: JobSettings = Field(default_factory=JobSettings)
    models: dict[str, ModelSettings] = Field(default_factory=dict)

    def enabled_models(self) -> list[str]:
        return [name for name, m in self.models.items() if m.enabled]


def _schemas() -> dict[str, type[BaseModel]]:
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    return {
        "root": ServeDeploySchema,
        "http_options": HTTPOptionsSchema,
        "application": ServeApplicationSchema,
        "deployment": DeploymentSchema,
        "ray_actor_options": RayActorOptionsSchema,
        "autoscaling_config": AutoscalingConfig,
    }


def _field_names(schema: type[BaseModel]) -> set[str]:
    names = set()
    for name, field in schema.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return names


def _check_keys(where: str, data: Any, schema: type[BaseModel]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - _field_names(schema))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; known: {sorted(_field_names(schema))}"
        )


def _pydantic_message(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


def parse_app_settings(args: dict[str, Any] | None) -> AppSettings:
    try:
        settings = AppSettings.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(f"applications[0].args: {_pydantic_message(err)}") from err
    unknown = sorted(set(settings.models) - set(MODELS))
    if unknown:
        raise ConfigError(f"args.models: unknown model(s) {unknown}; known: {sorted(MODELS)}")
    return settings


def validate_options(name: str, options: dict[str, Any]) -> BaseModel:
    """A model's `options`, checked against its registry entry's options class."""
    try:
        return MODELS[name].options.model_validate(options)
    except ValidationError as err:
        raise ConfigError(f"args.models.{name}.options: {err}") from err


def weights_needed(cfg: dict[str, Any], deployment_names: list[str] | None = None) -> list[str]:
    """Weight files the enabled models of a serve config need, in registry order.

    From each model's registry entry and its configured options, so `make models` and the
    KubeRay init containers fetch exactly what the service will look for.
    """
    models = parse_app_settings(cfg["applications"][0].get("args")).models
    names = set(deployment_names if deployment_names is not None else models)
    needed: dict[str, None] = {}  # ordered and without repeats
    for name, spec in MODELS.items():
        if name in names and name in models and models[name].enabled:
            needed.update(dict.fromkeys(spec.weights(validate_options(name, models[name].options))))
    return list(needed)


def validate_config(cfg: dict[str, Any]) -> AppSettings:
    """Validate a whole serve config; return the app's settings. Raises ConfigError."""
    s = _schemas()
    _check_keys("config", cfg, s["root"])
    _check_keys("http_options", cfg.get("http_options", {}), s["http_options"])
    apps = cfg.get("applications") or []
    if len(apps) != 1:
        raise ConfigError("applications: expected exactly one application (visionserve)")
    app = apps[0]
    _check_keys("applications[0]", app, s["application"])
    for i, dep in enumerate(app.get("deployments") or []):
        where = f"deployments[{i}] ({dep.get('name', '?')})"
        _check_keys(where, dep, s["deployment"])
        if "ray_actor_options" in dep:
            _check_keys(
                f"{where}.ray_actor_options", dep["ray_actor_options"], s["ray_actor_options"]
            )
        if "autoscaling_config" in dep:
            _check_keys(
                f"{where}.autoscaling_config", dep["autoscaling_config"], s["autoscaling_config"]
            )
    try:
        s["root"].model_validate(cfg)
    except ValidationError as err:
        raise ConfigError(_pydantic_message(err)) from err

    settings = parse_app_settings(app.get("args"))
    _check_deployments(cfg, app, settings)
    _check_opencv_limit(app, settings)
    return settings


OPENCV_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


def _check_opencv_limit(app: dict, settings: AppSettings) -> None:
    """OpenCV reads its pixel limit from the environment at import, before any of our code
    knows the config, so the app's runtime_env carries it; it must equal max_pixels."""
    env = ((app.get("runtime_env") or {}).get("env_vars") or {}).get(OPENCV_PIXELS_ENV)
    want = str(settings.limits.max_pixels)
    if env is None or str(env) != want:
        raise ConfigError(
            f'applications[0].runtime_env.env_vars.{OPENCV_PIXELS_ENV} must be "{want}" '
            f"(= args.limits.max_pixels: OpenCV's own decoder limit), got {env!r}"
        )


def _check_deployments(cfg: dict, app: dict, settings: AppSettings) -> None:
    deps = {d["name"]: d for d in app.get("deployments") or []}
    expected = set(settings.models) | {ROUTER_DEPLOYMENT, JOBS_DEPLOYMENT}
    if set(deps) != expected:
        missing, extra = sorted(expected - set(deps)), sorted(set(deps) - expected)
        raise ConfigError(
            f"deployments must list exactly router, jobs and args.models; "
            f"missing {missing}, not in args.models {extra}"
        )
    for name, dep in deps.items():
        opts = dep.get("ray_actor_options") or {}
        if "num_cpus" not in opts or "memory" not in opts:
            raise ConfigError(f"deployments.{name}: ray_actor_options needs num_cpus and memory")
        for key in ("max_ongoing_requests", "max_queued_requests"):
            if key not in dep:
                raise ConfigError(f"deployments.{name}: {key} must be set (backpressure)")
        if "autoscaling_config" not in dep:
            raise ConfigError(f"deployments.{name}: autoscaling_config must be set")
        if name in settings.models and not settings.models[name].enabled:
            auto = dep["autoscaling_config"]
            if auto.get("min_replicas", 1) != 0 or auto.get("initial_replicas", 1) != 0:
                raise ConfigError(
                    f"deployments.{name}: a disabled model must have min_replicas: 0 and "
                    "initial_replicas: 0 so that it holds no resources"
                )
    proxy_timeout = (cfg.get("http_options") or {}).get("request_timeout_s")
    longest = max((m.timeout_s for m in settings.models.values()), default=0)
    if proxy_timeout is not None and proxy_timeout < longest:
        raise ConfigError(
            f"http_options.request_timeout_s ({proxy_timeout}) is shorter than the longest "
            f"model timeout_s ({longest}); the proxy would cut requests the router still waits for"
        )


def load_config(path: str | Path = DEFAULT_CONFIG) -> dict[str, Any]:
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a YAML mapping")
    return cfg


def deployment_options(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Deployment name -> its entry in the config's deployments list."""
    return {d["name"]: d for d in cfg["applications"][0].get("deployments") or []}


def cpu_threads(num_cpus: float | None) -> int:
    """Threads for a replica's native libraries: its CPU share, at least one."""
    return max(1, math.ceil(num_cpus or 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.config")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("path", nargs="?", default=str(DEFAULT_CONFIG))
    args = parser.parse_args(argv)
    try:
        settings = validate_config(load_config(args.path))
    except (ConfigError, OSError, yaml.YAMLError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: ok ({len(settings.enabled_models())} models enabled: "
        f"{', '.join(settings.enabled_models())})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
