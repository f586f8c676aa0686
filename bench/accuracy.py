"""Face-detector accuracy on an annotated folder: precision/recall per face size, time per image.

    python -m bench.accuracy --model NAME|all [--data DIR] [--url URL | --in-process | --serve]
                             [--param KEY=VALUE ...] [--limit N] [--out DIR]

Through the running service (default `--url http://127.0.0.1:8000`: POST each image's bytes to
/v1/detect/NAME), `--in-process` (the replica's own class and code path, no Ray), or `--serve`
(starts a local Ray + Serve with the detectors of config/serve.yaml, measures through its HTTP,
stops it). `all` runs
every detector the service lists (in-process: every detector of config/serve.yaml) plus the
extra settings in `EXTRA_SETTINGS`, and prints one table. Writes JSON and a precision-recall
plot (PNG) to `bench/results/` (or `--out`).

Annotation formats (the first one found in DIR):
- `annotations.json`: {"images": {"<file>": {"width", "height", "faces": [[x, y, w, h], ...]}}},
  images in DIR/images/ (as ../shared/data/faces-dev);
- WIDER FACE `*_bbx_gt.txt`: file path, face count, one `x y w h blur expression illumination
  invalid occlusion pose` line per face; images under DIR/images/ or DIR/; `invalid` faces are
  ignore regions;
- dlib/imglab XML (`*.xml`): <image file=...><box top left width height [ignore='1']/>.

Scoring (the definitions docs/accuracy.md gives):
- Per image, predictions are taken in descending score order; each is matched to the not yet
  matched ground-truth face with the highest IoU, if that IoU is >= 0.5 (one GT per prediction,
  one prediction per GT). Unmatched predictions that overlap an ignore region by IoU >= 0.5 are
  dropped; the others are false positives.
- A face's size is the longer side of its box; buckets: >= 64, 32-64, 16-32, < 16 px.
- Recall of a bucket = its GT faces matched / its GT faces. Precision of a bucket = TP / (TP +
  FP), where a TP belongs to the bucket of the GT it matched and a FP to the bucket of its own
  predicted size. Overall precision and recall count every face and every prediction.
- The PR curve sweeps a threshold over the returned scores, so it runs from the highest score
  down to the model's own threshold (a detector returns nothing below it); AP is the area under
  the interpolated curve over that range. Haar cascades return no score (all 1.0): one point.
- Time per image: wall time of one call (HTTP: request to answer, client side; in-process: the
  replica's decode + model + JSON), one image at a time; mean and median over the images. Each
  image goes through every setting before the next image, so outside load hits all settings
  alike and the `x cnn` ratio (mean time over cnn-face-detection's, same run) holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VISIONSERVE_SHARED_DATA") or ROOT.parent / "shared" / "data")
DEFAULT_DATA = SHARED / "faces-dev"
RESULTS = ROOT / "bench" / "results"
IOU_MATCH = 0.5
BUCKETS: tuple[tuple[str, float, float], ...] = (
    (">=64", 64.0, float("inf")),
    ("32-64", 32.0, 64.0),
    ("16-32", 16.0, 32.0),
    ("<16", 0.0, 16.0),
)
# Settings measured alongside the defaults with --model all (name -> list of parameter sets).
EXTRA_SETTINGS: dict[str, list[dict[str, str]]] = {
    "yunet-face-detection": [
        {"small_faces": "true"},
        {"small_faces": "true", "score_threshold": "0.65"},
    ],
}
BASELINE = "cnn-face-detection"

Box = tuple[float, float, float, float]  # x, y, w, h


# -- data --------------------------------------------------------------------------------
@dataclass
class Sample:
    path: Path
    faces: list[Box]
    ignore: list[Box] = field(default_factory=list)


def load_dataset(data: Path) -> list[Sample]:
    """Samples of an annotated folder, sorted by file name (so --limit is a stable slice)."""
    if (data / "annotations.json").is_file():
        samples = _from_json(data)
    elif gt := sorted(data.glob("*_bbx_gt.txt")):
        samples = [s for f in gt for s in _from_wider(f, data)]
    elif xml := sorted(data.glob("*.xml")):
        samples = [s for f in xml for s in _from_imglab(f, data)]
    else:
        raise SystemExit(
            f"{data}: no annotations.json, *_bbx_gt.txt (WIDER) or *.xml (dlib/imglab) found"
        )
    return sorted(samples, key=lambda s: s.path.name)


def _image_path(data: Path, name: str) -> Path:
    for candidate in (data / "images" / name, data / name):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{data}: image {name!r} of the annotations is missing")


def _from_json(data: Path) -> list[Sample]:
    doc = json.loads((data / "annotations.json").read_text())
    return [
        Sample(_image_path(data, name), [tuple(map(float, f)) for f in entry["faces"]])
        for name, entry in doc["images"].items()
    ]


def _from_wider(path: Path, data: Path) -> list[Sample]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    out, i = [], 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        name, count = lines[i], int(lines[i + 1])
        rows = lines[i + 2 : i + 2 + max(count, 1)]  # a 0-face image still has one 0 row
        i += 2 + max(count, 1)
        faces, ignore = [], []
        for row in rows[:count]:
            v = [float(t) for t in row.split()]
            box = (v[0], v[1], v[2], v[3])
            if v[2] <= 0 or v[3] <= 0:
                continue
            (ignore if len(v) > 7 and v[7] == 1 else faces).append(box)
        out.append(Sample(_image_path(data, name), faces, ignore))
    return out


def _from_imglab(path: Path, data: Path) -> list[Sample]:
    out = []
    for image in ET.parse(path).getroot().iter("image"):
        faces, ignore = [], []
        for b in image.iter("box"):
            box = tuple(float(b.get(k, 0)) for k in ("left", "top", "width", "height"))
            (ignore if b.get("ignore") in ("1", "true") else faces).append(box)
        out.append(Sample(_image_path(path.parent, image.get("file", "")), faces, ignore))
    return out


# -- scoring -----------------------------------------------------------------------------
def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def bucket_of(box: Box) -> str:
    side = max(box[2], box[3])
    return next(name for name, lo, hi in BUCKETS if lo <= side < hi)


def match_image(preds: list[tuple[Box, float]], sample: Sample) -> list[tuple[float, bool, str]]:
    """(score, true positive, bucket) per counted prediction; see the module docstring."""
    taken = [False] * len(sample.faces)
    out = []
    for box, score in sorted(preds, key=lambda p: -p[1]):
        best, best_iou = -1, IOU_MATCH
        for j, gt in enumerate(sample.faces):
            if not taken[j] and (v := iou(box, gt)) >= best_iou:
                best, best_iou = j, v
        if best >= 0:
            taken[best] = True
            out.append((score, True, bucket_of(sample.faces[best])))
        elif not any(iou(box, g) >= IOU_MATCH for g in sample.ignore):
            out.append((score, False, bucket_of(box)))
    return out


def summarise(
    samples: list[Sample], matches: list[list[tuple[float, bool, str]]]
) -> dict[str, Any]:
    gt = {name: 0 for name, _, _ in BUCKETS}
    for s in samples:
        for f in s.faces:
            gt[bucket_of(f)] += 1
    flat = [m for ms in matches for m in ms]
    buckets = {}
    for name in gt:
        tp = sum(1 for _, ok, b in flat if ok and b == name)
        fp = sum(1 for _, ok, b in flat if not ok and b == name)
        buckets[name] = _pr(tp, fp, gt[name])
    tp = sum(1 for _, ok, _ in flat if ok)
    overall = _pr(tp, len(flat) - tp, sum(gt.values()))
    curve = _curve(flat, sum(gt.values()))
    overall["ap"] = _ap(curve)
    return {"overall": overall, "buckets": buckets, "curve": curve}


def _pr(tp: int, fp: int, gt: int) -> dict[str, Any]:
    return {
        "gt": gt,
        "tp": tp,
        "fp": fp,
        "recall": round(tp / gt, 4) if gt else None,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
    }


def _curve(flat: list[tuple[float, bool, str]], total_gt: int) -> list[list[float]]:
    """[score, precision, recall] at each distinct score, highest score first."""
    out: list[list[float]] = []
    tp = fp = 0
    ordered = sorted(flat, key=lambda m: -m[0])
    for i, (score, ok, _) in enumerate(ordered):
        tp += ok
        fp += not ok
        if i + 1 == len(ordered) or ordered[i + 1][0] != score:
            out.append([round(score, 4), round(tp / (tp + fp), 4), round(tp / total_gt, 4)])
    return out


def _ap(curve: list[list[float]]) -> float | None:
    """Area under the PR curve with precision made monotone (VOC's all-points rule)."""
    if not curve:
        return None
    area, prev_r = 0.0, 0.0
    best_after = [0.0] * len(curve)
    running = 0.0
    for i in range(len(curve) - 1, -1, -1):
        running = max(running, curve[i][1])
        best_after[i] = running
    for (_, _, r), p in zip(curve, best_after, strict=True):
        area += (r - prev_r) * p
        prev_r = r
    return round(area, 4)


# -- detectors ---------------------------------------------------------------------------
Detect = Callable[[bytes], tuple[list[tuple[Box, float]], float]]


def http_detector(url: str, model: str, params: dict[str, str], client: Any) -> Detect:
    def detect(data: bytes) -> tuple[list[tuple[Box, float]], float]:
        r = client.post(f"{url}/v1/detect/{model}", params=params, content=data)
        if r.status_code != 200:
            raise SystemExit(f"{model}: HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
        return _faces(body), body["timing_ms"]["total"]

    return detect


def in_process_detector(
    model: str, params: dict[str, str], model_dir: str | None, threads: int
) -> Detect:
    from serve_app.config import load_config, parse_app_settings
    from serve_app.deployments.params import parse_params
    from serve_app.registry import MODELS

    settings = parse_app_settings(load_config()["applications"][0]["args"])
    options = {**settings.models[model].options, "threads": threads}
    replica = (
        MODELS[model]
        .deployment_class()
        .func_or_class(model, options, model_dir, settings.limits.max_pixels)
    )
    ready = replica.ready_model()
    parsed = parse_params(replica.PARAMS, params)

    def detect(data: bytes) -> tuple[list[tuple[Box, float]], float]:
        body = replica._detect(ready, data, parsed, "json", None)
        return _faces(body), body["timing_ms"]["total"]

    return detect


def _faces(body: dict[str, Any]) -> list[tuple[Box, float]]:
    return [((f["x"], f["y"], f["w"], f["h"]), float(f["score"])) for f in body["faces"]]


def evaluate(detects: dict[str, Detect], samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Scores and times of each setting. Image by image, every setting in turn: load from
    elsewhere on the machine then hits all settings alike, so time ratios hold."""
    matches: dict[str, list] = {name: [] for name in detects}
    wall: dict[str, list[float]] = {name: [] for name in detects}
    replica: dict[str, list[float]] = {name: [] for name in detects}
    for s in samples:
        data = s.path.read_bytes()
        for name, detect in detects.items():
            t = time.perf_counter()
            preds, replica_ms = detect(data)
            wall[name].append((time.perf_counter() - t) * 1e3)
            replica[name].append(replica_ms)
            matches[name].append(match_image(preds, s))
    rows = {}
    for name in detects:
        rows[name] = summarise(samples, matches[name])
        rows[name]["time_ms"] = {
            "mean": round(statistics.fmean(wall[name]), 2),
            "median": round(statistics.median(wall[name]), 2),
            "replica_median": round(statistics.median(replica[name]), 2),
        }
    return rows


# -- output ------------------------------------------------------------------------------
def label_of(model: str, params: dict[str, str]) -> str:
    return " ".join([model, *(f"{k}={v}" for k, v in sorted(params.items()))])


def table(rows: dict[str, dict[str, Any]]) -> str:
    base = next((r for name, r in rows.items() if name == BASELINE), None)
    head = (
        f"{'model / setting':44} {'prec':>5} {'rec':>5} "
        + " ".join(f"{'R' + n:>7}" for n, _, _ in BUCKETS)
        + " "
        + " ".join(f"{'P' + n:>7}" for n, _, _ in BUCKETS)
        + f" {'AP':>5} {'ms/img':>7} {'x cnn':>6}"
    )
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        o = r["overall"]
        ratio = f"{r['time_ms']['mean'] / base['time_ms']['mean']:6.2f}" if base else f"{'-':>6}"
        lines.append(
            f"{name[:44]:44} {_f(o['precision']):>5} {_f(o['recall']):>5} "
            + " ".join(f"{_f(r['buckets'][n]['recall']):>7}" for n, _, _ in BUCKETS)
            + " "
            + " ".join(f"{_f(r['buckets'][n]['precision']):>7}" for n, _, _ in BUCKETS)
            + f" {_f(o['ap']):>5} {r['time_ms']['mean']:7.1f} {ratio}"
        )
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    for name, r in rows.items():
        if not r["curve"]:
            continue
        rec = [c[2] for c in r["curve"]]
        prec = [c[1] for c in r["curve"]]
        (line,) = ax.plot(rec, prec, label=f"{name} (AP {_f(r['overall']['ap'])})")
        ax.plot([rec[-1]], [prec[-1]], "o", color=line.get_color())  # the default threshold
    ax.set_xlabel("recall (all sizes)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- a service of our own (--serve) -------------------------------------------------------
def start_service(model_dir: str | None) -> str:
    """Ray + Serve in this process with the detectors of config/serve.yaml (no SAM), one
    replica each, on a free loopback port; stopped by `stop_service`."""

    from serve_app.config import load_config
    from serve_app.launch import deploy_config, free_port, start_local_ray, with_overrides
    from serve_app.registry import MODELS

    start_local_ray("vs-accuracy-", num_cpus=2)
    cfg = load_config()
    names = list(cfg["applications"][0]["args"]["models"])
    one = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    port = free_port()
    cfg = with_overrides(
        cfg,
        port=port,
        args={"model_dir": model_dir},
        models={n: None for n in names if MODELS[n].kind != "detector"},
        deployments={n: one for n in names if MODELS[n].kind == "detector"},
    )
    deploy_config(cfg)
    return f"http://127.0.0.1:{port}"


def stop_service() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


# -- main --------------------------------------------------------------------------------
def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _all_models(url: str | None, client: Any) -> list[str]:
    if url is None:
        from serve_app.config import load_config, parse_app_settings
        from serve_app.registry import MODELS

        settings = parse_app_settings(load_config()["applications"][0]["args"])
        return [n for n in settings.enabled_models() if MODELS[n].kind == "detector"]
    r = client.get(f"{url}/v1/models")
    r.raise_for_status()
    return [
        m["name"]
        for m in r.json()["models"]
        if m["kind"] == "detector" and m.get("status") == "ready"
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.accuracy", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--model", required=True, help="a detector's name, or `all`")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="service address (default 127.0.0.1:8000)")
    where.add_argument("--in-process", action="store_true", help="no service: the replica class")
    where.add_argument(
        "--serve",
        action="store_true",
        help="start a local service (detectors of config/serve.yaml) for this run, then stop it",
    )
    ap.add_argument("--model-dir", default=None, help="in-process/--serve: where the weights are")
    ap.add_argument("--threads", type=int, default=1, help="in-process: OpenCV threads")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--limit", type=int, default=None, help="first N images (by file name)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default=None, help="file name stem (default from model and mode)")
    args = ap.parse_args(argv)

    if not args.data.is_dir():
        print(f"{args.data} is absent: nothing to measure (see --data)", file=sys.stderr)
        return 1
    samples = load_dataset(args.data)[: args.limit]
    params = _params(args.param)
    if args.serve:
        url = start_service(args.model_dir)
        try:
            return _run(args, samples, url, params)
        finally:
            stop_service()
    url = None if args.in_process else (args.url or "http://127.0.0.1:8000").rstrip("/")
    return _run(args, samples, url, params)


def _run(
    args: argparse.Namespace, samples: list[Sample], url: str | None, params: dict[str, str]
) -> int:
    import httpx

    with httpx.Client(timeout=300) as client:
        if args.model == "all":
            runs = []
            for m in _all_models(url, client):
                runs.append((m, params))
                runs += [(m, {**params, **extra}) for extra in EXTRA_SETTINGS.get(m, [])]
        else:
            runs = [(args.model, params)]
        detects: dict[str, Detect] = {}
        for model, p in runs:
            if url is None:
                detect = in_process_detector(model, p, args.model_dir, args.threads)
            else:
                detect = http_detector(url, model, p, client)
            detect(samples[0].path.read_bytes())  # warm-up: first-call costs are not per image
            detects[label_of(model, p)] = detect
        print(f"  {len(detects)} setting(s) x {len(samples)} images", file=sys.stderr, flush=True)
        rows = evaluate(detects, samples)

    mode = "in-process" if url is None else "http"
    n_faces = sum(len(s.faces) for s in samples)
    title = f"{args.data.name}: {len(samples)} images, {n_faces} faces ({mode})"
    print(title)
    print(table(rows))
    stem = args.tag or f"accuracy-{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.model)}-{mode}"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "data": args.data.name,
        "images": len(samples),
        "faces": n_faces,
        "mode": mode,
        "iou": IOU_MATCH,
        "buckets": [b[0] for b in BUCKETS],
        "results": rows,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    plotted = plot(rows, args.out / f"{stem}.png", title)
    print(f"written {args.out / (stem + '.json')}" + (" and .png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
