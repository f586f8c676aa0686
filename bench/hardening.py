"""Hardening figures: what the limits of issue 11 cost and protect, as ratios in one run.

    python bench/hardening.py [--quick]

1. Pico on a 50 MP image in a fresh process (what a replica holds): peak RSS and time at
   the store parameters and at the largest window count the budget admits, against the
   replica's `memory` budget from config/serve.yaml; the worst parameters are refused.
2. Small requests' latency while JSON bodies are sent (the router parses them): p50 of a
   small detect call idle (before and after) vs while one client (its own process) keeps
   sending 50 MiB JSON bodies (refused at the cap, in Serve's proxy: serve_app/proxy.py)
   or cap-sized JSON bodies of many values (parsed), as ratios to the mean idle p50.

Writes bench/results/hardening.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

PICO_SCRIPT = r"""
import asyncio, json, resource, sys, time
import cv2, numpy as np
from serve_app.registry import MODELS
from serve_app.errors import ServiceError
model_dir, image_path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cls = MODELS["face-detect-pigo"].deployment_class().func_or_class
dep = cls("face-detect-pigo", {}, model_dir, 50_000_000)
src = cv2.imread(image_path)
data = cv2.imencode(".jpg", cv2.resize(src, (8660, 5773)), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
data = data.tobytes()
del src
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
try:
    r = asyncio.run(dep.detect(data, params))
    out = {"status": 200, "faces": r["count"], "timing_ms": r["timing_ms"]}
except ServiceError as err:
    out = {"status": err.status, "error": err.code, "detail": err.message}
out["seconds"] = round(time.perf_counter() - t0, 2)
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
out["rss_before_request_mib"] = base // 1024
print(json.dumps(out))
"""


def pico_50mp(model_dir: Path, quick: bool) -> dict:
    from serve_app.config import deployment_options, load_config
    from serve_app.models.pico import PicoParams

    budget = deployment_options(load_config())["face-detect-pigo"]["ray_actor_options"]["memory"]
    cases = {"store": {}}
    # The most windows the budget (200 M) admits at the default shift: min_size lowered.
    for min_size in range(20, 3, -1):
        if PicoParams(min_size=min_size).windows(5773, 8660) > 200_000_000:
            break
        largest = min_size
    if not quick:
        cases[f"largest admitted (min_size={largest})"] = {"min_size": largest}
    cases["worst (min_size=4, shift 0.01, scale 1.01)"] = {
        "min_size": 4,
        "shift_factor": 0.01,
        "scale_factor": 1.01,
        "max_size": 20000,
    }
    out = {"memory_budget_mib": budget // 2**20, "cases": {}}
    for name, params in cases.items():
        print(f"  pico 50 MP, {name} ...", flush=True)
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                PICO_SCRIPT,
                str(model_dir),
                str(SHARED / "images" / "truck.jpg"),
                json.dumps(params),
            ],
            capture_output=True,
            cwd=ROOT,
            timeout=900,
        )
        lines = run.stdout.decode().strip().splitlines()
        result = json.loads(lines[-1]) if lines else {"failed": run.stderr.decode()[-500:]}
        result["windows_millions"] = round(PicoParams(**params).windows(5773, 8660) / 1e6, 1)
        result["peak_over_budget"] = round(result.get("peak_rss_mib", 0) * 2**20 / budget, 3)
        print(f"    {result}", flush=True)
        out["cases"][name] = result
    return out


# The big-body client, in a process of its own as a real one would be: in the measuring
# process its Python work would compete with the small calls for the GIL, which is the
# bench's cost, not the service's. Sends one body at a time until the stop file appears.
SENDER_SCRIPT = r"""
import json, os, sys, httpx
url, body_path, stop_path = sys.argv[1:4]
body = open(body_path, "rb").read()
statuses = []
with httpx.Client(base_url=url, timeout=120) as c:
    while not os.path.exists(stop_path):
        try:
            r = c.post("/v1/detect/face-detect-opencv", content=body,
                       headers={"content-type": "application/json"})
            statuses.append(r.status_code)
        except httpx.TransportError:  # a refusal that cut the upload short
            statuses.append(0)
print(json.dumps(statuses))
"""


def start_service(model_dir: Path) -> str:

    from serve_app.config import load_config
    from serve_app.launch import deploy_config, free_port, start_local_ray, with_overrides

    start_local_ray("vs-bench-")  # with the proxy's body caps (serve_app/proxy.py)
    port = free_port()
    one = {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {"num_cpus": 0.1, "memory": 512 * 2**20},
    }
    sam = ("sam-segmentation-light", "sam-segmentation", "sam-vit-h", "sam-mobile")
    cfg = with_overrides(
        load_config(),
        port=port,
        args={"model_dir": str(model_dir)},
        models={
            **{n: None for n in sam},
            "face-detect-pigo": None,
            "basic-face-detection": None,
            "cnn-face-detection": None,
        },
        deployments={n: one for n in ("router", "jobs", "face-detect-opencv")},
    )
    deploy_config(cfg)
    return f"http://127.0.0.1:{port}"


def json_load(url: str, quick: bool) -> dict:
    import httpx

    small = (SHARED / "images" / "pigo_sample.jpg").read_bytes()
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(small, np.uint8), 1)
    small = cv2.imencode(".jpg", cv2.resize(img, (160, 200)))[1].tobytes()
    n = 40 if quick else 120
    big_50mib = b'{"image_base64": "' + b"A" * (50 * 2**20) + b'"}'
    from serve_app.inputs.request import MAX_JSON_TOKENS

    # As many values as a body may hold (just under the token cap), padded with a long
    # string to the JSON byte cap: the most parsing one admitted body costs.
    values = b"[" + b",".join([b"1"] * (MAX_JSON_TOKENS - 8)) + b"]"
    pad = 8 * 2**20 - len(values) - 64
    cap_body = (
        b'{"url": "http://127.0.0.2:9/x.jpg", "x": ' + values + b', "p": "' + b"A" * pad + b'"}'
    )

    def small_calls(client: httpx.Client) -> list[float]:
        lat = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post("/v1/detect/face-detect-opencv", content=small)
            assert r.status_code == 200, r.text
            lat.append(time.perf_counter() - t0)
        return lat

    out = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        small_calls(client)  # warm up
        # One sender, one body at a time: a big body always in flight, as in the case.
        for name, body in (
            ("idle", None),
            ("50 MiB JSON bodies", big_50mib),
            ("8 MiB JSON bodies of 65k values", cap_body),
            ("idle again", None),
        ):
            statuses: list[int] = []
            sender = None
            if body is not None:
                work = Path(tempfile.mkdtemp(prefix="vs-bench-json-"))
                (work / "body").write_bytes(body)
                stop = work / "stop"
                sender = subprocess.Popen(
                    [sys.executable, "-c", SENDER_SCRIPT, url, str(work / "body"), str(stop)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                time.sleep(1.0)
            lat = small_calls(client)
            if sender is not None:
                stop.touch()
                statuses = json.loads(sender.communicate(timeout=120)[0])
                shutil.rmtree(work)
            out[name] = {
                "p50_ms": round(statistics.median(lat) * 1e3, 1),
                "p95_ms": round(sorted(lat)[int(0.95 * len(lat))] * 1e3, 1),
                "big_bodies_sent": len(statuses),
                "big_body_statuses": sorted(set(statuses)),
            }
            print(f"  {name}: {out[name]}", flush=True)
    idle = (out["idle"]["p50_ms"] + out["idle again"]["p50_ms"]) / 2
    for name in list(out):
        out[name]["p50_over_idle"] = round(out[name]["p50_ms"] / idle, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hardening.json")
    ap.add_argument(
        "--only", choices=("pico", "json"), help="rerun one section into the existing JSON"
    )
    args = ap.parse_args(argv)
    from serve_app.models import weights

    model_dir = Path(tempfile.mkdtemp(prefix="vs-bench-models-"))
    weights.fetch(["facefinder"], model_dir=model_dir, from_dir=SHARED / "pico", progress=False)
    results = json.loads(args.out.read_text()) if args.only and args.out.exists() else {}
    if args.only in (None, "pico"):
        results["pico_50mp"] = pico_50mp(model_dir, args.quick)
    if args.only in (None, "json"):
        url = start_service(model_dir)
        try:
            results["json_bodies_vs_small_requests"] = json_load(url, args.quick)
        finally:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
