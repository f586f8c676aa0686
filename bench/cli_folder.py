"""CLI folder mode over 200 images: killed half-way, then resumed, against a real service.

Copies the shared images 200 times into a temp folder (some in a subfolder), starts Ray +
Serve (pigo with 2 replicas), runs `visionserve detect face-detect-pigo DIR --out OUT --json
LOG` once with the test hook that SIGKILLs it after 100 written outputs, then again to finish.
Checks every output is there and decodable, that none of the first run's outputs was
rewritten, and records times, rates and the progress lines.

    .venv/bin/python -m bench.cli_folder [--images 200] [--kill-after 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.detectors import DATA, PIGO, ROOT, SHARED_IMAGES
from serve_app.client.folder import KILL_AFTER_ENV


def start(model_dir: Path) -> str:

    from serve_app.config import load_config
    from serve_app.launch import deploy_config, free_port, start_local_ray, with_overrides

    start_local_ray("vs-bench-")
    port = free_port()
    others = [n for n in load_config()["applications"][0]["args"]["models"] if n != PIGO]
    small = {
        "ray_actor_options": {"num_cpus": 0.1, "memory": 512 * 2**20},
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
    }
    cfg = with_overrides(
        load_config(),
        port=port,
        args={"model_dir": str(model_dir)},
        models={n: None for n in others},
        deployments={
            "router": small,
            "jobs": small,
            PIGO: {**small, "autoscaling_config": {"min_replicas": 2, "max_replicas": 2}},
        },
    )
    deploy_config(cfg, timeout_s=600)
    return f"http://127.0.0.1:{port}"


def run_cli(url: str, src: Path, out: Path, log: Path, env: dict[str, str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "serve_app.client.cli",
            "--url",
            url,
            "detect",
            PIGO,
            str(src),
            "--out",
            str(out),
            "--json",
            str(log),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    return {
        "returncode": r.returncode,
        "seconds": round(time.perf_counter() - t, 2),
        "stdout": r.stdout.strip().splitlines(),
        "progress": r.stderr.strip().splitlines(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--kill-after", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cli_folder.json")
    args = ap.parse_args(argv)
    sources = [DATA / "images" / n for n in SHARED_IMAGES if (DATA / "images" / n).exists()]
    if not sources:
        print(f"{DATA / 'images'} is absent; nothing to measure", file=sys.stderr)
        return 1
    from serve_app.models import weights

    work = Path(tempfile.mkdtemp(prefix="vs-folder-"))
    src, out, log = work / "photos", work / "boxed", work / "faces.jsonl"
    (src / "sub").mkdir(parents=True)
    for i, path in zip(range(args.images), itertools.cycle(sources)):
        shutil.copy(path, (src / "sub" if i % 4 == 0 else src) / f"img{i:04d}{path.suffix}")
    model_dir = work / "models"
    weights.fetch(["facefinder"], model_dir=model_dir, from_dir=DATA / "pico", progress=False)
    print("[1/3] starting Ray + Serve (pigo, 2 replicas)", flush=True)
    url = start(model_dir)
    try:
        print(f"[2/3] folder run, killed after {args.kill_after} outputs", flush=True)
        first = run_cli(url, src, out, log, {KILL_AFTER_ENV: str(args.kill_after)})
        after_kill = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
        print(f"  exit {first['returncode']}, {len(after_kill)} outputs", flush=True)
        print("[3/3] resumed run", flush=True)
        second = run_cli(url, src, out, log, {})
        print("\n".join(second["stdout"]), flush=True)
    finally:
        import ray

        ray.shutdown()
    outputs = sorted(out.rglob("*.jpg"))
    decodable = sum(
        cv2.imdecode(np.fromfile(str(p), np.uint8), cv2.IMREAD_COLOR) is not None for p in outputs
    )
    untouched = all(p.stat().st_mtime_ns == m for p, m in after_kill.items())
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    report = {
        "images": args.images,
        "kill_after": args.kill_after,
        "first_run": {**first, "outputs_after_kill": len(after_kill)},
        "second_run": second,
        "outputs": len(outputs),
        "decodable_outputs": decodable,
        "first_run_outputs_untouched": untouched,
        "jsonl_rows": len(rows),
        "jsonl_distinct_sources": len({r["source"] for r in rows}),
        "resumed_images_per_s": round(
            (args.images - len(after_kill)) / max(second["seconds"], 1e-6), 2
        ),
        "ok": (
            first["returncode"] == -9
            and len(after_kill) == args.kill_after
            and second["returncode"] == 0
            and len(outputs) == args.images
            and decodable == args.images
            and untouched
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"ok: {report['ok']}; written {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
