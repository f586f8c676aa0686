"""The minikube profile: the cluster capped to what one minikube node of a given budget holds.

With minikube's docker driver the node advertises the host's CPUs and memory, so a pod that
does not fit the minikube container is scheduled anyway and OOM-killed. Here the profile is
made to fit: each worker group's maxReplicas is capped so that the head, every group at its
cap and the system pods fit `minikube.budget`, and each deployment's max_replicas is capped
to what those pods hold. kuberay/minikube.sh then starts the node at exactly that size and
reserves the rest of the host from the kubelet.
"""

from __future__ import annotations

import copy
from typing import Any

from kuberay import sizing
from kuberay.quantity import cpu_cores, memory_bytes


def _pod(cpu: str, memory: str) -> tuple[float, int]:
    return cpu_cores(cpu), memory_bytes(memory)


def head_footprint(cluster: dict[str, Any]) -> tuple[float, int]:
    """The head pod with the autoscaler sidecar KubeRay adds to it."""
    head, auto = cluster["head"], cluster["autoscaler"]
    return (
        cpu_cores(head["cpu"]) + cpu_cores(auto["cpu"]),
        memory_bytes(head["memory"]) + memory_bytes(auto["memory"]),
    )


def fits_budget(cluster: dict[str, Any], counts: dict[str, int]) -> bool:
    mk = cluster["minikube"]
    cpu, mem = head_footprint(cluster)
    cpu += cpu_cores(mk["systemCpus"])
    mem += memory_bytes(mk["systemMemory"])
    for g in sizing.groups(cluster):
        g_cpu, g_mem = _pod(g.cpu, g.memory)
        cpu += counts[g.name] * g_cpu
        mem += counts[g.name] * g_mem
    budget = mk["budget"]
    return cpu <= cpu_cores(budget["cpus"]) + 1e-9 and mem <= memory_bytes(budget["memory"])


def minikube_profile(
    cluster: dict[str, Any], serve_cfg: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cluster, cluster serve config) of the minikube profile. Raises SizingError when even
    the groups at minReplicas exceed the budget."""
    cluster, serve_cfg = _overrides(cluster, serve_cfg)
    gs = sizing.groups(cluster)
    caps = {g.name: g.min_replicas for g in gs}
    if not fits_budget(cluster, caps):
        raise sizing.SizingError(
            f"minikube.budget {cluster['minikube']['budget']} cannot hold the groups at "
            "minReplicas: raise it, or disable models in config/serve.yaml"
        )
    grew = True
    while grew:  # one pod at a time, round robin, while the budget holds it
        grew = False
        for g in gs:
            more = {**caps, g.name: caps[g.name] + 1}
            if caps[g.name] < g.max_replicas and fits_budget(cluster, more):
                caps = more
                grew = True
    out_cluster = copy.deepcopy(cluster)
    for g in out_cluster["workerGroups"]:
        if g["name"] in caps:
            g["maxReplicas"] = caps[g["name"]]
    return out_cluster, cap_max_replicas(out_cluster, serve_cfg)


def _overrides(
    cluster: dict[str, Any], serve_cfg: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The profile's own pod sizes (`minikube.workerGroups`, by name) and replica shares
    (`minikube.serve.deployments`), merged over the cluster's."""
    from kuberay.overlay import _merge

    mk = cluster["minikube"]
    cluster = copy.deepcopy(cluster)
    for g in cluster["workerGroups"]:
        g.update((mk.get("workerGroups") or {}).get(g["name"]) or {})
    cfg = copy.deepcopy(serve_cfg)
    app = cfg["applications"][0]
    over = (mk.get("serve") or {}).get("deployments") or {}
    unknown = sorted(set(over) - {d["name"] for d in app["deployments"]})
    if unknown:
        raise sizing.SizingError(f"minikube.serve.deployments: unknown {unknown}")
    app["deployments"] = [_merge(d, over.get(d["name"]) or {}) for d in app["deployments"]]
    sizing.check_min(cluster, cfg)
    return cluster, cfg


def cap_max_replicas(cluster: dict[str, Any], serve_cfg: dict[str, Any]) -> dict[str, Any]:
    """Lower the enabled deployments' max_replicas (the one with the most room above its
    min first) until they pack into the groups at maxReplicas."""
    cfg = copy.deepcopy(serve_cfg)
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    gs = sizing.groups(cluster)
    for _ in range(1000):  # bounded: each round lowers one max_replicas by one
        reps = sizing.replicas(cfg)
        meant = sizing.placement(cluster, reps, gs)
        try:
            sizing.pack(reps, meant, "max_replicas")
            return cfg
        except sizing.SizingError:
            pass
        room = [r for r in reps if r.enabled and r.max_replicas > max(1, r.min_replicas)]
        if not room:
            raise sizing.SizingError("minikube profile: min_replicas alone do not fit")
        r = max(room, key=lambda r: (r.max_replicas - r.min_replicas, r.memory))
        deps[r.name]["autoscaling_config"]["max_replicas"] = r.max_replicas - 1
    raise sizing.SizingError("minikube profile: could not cap max_replicas")
