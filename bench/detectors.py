"""Each detector in-process vs through HTTP on the same image, in one run.

In-process: the model class the replica uses, decode included, same thread count, one
call after another. HTTP: the real Serve app (router + one replica per detector, resources
from config/serve.yaml scaled to this run), `--concurrency` clients posting the same bytes.
The ratio (HTTP calls/s over in-process calls/s) is what serving costs; p50/p95 per call.

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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DETECTORS = ("face-detect-pigo", "face-detect-opencv", "basic-face-detection", "cnn-face-detection")
SAM = ("sam-segmentation-light", "sam-segmentation", "sam-vit-h", "sam-mobile")


def stats(latencies: list[float], wall: float) -> dict[str, float]:
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return {
        "calls": len(latencies),
        "calls_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(statistics.median(latencies) * 1e3, 2),
        "p95_ms": round(q[18] * 1e3, 2),
    }


def in_process(name: str, data: bytes, calls: int, threads: int, model_dir: Path) -> dict:
    """The replica's own code path (decode + model + JSON result), no Serve."""
    from serve_app.deployments.detectors import DETECTORS as CLASSES
    from serve_app.deployments.params import parse_params

    cls = CLASSES[name].func_or_class
    options = {"threads": threads}
    if name == "cnn-face-detection":
        options.update(blob_sizes=[600, 300])
    replica = cls(name, options, str(model_dir), 50_000_000)
    model = replica.ready_model()
    params = parse_params(replica.PARAMS, {})
    replica._detect(model, data, params, "json", None)  # warm-up
    latencies = []
    start = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        replica._detect(model, data, params, "json", None)
        latencies.append(time.perf_counter() - t)
    return stats(latencies, time.perf_counter() - start)


def over_http(url: str, data: bytes, calls: int, concurrency: int) -> dict:
    import httpx

    with httpx.Client(timeout=60) as client:
        for _ in range(2):  # warm-up: connections, replica code paths
            client.post(url, content=data).raise_for_status()

        def one(_: int) -> float:
            t = time.perf_counter()
            client.post(url, content=data).raise_for_status()
            return time.perf_counter() - t

        start = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(one, range(calls)))
        return stats(latencies, time.perf_counter() - start)


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

    print(f"[1/3] in-process, {args.calls} calls each, {args.threads} thread(s)", flush=True)
    local = {n: in_process(n, data, args.calls, args.threads, model_dir) for n in DETECTORS}
    print("[2/3] starting Ray + Serve (router + one replica per detector)", flush=True)
    url = start_service(model_dir, args.threads)
    print(f"[3/3] HTTP, {args.calls} calls each, concurrency {args.concurrency}", flush=True)
    remote = {
        n: over_http(f"{url}/v1/detect/{n}", data, args.calls, args.concurrency) for n in DETECTORS
    }

    rows: dict[str, Any] = {}
    print(
        f"\n{'detector':24} {'in-proc/s':>10} {'http/s':>8} {'ratio':>6} "
        f"{'p50 in':>8} {'p50 http':>9} {'p95 http':>9}"
    )
    for n in DETECTORS:
        ratio = remote[n]["calls_per_s"] / local[n]["calls_per_s"]
        rows[n] = {
            "in_process": local[n],
            "http": remote[n],
            "http_over_in_process": round(ratio, 3),
        }
        print(
            f"{n:24} {local[n]['calls_per_s']:>10} {remote[n]['calls_per_s']:>8} "
            f"{ratio:>6.2f} {local[n]['p50_ms']:>8} {remote[n]['p50_ms']:>9} "
            f"{remote[n]['p95_ms']:>9}"
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
