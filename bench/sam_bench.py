"""Benchmark: FastMaskGenerator vs segment_anything's SamAutomaticMaskGenerator, and the
image encoder in float32 vs bfloat16.

    .venv/bin/python bench/sam_bench.py [--quick] [--reference-memory]

Writes bench/results/sam_bench.json (bench/results/sam_bench_quick.json with --quick). All
models have random weights (no checkpoint here): compute is the same as with trained
weights, the masks mean nothing, and the IoU head's scores are low, see `flattered`.

(e) encoder: vit_b, ~1 MP: fused vs stock (segment_anything's module), float32 vs bf16
    (autocast), and the bf16 embedding's relative error; the same for MobileSAM's TinyViT.
(a) speed, defaults: vit_b, 32x32 points (12x12 with --quick), each generator with its
    default thresholds; ours in float32 and bf16. With random weights no mask passes
    pred_iou_thresh (0.88), so the reference still upsamples every mask while ours skips
    the mask upscaler entirely: that ratio flatters us.
(b) speed, every filter off (thresholds 0, NMS off), same grid: every mask is kept and
    decoded at full size on both sides, the honest ratio. Fidelity: each reference mask
    matched to ours from the same point prompt, IoU min/mean; bf16 vs float32 likewise.
(f) crop layers: ours with crop_n_layers=1 vs 0 at the defaults (float32 and bf16), and
    fidelity vs the reference at crop_n_layers=1 with every filter off (8x8 points).
(d) prompted: vit_b and MobileSAM, one point on a ~1 MP image, a new key (encoder runs)
    vs the same key, float32 and bf16; mask IoU bf16 vs float32 per prompt.
(c) peak RSS, one subprocess per run (VmHWM polled from /proc). Tiny model (same decoder
    and post-processing as vit_b; encoder cost does not depend on image size), 8x8 points
    (4x4 with --quick), every filter off (with crops, also crop NMS and the crop-edge
    filter, see CROP_EDGE): ours at 1 and 12 MP with crop_n_layers 0 and 1;
    the reference at 1 MP (with --reference-memory also 6, 12 MP, killed above 14 GB: not
    run by default on a shared machine).
Stage times (encoder / decoder / postprocess) come from the generator's progress reports.
Wall and CPU times are measured in one process, one after the other; the machine is
shared, so compare ratios within the run, not absolute times across runs.
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
from contextlib import contextmanager
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
    """Progress callback summing wall and CPU seconds per stage (encoder, decoder,
    postprocess): the time up to each report is the reported stage's (reports come as
    work ends)."""

    def __init__(self) -> None:
        self.last = (time.perf_counter(), time.process_time())
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def __call__(self, fraction: float, stage: str) -> None:
        now = (time.perf_counter(), time.process_time())
        key = stage.split(" ")[0]
        self.wall[key] = self.wall.get(key, 0.0) + now[0] - self.last[0]
        self.cpu[key] = self.cpu.get(key, 0.0) + now[1] - self.last[1]
        self.last = now

    def stages(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.wall.items()}

    def stages_cpu(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.cpu.items()}


def run_fast(sam, image, label: str, dtype, **kw) -> dict[str, Any]:
    import torch

    name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    log(f"{label}: fast {name} ...")
    clock = StageClock()
    gen = generator("fast", sam, dtype=dtype, **kw)
    masks, wall, cpu = timed(lambda: gen.generate(image, progress=clock))
    log(f"{label}: fast {name} {wall:.1f} s wall, {cpu:.1f} s CPU, {len(masks)} masks")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "masks": len(masks),
        "stages_wall_s": clock.stages(),
        "stages_cpu_s": clock.stages_cpu(),
        "_records": masks,
    }


def run_reference(sam, image, label: str, **kw) -> dict[str, Any]:
    log(f"{label}: reference ...")
    gen = generator("reference", sam, **kw)
    masks, wall, cpu = timed(lambda: gen.generate(image))
    log(f"{label}: reference {wall:.1f} s wall, {cpu:.1f} s CPU, {len(masks)} masks")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "masks": len(masks),
        "_records": masks,
    }


def compare_runs(sam, image, label: str, reference: bool, **kw) -> tuple[dict, dict]:
    """Reference (float32) and ours in float32 and bf16 on the same settings: times,
    ratios and the records (popped by the caller)."""
    import torch

    runs: dict[str, Any] = {}
    if reference:
        runs["reference_float32"] = run_reference(sam, image, label, **kw)
    runs["fast_float32"] = run_fast(sam, image, label, torch.float32, **kw)
    runs["fast_bfloat16"] = run_fast(sam, image, label, torch.bfloat16, **kw)
    records = {k: v.pop("_records") for k, v in runs.items()}
    f32, b16 = runs["fast_float32"]["wall_s"], runs["fast_bfloat16"]["wall_s"]
    runs["bfloat16_over_float32_wall"] = round(b16 / f32, 3)
    if reference:
        ref = runs["reference_float32"]
        runs["speedup_wall_float32"] = round(ref["wall_s"] / f32, 2)
        runs["speedup_wall_bfloat16"] = round(ref["wall_s"] / b16, 2)
        runs["speedup_cpu_float32"] = round(ref["cpu_s"] / runs["fast_float32"]["cpu_s"], 2)
        runs["speedup_cpu_bfloat16"] = round(ref["cpu_s"] / runs["fast_bfloat16"]["cpu_s"], 2)
    return runs, records


def fidelity(ref: list, fast: list) -> dict[str, Any]:
    """Each `ref` mask vs the `fast` masks from the same point prompt (and crop): best IoU."""
    from serve_app.models.sam.compare import iou_stats, matched_ious

    def coords(rs):
        return [(r if isinstance(r, dict) else r.as_dict())["point_coords"] for r in rs]

    ious = matched_ious(ref, fast)
    stats = iou_stats(ious)
    return {
        "reference_masks": len(ref),
        "fast_masks": len(fast),
        "matched_iou_min": stats["iou_min"],
        "matched_iou_mean": stats["iou_mean"],
        "matched_below_0.9": sum(i < 0.9 for i in ious),
        "pixel_identical": sum(i == 1.0 for i in ious),
        "same_order": coords(ref) == coords(fast),
    }


# -- (c) memory: one child process per run -----------------------------------------------
def child(spec: dict) -> None:
    """Runs one generator on one image size; prints one JSON line."""
    import torch

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    sam = build(spec["variant"])
    image = image_rgb(spec["mp"])
    kw = {"points_per_side": spec["points"], "crop_n_layers": spec.get("crop", 0), **UNFILTERED}
    if kw["crop_n_layers"]:
        kw["crop_nms_thresh"] = 1.0
    with crop_edge_filter_off():  # every mask of every crop kept: the worst case
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


def memory_run(kind: str, mp: float, variant: str, points: int, crop: int = 0) -> dict[str, Any]:
    spec = {"kind": kind, "mp": mp, "variant": variant, "points": points, "crop": crop}
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
def prompted(sam, image, reps: int, cached_runs: int = 5) -> dict[str, Any]:
    """Cold (new key: encoder + one decode) and cached prompts, float32 and bf16
    interleaved; cold is the best of `reps` new keys (the machine is shared: the best run
    is the least disturbed one)."""
    import torch

    from serve_app.models.sam.prompt import PromptedSegmenter

    h, w = image.shape[:2]
    point = [(w * 0.4, h * 0.6)]
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    segs = {k: PromptedSegmenter(sam, cache_bytes=64 * 2**20, dtype=d) for k, d in dtypes.items()}
    colds: dict[str, list[float]] = {k: [] for k in dtypes}
    for r in range(reps):
        for k, seg in segs.items():
            _, t, _ = timed(lambda s=seg, r=r: s.segment(image, f"cold{r}", points=point))
            colds[k].append(t)
    out: dict[str, Any] = {}
    for k, seg in segs.items():
        times = []
        for i in range(cached_runs):
            p = [(w * (0.2 + 0.1 * i), h * 0.5)]
            _, t, _ = timed(lambda s=seg, p=p: s.segment(image, "cold0", points=p, multimask=True))
            times.append(t)
        assert seg.encoder_calls == reps
        cold, cached = min(colds[k]), statistics.median(times)
        out[k] = {
            "cold_s": round(cold, 3),
            "cold_s_all": [round(t, 2) for t in colds[k]],
            "cached_s_median": round(cached, 4),
            "cached_over_cold": round(cached / cold, 4),
        }
    ratio = out["bfloat16"]["cold_s"] / out["float32"]["cold_s"]
    out["cold_bfloat16_over_float32"] = round(ratio, 3)
    return out


def encoder_times(sam, image, kinds, reps: int) -> dict[str, Any]:
    """Seconds of one embedding per (name, fused, dtype): `reps` interleaved rounds after
    a warm-up, best wall time reported (with its CPU time) and all of them listed."""
    from serve_app.models.sam.encoder import embed

    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in kinds}
    for _ in range(reps):
        for name, fused, dtype in kinds:
            _, wall, cpu = timed(lambda f=fused, d=dtype: embed(sam, image, fused=f, dtype=d))
            runs[name].append((wall, cpu))
            log(f"encoder {name}: {wall:.1f} s")
    out: dict[str, Any] = {}
    for name, times in runs.items():
        wall, cpu = min(times)
        out[name] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "wall_s_all": [round(t[0], 2) for t in times],
        }
    return out


CROP_EDGE = (
    "the reference drops masks whose box lies within 20 px of a crop edge inside the "
    "image and has no switch for it; random weights make every mask a large blob touching "
    "its crop's edges, so with the filter on no crop mask survives on either side"
)


@contextmanager
def crop_edge_filter_off():
    """Both generators without the crop-edge filter (see CROP_EDGE)."""
    from unittest import mock

    import torch

    def never(boxes, crop_box, orig_box, atol=20.0):
        return torch.zeros(len(boxes), dtype=torch.bool)

    with (
        mock.patch("segment_anything.automatic_mask_generator.is_box_near_crop_edge", never),
        mock.patch("serve_app.models.sam.amg.is_box_near_crop_edge", never),
    ):
        yield


FLATTERED = (
    "speed_defaults is flattered by random weights: their predicted IoUs stay below "
    "pred_iou_thresh (0.88), so no mask survives and ours skips the mask upscaler and all "
    "full-size work while the reference still upsamples every mask. speed_unfiltered (every "
    "filter off, every mask decoded on both sides) is the honest ratio; with real weights "
    "and default thresholds the ratio lies between the two. The bf16 fidelity figures are "
    "for random weights too: real-weight mask agreement is not measured here "
    "(python -m serve_app.models.sam.compare measures it on your own weights and image)."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer points and sizes (~10 min)")
    ap.add_argument(
        "--reference-memory",
        action="store_true",
        help="also the reference's peak RSS at 6 and 12 MP (up to 14 GB)",
    )
    ap.add_argument(
        "--only",
        help="comma-separated sections to (re)run into the existing JSON: "
        "encoder,prompted,defaults,unfiltered,crop,mobile,memory",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    from serve_app.models.sam import compare
    from serve_app.models.sam.precision import native_bf16

    global RESULTS
    t_start = time.perf_counter()
    quick = args.quick
    if quick:
        RESULTS = RESULTS.with_name("sam_bench_quick.json")
    reps = 2 if quick else 3
    only = set(args.only.split(",")) if args.only else None

    def want(section: str) -> bool:
        return only is None or section in only

    points = 12 if quick else 32
    crop_fid_points = 4 if quick else 8
    mem_points = 4 if quick else 8
    bf16 = torch.bfloat16
    native, why = native_bf16(torch.device("cpu"))
    result: dict[str, Any] = {
        "command": "bench/sam_bench.py" + (" --quick" if quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native,
            "native_bf16_reason": why,
            "processor": platform.processor() or platform.machine(),
            "loadavg_start": os.getloadavg(),
        },
        "weights": "random (checkpoint=None): timings are real, masks meaningless",
        "flattered": FLATTERED,
    }
    if only is not None:  # merge into the last full run, saying which parts are newer
        machine = result["machine"]
        result = json.loads(RESULTS.read_text()) if RESULTS.exists() else result
        result.setdefault("reruns", []).append(
            {
                "sections": sorted(only),
                "at": time.strftime("%Y-%m-%d %H:%M:%S"),
                "loadavg_start": machine["loadavg_start"],
            }
        )

    image = image_rgb(1.0)
    result["image_hw"] = list(image.shape[:2])
    from serve_app.models.sam.encoder import embed

    sam = None
    if only is None or only & {"encoder", "prompted", "defaults", "unfiltered", "crop"}:
        log(f"building vit_b (random weights); native bf16: {native} ({why})")
        sam = build("vit_b")
        embed(sam, image, dtype=bf16)  # warm-up (oneDNN kernels, allocator): not reported

    if want("encoder"):  # (e)
        kinds = [("fused_float32", True, torch.float32), ("fused_bfloat16", True, bf16)]
        kinds += [("stock_float32", False, torch.float32), ("stock_bfloat16", False, bf16)]
        enc = encoder_times(sam, image, kinds, reps)
        enc["fused_bfloat16_over_stock_float32_speedup"] = round(
            enc["stock_float32"]["wall_s"] / enc["fused_bfloat16"]["wall_s"], 2
        )
        enc["fused_bfloat16_over_fused_float32_speedup"] = round(
            enc["fused_float32"]["wall_s"] / enc["fused_bfloat16"]["wall_s"], 2
        )
        enc["stock_bfloat16_over_stock_float32_speedup"] = round(
            enc["stock_float32"]["wall_s"] / enc["stock_bfloat16"]["wall_s"], 2
        )
        enc["embedding_bfloat16_vs_float32"] = compare.embedding_error(sam, image)
        result["encoder"] = {"model": "vit_b", "best_of": reps, **enc}
        log(f"encoder {result['encoder']}")
        _write(result)

    if want("prompted"):  # (d) cold (encoder + one decode) and cached, both dtypes
        pr = prompted(sam, image, reps)
        pr["masks_bfloat16_vs_float32"] = compare.prompted_ious(sam, image, side=4)
        result["prompted"] = {"model": "vit_b", "image_hw": list(image.shape[:2]), **pr}
        log(f"prompted {result['prompted']}")
        _write(result)

    if want("defaults"):  # (a) speed with each generator's defaults
        runs, recs = compare_runs(sam, image, "defaults", True, points_per_side=points)
        result["speed_defaults"] = {"model": "vit_b", "points_per_side": points, **runs}
        _write(result)

    if want("unfiltered"):  # (b) every filter off: the honest ratio, fidelity, bf16
        kw = {"points_per_side": points, **UNFILTERED}
        runs, recs = compare_runs(sam, image, "unfiltered", True, **kw)
        result["speed_unfiltered"] = {"model": "vit_b", **kw, **runs}
        fid = fidelity(recs["reference_float32"], recs["fast_float32"])
        result["fidelity"] = {"model": "vit_b", **kw, **fid}
        log(f"fidelity {fid}")
        fid16 = fidelity(recs["fast_float32"], recs["fast_bfloat16"])
        share = fid16["matched_below_0.9"] / max(fid16["reference_masks"], 1)
        result["fidelity_bfloat16_vs_float32"] = {
            "model": "vit_b",
            **kw,
            "note": "reference_* here is our float32 run, fast_* our bf16 run",
            "share_below_0.9": round(share, 6),
            **fid16,
        }
        log(f"fidelity bf16 vs float32 {result['fidelity_bfloat16_vs_float32']}")
        del recs
        _write(result)

    if want("crop"):  # (f) crop layers: on vs off at the defaults, fidelity vs reference
        crop: dict[str, Any] = {}
        if "speed_defaults" in result:
            d = result["speed_defaults"]
            crop["crop_n_layers_0"] = {k: d[k] for k in ("fast_float32", "fast_bfloat16")}
        runs, _ = compare_runs(sam, image, "crop 1", False, points_per_side=points, crop_n_layers=1)
        crop["crop_n_layers_1"] = runs
        for dt in ("fast_float32", "fast_bfloat16"):
            if "crop_n_layers_0" in crop:
                crop[f"{dt}_crop1_over_crop0_wall"] = round(
                    crop["crop_n_layers_1"][dt]["wall_s"] / crop["crop_n_layers_0"][dt]["wall_s"],
                    2,
                )
        kw = {"points_per_side": crop_fid_points, "crop_n_layers": 1, "crop_nms_thresh": 1.0}
        kw.update(UNFILTERED)
        with crop_edge_filter_off():
            ref = run_reference(sam, image, "crop fidelity", **kw)
            fast = run_fast(sam, image, "crop fidelity", torch.float32, **kw)
        crop["fidelity_crop_n_layers_1"] = {
            "model": "vit_b",
            **kw,
            "crop_edge_filter": "off on both sides (patched): " + CROP_EDGE,
            "crops_with_masks": len({tuple(r["crop_box"]) for r in ref["_records"]}),
            "reference_wall_s": ref["wall_s"],
            "fast_float32_wall_s": fast["wall_s"],
            **fidelity(ref["_records"], fast["_records"]),
        }
        result["crop_layers"] = {"model": "vit_b", "points_per_side": points, **crop}
        log(f"crop layers {result['crop_layers']}")
        _write(result)
    sam = None  # free it

    if want("mobile"):  # MobileSAM: encoder, prompted and automatic (unfiltered)
        log("building MobileSAM (random weights)")
        mobile = build("mobile")
        embed(mobile, image, dtype=bf16)  # warm-up
        kinds = [("float32", True, torch.float32), ("bfloat16", True, bf16)]
        menc = encoder_times(mobile, image, kinds, reps)
        menc["bfloat16_speedup"] = round(menc["float32"]["wall_s"] / menc["bfloat16"]["wall_s"], 2)
        menc["embedding_bfloat16_vs_float32"] = compare.embedding_error(mobile, image)
        mpr = prompted(mobile, image, reps)
        mpr["masks_bfloat16_vs_float32"] = compare.prompted_ious(mobile, image, side=4)
        kw = {"points_per_side": points // 2, **UNFILTERED}
        mauto = compare.automatic_ious(mobile, image, **kw)
        result["mobile"] = {
            "encoder": menc,
            "prompted": mpr,
            "automatic_unfiltered": {**kw, **mauto},
        }
        log(f"mobile {result['mobile']}")
        mobile = None
        _write(result)

    if want("memory"):  # (c)
        sizes = [1, 12]
        table: dict[str, dict[str, Any]] = {}
        runs_mem = [("fast", mp, c) for mp in sizes for c in (0, 1)]
        runs_mem += [("reference", mp, 0) for mp in ([1, 6, 12] if args.reference_memory else [1])]
        for kind, mp, c in runs_mem:
            key = f"{kind}_crop{c}" if kind == "fast" else kind
            log(f"memory: {key} at {mp} MP ...")
            table.setdefault(f"{mp}MP", {})[key] = r = memory_run(kind, mp, "tiny", mem_points, c)
            log(f"memory: {key} at {mp} MP: {r}")
            _write({**result, "memory": {"rows": table}})
        big = table[f"{sizes[-1]}MP"]
        c0, c1 = big["fast_crop0"].get("peak_rss_mib"), big["fast_crop1"].get("peak_rss_mib")
        flat = {}
        for c in (0, 1):
            lo = table[f"{sizes[0]}MP"][f"fast_crop{c}"].get("peak_rss_mib")
            hi = big[f"fast_crop{c}"].get("peak_rss_mib")
            flat[f"crop{c}"] = round(hi / lo, 3) if lo and hi else None
        result["memory"] = {
            "model": "tiny",
            "points_per_side": mem_points,
            **UNFILTERED,
            "crop_runs": "crop_nms_thresh 1.0 and the crop-edge filter off: " + CROP_EDGE,
            "rss_limit": "14 GB (reference killed above)",
            "rows": table,
            f"fast_crop1_over_crop0_at_{sizes[-1]}MP": round(c1 / c0, 3) if c0 and c1 else None,
            f"fast_peak_{sizes[-1]}MP_over_{sizes[0]}MP": flat,
        }
    if only is None:
        result["machine"]["loadavg_end"] = os.getloadavg()
        result["total_s"] = round(time.perf_counter() - t_start, 1)
    _write(result)
    log(f"done in {round(time.perf_counter() - t_start, 1)} s -> {RESULTS}")


def _write(result: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
