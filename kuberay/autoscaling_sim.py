"""Local simulation of the RayService's autoscaling, without Kubernetes.

    python -m kuberay.autoscaling_sim --temp-dir /tmp/vs-sim-XXXX [--out timeline.json]

Starts its own Ray cluster whose worker node types are kuberay/cluster.yaml's worker groups
(same logical CPUs, memory and node labels per node, fewer nodes), with Ray's autoscaler v2
launching "nodes" as local raylets (kuberay/sim_provider.py). Deploys the cluster's serve config
(config/serve.yaml merged with the overlay, kuberay/overlay.py: the shipped num_cpus, memory,
label selectors, min/max replicas, two routers) cut down to the router, jobs, face-detect-opencv
(real code, no weight files) and sam-mobile as the small "tiny" SAM with random weights on the
`sam` node type; head num-cpus 0 as in the manifest. Then: load over HTTP on loopback until
Serve adds replicas up to the shipped max_replicas and the autoscaler adds nodes; no load until
both are back to the baseline. Prints and writes the timeline as JSON.

Time is compressed: Serve's metric push, upscale and downscale delays and the node idle
timeout are seconds here (on the cluster: 10 s, 30 s, 120 s, 60 s). Every phase is bounded.

Never runs `ray stop` (it would kill every Ray on the machine): every process it starts
carries a marker in its environment and is stopped by pid; the temp dir is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ray.cluster_utils import AutoscalingCluster

from kuberay import overlay, sizing
from kuberay.procs import MARKER, stop_processes
from serve_app.config import load_config
from serve_app.launch import APP_NAME, deploy_config, free_port, with_overrides

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
GROUP_LABEL = sizing.GROUP_LABEL

LOADED = "face-detect-opencv"  # no weight files, real OpenCV work per request
SAM = "sam-mobile"  # as the "tiny" SAM with random weights: small, but the real SAM code
# Timing only: min/max replicas and targets are the shipped ones.
SIM_AUTOSCALING = {
    "metrics_interval_s": 1,
    "look_back_period_s": 3,
    "upscale_delay_s": 2,
    "downscale_delay_s": 6,
}
SIM_ENV = {
    # Replicas and handles report load every second instead of every 10 s.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
}
NODE_IDLE_TIMEOUT_S = 5
OBJECT_STORE_BYTES = 100 * 2**20  # per simulated node; request bodies here are small
MAX_NODES_PER_GROUP = 4  # the machine's limit, not the groups' (10 and 4 on the cluster)


class LocalAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster that shares the machine: own ports, temp dir and processes.

    The base class reads a config file pip installs of Ray do not ship and runs
    `ray stop --force`, which would kill other people's Rays; both are replaced here."""

    def __init__(self, temp_dir: Path, worker_node_types: dict[str, Any], sim_id: str) -> None:
        self.temp_dir = temp_dir
        self.sim_id = sim_id
        self.gcs_port = free_port()
        # Ray turns 127.0.0.1 into this machine's address (resolve_ip_for_localhost) for
        # every node; use that address everywhere so head, nodes and driver agree.
        from ray._private.services import resolve_ip_for_localhost

        self.node_ip = resolve_ip_for_localhost("127.0.0.1")
        self.gcs_address = f"{self.node_ip}:{self.gcs_port}"
        super().__init__({"CPU": 0}, worker_node_types, autoscaler_v2=True)

    def _generate_config(
        self,
        head_resources: dict[str, Any],
        worker_node_types: dict[str, Any],
        autoscaler_v2: bool = False,
        **config_kwargs: Any,
    ) -> dict[str, Any]:
        # Inline what ray's fake_multi_node/example.yaml would provide.
        return {
            "cluster_name": f"visionserve-sim-{self.sim_id[:8]}",
            "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
            "provider": {
                "type": "external",
                "module": "kuberay.sim_provider.LoopbackFakeProvider",
                "gcs_address": self.gcs_address,
                "head_node_id": FAKE_HEAD_NODE_ID,
                "launch_multiple": True,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                "ray.head.default": {
                    "resources": head_resources,
                    "node_config": {},
                    "max_workers": 0,
                },
                **worker_node_types,
            },
            "head_node_type": "ray.head.default",
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": NODE_IDLE_TIMEOUT_S / 60,
            "auth": {},
            "docker": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            "initialization_commands": [],
            "setup_commands": [],
            "head_setup_commands": [],
            "worker_setup_commands": [],
            "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self, _system_config: dict | None = None, override_env: dict | None = None) -> None:
        config_file = self.temp_dir / "autoscaling.json"
        config_file.write_text(json.dumps(self._config))
        ports = {
            name: free_port()
            for name in (
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
                "ray-client-server-port",
            )
        }
        cmd = [
            str(RAY),
            "start",
            "--head",
            f"--node-ip-address={self.node_ip}",
            f"--port={self.gcs_port}",
            f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config_file}",
            "--num-cpus=0",  # as the RayService head: no replicas there
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--include-log-monitor=false",  # one process less; logs stay in the temp dir
            "--min-worker-port=0",
            "--max-worker-port=0",  # any free port, not 10002-19999
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        env = {
            **os.environ,
            **SIM_ENV,
            MARKER: self.sim_id,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "RAY_FAKE_CLUSTER": "1",
            "RAY_enable_autoscaler_v2": "1",
            "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
            "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
            "RAY_USAGE_STATS_ENABLED": "0",
            **(override_env or {}),
        }
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)

    def shutdown(self) -> None:
        stop_processes(self.sim_id)


def node_types(cluster_cfg: dict[str, Any], groups_used: set[str]) -> dict[str, Any]:
    """kuberay/cluster.yaml's worker groups as autoscaler node types: the same logical CPUs
    and memory per node, at most MAX_NODES_PER_GROUP nodes, one kept for the groups in use."""
    out = {}
    for g in sizing.groups(cluster_cfg):
        out[g.name] = {
            "resources": {
                "CPU": g.ray_cpus,
                "memory": g.ray_memory,
                "object_store_memory": OBJECT_STORE_BYTES,
            },
            "labels": dict(g.labels),
            "node_config": {},
            # None kept at min: the nodes come and go with the replicas' demand.
            "min_workers": 0,
            "max_workers": min(g.max_replicas, MAX_NODES_PER_GROUP),
        }
    return out


def sim_serve_config(port: int, model_dir: Path, cluster_cfg: dict[str, Any]) -> dict[str, Any]:
    """The cluster's serve config with only the router, jobs, the loaded detector and the small
    SAM; fast autoscaling; the proxy on loopback."""
    cfg = overlay.cluster_serve_config(load_config(), cluster_cfg)
    cfg["http_options"]["host"] = "127.0.0.1"
    models = cfg["applications"][0]["args"]["models"]
    fast = {"autoscaling_config": SIM_AUTOSCALING}
    return with_overrides(
        cfg,
        port=port,
        # The cluster requires an API key (the RayService's Secret); the local simulation runs
        # open, on loopback only.
        args={"model_dir": str(model_dir), "require_api_key": False},
        models={
            **{name: None for name in models if name not in (LOADED, SAM)},
            SAM: {"options": {"variant": "tiny", "random_weights": True}},
        },
        deployments={name: fast for name in ("router", "jobs", LOADED, SAM)},
    )


def test_image() -> bytes:
    photo = REPO.parent / "shared" / "data" / "images" / "pigo_sample.jpg"
    if photo.exists():
        return photo.read_bytes()
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    return cv2.imencode(".jpg", rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))[1].tobytes()


class Load:
    """Closed-loop HTTP clients on loopback: each keeps one request in flight. Bounded by
    `max_requests` and by stop()."""

    def __init__(self, url: str, body: bytes, clients: int, max_requests: int) -> None:
        self.url, self.body, self.clients, self.max_requests = url, body, clients, max_requests
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for _ in range(self.clients):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=70)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                with self._lock:
                    if self.ok + self.failed >= self.max_requests:
                        return
                try:
                    r = client.post(self.url, content=self.body)
                    good, why = r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as err:
                    good, why = False, repr(err)
                with self._lock:
                    if good:
                        self.ok += 1
                    else:
                        self.failed += 1
                        if len(self.errors) < 10:
                            self.errors.append(why)


def sample(t0: float, load: Load | None, phase: str) -> dict[str, Any]:
    import ray
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    replicas, starting = {}, 0
    if app is not None:
        for name, dep in app.deployments.items():
            states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
            replicas[name] = states.get("RUNNING", 0)
            if name == LOADED:  # decided by Serve, waiting for a node or still importing
                starting = states.get("STARTING", 0)
    nodes: dict[str, int] = {}
    for node in ray.nodes():
        if node["Alive"] and node["NodeID"] != FAKE_HEAD_NODE_ID:
            group = (node.get("Labels") or {}).get(GROUP_LABEL, "?")
            nodes[group] = nodes.get(group, 0) + 1
    return {
        "t": round(time.monotonic() - t0, 1),
        "phase": phase,
        "replicas": replicas.get(LOADED, 0),
        "starting": starting,
        "replicas_all": sum(replicas.values()),
        "worker_nodes": sum(nodes.values()),
        "nodes": nodes,
        "requests_ok": load.ok if load else 0,
        "requests_failed": load.failed if load else 0,
    }


def placement() -> dict[str, dict[str, float]]:
    """Node group -> CPUs in use there (from the GCS: the state API would need a dashboard,
    and the default dashboard port may be another session's). Shows which group holds what:
    the replicas ask for known CPU shares."""
    import ray
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    out: dict[str, dict[str, float]] = {}
    for node in ray.nodes():
        if not node["Alive"] or node["NodeID"] == FAKE_HEAD_NODE_ID:
            continue
        group = (node.get("Labels") or {}).get(GROUP_LABEL, "?")
        total = node["Resources"].get("CPU", 0)
        used = total - free.get(node["NodeID"], {}).get("CPU", 0)
        row = out.setdefault(group, {"nodes": 0, "cpus_used": 0.0})
        row["nodes"] += 1
        row["cpus_used"] = round(row["cpus_used"] + used, 2)
    return out


def run(
    temp_dir: Path,
    sim_id: str,
    *,
    clients: int,
    load_s: float,
    drain_s: float,
    startup_s: float,
) -> dict[str, Any]:
    """The whole simulation. Each phase is bounded: starting the cluster and the app
    (`startup_s`), the load (`load_s`, less once scaled out) and the drain (`drain_s`, less
    once back to the baseline)."""
    import ray

    t0 = time.monotonic()
    cluster_cfg = sizing.load_cluster()
    types = node_types(cluster_cfg, set())
    cluster = LocalAutoscalingCluster(temp_dir, types, sim_id)
    timeline: list[dict[str, Any]] = []
    marks: dict[str, float] = {}
    load: Load | None = None
    marks["load_avg_start"] = round(os.getloadavg()[0], 1)
    # The dispatch is by node group label; the sizes are the cluster's.
    try:
        cluster.start()
        marks["head_up"] = round(time.monotonic() - t0, 1)
        ray.init(
            address=cluster.gcs_address,
            namespace="serve",
            log_to_driver=False,
            logging_level="WARNING",
        )
        port = free_port()
        model_dir = temp_dir / "models"
        model_dir.mkdir()
        serve_cfg = sim_serve_config(port, model_dir, cluster_cfg)
        max_replicas = next(
            d for d in serve_cfg["applications"][0]["deployments"] if d["name"] == LOADED
        )["autoscaling_config"]["max_replicas"]
        marks["max_replicas"] = max_replicas
        deploy_config(serve_cfg, timeout_s=max(10.0, t0 + startup_s - time.monotonic()))
        marks["app_running"] = round(time.monotonic() - t0, 1)

        def record(phase: str) -> dict[str, Any]:
            try:
                row = sample(t0, load, phase)
            except Exception as err:  # a slow controller answer: keep the last state
                print(f"sample failed: {err!r}", file=sys.stderr)
                row = {**timeline[-1], "t": round(time.monotonic() - t0, 1), "phase": phase}
            timeline.append(row)
            print(json.dumps(row), flush=True)
            return row

        baseline = record("idle")
        marks["placement"] = placement()
        load = Load(
            f"http://127.0.0.1:{port}/v1/detect/{LOADED}",
            test_image(),
            clients=clients,
            max_requests=20_000,
        )
        marks["load_start"] = round(time.monotonic() - t0, 1)
        load.start()
        end = time.monotonic() + load_s
        held = 0
        while time.monotonic() < end:
            time.sleep(1)
            row = record("load")
            scaled = (
                row["worker_nodes"] > baseline["worker_nodes"] and row["replicas"] >= max_replicas
            )
            held = held + 1 if scaled else 0
            if held >= 5:  # scaled out and serving there for 5 s: enough seen
                break
        load.stop()
        marks["load_stop"] = round(time.monotonic() - t0, 1)
        end = time.monotonic() + drain_s
        while time.monotonic() < end:
            time.sleep(1)
            row = record("drain")
            if (
                row["replicas"] <= baseline["replicas"]
                and row["worker_nodes"] <= baseline["worker_nodes"]
            ):
                break
        marks["end"] = round(time.monotonic() - t0, 1)
        marks["load_avg_end"] = round(os.getloadavg()[0], 1)
        return _report(timeline, marks, load, types, baseline)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        left = stop_processes(sim_id)
        if left:
            print(f"warning: {left} simulation processes did not stop", file=sys.stderr)


def _report(
    timeline: list[dict[str, Any]],
    marks: dict[str, float],
    load: Load,
    types: dict[str, Any],
    baseline: dict[str, Any],
) -> dict[str, Any]:
    loaded = [r for r in timeline if r["phase"] == "load"]
    drained = [r for r in timeline if r["phase"] == "drain"]
    first_added = next(
        (r["t"] for r in loaded + drained if r["worker_nodes"] > baseline["worker_nodes"]), None
    )
    last = timeline[-1]
    return {
        "deployment": LOADED,
        "autoscaler": "v2",
        "sim_autoscaling": SIM_AUTOSCALING,
        "sim_env": SIM_ENV,
        "node_idle_timeout_s": NODE_IDLE_TIMEOUT_S,
        "node_types": {
            k: {"resources": v["resources"], "min": v["min_workers"], "max": v["max_workers"]}
            for k, v in types.items()
        },
        "marks": marks,
        "summary": {
            "baseline_replicas": baseline["replicas"],
            "baseline_worker_nodes": baseline["worker_nodes"],
            "peak_replicas": max(r["replicas"] for r in timeline),
            "peak_worker_nodes": max(r["worker_nodes"] for r in timeline),
            "final_replicas": last["replicas"],
            "final_worker_nodes": last["worker_nodes"],
            "t_first_node_added": first_added,
            "requests_ok": load.ok,
            "requests_failed": load.failed,
        },
        "errors": load.errors,
        "timeline": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kuberay.autoscaling_sim")
    parser.add_argument(
        "--temp-dir",
        type=Path,
        help="an empty directory of its own (default: a new one, removed after)",
    )
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    parser.add_argument(
        "--sim-id",
        help="marker for its processes (kuberay/procs.py), so a "
        "caller can clean up after a crash; default: random",
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument(
        "--startup-s",
        type=float,
        default=150,
        help="at most this long to start the cluster and deploy the app",
    )
    parser.add_argument("--load-s", type=float, default=45, help="at most this long")
    parser.add_argument("--drain-s", type=float, default=60, help="at most this long")
    args = parser.parse_args(argv)

    # A SIGTERM (e.g. a test timeout) must still run the cleanup in run()'s finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    temp_dir = args.temp_dir or Path(tempfile.mkdtemp(prefix="vs-sim-"))
    report = run(
        temp_dir.resolve(),
        args.sim_id or os.urandom(8).hex(),
        clients=args.clients,
        load_s=args.load_s,
        drain_s=args.drain_s,
        startup_s=args.startup_s,
    )
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
    print("REPORT " + json.dumps(report))
    if args.temp_dir is None:
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
