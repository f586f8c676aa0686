"""Pico (pigo-exact, numba kernel) vs OpenCV's Haar face cascade on truck.jpg (1800x1200).

Runs each detector alternately so that load from other processes hits both alike, and prints and
writes (bench/results/pico_vs_haar.json) the median wall times and their ratio.

    .venv/bin/python bench/pico_vs_haar.py [--repeats N] [--image PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.models.pico import (  # noqa: E402
    STORE_PARAMS,
    PicoCascade,
    to_gray_pigo,
)

DATA = ROOT.parent / "shared" / "data"


def _once(fn) -> tuple[float, float]:
    """Wall and CPU (all threads of this process) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", type=Path, default=DATA / "images" / "truck.jpg")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Pico threads (default: its own default); Haar keeps cv2's",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pico_vs_haar.json")
    args = ap.parse_args()

    bgr = cv2.imread(str(args.image), cv2.IMREAD_COLOR)
    if bgr is None:
        print(f"cannot read {args.image}", file=sys.stderr)
        return 2
    pico = PicoCascade.from_file(DATA / "pico" / "facefinder")
    haar = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    pico_gray = to_gray_pigo(bgr, "bgr")
    haar_gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)

    def run_pico():
        return pico.detect(pico_gray, STORE_PARAMS, threads=args.threads)

    def run_haar():
        return haar.detectMultiScale(haar_gray, 1.1, 5, minSize=(30, 30))

    faces_pico, faces_haar = run_pico(), run_haar()  # warm-up
    t_pico, t_haar = [], []
    for _ in range(args.repeats):  # alternate, so that outside load hits both alike
        t_pico.append(_once(run_pico))
        t_haar.append(_once(run_haar))
    t_gray = [_once(lambda: to_gray_pigo(bgr, "bgr"))[0] for _ in range(3)]

    def median_ms(times: list[tuple[float, float]], i: int) -> float:
        return statistics.median(t[i] for t in times) * 1e3

    pico_ms, haar_ms = median_ms(t_pico, 0), median_ms(t_haar, 0)
    pico_cpu, haar_cpu = median_ms(t_pico, 1), median_ms(t_haar, 1)
    result = {
        "image": args.image.name,
        "shape": list(bgr.shape[:2]),
        "repeats": args.repeats,
        "pico_params": STORE_PARAMS.__dict__,
        "pico_threads": args.threads,
        "pico_backend": "numba",
        "cv2_threads": cv2.getNumThreads(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "pico_detect_ms_median": round(pico_ms, 1),
        "pico_detect_ms_all": [round(t[0] * 1e3, 1) for t in t_pico],
        "pico_detect_cpu_ms_median": round(pico_cpu, 1),
        "pico_to_gray_ms_median": round(statistics.median(t_gray) * 1e3, 1),
        "haar_ms_median": round(haar_ms, 1),
        "haar_ms_all": [round(t[0] * 1e3, 1) for t in t_haar],
        "haar_cpu_ms_median": round(haar_cpu, 1),
        "haar_over_pico": round(haar_ms / pico_ms, 2),
        "haar_over_pico_cpu": round(haar_cpu / pico_cpu, 2),
        "pico_faces": [d.as_dict() for d in faces_pico],
        "haar_faces": [list(map(int, f)) for f in faces_haar],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"medians of {args.repeats}, load average {result['load_avg_1min']:.1f}")
    print(f"pico detect  {pico_ms:8.1f} ms wall {pico_cpu:8.1f} ms cpu")
    print(f"haar         {haar_ms:8.1f} ms wall {haar_cpu:8.1f} ms cpu")
    print(f"haar / pico  {haar_ms / pico_ms:8.2f}x   wall {haar_cpu / pico_cpu:8.2f}x   cpu")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
