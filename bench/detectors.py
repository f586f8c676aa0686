"""Each detector in-process vs through HTTP on the same image, in one run.

In-process: the replica's own class and code path (decode, model, JSON result), same
thread count, called by `--concurrency` threads. HTTP: the real Serve app (router + one
replica per detector), `--concurrency` clients posting the same bytes. Rounds alternate
between the two so that load from elsewhere hits both alike. The ratio (HTTP calls/s over
in-process calls/s) is what serving costs; p50/p95 per call.

    .venv/bin/python -m bench.detectors [--calls N] [--concurrency C] [--image PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app.registry import names_of

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DETECTORS = tuple(names_of("detector"))
SAM = tuple(names_of("segmenter"))


def stats(latencies: list[float], wall: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2),
        "p95_ms": round(q[18] * 1e3, 2),
    }


def load_replica(name: str, threads: int, model_dir: Path) -> Any:
    """The replica class the deployment runs, constructed outside Serve."""
    from serve_app.registry import MODELS

    cls = MODELS[name].deployment_class().func_or_class
    return cls(name, {"threads": threads}, str(model_dir), 50_000_000)


def timed_calls(call: Callable[[], Any], calls: int, concurrency: int) -> tuple[list[float], float]:
    """Latencies of `calls` calls made by `concurrency` threads, and the wall time."""

    def one(_: int) -> float:
        t = time.perf_counter()
        call()
        return time.perf_counter() - t

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(calls)))
    return latencies, time.perf_counter() - start


def measure(
    name: str, data: bytes, url: str, client: Any, args: argparse.Namespace, model_dir: Path
) -> dict[str, Any]:
    """Alternate in-process and HTTP rounds so that outside load hits both sides alike."""
    from serve_app.deployments.params import parse_params

    replica = load_replica(name, args.threads, model_dir)
    model = replica.ready_model()
    params = parse_params(replica.PARAMS, {})

    def local() -> None:
        replica._detect(model, data, params, "json", None)

    server_ms: list[float] = []

    def remote() -> None:
        r = client.post(url, content=data)
        r.raise_for_status()
        server_ms.append(r.json()["timing_ms"]["total"])

    for warm in (local, remote, remote):
        warm()
    sides: dict[str, dict[str, list[float]]] = {
        "in_process": {"lat": [], "wall": []},
        "http": {"lat": [], "wall": []},
    }
    per_round = max(1, args.calls // args.rounds)
    for _ in range(args.rounds):
        for side, call in (("in_process", local), ("http", remote)):
            lat, wall = timed_calls(call, per_round, args.concurrency)
            sides[side]["lat"] += lat
            sides[side]["wall"].append(wall)
    out = {side: stats(v["lat"], sum(v["wall"])) for side, v in sides.items()}
    out["http_over_in_process"] = round(
        out["http"]["calls_per_s"] / out["in_process"]["calls_per_s"], 3
    )
    # Where the time goes: the replica's own decode+model+render time vs what the client saw.
    replica_p50 = statistics.median(server_ms)
    out["where_time_goes_p50_ms"] = {
        "replica_work": round(replica_p50, 2),
        "proxy_router_queue_and_transfer": round(out["http"]["p50_ms"] - replica_p50, 2),
    }
    return out


def start_service(model_dir: Path, threads: int) -> str:
    import ray

    from serve_app.config import load_config
    from serve_app.launch import deploy_config, free_port, with_overrides

    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="vs-bench-"),
        namespace="serve",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
    )
    port = free_port()
    one = {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {"num_cpus": 0.1, "memory": 512 * 2**20},
    }
    cfg = with_overrides(
        load_config(),
        port=port,
        args={"model_dir": str(model_dir)},
        models={
            **{n: None for n in SAM},
            **{n: {"options": {"threads": threads}} for n in DETECTORS},
        },
        deployments={n: one for n in ("router", "jobs", *DETECTORS)},
    )
    deploy_config(cfg)
    return f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=DATA / "images" / "pigo_sample.jpg")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads, both sides")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "detectors.json")
    args = ap.parse_args(argv)
    if not args.image.exists():
        print(f"{args.image} is absent (../shared/data); nothing to measure", file=sys.stderr)
        return 1

    import cv2

    from serve_app.models import weights

    cv2.setNumThreads(args.threads)
    data = args.image.read_bytes()
    model_dir = Path(tempfile.mkdtemp(prefix="vs-bench-models-"))
    weights.fetch(["facefinder"], model_dir=model_dir, from_dir=DATA / "pico", progress=False)

    print("[1/2] starting Ray + Serve (router + one replica per detector)", flush=True)
    url = start_service(model_dir, args.threads)
    print(
        f"[2/2] {args.calls} calls per side per detector, concurrency {args.concurrency}, "
        f"{args.rounds} alternating rounds",
        flush=True,
    )
    import httpx

    rows: dict[str, Any] = {}
    with httpx.Client(timeout=60) as client:
        for n in DETECTORS:
            rows[n] = measure(n, data, f"{url}/v1/detect/{n}", client, args, model_dir)
            r = rows[n]
            print(
                f"  {n:24} in-process {r['in_process']['calls_per_s']:>7}/s "
                f"http {r['http']['calls_per_s']:>7}/s  ratio {r['http_over_in_process']:.2f}  "
                f"p50 {r['in_process']['p50_ms']} / {r['http']['p50_ms']} ms  "
                f"p95 {r['in_process']['p95_ms']} / {r['http']['p95_ms']} ms  "
                f"(http p50: replica {r['where_time_goes_p50_ms']['replica_work']} ms)",
                flush=True,
            )
    report = {
        "image": args.image.name,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "detectors": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out}")

    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
