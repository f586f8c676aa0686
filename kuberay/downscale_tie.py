"""Minimal reproduction: Serve's downscale can keep a replica on a node the autoscaler added,
so that node never goes idle (the "stuck scale-down" of the autoscaling simulation).

    python -m kuberay.downscale_tie

Runs Ray Serve's own DeploymentScheduler._get_replicas_to_stop (ray 2.58) on a hand-made
placement, no cluster needed. Serve stops replicas on the nodes with the FEWEST replicas of all
deployments first and never moves a replica; among nodes with equal counts the first seen
wins, which is usually an old (baseline) node. Placement (4 detector replicas, scale 4 -> 1):

    A (baseline): router, detector-1        B (baseline): router, jobs
    C (added):    detector-2, detector-3    D (added):    detector-4

Serve stops detector-4 (D, 1 replica), then ties A and C at 2: it takes detector-1 on A, then
detector-3 on C. detector-2 stays on C, A still holds a router: 3 nodes where 2 would do,
until the next scale event. Not reported upstream from here (no internet access); the
docstring of _get_replicas_to_stop itself points at ray-project/ray#20599. A fix in Serve would
break the tie towards the node that would then be empty (or rebalance).
"""

from __future__ import annotations

from typing import Any


class _Nodes:
    """The one thing _get_replicas_to_stop asks the cluster: a node's labels."""

    def get_node_labels(self, node_id: str) -> dict[str, str]:
        return {}


def reproduce() -> dict[str, Any]:
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.deployment_scheduler import (
        DefaultDeploymentScheduler,
        SpreadDeploymentSchedulingPolicy,
    )

    sched = DefaultDeploymentScheduler(
        _Nodes(), head_node_id="head", create_placement_group_fn=None
    )
    ids = {
        name: DeploymentID(name=name, app_name="visionserve")
        for name in ("router", "jobs", "detector")
    }
    for dep in ids.values():
        sched.on_deployment_created(dep, SpreadDeploymentSchedulingPolicy())
    placement = [
        ("router", "router-1", "A"),
        ("router", "router-2", "B"),
        ("jobs", "jobs", "B"),
        ("detector", "detector-1", "A"),
        ("detector", "detector-2", "C"),
        ("detector", "detector-3", "C"),
        ("detector", "detector-4", "D"),
    ]
    where = {}
    for dep, replica, node in placement:
        rid = ReplicaID(unique_id=replica, deployment_id=ids[dep])
        sched.on_replica_running(rid, node)
        where[replica] = node
    stopped = sched._get_replicas_to_stop(ids["detector"], 3)
    names = sorted(r.unique_id for r in stopped)
    kept = [r for d, r, _ in placement if d == "detector" and r not in names]
    busy = {node for (d, r, node) in placement if r not in names}
    return {
        "stopped": names,
        "kept": kept,
        "kept_on": [where[r] for r in kept],
        "nodes_still_busy": sorted(busy),
    }


if __name__ == "__main__":
    print(reproduce())
