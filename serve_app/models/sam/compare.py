"""Compare SAM's encoder in float32 and bfloat16 on your own image and weights.

    .venv/bin/python -m serve_app.models.sam.compare --variant vit_b \\
        --weights models/sam_vit_b_01ec64.pth --image photo.jpg [--points-per-side 32]

Prints (and with --json writes) the embedding's relative error and, for the same prompts,
mask IoU between the two dtypes: prompted (a grid of single-point prompts, three masks
each) and automatic (the service's generator at its default thresholds). Each mask is
matched to the best mask of the same point prompt in the other dtype (a mask with no
counterpart, e.g. one that passed a threshold in one dtype only, counts as IoU 0).

This is how to check bf16 on real weights: the repository's own figures use random
weights (no checkpoint is available to it), whose masks mean nothing. The benchmark
(bench/sam_bench.py) calls the same functions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from serve_app.models.sam.records import MaskRecord


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def iou_stats(ious: Sequence[float]) -> dict[str, Any]:
    """min, mean and share below 0.9 of per-mask IoUs."""
    if not ious:
        return {"masks": 0, "iou_min": None, "iou_mean": None, "share_below_0.9": None}
    return {
        "masks": len(ious),
        "iou_min": round(min(ious), 6),
        "iou_mean": round(statistics.fmean(ious), 6),
        "share_below_0.9": round(sum(i < 0.9 for i in ious) / len(ious), 6),
    }


def matched_ious(base: Sequence[Any], other: Sequence[Any]) -> list[float]:
    """For each mask of `base`, the best IoU with a mask of `other` from the same point
    prompt (records or reference dicts); 0 when `other` has none."""

    def key(r: Any) -> str:
        # As floats: the reference reports crop boxes as floats or ints depending on
        # whether its first crop kept any mask (torch.cat promotes).
        d = r if isinstance(r, dict) else r.as_dict()
        parts = (d["point_coords"], [d.get("crop_box") or []], [d.get("box_prompt") or []])
        return json.dumps([[[float(v) for v in row] for row in part] for part in parts])

    def mask(r: Any) -> np.ndarray:
        if isinstance(r, MaskRecord):
            return r.mask()
        from serve_app.rendering import rle

        return rle.decode(r["segmentation"])

    by_key: dict[str, list[np.ndarray]] = {}
    for r in other:
        by_key.setdefault(key(r), []).append(mask(r))
    out = []
    for r in base:
        a = mask(r)
        out.append(max((iou(a, b) for b in by_key.get(key(r), [])), default=0.0))
    return out


def embedding_error(sam: nn.Module, image_rgb: np.ndarray) -> dict[str, Any]:
    """float32 vs bfloat16 image embedding of the fused encoder, with both timings."""
    from serve_app.models.sam.encoder import embed

    t = time.perf_counter()
    a = embed(sam, image_rgb, dtype=torch.float32).features
    t32 = time.perf_counter() - t
    t = time.perf_counter()
    b = embed(sam, image_rgb, dtype=torch.bfloat16).features
    t16 = time.perf_counter() - t
    rel = float((a - b).norm() / a.norm())
    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    return {
        "relative_error": round(rel, 6),
        "cosine": round(cos, 7),
        "float32_s": round(t32, 2),
        "bfloat16_s": round(t16, 2),
    }


def prompt_grid(h: int, w: int, n: int) -> list[tuple[float, float]]:
    """n x n points at the centres of an even grid over the image."""
    return [((i + 0.5) * w / n, (j + 0.5) * h / n) for j in range(n) for i in range(n)]


def prompted_ious(sam: nn.Module, image_rgb: np.ndarray, side: int = 4) -> dict[str, Any]:
    """Single-point prompts on a side x side grid, three masks each, in both dtypes."""
    from serve_app.models.sam.prompt import PromptedSegmenter

    h, w = image_rgb.shape[:2]
    runs = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        seg = PromptedSegmenter(sam, cache_bytes=64 * 2**20, dtype=dtype)
        runs[name] = [
            r
            for p in prompt_grid(h, w, side)
            for r in seg.segment(image_rgb, "image", points=[p], multimask=True)
        ]
    ious = [iou(a.mask(), b.mask()) for a, b in zip(runs["float32"], runs["bfloat16"], strict=True)]
    return {"prompts": side * side, **iou_stats(ious)}


def automatic_records(
    sam: nn.Module, image_rgb: np.ndarray, dtype: torch.dtype, **kw: Any
) -> tuple[list[MaskRecord], float]:
    from serve_app.models.sam.amg import FastMaskGenerator

    t = time.perf_counter()
    records = FastMaskGenerator(sam, dtype=dtype, **kw).generate(image_rgb)
    return records, time.perf_counter() - t


def automatic_ious(sam: nn.Module, image_rgb: np.ndarray, **kw: Any) -> dict[str, Any]:
    """The automatic generator in both dtypes; float32 masks matched to bf16 ones."""
    a, ta = automatic_records(sam, image_rgb, torch.float32, **kw)
    b, tb = automatic_records(sam, image_rgb, torch.bfloat16, **kw)
    return {
        "float32_masks": len(a),
        "bfloat16_masks": len(b),
        "float32_s": round(ta, 2),
        "bfloat16_s": round(tb, 2),
        **iou_stats(matched_ious(a, b)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--variant", required=True, choices=["vit_b", "vit_l", "vit_h", "mobile"])
    ap.add_argument("--weights", required=True, help="the SAM checkpoint (.pth)")
    ap.add_argument("--image", required=True)
    ap.add_argument("--points-per-side", type=int, default=32, help="automatic mode grid")
    ap.add_argument("--prompt-grid", type=int, default=4, help="prompted: n x n points")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    import cv2

    from serve_app.models.sam.precision import native_bf16
    from serve_app.models.sam.registry import build_sam

    bgr = cv2.imread(args.image)
    if bgr is None:
        raise SystemExit(f"cannot read image {args.image}")
    image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    sam = build_sam(args.variant, args.weights, device=args.device)
    native, why = native_bf16(torch.device(args.device))
    print(f"native bf16: {native} ({why})", flush=True)
    out: dict[str, Any] = {
        "variant": args.variant,
        "image_hw": list(image.shape[:2]),
        "native_bf16": native,
        "embedding": embedding_error(sam, image),
    }
    print(f"embedding: {out['embedding']}", flush=True)
    out["prompted"] = prompted_ious(sam, image, args.prompt_grid)
    print(f"prompted: {out['prompted']}", flush=True)
    out["automatic"] = automatic_ious(sam, image, points_per_side=args.points_per_side)
    print(f"automatic (default thresholds): {out['automatic']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
