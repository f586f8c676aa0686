"""Worker groups from kuberay/cluster.yaml, and whether the deployments fit them.

Ray places a replica on any node with enough free logical resources, so these checks use the
same arithmetic: a replica fits a pod when its num_cpus, memory and num_gpus are within what
`ray start` on that pod offers. Both the generator (refuses to write a manifest that cannot
work) and the tests use this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kuberay.quantity import cpu_cores, gib, memory_bytes

CLUSTER_CONFIG = Path(__file__).resolve().parent / "cluster.yaml"
GROUP_LABEL = "visionserve.io/group"


class SizingError(ValueError):
    """cluster.yaml and config/serve.yaml do not fit together; the message says how."""


@dataclass(frozen=True)
class Group:
    """One KubeRay worker group: its pod size and what Ray on that pod offers."""

    name: str
    cpu: str
    memory: str
    object_store_memory: str
    reserved_memory: str
    min_replicas: int
    max_replicas: int
    gpu: int = 0
    termination_grace_s: int = 0  # set by the generator from what is placed on the group

    @property
    def labels(self) -> dict[str, str]:
        """Ray node labels of this group's pods (the deployments placed here select them)."""
        return {GROUP_LABEL: self.name}

    @property
    def ray_cpus(self) -> int:
        return int(cpu_cores(self.cpu))

    @property
    def ray_memory(self) -> int:
        return (
            memory_bytes(self.memory)
            - memory_bytes(self.object_store_memory)
            - memory_bytes(self.reserved_memory)
        )


@dataclass(frozen=True)
class Replica:
    """What one replica of a deployment asks Ray for."""

    name: str
    num_cpus: float
    memory: int
    num_gpus: float
    custom: dict[str, float]
    label_selector: dict[str, str]
    min_replicas: int
    max_replicas: int
    enabled: bool


@dataclass
class Pod:
    group: Group
    cpus: float = 0.0
    memory: int = 0
    gpus: float = 0.0
    replicas: list[str] = field(default_factory=list)

    def room_for(self, r: Replica) -> bool:
        return (
            self.cpus + r.num_cpus <= self.group.ray_cpus + 1e-9
            and self.memory + r.memory <= self.group.ray_memory
            and self.gpus + r.num_gpus <= self.group.gpu + 1e-9
        )

    def add(self, r: Replica) -> None:
        self.cpus += r.num_cpus
        self.memory += r.memory
        self.gpus += r.num_gpus
        self.replicas.append(r.name)


def load_cluster(path: str | Path = CLUSTER_CONFIG) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise SizingError(f"{path}: not a YAML mapping")
    return data


def groups(cluster: dict[str, Any]) -> list[Group]:
    """The enabled worker groups (a group with `enabled: false` is not in the manifest)."""
    out = []
    for g in cluster["workerGroups"]:
        if not g.get("enabled", True):
            continue
        group = Group(
            name=g["name"],
            cpu=str(g["cpu"]),
            memory=str(g["memory"]),
            object_store_memory=str(g["objectStoreMemory"]),
            reserved_memory=str(g["reservedMemory"]),
            min_replicas=int(g["minReplicas"]),
            max_replicas=int(g["maxReplicas"]),
            gpu=int(g.get("gpu", 0)),
        )
        if cpu_cores(group.cpu) != group.ray_cpus or group.ray_cpus < 1:
            raise SizingError(f"workerGroups.{group.name}.cpu must be a whole number >= 1")
        if group.ray_memory <= 0:
            raise SizingError(f"workerGroups.{group.name}: no memory left for replicas")
        if not 0 <= group.min_replicas <= group.max_replicas:
            raise SizingError(f"workerGroups.{group.name}: need 0 <= minReplicas <= maxReplicas")
        out.append(group)
    return out


def replicas(serve_cfg: dict[str, Any]) -> list[Replica]:
    """Every deployment of the (validated) serve config, with what a replica asks for."""
    app = serve_cfg["applications"][0]
    models = (app.get("args") or {}).get("models") or {}
    out = []
    for dep in app["deployments"]:
        opts = dep.get("ray_actor_options") or {}
        auto = dep.get("autoscaling_config") or {}
        model = models.get(dep["name"]) or {}
        out.append(
            Replica(
                name=dep["name"],
                num_cpus=float(opts.get("num_cpus", 1)),
                memory=int(opts.get("memory", 0)),
                num_gpus=float(opts.get("num_gpus", 0)),
                custom=dict(opts.get("resources") or {}),
                label_selector=dict(opts.get("label_selector") or {}),
                min_replicas=int(auto.get("min_replicas", dep.get("num_replicas", 1))),
                max_replicas=int(auto.get("max_replicas", dep.get("num_replicas", 1))),
                enabled=bool(model.get("enabled", True)),
            )
        )
    return out


def fits(r: Replica, g: Group) -> bool:
    """Whether one replica may land on an empty pod of `g`: its label selector matches the
    group's labels and its resources fit (custom resources never do: no group offers any)."""
    selected = all(g.labels.get(k) == v for k, v in r.label_selector.items())
    return selected and not r.custom and Pod(g).room_for(r)


def group_of(cluster: dict[str, Any], names: list[str] | None = None) -> dict[str, str]:
    """Deployment -> the worker group it runs on: `placement`, else by kind (`placement_by_kind`:
    a model added to config/serve.yaml lands with its kind), except that with the gpu group
    enabled the deployments in `gpu.numGpus` run there."""
    from serve_app.registry import MODELS

    out = dict(cluster.get("placement") or {})
    by_kind = cluster.get("placementByKind") or {}
    for name in names or ():
        if name not in out and name in MODELS and MODELS[name].kind in by_kind:
            out[name] = by_kind[MODELS[name].kind]
    enabled = {g["name"] for g in cluster["workerGroups"] if g.get("enabled", True)}
    if "gpu" in enabled:
        for name in (cluster.get("gpu") or {}).get("numGpus") or {}:
            out[name] = "gpu"
    return out


def placement(cluster: dict[str, Any], reps: list[Replica], gs: list[Group]) -> dict[str, list]:
    """Deployment -> [its Group], checked complete (a list: pack() takes preferences)."""
    by_name = {g.name: g for g in gs}
    declared = group_of(cluster, [r.name for r in reps])
    names = {r.name for r in reps}
    missing, extra = sorted(names - set(declared)), sorted(set(declared) - names)
    if missing or extra:
        raise SizingError(
            f"kuberay/cluster.yaml placement must list exactly the deployments of "
            f"config/serve.yaml; missing {missing}, unknown {extra}"
        )
    out = {}
    for name, group_name in declared.items():
        if group_name not in by_name:
            raise SizingError(f"placement.{name}: no enabled worker group {group_name!r}")
        out[name] = [by_name[group_name]]
    return out


def pack(
    reps: list[Replica],
    meant: dict[str, list[Group]],
    count: str,
    *,
    everything: bool = False,
    limits: dict[str, int] | None = None,
) -> dict[str, list[Pod]]:
    """First-fit-decreasing packing of `count` ("min_replicas"/"max_replicas") replicas of
    every enabled deployment (or of all, with `everything`) into pods of their groups, at
    most `limits[group]` (default: the group's maxReplicas) pods a group.

    Ray's scheduler is not FFD, but FFD is within 22% of optimal, so a count that packs here
    with the maxReplicas to spare is a count the autoscaler can reach."""
    pods: dict[str, list[Pod]] = {}
    todo = [(r, i) for r in reps if r.enabled or everything for i in range(getattr(r, count))]
    todo.sort(key=lambda item: (item[0].memory, item[0].num_cpus), reverse=True)
    for r, _ in todo:
        for g in meant[r.name]:
            if not fits(r, g):
                continue
            group_pods = pods.setdefault(g.name, [])
            pod = next((p for p in group_pods if p.room_for(r)), None)
            most = (limits or {}).get(g.name, g.max_replicas)
            if pod is None and len(group_pods) < most:
                pod = Pod(g)
                group_pods.append(pod)
            if pod is not None:
                pod.add(r)
                break
        else:
            raise SizingError(
                f"{count}: no room for a replica of {r.name} ({r.num_cpus} CPU, {gib(r.memory)}) "
                f"in groups {[g.name for g in meant[r.name]]} within their maxReplicas"
            )
    return pods


def check_min(cluster: dict[str, Any], serve_cfg: dict[str, Any]) -> None:
    """Raise SizingError unless each enabled replica fits a pod of its group (the part of
    check() a profile with other pod sizes must still pass)."""
    gs = groups(cluster)
    reps = replicas(serve_cfg)
    meant = placement(cluster, reps, gs)
    for r in reps:
        if r.enabled and not any(fits(r, g) for g in meant[r.name]):
            raise SizingError(f"{r.name}: a replica fits no pod of its group")


def check(cluster: dict[str, Any], serve_cfg: dict[str, Any]) -> list[str]:
    """Raise SizingError unless the deployments fit the groups; return a summary for people.

    `serve_cfg` is the cluster's serve config (config/serve.yaml merged with the overlay).
    maxReplicas must hold every deployment at max_replicas, enabled or NOT: the groups are
    then the same whichever models are on, so toggling a model changes serveConfigV2 only."""
    gs = groups(cluster)
    reps = replicas(serve_cfg)
    meant = placement(cluster, reps, gs)
    lines = []
    for r in reps:
        where = [g.name for g in gs if fits(r, g)]
        state = "" if r.enabled else " (disabled)"
        lines.append(
            f"{r.name}: {r.num_cpus} CPU, {gib(r.memory)}, {r.num_gpus} GPU x "
            f"{r.min_replicas}..{r.max_replicas} on {where or 'no group'}{state}"
        )
        if r.num_cpus <= 0:
            raise SizingError(f"{r.name}: num_cpus 0 would let replicas land on the head")
        if not any(fits(r, g) for g in meant[r.name]):
            raise SizingError(
                f"{r.name}: a replica ({r.num_cpus} CPU, {gib(r.memory)}, {r.num_gpus} GPU) "
                f"fits no pod of group {[g.name for g in meant[r.name]]}; raise its cpu/memory "
                "in kuberay/cluster.yaml"
            )
    for count in ("min_replicas", "max_replicas"):
        packed = pack(reps, meant, count, everything=count == "max_replicas")
        for g in gs:
            n = len(packed.get(g.name, []))
            lines.append(f"{count}: group {g.name} needs {n} pod(s)")
            if count == "min_replicas" and n > g.min_replicas:
                # Not an error: a model switched on must not change the Ray cluster (see the
                # docstring); the autoscaler adds the pods at start. The tests hold the
                # shipped config to minReplicas.
                lines.append(
                    f"note: group {g.name}: min_replicas need {n} pods, minReplicas "
                    f"is {g.min_replicas}: the app waits for a scale-up at start"
                )
    return lines
