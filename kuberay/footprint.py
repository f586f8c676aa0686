"""What the generated manifest asks of Kubernetes, read back from the manifest itself.

Used by `python -m kuberay.generate --print-minikube-size` (so minikube.sh sizes the VM from
what will really be applied) and by the tests. Needs only PyYAML: minikube.sh may run it with
a plain python3.
"""

from __future__ import annotations

import math
from typing import Any

from kuberay.quantity import cpu_cores, memory_bytes


def _limits(container: dict[str, Any]) -> tuple[float, int]:
    limits = (container.get("resources") or {}).get("limits") or {}
    return cpu_cores(limits.get("cpu", 0)), memory_bytes(limits.get("memory", 0))


def pod_footprint(pod_spec: dict[str, Any], extra: list[dict[str, Any]] = ()) -> tuple[float, int]:
    """(cores, bytes) the scheduler reserves for a pod: its containers together, or its
    largest init container if that is bigger (init containers run one at a time, first)."""
    containers = [_limits(c) for c in [*pod_spec.get("containers", []), *extra]]
    inits = [_limits(c) for c in pod_spec.get("initContainers", [])]
    cpu = max([sum(c for c, _ in containers)] + [c for c, _ in inits])
    mem = max([sum(m for _, m in containers)] + [m for _, m in inits])
    return cpu, mem


def cluster_footprint(manifest: dict[str, Any], at: str = "maxReplicas") -> tuple[float, int]:
    """(cores, bytes) for the head and every worker group at `at` (minReplicas/maxReplicas)."""
    rc = manifest["spec"]["rayClusterConfig"]
    autoscaler = []
    if rc.get("enableInTreeAutoscaling"):
        # KubeRay adds this sidecar to the head pod; its size is in autoscalerOptions.
        autoscaler = [{"resources": (rc.get("autoscalerOptions") or {}).get("resources") or {}}]
    cpu, mem = pod_footprint(rc["headGroupSpec"]["template"]["spec"], autoscaler)
    for group in rc.get("workerGroupSpecs", []):
        n = group.get(at, 0)
        g_cpu, g_mem = pod_footprint(group["template"]["spec"])
        cpu += n * g_cpu
        mem += n * g_mem
    return cpu, mem


def minikube_size(manifest: dict[str, Any], minikube: dict[str, Any]) -> tuple[int, int]:
    """(CPUs, MiB) for `minikube start`: the cluster with every group at maxReplicas (the
    minikube profile caps them to its budget) plus the Kubernetes system pods, from the
    `minikube` section of kuberay/cluster.yaml. Nothing the autoscaler may add is then left
    without room."""
    cpu, mem = cluster_footprint(manifest, "maxReplicas")
    cpu += cpu_cores(minikube.get("systemCpus", 1))
    mem += memory_bytes(minikube.get("systemMemory", "2Gi"))
    return math.ceil(cpu - 1e-9), math.ceil(mem / 2**20)
