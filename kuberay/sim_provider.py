"""A fake node provider for the local autoscaling simulation (kuberay/autoscaling_sim.py).

Ray's FakeMultiNodeProvider starts each "node" as raylet processes on this machine. What it
does not do and the simulation needs: a node type with a logical `memory` resource. The base
class passes it among the custom resources, which Ray refuses; here it becomes the node's
`memory` (as KubeRay passes rayStartParams.memory to `ray start --memory`), so the worker
groups' memory sizing is what gets simulated. It also insists on a GCS address, so that nodes
never look for a Ray at the default port (another session's).

Loaded by the Ray autoscaler (monitor process) as `provider: {type: external, module: ...}`;
the `external` type also avoids the base config file that pip installs of Ray lack.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import ray
import ray._private.node
import ray._private.ray_constants as ray_constants
from ray._private.parameter import RayParams
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_NAME,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)


class LoopbackFakeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(
        self,
        node_config: dict[str, Any],
        tags: dict[str, str],
        count: int,
        resources: dict[str, float],
        labels: dict[str, str],
    ) -> None:
        if not self._gcs_address:
            raise RuntimeError("provider.gcs_address must be set: nodes join the head's GCS")
        resources = copy.deepcopy(resources)  # popped below; the caller's dict is reused
        with self.lock:
            node_type = tags[TAG_RAY_USER_NODE_TYPE]
            node_id = self._next_hex_node_id()
            params = RayParams(
                min_worker_port=0,
                max_worker_port=0,
                dashboard_port=None,
                dashboard_agent_listen_port=0,
                num_cpus=resources.pop("CPU", 0),
                num_gpus=resources.pop("GPU", 0),
                memory=resources.pop("memory", None),
                object_store_memory=resources.pop("object_store_memory", None),
                resources=resources,
                labels=labels,
                redis_address=self._gcs_address,
                gcs_address=self._gcs_address,
                env_vars={
                    # The autoscaler matches nodes to the instances it launched by these.
                    "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id,
                    "RAY_CLOUD_INSTANCE_ID": node_id,
                    "RAY_NODE_TYPE_NAME": node_type,
                    ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                    ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels),
                },
            )
            node = ray._private.node.Node(
                params, head=False, shutdown_at_exit=False, spawn_reaper=False
            )
            self._nodes[node_id] = {
                "tags": {
                    TAG_RAY_NODE_KIND: NODE_KIND_WORKER,
                    TAG_RAY_USER_NODE_TYPE: node_type,
                    TAG_RAY_NODE_NAME: node_id,
                    TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE,
                    **tags,
                },
                "node": node,
            }
