"""How YuNet's multi-scale settings were chosen: a sweep on the dev set (faces-dev only).

Each pass (scale 1, the large-face copy, 2x) runs once per image with a low score floor and
no NMS; every setting is then replayed from those raw rows (score thresholds, keep ranges, one
NMS), scored by bench.accuracy's rules. Passes run whole here; the service tiles its upscaled
pass, which moves a few faces (compare the chosen rows with bench/results/accuracy-all-*.json).
Times are one thread, in-process, relative to cnn-face-detection on the same images.

    python -m bench.yunet_tuning [--data DIR] [--model-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from bench.accuracy import BUCKETS, DEFAULT_DATA, RESULTS, load_dataset, match_image, summarise

SCALES = {"main": 1.0, "large": None, "2x": 2.0}  # large: longer side 320 (plan()'s default)
FLOOR = 0.3


def raw_passes(samples, model_path: Path) -> tuple[dict, dict]:
    from serve_app.models.yunet import ScalePass, YuNet

    net = YuNet(model_path)
    rows, times = {}, {k: [] for k in SCALES}
    for s in samples:
        img = cv2.imread(str(s.path))
        h, w = img.shape[:2]
        for name, scale in SCALES.items():
            sc = scale or 320 / max(w, h)
            p = ScalePass(name, sc, 0, np.inf, round(w * sc), round(h * sc))
            t = time.perf_counter()
            rows[(s.path.name, name)] = (net._run_pass(img, p, FLOOR, 0.99), sc)
            times[name].append(time.perf_counter() - t)
    return rows, {k: statistics.fmean(v) * 1e3 for k, v in times.items()}


def cnn_time(samples, model_dir: str | None) -> float:
    from serve_app.models import weights
    from serve_app.models.res10 import Res10Detector

    cnn = Res10Detector(
        weights.find("res10_prototxt", model_dir), weights.find("res10_ssd", model_dir)
    )
    times = []
    for s in samples:
        img = cv2.imread(str(s.path))
        t = time.perf_counter()
        cnn.detect(img, confidence=0.85)
        times.append(time.perf_counter() - t)
    return statistics.fmean(times) * 1e3


def _nms(r: np.ndarray, t: float) -> np.ndarray:
    if len(r) < 2:
        return r
    keep = cv2.dnn.NMSBoxes(r[:, :4].tolist(), r[:, 14].tolist(), 0.0, t)
    return r[np.asarray(keep, dtype=int).ravel()]


def replay(samples, rows, passes, score: float, nms: float = 0.3) -> dict:
    """passes: [(name, keep_min, keep_max)] with keep limits in the pass's own pixels."""
    matches = []
    for s in samples:
        kept = []
        for name, lo, hi in passes:
            r, sc = rows[(s.path.name, name)]
            r = _nms(r[r[:, 14] >= score], nms)
            size = np.maximum(r[:, 2], r[:, 3]) * sc
            kept.append(r[(size >= lo) & (size < hi)])
        r = _nms(np.concatenate(kept), nms)
        matches.append(match_image([(tuple(x[:4]), float(x[14])) for x in r], s))
    out = summarise(samples, matches)
    return {
        "precision": out["overall"]["precision"],
        "recall": {b: out["buckets"][b]["recall"] for b, _, _ in BUCKETS},
    }


INF = float("inf")
SETTINGS = {
    # name: (passes, score); keep limits in each pass's own pixels
    "main only, score 0.7 (raw YuNet)": ([("main", 0, INF)], 0.7),
    "main only, score 0.65": ([("main", 0, INF)], 0.65),
    "main only, score 0.6": ([("main", 0, INF)], 0.6),
    "main <320 + large >=32, score 0.7": ([("main", 0, 320), ("large", 32, INF)], 0.7),
    "main <320 + large >=48, score 0.7 (default)": ([("main", 0, 320), ("large", 48, INF)], 0.7),
    "main <320 + large >=96, score 0.7": ([("main", 0, 320), ("large", 96, INF)], 0.7),
    "main <320 + large >=48, score 0.65": ([("main", 0, 320), ("large", 48, INF)], 0.65),
    "2x <32 + main >=16 + large, score 0.7": (
        [("2x", 0, 32), ("main", 16, 320), ("large", 48, INF)],
        0.7,
    ),
    "2x <40 + main >=12 + large, score 0.7": (
        [("2x", 0, 40), ("main", 12, 320), ("large", 48, INF)],
        0.7,
    ),
    "2x <40 + main >=16 + large, score 0.7 (small_faces)": (
        [("2x", 0, 40), ("main", 16, 320), ("large", 48, INF)],
        0.7,
    ),
    "2x <40 + main >=20 + large, score 0.7": (
        [("2x", 0, 40), ("main", 20, 320), ("large", 48, INF)],
        0.7,
    ),
    "2x <64 + main >=16 + large, score 0.7": (
        [("2x", 0, 64), ("main", 16, 320), ("large", 48, INF)],
        0.7,
    ),
    "2x <40 + main >=16 + large, score 0.65": (
        [("2x", 0, 40), ("main", 16, 320), ("large", 48, INF)],
        0.65,
    ),
    "2x <40 + main >=16 + large, score 0.6": (
        [("2x", 0, 40), ("main", 16, 320), ("large", 48, INF)],
        0.6,
    ),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "yunet-tuning.json")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"{args.data} is absent: nothing to measure", file=sys.stderr)
        return 1
    from serve_app.models import weights

    model = weights.find("yunet_n", args.model_dir)
    if model is None:
        print(f"yunet_n is missing: {weights.fetch_command('yunet_n')}", file=sys.stderr)
        return 1
    cv2.setNumThreads(1)
    samples = load_dataset(args.data)
    cnn_ms = cnn_time(samples, args.model_dir)
    rows, pass_ms = raw_passes(samples, model)
    results = {}
    print(f"{'setting':52} {'prec':>5}  recall >=64 32-64 16-32 <16   x cnn")
    for name, (passes, score) in SETTINGS.items():
        r = replay(samples, rows, passes, score)
        r["time_x_cnn"] = round(sum(pass_ms[p] for p, _, _ in passes) / cnn_ms, 2)
        results[name] = r
        rec = " ".join(f"{r['recall'][b]:.3f}" for b, _, _ in BUCKETS)
        print(f"{name:52} {r['precision']:.3f}  {rec}  {r['time_x_cnn']:.2f}", flush=True)
    report = {
        "data": args.data.name,
        "images": len(samples),
        "model_ms_per_image": {
            "cnn": round(cnn_ms, 1),
            **{k: round(v, 1) for k, v in pass_ms.items()},
        },
        "note": "model time only (no decode, no HTTP); passes run whole",
        "settings": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
