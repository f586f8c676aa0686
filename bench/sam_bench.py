"""Benchmark: FastMaskGenerator vs segment_anything's SamAutomaticMaskGenerator.

    .venv/bin/python bench/sam_bench.py [--quick]

Writes bench/results/sam_bench.json. All models have random weights (no checkpoint here):
compute is the same as with trained weights, the masks mean nothing, and the IoU head's
scores are low, which matters for (a), see below.

(a) speed: vit_b, the same model object and ~1 MP image for both, each generator with its
    defaults (32x32 points; 12x12 with --quick). With random weights no mask
    passes the default pred_iou_thresh (0.88), so the reference still upsamples every mask
    while ours skips the mask upscaler entirely: that ratio flatters us. The run with every
    filter off (b) is the opposite extreme (every mask kept and decoded at full size);
    both are reported. Wall and CPU times, measured in the same process, one after the
    other (the machine is shared: compare ratios, not absolute times).
(b) fidelity: thresholds 0 and NMS off on both (16x16 points; 6x6 with --quick); each
    reference mask matched to ours from the same point prompt; IoU min/mean.
(c) peak RSS at 1, 6, 12, 24 MP, one subprocess per generator and size (VmHWM polled
    from /proc; the reference is killed above 14 GB and reported as such). Tiny model
    (same decoder and post-processing as vit_b; encoder cost does not depend on image
    size), 8x8 points = one full 64-point batch (4x4 and 1/12 MP only with --quick),
    every filter off so every mask is kept: the worst case for both.
(d) prompted: vit_b, one point on a ~1 MP image, a new key (encoder runs) vs the same key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IMAGE = REPO.parent / "shared" / "data" / "images" / "truck.jpg"
RESULTS = REPO / "bench" / "results" / "sam_bench.json"
RSS_LIMIT = 14 * 2**30
UNFILTERED = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def image_rgb(megapixels: float):
    """truck.jpg (3:2) resized to about `megapixels`, RGB."""
    import cv2

    bgr = cv2.imread(str(IMAGE))
    if bgr is None:
        raise SystemExit(f"missing {IMAGE}")
    h0, w0 = bgr.shape[:2]
    scale = (megapixels * 1e6 / (h0 * w0)) ** 0.5
    size = (round(w0 * scale), round(h0 * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    rgb = cv2.cvtColor(cv2.resize(bgr, size, interpolation=interp), cv2.COLOR_BGR2RGB)
    del bgr
    return rgb


def build(variant: str):
    import torch

    from serve_app.models.sam.registry import build_sam

    torch.manual_seed(0)
    return build_sam(variant, None, device="cpu")


def generator(kind: str, sam, **kw):
    if kind == "reference":
        from segment_anything import SamAutomaticMaskGenerator

        return SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **kw)
    from serve_app.models.sam.amg import FastMaskGenerator

    return FastMaskGenerator(sam, **kw)


def timed(fn) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def as_dicts(records) -> list[dict]:
    return [r if isinstance(r, dict) else r.as_dict() for r in records]


class StageClock:
    """Progress callback that records when each stage ended (wall seconds)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def __call__(self, fraction: float, stage: str) -> None:
        key = "decoder" if stage.startswith("decoder") else stage
        self.marks[key] = time.perf_counter() - self.t0

    def stages(self) -> dict[str, float]:
        out, prev = {}, 0.0
        for k, t in self.marks.items():
            out[k] = round(t - prev, 2)
            prev = t
        return out


def run_pair(sam, image, label: str, **kw) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("reference", "fast"):
        log(f"{label}: {kind} ...")
        clock = StageClock()
        gen = generator(kind, sam, **kw)
        if kind == "fast":
            masks, wall, cpu = timed(lambda g=gen, c=clock: g.generate(image, progress=c))
        else:
            masks, wall, cpu = timed(lambda g=gen: g.generate(image))
        out[kind] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "masks": len(masks)}
        if kind == "fast":
            out[kind]["stages_wall_s"] = clock.stages()
        out[f"_{kind}_records"] = as_dicts(masks)
        log(f"{label}: {kind} {wall:.1f} s wall, {cpu:.1f} s CPU, {len(masks)} masks")
    ref, fast = out["reference"], out["fast"]
    out["speedup_wall"] = round(ref["wall_s"] / fast["wall_s"], 2)
    out["speedup_cpu"] = round(ref["cpu_s"] / fast["cpu_s"], 2)
    return out


def fidelity(ref: list[dict], fast: list[dict]) -> dict[str, Any]:
    """Each reference mask vs our masks from the same point: best IoU."""
    import numpy as np

    from serve_app.rendering import rle

    by_point: dict[str, list[np.ndarray]] = {}
    for r in fast:
        by_point.setdefault(json.dumps(r["point_coords"]), []).append(rle.decode(r["segmentation"]))
    ious, identical = [], 0
    for r in ref:
        a = rle.decode(r["segmentation"])
        best = 0.0
        for b in by_point.get(json.dumps(r["point_coords"]), []):
            union = np.logical_or(a, b).sum()
            iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
            best = max(best, iou)
            identical += int(iou == 1.0)
        ious.append(best)
    same_order = [r["point_coords"] for r in ref] == [r["point_coords"] for r in fast]
    return {
        "reference_masks": len(ref),
        "fast_masks": len(fast),
        "matched_iou_min": round(min(ious), 6) if ious else None,
        "matched_iou_mean": round(statistics.fmean(ious), 6) if ious else None,
        "matched_below_0.9": sum(i < 0.9 for i in ious),
        "pixel_identical": identical,
        "same_order": same_order,
    }


# -- (c) memory: one child process per run -----------------------------------------------
def child(spec: dict) -> None:
    """Runs one generator on one image size; prints one JSON line."""
    import torch

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    sam = build(spec["variant"])
    image = image_rgb(spec["mp"])
    kw = {"points_per_side": spec["points"], **UNFILTERED}
    masks, wall, cpu = timed(lambda: generator(spec["kind"], sam, **kw).generate(image))
    # Not ru_maxrss: Linux carries it over exec from the (large) parent process.
    peak_kib = _status_kib(os.getpid(), "VmHWM")
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "masks": len(masks),
                "peak_kib": peak_kib,
                "size": list(image.shape[:2]),
            }
        ),
        flush=True,
    )


def _status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_run(kind: str, mp: float, variant: str, points: int) -> dict[str, Any]:
    spec = {"kind": kind, "mp": mp, "variant": variant, "points": points}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, killed = 0, False
    while proc.poll() is None:
        rss = _status_kib(proc.pid, "VmRSS") or 0
        peak = max(peak, _status_kib(proc.pid, "VmHWM") or 0, rss)
        if rss * 1024 > RSS_LIMIT:
            proc.kill()
            killed = True
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if killed:
        return {"peak_rss_mib": None, "exceeded": "exceeded 14 GB", "killed_at_mib": peak // 1024}
    if proc.returncode != 0:
        return {"error": stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    res = json.loads(stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mib": round(max(res["peak_kib"], peak) / 1024),
        "wall_s": round(res["wall_s"], 1),
        "masks": res["masks"],
        "image_hw": res["size"],
    }


# -- (d) prompted ------------------------------------------------------------------------
def prompted(sam, image, cached_runs: int = 5) -> dict[str, Any]:
    from serve_app.models.sam.prompt import PromptedSegmenter

    seg = PromptedSegmenter(sam, cache_bytes=64 * 2**20)
    h, w = image.shape[:2]
    point = [(w * 0.4, h * 0.6)]
    _, cold, _ = timed(lambda: seg.segment(image, "cold", points=point, multimask=True))
    times = []
    for i in range(cached_runs):
        p = [(w * (0.2 + 0.1 * i), h * 0.5)]
        _, t, _ = timed(lambda p=p: seg.segment(image, "cold", points=p, multimask=True))
        times.append(t)
    assert seg.encoder_calls == 1
    cached = statistics.median(times)
    return {
        "cold_s": round(cold, 3),
        "cached_s_median": round(cached, 4),
        "cached_over_cold": round(cached / cold, 4),
        "image_hw": [h, w],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points and sizes (~5 min)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    t_start = time.perf_counter()
    quick = args.quick
    # Speed at the generators' defaults uses the default 32x32 grid (16x16 with --quick);
    # the unfiltered run decodes every mask of both, so it uses a coarser grid.
    points = 12 if quick else 32
    fid_points = 6 if quick else 16
    sizes = [1, 12] if quick else [1, 6, 12, 24]
    mem_points = 4 if quick else 8
    result: dict[str, Any] = {
        "command": "bench/sam_bench.py" + (" --quick" if quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_start": os.getloadavg(),
        },
        "weights": "random (checkpoint=None): timings are real, masks meaningless",
    }

    log("building vit_b (random weights)")
    sam = build("vit_b")
    image = image_rgb(1.0)
    result["image_hw"] = list(image.shape[:2])
    from serve_app.models.sam.encoder import embed

    # Warm-up, and the encoder on its own: the reference runs the stock module, ours the
    # same weights with fused attention (serve_app/models/sam/vit.py).
    result["encoder"] = {}
    for name, fused in (("fused", True), ("stock", False)):
        if quick and name == "stock":
            continue
        _, wall, cpu = timed(lambda f=fused: embed(sam, image, fused=f))
        result["encoder"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
        log(f"encoder ({name}) {wall:.1f} s")

    # (a) speed with each generator's defaults
    speed = run_pair(sam, image, "defaults", points_per_side=points)
    speed.pop("_reference_records"), speed.pop("_fast_records")
    result["speed_defaults"] = {"model": "vit_b", "points_per_side": points, **speed}
    # (b) every filter off: fidelity, and the other end of the speed range
    pair = run_pair(sam, image, "unfiltered", points_per_side=fid_points, **UNFILTERED)
    fid = fidelity(pair.pop("_reference_records"), pair.pop("_fast_records"))
    result["speed_unfiltered"] = {"model": "vit_b", "points_per_side": fid_points, **pair}
    result["fidelity"] = {"model": "vit_b", "points_per_side": fid_points, **UNFILTERED, **fid}
    log(f"fidelity {fid}")
    _write(result)

    # (d) prompted
    result["prompted"] = {"model": "vit_b", **prompted(sam, image)}
    log(f"prompted {result['prompted']}")
    sam = None  # free it before the memory runs
    _write(result)

    # (c) memory
    table: dict[str, dict[str, Any]] = {}
    for mp in sizes:
        for kind in ("fast", "reference"):
            log(f"memory: {kind} at {mp} MP ...")
            table.setdefault(f"{mp}MP", {})[kind] = r = memory_run(kind, mp, "tiny", mem_points)
            log(f"memory: {kind} at {mp} MP: {r}")
            _write({**result, "memory": {"rows": table}})
    base = table[f"{sizes[0]}MP"]
    ratios = {}
    for kind in ("fast", "reference"):
        b = base[kind].get("peak_rss_mib")
        top = table[f"{sizes[-1]}MP"][kind].get("peak_rss_mib")
        ratios[kind] = round(top / b, 3) if b and top else None
    result["memory"] = {
        "model": "tiny",
        "points_per_side": mem_points,
        **UNFILTERED,
        "rss_limit": "14 GB (reference killed above)",
        "rows": table,
        f"peak_{sizes[-1]}MP_over_{sizes[0]}MP": ratios,
    }
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    _write(result)
    log(f"done in {result['total_s']} s -> {RESULTS}")


def _write(result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
