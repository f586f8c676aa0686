"""The cluster's serve config: config/serve.yaml with kuberay/cluster.yaml's overrides.

config/serve.yaml is sized for a laptop (fractions of a CPU per replica) and stays the file for
`serve run`. On the cluster each replica gets what it really uses; this module is the one place
that merges the two, so the generator, the sizing checks, the autoscaling simulation and the
tests all see the same deployments.
"""

from __future__ import annotations

import copy
from typing import Any

from kuberay.sizing import GROUP_LABEL, SizingError, group_of
from serve_app.registry import MODELS

CLUSTER_HOST = "0.0.0.0"  # the Serve proxy must listen on the pod IP for the Service to reach it
SHUTDOWN_MARGIN_S = 30  # a pod's terminationGracePeriodSeconds beyond its longest replica drain


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def cluster_serve_config(serve_cfg: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """`serve_cfg` as the cluster runs it: overlay's per-deployment overrides merged in, each
    deployment selecting its worker group's node label, num_gpus on the GPU group, the
    proxy on 0.0.0.0 and require_api_key true. Raises SizingError when an override names no
    deployment or a graceful shutdown is shorter than the requests it would cut."""
    cfg = copy.deepcopy(serve_cfg)
    cfg.setdefault("http_options", {})["host"] = CLUSTER_HOST
    app = cfg["applications"][0]
    # Listening on the pod IP, the router must not start without a key (and generate.py then
    # makes the key Secret not optional, so a pod without it does not start at all).
    app.setdefault("args", {})["require_api_key"] = True
    deps = {d["name"]: d for d in app["deployments"]}
    serve = cluster.get("serve") or {}
    overrides = serve.get("deployments") or {}
    # A model's cluster resources come from its kind unless the overlay names it, so a model
    # added to the registry and config/serve.yaml runs on the cluster without a line here.
    by_kind = serve.get("byKind") or {}
    unknown = sorted(set(overrides) - set(deps))
    if unknown:
        raise SizingError(f"kuberay/cluster.yaml serve.deployments: unknown {unknown}")
    where = group_of(cluster, list(deps))
    gpu = cluster.get("gpu") or {}
    gpus = gpu.get("numGpus") or {}
    merged = []
    for dep in app["deployments"]:
        name = dep["name"]
        kind = MODELS[name].kind if name in MODELS else None
        new = _merge(_merge(dep, by_kind.get(kind) or {}), overrides.get(name) or {})
        opts = new.setdefault("ray_actor_options", {})
        if name in where:
            opts["label_selector"] = {GROUP_LABEL: where[name]}
            if where[name] == "gpu" and name in gpus:
                opts["num_gpus"] = gpus[name]
                opts["num_cpus"] = gpu.get("numCpus", opts.get("num_cpus", 1))
        merged.append(new)
    app["deployments"] = merged
    _default_graceful_shutdown(cfg)
    _check_graceful_shutdown(cfg)
    return cfg


def _needed_s(cfg: dict[str, Any], name: str) -> float:
    """How long a request to `name` may take: its model's timeout_s; the router and jobs hold
    a request for as long as the slowest model takes."""
    models = (cfg["applications"][0].get("args") or {}).get("models") or {}
    if name in models:
        return float(models[name].get("timeout_s", 60))
    return max((float(m.get("timeout_s", 60)) for m in models.values()), default=0.0)


def _default_graceful_shutdown(cfg: dict[str, Any]) -> None:
    # A deployment the overlay does not name (e.g. a model added to config/serve.yaml since)
    # still drains its longest request.
    for dep in cfg["applications"][0]["deployments"]:
        dep.setdefault("graceful_shutdown_timeout_s", int(_needed_s(cfg, dep["name"])) + 5)


def _check_graceful_shutdown(cfg: dict[str, Any]) -> None:
    for dep in cfg["applications"][0]["deployments"]:
        name = dep["name"]
        needed = _needed_s(cfg, name)
        have = float(dep.get("graceful_shutdown_timeout_s", 20))  # Serve's default
        if have < needed:
            raise SizingError(
                f"deployments.{name}: graceful_shutdown_timeout_s {have:g} < {needed:g} s a "
                "request may take; a downscale would cut it (set it in kuberay/cluster.yaml "
                "serve.deployments)"
            )


def termination_grace_s(cfg: dict[str, Any], group: str) -> int:
    """terminationGracePeriodSeconds for the pods of `group`: the longest graceful shutdown of
    the deployments placed there, plus a margin for Ray itself to stop."""
    longest = 20.0
    for dep in cfg["applications"][0]["deployments"]:
        selector = (dep.get("ray_actor_options") or {}).get("label_selector") or {}
        if selector.get(GROUP_LABEL) == group:
            longest = max(longest, float(dep.get("graceful_shutdown_timeout_s", 20)))
    return int(longest) + SHUTDOWN_MARGIN_S
