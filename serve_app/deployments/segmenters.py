"""Segment Anything deployments: one Serve deployment per SAM variant, one class for all.

A replica owns one model: it decodes the image, runs automatic mask generation (optionally
streaming progress events for the jobs API) or prompted segmentation with a cache of image
embeddings, and renders the masks as JSON (COCO RLE) or as the seed's coloured overlay.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

import cv2
import numpy as np
from ray import serve

from serve_app import metrics
from serve_app.deployments.base import ModelDeployment
from serve_app.deployments.budget import check_work
from serve_app.deployments.params import Param, parse_params
from serve_app.errors import ServiceError
from serve_app.inputs.decode import decode_image
from serve_app.models import weights
from serve_app.models.types import Cancelled
from serve_app.rendering.encode import MEDIA_TYPES, encode_image

OUTPUTS = ("json", "jpeg", "png")
OVERLAY_ALPHA = 0.35


class SamSegmenter(ModelDeployment):
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._running = 0  # model calls in worker threads, cancelled ones still stopping too
        self._running_lock = threading.Lock()
        o = self.options
        self.PARAMS = {
            "points_per_side": Param(
                int, o.points_per_side, 1, o.max_points_per_side, "prompt grid per image side"
            ),
            "pred_iou_thresh": Param(float, o.pred_iou_thresh, 0.0, 1.0, "minimum predicted IoU"),
            "stability_score_thresh": Param(
                float, o.stability_score_thresh, 0.0, 1.0, "minimum stability score"
            ),
            "box_nms_thresh": Param(float, o.box_nms_thresh, 0.0, 1.0, "box IoU for NMS"),
            "min_mask_region_area": Param(
                int, o.min_mask_region_area, 0, 10**8, "remove smaller holes and islands"
            ),
            "crop_n_layers": Param(
                int,
                o.crop_n_layers,
                0,
                o.max_crop_n_layers,
                "extra layers of image crops (small objects; each layer n: 4**n encoder runs)",
            ),
            "seed": Param(int, 0, 0, 2**31 - 1, "overlay colour seed"),
        }
        try:  # the defaults must fit: else every default request would be refused
            self.check_work({k: spec.default for k, spec in self.PARAMS.items()})
        except ServiceError as err:
            raise ValueError(
                f"{self.name}: default parameters over budget: {err.message}"
            ) from None

    # -- ModelDeployment ---------------------------------------------------------------
    def load(self) -> Any:
        import torch

        from serve_app.models.sam import precision
        from serve_app.models.sam.encoder import model_device
        from serve_app.models.sam.prompt import PromptedSegmenter
        from serve_app.models.sam.registry import build_sam

        torch.set_num_threads(self.threads)
        checkpoint = None
        if not self.options.random_weights:
            checkpoint = weights.find(self.options.weights, self.model_dir)
        sam = build_sam(self.options.variant, checkpoint, device=self.options.device)
        self.precision = precision.choose(
            self.options.dtype,
            model_device(sam),
            probe=precision.probe_speedup if self.options.dtype_probe else None,
        )
        precision.log_decision(self.name, self.precision)
        self.prompted = PromptedSegmenter(
            sam, cache_bytes=self.options.embedding_cache_bytes, dtype=self.precision.dtype
        )
        return sam

    def describe(self) -> dict[str, Any]:
        decision = getattr(self, "precision", None)  # set once the model has loaded
        return {
            "variant": self.options.variant,
            "random_weights": self.options.random_weights,
            "dtype": decision.name if decision else None,
            "dtype_reason": decision.reason if decision else None,
            "running": self._running,
            "parameters": {k: p.describe() for k, p in self.PARAMS.items()},
        }

    # -- automatic masks ---------------------------------------------------------------
    async def generate(
        self, data: bytes, params: dict[str, Any], output: str = "json", filename: str | None = None
    ) -> dict[str, Any]:
        p, model = self._prepare(params, output)
        self.check_work(p)
        return await self._in_thread(self._generate, model, data, p, output, filename, None)

    async def generate_stream(
        self, data: bytes, params: dict[str, Any], output: str = "json", filename: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Progress events `{"progress", "stage"}`, then one `{"result": ...}`."""
        p, model = self._prepare(params, output)
        self.check_work(p)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        def progress(fraction: float, stage: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, {"progress": fraction, "stage": stage})

        cancel = threading.Event()
        work = asyncio.ensure_future(
            self._in_thread(
                self._generate, model, data, p, output, filename, progress, cancel=cancel
            )
        )
        try:
            while not work.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield {"result": work.result()}
        finally:
            # Cancelled (the job's timeout) or closed early: the model stops at its next step.
            if not work.done():
                cancel.set()

    async def _in_thread(
        self, fn: Callable[..., Any], *args: Any, cancel: threading.Event | None = None
    ) -> Any:
        """`fn(*args, cancel)` in a worker thread, which cannot be killed: when the caller
        gives up (the router's timeout cancels the call, which Serve turns into
        CancelledError here) the event tells the model to stop at its next step."""
        cancel = cancel or threading.Event()

        def run() -> Any:
            with self._running_lock:
                self._running += 1
            try:
                return fn(*args, cancel)
            except Cancelled:
                # Nobody waits for this answer any more; the router has already answered.
                raise ServiceError(504, "cancelled", "the request was cancelled") from None
            finally:
                with self._running_lock:
                    self._running -= 1

        try:
            return await asyncio.to_thread(run)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def check_work(self, p: dict[str, Any]) -> None:
        """Refuse (422) automatic-mask parameters whose decoder prompts are over budget,
        before the image is decoded: the count does not depend on the image's size."""
        from serve_app.models.sam.work import crop_layers, planned_work

        o = self.options
        down = o.crop_n_points_downscale_factor
        for layer, (_, points) in enumerate(
            crop_layers(p["points_per_side"], p["crop_n_layers"], down)
        ):
            if points == 0:  # segment_anything would divide by zero building that grid
                raise ServiceError(
                    422,
                    "bad_parameter",
                    f"points_per_side={p['points_per_side']} leaves crop layer {layer} no "
                    f"points (crop_n_points_downscale_factor {down}): use more points or "
                    "fewer crop layers",
                )
        defaults = {k: spec.default for k, spec in self.PARAMS.items()}
        check_work(
            lambda q: planned_work(q["points_per_side"], q["crop_n_layers"], down).decoder_prompts,
            p,
            defaults,
            ("points_per_side", "crop_n_layers"),
            o.max_decoder_prompts,
            unit="decoder prompts",
            option="max_decoder_prompts",
        )

    def _prepare(self, params: dict[str, Any], output: str) -> tuple[dict[str, Any], Any]:
        if output not in OUTPUTS:
            raise ServiceError(422, "bad_parameter", f"format must be one of {list(OUTPUTS)}")
        return parse_params(self.PARAMS, params), self.ready_model()

    def _generate(self, model, data, p, output, filename, progress, cancel) -> dict[str, Any]:
        from serve_app.models.sam.amg import FastMaskGenerator

        t0 = time.perf_counter()
        image = decode_sam_image(data, self.max_pixels)
        t1 = time.perf_counter()
        generator = FastMaskGenerator(
            model,
            points_per_side=p["points_per_side"],
            points_per_batch=self.options.points_per_batch,
            pred_iou_thresh=p["pred_iou_thresh"],
            stability_score_thresh=p["stability_score_thresh"],
            box_nms_thresh=p["box_nms_thresh"],
            min_mask_region_area=p["min_mask_region_area"],
            crop_n_layers=p["crop_n_layers"],
            crop_nms_thresh=self.options.crop_nms_thresh,
            crop_overlap_ratio=self.options.crop_overlap_ratio,
            crop_n_points_downscale_factor=self.options.crop_n_points_downscale_factor,
            dtype=self.precision.dtype,
        )
        masks = generator.generate(
            cv2.cvtColor(image, cv2.COLOR_BGR2RGB), progress=progress, cancel=cancel
        )
        t2 = time.perf_counter()
        result = self._render(image, masks, p, output, filename, "automatic")
        result["timing_ms"] = _timing(t0, t1, t2, time.perf_counter())
        metrics.record_answer(self.name, self.spec.kind, result)
        return result

    # -- prompted masks ----------------------------------------------------------------
    async def segment(
        self, data: bytes, params: dict[str, Any], output: str = "json", filename: str | None = None
    ) -> dict[str, Any]:
        params = dict(params)
        prompts = parse_prompts(
            params.pop("points", None),
            params.pop("labels", None),
            params.pop("boxes", None),
            params.pop("multimask", None),
            self.options.max_prompts,
        )
        p, model = self._prepare(params, output)
        return await self._in_thread(self._segment, data, prompts, p, output, filename)

    def _segment(self, data, prompts, p, output, filename, cancel) -> dict[str, Any]:
        t0 = time.perf_counter()
        image = decode_sam_image(data, self.max_pixels)
        h, w = image.shape[:2]
        check_prompts_inside(prompts, w, h)
        t1 = time.perf_counter()
        key = hashlib.sha256(data).hexdigest()
        masks = self.prompted.segment(
            cv2.cvtColor(image, cv2.COLOR_BGR2RGB), key, **prompts, cancel=cancel
        )
        t2 = time.perf_counter()
        result = self._render(image, masks, p, output, filename, "prompted")
        result["cached_embedding"] = bool(getattr(self.prompted, "last_hit", False))
        result["timing_ms"] = _timing(t0, t1, t2, time.perf_counter())
        metrics.record_answer(self.name, self.spec.kind, result)
        return result

    # -- rendering ---------------------------------------------------------------------
    def _render(self, image, masks, p, output, filename, mode) -> dict[str, Any]:
        from serve_app.rendering.masks import overlay

        result: dict[str, Any] = {
            "model": self.name,
            "mode": mode,
            "filename": filename,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "count": len(masks),
            "parameters": p,
        }
        if output == "json":
            result["masks"] = [mask_json(m) for m in masks]
        else:
            drawn = overlay(image, masks, alpha=OVERLAY_ALPHA, seed=p.get("seed", 0))
            result["image"] = encode_image(drawn, output)
            result["media_type"] = MEDIA_TYPES[output]
        return result


def decode_sam_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode, refusing shapes SAM cannot take: it resizes the long side to 1024 px, so a
    short side under 1/2048 of the long one would shrink to nothing."""
    image = decode_image(data, max_pixels=max_pixels)
    h, w = image.shape[:2]
    if round(1024 * min(h, w) / max(h, w)) < 1:
        raise ServiceError(
            422, "bad_image", f"a {w}x{h} image is too thin for SAM (aspect ratio over 2048:1)"
        )
    return image


def mask_json(mask: Any) -> dict[str, Any]:
    return {
        "segmentation": mask.rle,
        "bbox": [int(v) for v in mask.bbox],
        "area": int(mask.area),
        "predicted_iou": round(float(mask.predicted_iou), 5),
        "stability_score": round(float(mask.stability_score), 5),
    }


def _timing(t0: float, t1: float, t2: float, t3: float) -> dict[str, float]:
    return {
        "decode": round((t1 - t0) * 1e3, 2),
        "inference": round((t2 - t1) * 1e3, 2),
        "render": round((t3 - t2) * 1e3, 2),
        "total": round((t3 - t0) * 1e3, 2),
    }


# Characters of prompt JSON text (query string, form field) parsed at most: 64 boxes of four
# long floats need ~6 kB, so this refuses only what would cost real parse time.
MAX_PROMPT_TEXT = 64 * 1024


def _as_list(name: str, value: Any, max_items: int) -> list | None:
    """The prompt list, its length checked before any conversion (numpy or json)."""
    if value is None:
        return None
    if isinstance(value, str):  # query string / form field: JSON text
        if len(value) > MAX_PROMPT_TEXT:
            raise ServiceError(
                422, "bad_prompt", f"{name} is over {MAX_PROMPT_TEXT} characters of JSON"
            )
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # incl. JSONDecodeError and over-long integers
            raise ServiceError(422, "bad_prompt", f"{name} must be a JSON list") from None
    if not isinstance(value, list):
        raise ServiceError(422, "bad_prompt", f"{name} must be a list")
    if len(value) > max_items:
        raise ServiceError(422, "bad_prompt", f"at most {max_items} {name} (max_prompts)")
    return value


def _numbers(name: str, rows: list, width: int) -> np.ndarray:
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ServiceError(422, "bad_prompt", f"{name} must hold numbers") from None
    if arr.ndim != 2 or arr.shape[1] != width or not np.isfinite(arr).all():
        raise ServiceError(422, "bad_prompt", f"{name} must be a list of {width}-number lists")
    return arr


def parse_prompts(points, labels, boxes, multimask, max_prompts: int) -> dict[str, Any]:
    """Validated prompts: points (N x 2) with labels (N,), boxes (M x 4), multimask flag."""
    points, labels, boxes = (
        _as_list("points", points, max_prompts),
        _as_list("labels", labels, max_prompts),
        _as_list("boxes", boxes, max_prompts),
    )
    if not points and not boxes:
        raise ServiceError(422, "bad_prompt", "give `points` and/or `boxes`")
    out: dict[str, Any] = {"points": None, "labels": None, "boxes": None}
    if points:
        pts = _numbers("points", points, 2)
        try:
            lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels)
        except (TypeError, ValueError):  # ragged or mixed lists
            raise ServiceError(422, "bad_prompt", "labels must be one 0/1 per point") from None
        if lab.shape != (len(pts),) or not np.isin(lab, (0, 1)).all():
            raise ServiceError(422, "bad_prompt", "labels must be one 0/1 per point")
        out["points"], out["labels"] = pts, lab.astype(np.int64)
    if boxes:
        bx = _numbers("boxes", boxes, 4)
        if ((bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])).any():
            raise ServiceError(422, "bad_prompt", "boxes are [x0, y0, x1, y1] with x1>x0, y1>y0")
        out["boxes"] = bx
    count = max(
        len(out["points"]) if out["points"] is not None else 0,
        len(out["boxes"]) if out["boxes"] is not None else 0,
    )
    if count > max_prompts:
        raise ServiceError(422, "bad_prompt", f"at most {max_prompts} points or boxes")
    out["multimask"] = str(multimask).lower() in ("1", "true", "yes") if multimask else False
    return out


def check_prompts_inside(prompts: dict[str, Any], width: int, height: int) -> None:
    for name in ("points", "boxes"):
        arr = prompts[name]
        if arr is None:
            continue
        xs, ys = arr[:, 0::2], arr[:, 1::2]
        if (xs < 0).any() or (ys < 0).any() or (xs > width).any() or (ys > height).any():
            raise ServiceError(
                422, "bad_prompt", f"{name} must lie inside the {width}x{height} image"
            )


@serve.deployment
class SamDeployment(SamSegmenter):
    """One SAM variant; the config names it (sam-segmentation-light, sam-segmentation, ...)."""
