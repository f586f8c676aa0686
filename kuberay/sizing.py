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
from serve_app.registry import MODELS

CLUSTER_CONFIG = Path(__file__).resolve().parent / "cluster.yaml"


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
    out = []
    for g in cluster["workerGroups"]:
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
                min_replicas=int(auto.get("min_replicas", dep.get("num_replicas", 1))),
                max_replicas=int(auto.get("max_replicas", dep.get("num_replicas", 1))),
                enabled=bool(model.get("enabled", True)),
            )
        )
    return out


def fits(r: Replica, g: Group) -> bool:
    """Whether one replica fits an empty pod of `g` (custom resources never do: no group
    offers any)."""
    return not r.custom and Pod(g).room_for(r)


def placement(cluster: dict[str, Any], reps: list[Replica], gs: list[Group]) -> dict[str, list]:
    """Deployment -> its meant groups (Group objects, preferred first), checked complete."""
    by_name = {g.name: g for g in gs}
    declared = cluster.get("placement") or {}
    names = {r.name for r in reps}
    missing, extra = sorted(names - set(declared)), sorted(set(declared) - names)
    if missing or extra:
        raise SizingError(
            f"kuberay/cluster.yaml placement must list exactly the deployments of "
            f"config/serve.yaml; missing {missing}, unknown {extra}"
        )
    out = {}
    for name, group_names in declared.items():
        unknown = [n for n in group_names if n not in by_name]
        if unknown or not group_names:
            raise SizingError(f"placement.{name}: unknown or no worker group(s) {unknown}")
        out[name] = [by_name[n] for n in group_names]
    return out


def pack(reps: list[Replica], meant: dict[str, list[Group]], count: str) -> dict[str, list[Pod]]:
    """First-fit-decreasing packing of `count` ("min_replicas"/"max_replicas") replicas of
    every enabled deployment into pods of their meant groups, preferred group first.

    Ray's scheduler is not FFD, but FFD is within 22% of optimal, so a count that packs here
    with the maxReplicas to spare is a count the autoscaler can reach."""
    pods: dict[str, list[Pod]] = {}
    todo = [(r, i) for r in reps if r.enabled for i in range(getattr(r, count))]
    todo.sort(key=lambda item: (item[0].memory, item[0].num_cpus), reverse=True)
    for r, _ in todo:
        for g in meant[r.name]:
            if not fits(r, g):
                continue
            group_pods = pods.setdefault(g.name, [])
            pod = next((p for p in group_pods if p.room_for(r)), None)
            if pod is None and len(group_pods) < g.max_replicas:
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


def check(cluster: dict[str, Any], serve_cfg: dict[str, Any]) -> list[str]:
    """Raise SizingError unless the deployments fit the groups; return a summary for people."""
    gs = groups(cluster)
    reps = replicas(serve_cfg)
    meant = placement(cluster, reps, gs)
    lines = []
    for r in reps:
        where = [g.name for g in gs if fits(r, g)]
        state = "" if r.enabled else " (disabled: never scheduled)"
        lines.append(
            f"{r.name}: {r.num_cpus} CPU, {gib(r.memory)} x {r.min_replicas}..{r.max_replicas}"
            f" fits {where or 'no group'}{state}"
        )
        if not r.enabled:
            continue
        if not any(fits(r, g) for g in meant[r.name]):
            raise SizingError(
                f"{r.name}: a replica ({r.num_cpus} CPU, {gib(r.memory)}) fits no pod of its "
                f"groups {[g.name for g in meant[r.name]]}; raise their cpu/memory in "
                "kuberay/cluster.yaml"
            )
        if r.num_cpus <= 0:
            raise SizingError(f"{r.name}: num_cpus 0 would let replicas land on the head")
        strays = [n for n in where if n not in {g.name for g in meant[r.name]}]
        if r.name in MODELS and MODELS[r.name].kind == "segmenter" and strays:
            raise SizingError(f"{r.name}: also fits {strays}, which are not meant for it")
    for count in ("min_replicas", "max_replicas"):
        packed = pack(reps, meant, count)
        for g in gs:
            n = len(packed.get(g.name, []))
            lines.append(f"{count}: group {g.name} needs {n} pod(s)")
            if count == "min_replicas" and n > g.min_replicas:
                raise SizingError(
                    f"group {g.name}: min_replicas of its deployments need {n} pods but "
                    f"minReplicas is {g.min_replicas}; the app would wait for a scale-up"
                )
    return lines
