"""Automatic mask generation: SamAutomaticMaskGenerator's output, at flat memory.

The reference upsamples all three float masks of every point to the full image before it
filters anything (about 9 GB per 64-point batch at 12 MP). Here every filter runs at a
size that does not depend on the image, and only the masks that survive NMS are ever
built at full resolution, one at a time, straight into COCO RLE:

1. Encoder as upstream (SamPredictor.set_image).
2. Per batch of points: the decoder's transformer (decoder.FastDecoder), the IoU head,
   then the upscaler only for points with a mask above `pred_iou_thresh`, and only over
   the unpadded part of the image.
3. Per batch, in chunks: stability score and box.
   * Original no larger than the model input (long side <= 1024): exactly the
     reference's computation at full size, which is then the smaller size anyway.
   * Larger originals: stability at the model-input scale (the reference's own
     intermediate 1024-scale logits); masks within `stability_margin` of the threshold
     are re-scored at full resolution, exactly. Boxes at full resolution from a few rows
     and columns per edge (resample.BandBoxes).
   Survivors keep their low-res logit crop (at most 256x256 floats), not a full mask.
4. Box NMS over all survivors, as the reference (same boxes, scores and order).
5. Each kept mask: decoded at full resolution (bit-identical to the reference's resize),
   stability/area/box measured on it, optional small-region removal (then a second NMS,
   as the reference), and encoded to RLE before the next one is decoded.

Crop layers (`crop_n_layers > 0`) as the reference: the same crop boxes
(generate_crop_boxes) and per-layer point grids (`crop_n_points_downscale_factor`); each
crop is encoded on its own and runs steps 2-4 at its own size, masks whose box touches a
crop edge inside the image are dropped, boxes and points move back to image coordinates,
and NMS across crops prefers smaller crops (`crop_nms_thresh`). Each kept mask is decoded
at its crop's size and written into one image-size buffer, so memory stays flat.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from segment_anything.utils.amg import (
    batched_mask_to_box,
    build_all_layer_point_grids,
    generate_crop_boxes,
    is_box_near_crop_edge,
    remove_small_regions,
)
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn
from torchvision.ops.boxes import batched_nms, box_area

from serve_app.models.sam.decoder import FastDecoder
from serve_app.models.sam.encoder import Embedding, check_image, embed, model_device
from serve_app.models.sam.records import MaskRecord, xyxy_to_xywh
from serve_app.models.sam.resample import (
    BandBoxes,
    FullResDecoder,
    Geometry,
    geometry,
    stability_score,
    summarize,
    to_input_scale,
    to_orig,
)
from serve_app.models.types import stop_if_cancelled

Progress = Callable[[float, str], None]

# Share of the progress bar per stage (rough CPU time shares at 32x32 points).
_ENCODER, _DECODER = 0.2, 0.75


@dataclass
class _Survivors:
    """Masks that passed the per-batch filters, waiting for NMS."""

    low: list[Tensor] = field(default_factory=list)  # each (lh, lw) float logits
    iou: list[Tensor] = field(default_factory=list)
    boxes: list[Tensor] = field(default_factory=list)  # XYXY, original pixels
    points: list[np.ndarray] = field(default_factory=list)

    def add(self, low: Tensor, iou: Tensor, boxes: Tensor, points: np.ndarray) -> None:
        self.low.extend(low.unbind(0))  # `low` is a compact copy made by indexing
        self.iou.append(iou)
        self.boxes.append(boxes)
        self.points.append(points)

    def __len__(self) -> int:
        return len(self.low)


@dataclass
class _Crop:
    """One crop's masks after its own NMS; boxes and points in image coordinates."""

    box: tuple[int, int, int, int]  # XYXY in the image, exclusive end
    geometry: Geometry
    low: list[Tensor]
    iou: Tensor
    boxes: Tensor
    points: np.ndarray


class FastMaskGenerator:
    """Drop-in for SamAutomaticMaskGenerator (output_mode="coco_rle"); see module doc.

    Options beyond the reference's: `stability_margin`, how close to
    `stability_score_thresh` a model-scale score must be to get re-scored at full size;
    `chunk`, masks per post-processing step (memory: chunk x 1024x1024 floats);
    `decoder_batch`, prompts per decoder pass (`points_per_batch` only sets how many
    prompts are encoded at once and the progress steps); `dtype`, the image encoder's
    (precision.py; the decoder stays float32).
    """

    def __init__(
        self,
        model: nn.Module,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        stability_margin: float = 0.02,
        chunk: int = 16,
        decoder_batch: int = 4,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if crop_n_layers < 0:
            raise ValueError("crop_n_layers must be >= 0")
        if points_per_side is not None:
            grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        else:
            grids = list(point_grids)
        if len(grids) != crop_n_layers + 1:
            raise ValueError(f"need crop_n_layers + 1 = {crop_n_layers + 1} point grids")
        self.model = model
        self.point_grids = grids
        self.point_grid = grids[0]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.stability_margin = stability_margin
        self.chunk = chunk
        self.decoder_batch = decoder_batch
        self.dtype = dtype
        self.decoder = FastDecoder(model)
        self.mask_threshold = float(model.mask_threshold)

    # -- public ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        image_rgb: np.ndarray,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> list[MaskRecord]:
        """Masks for an HxWx3 uint8 RGB image, in the reference's order (by predicted
        IoU after NMS; with crop layers, smaller crops first).

        A set `cancel` stops the work with `Cancelled` at its next step: between encoder
        blocks, decoder batches, crops and full-resolution masks."""
        check_image(image_rgb)
        report = progress or (lambda fraction, stage: None)
        orig_hw = (int(image_rgb.shape[0]), int(image_rgb.shape[1]))
        boxes, layers = generate_crop_boxes(orig_hw, self.crop_n_layers, self.crop_overlap_ratio)
        n = len(boxes)
        crops = []
        for i, (box, layer) in enumerate(zip(boxes, layers, strict=True)):
            part = _Scaled(report, i / n * (_ENCODER + _DECODER), (_ENCODER + _DECODER) / n, i, n)
            stop_if_cancelled(cancel, "between crops")
            crops.append(self._process_crop(image_rgb, tuple(box), layer, orig_hw, part, cancel))
        order = _merge(crops, self.crop_nms_thresh)
        report(_ENCODER + _DECODER, "postprocess")
        if not order:
            report(1.0, "postprocess")
            return []
        return self._finish(crops, order, orig_hw, report, cancel)

    # -- per crop: steps 1-4 -----------------------------------------------------------
    def _process_crop(
        self,
        image_rgb: np.ndarray,
        box: tuple[int, int, int, int],
        layer: int,
        orig_hw: tuple[int, int],
        report: Progress,
        cancel: threading.Event | None = None,
    ) -> _Crop:
        x0, y0, x1, y1 = box
        whole = box == (0, 0, orig_hw[1], orig_hw[0])
        crop = image_rgb if whole else image_rgb[y0:y1, x0:x1, :]
        report(0.0, "encoder")
        emb = embed(self.model, crop, dtype=self.dtype, cancel=cancel)
        report(_ENCODER, "encoder")
        g = geometry(
            emb.orig_hw,
            self.model.image_encoder.img_size,
            self.model.prompt_encoder.mask_input_size[0],
        )
        full = FullResDecoder(g)  # one crop-size buffer, reused for every re-scored mask
        edge = None if whole else (list(box), [0, 0, orig_hw[1], orig_hw[0]])
        survivors = self._decode_all(emb, g, full, report, self.point_grids[layer], edge, cancel)
        if not len(survivors):
            empty = torch.zeros(0, 4, dtype=torch.long)
            return _Crop(box, g, [], torch.zeros(0), empty, np.zeros((0, 2)))
        iou = torch.cat(survivors.iou)
        boxes = torch.cat(survivors.boxes)
        points = np.concatenate(survivors.points)
        keep = batched_nms(boxes.float(), iou, torch.zeros(len(boxes)), self.box_nms_thresh)
        idx = keep.tolist()
        return _Crop(
            box,
            g,
            [survivors.low[i] for i in idx],
            iou[keep],
            boxes[keep] + torch.tensor([[x0, y0, x0, y0]]),
            points[keep.numpy()] + np.array([[x0, y0]]),
        )

    # -- stage 2-3: decoder and per-batch filters ------------------------------------
    def _decode_all(
        self,
        emb: Embedding,
        g: Geometry,
        full: FullResDecoder,
        report: Progress,
        grid: np.ndarray,
        edge: tuple[list[int], list[int]] | None,
        cancel: threading.Event | None = None,
    ) -> _Survivors:
        h, w = emb.orig_hw
        points_all = grid * np.array([[w, h]])
        transform = ResizeLongestSide(self.model.image_encoder.img_size)
        device = model_device(self.model)
        n_batches = -(-len(points_all) // self.points_per_batch)
        bands = BandBoxes(g) if g.upsamples else None
        survivors = _Survivors()
        for b in range(n_batches):
            stop_if_cancelled(cancel, "between decoder batches")
            points = points_all[b * self.points_per_batch : (b + 1) * self.points_per_batch]
            coords = torch.as_tensor(transform.apply_coords(points, (h, w)), device=device)
            labels = torch.ones(len(points), dtype=torch.int, device=device)
            sparse, dense = self.model.prompt_encoder(
                points=(coords[:, None, :], labels[:, None]), boxes=None, masks=None
            )
            iou, select, low = self.decoder.predict(
                emb.features,
                sparse,
                dense,
                g.grid_hw,
                self.pred_iou_thresh if self.pred_iou_thresh > 0 else None,
                batch=self.decoder_batch,
                cancel=cancel,
            )
            if len(select):
                # Post-processing is CPU code (cv2, pycocotools); the crops are small.
                low = low[..., : g.low_hw[0], : g.low_hw[1]].cpu()
                iou, select = iou[select].cpu(), select.cpu()
                keep = iou > self.pred_iou_thresh
                if self.pred_iou_thresh <= 0:
                    keep = torch.ones_like(keep)
                # Point-major order (point, mask) as the reference flattens its batches.
                self._filter(
                    low[keep],
                    iou[keep],
                    points[select.numpy()].repeat(3, axis=0)[keep.flatten().numpy()],
                    g,
                    bands,
                    full,
                    survivors,
                    edge,
                    cancel,
                )
            report(_ENCODER + _DECODER * (b + 1) / n_batches, f"decoder batch {b + 1}/{n_batches}")
        return survivors

    def _filter(
        self,
        low: Tensor,
        iou: Tensor,
        points: np.ndarray,
        g: Geometry,
        bands: BandBoxes | None,
        full: FullResDecoder,
        out: _Survivors,
        edge: tuple[list[int], list[int]] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """Stability filter and boxes for one batch's masks; `edge` = (crop box, image
        box) drops masks whose box touches the crop's edge inside the image."""
        thr, off = self.mask_threshold, self.stability_score_offset
        s_thr = self.stability_score_thresh
        for i in range(0, len(low), self.chunk):
            stop_if_cancelled(cancel, "between mask chunks")
            lc, ic, pc = (
                low[i : i + self.chunk],
                iou[i : i + self.chunk],
                points[i : i + self.chunk],
            )
            inter = to_input_scale(lc, g)
            if bands is None:  # small original: the reference's own full-size path
                logits = to_orig(inter, g)
                stab = stability_score(logits, thr, off)
                keep = stab >= s_thr if s_thr > 0 else torch.ones_like(stab, dtype=torch.bool)
                boxes = batched_mask_to_box(logits[keep] > thr)
            else:
                stab = stability_score(inter, thr, off)
                keep = self._stability_keep(stab, lc, full)
                boxes = bands(inter[keep], thr)
            del inter
            if edge is not None and len(boxes):
                near = is_box_near_crop_edge(boxes, *edge)
                if bool(near.any()):
                    kept = torch.nonzero(keep).flatten()
                    keep = keep.clone()
                    keep[kept[near]] = False
                    boxes = boxes[~near]
            if bool(keep.any()):
                out.add(lc[keep], ic[keep], boxes, pc[keep.numpy()])

    def _stability_keep(self, stab: Tensor, low: Tensor, full: FullResDecoder) -> Tensor:
        s_thr = self.stability_score_thresh
        if s_thr <= 0:
            return torch.ones_like(stab, dtype=torch.bool)
        keep = stab >= s_thr
        unsure = (stab - s_thr).abs() < self.stability_margin
        if bool(unsure.any()):
            for j in torch.nonzero(unsure).flatten().tolist():
                d = full.decode(low[j], self.mask_threshold, self.stability_score_offset)
                keep[j] = d.stability >= s_thr
        return keep

    # -- stage 5: full-resolution records ---------------------------------------------
    def _finish(
        self,
        crops: list[_Crop],
        order: list[tuple[int, int]],
        orig_hw: tuple[int, int],
        report: Progress,
        cancel: threading.Event | None = None,
    ) -> list[MaskRecord]:
        """Records for `order` (crop index, mask index), decoded crop by crop so one
        crop-size decoder exists at a time, returned in `order`."""
        h, w = orig_hw
        records: list[MaskRecord | None] = [None] * len(order)
        unchanged = [1.0] * len(order)
        by_crop: dict[int, list[tuple[int, int]]] = {}
        for pos, (c, i) in enumerate(order):
            by_crop.setdefault(c, []).append((pos, i))
        canvas = None  # image-size mask that crops are pasted into (zero outside them)
        start, done = _ENCODER + _DECODER, 0
        for c in sorted(by_crop):
            crop = crops[c]
            x0, y0, x1, y1 = crop.box
            whole = crop.box == (0, 0, w, h)
            decoder = FullResDecoder(crop.geometry)
            if not whole and canvas is None:
                canvas = np.zeros((h, w), dtype=np.bool_, order="F")
            for pos, i in by_crop[c]:
                stop_if_cancelled(cancel, "between full-resolution masks")
                d = decoder.decode(crop.low[i], self.mask_threshold, self.stability_score_offset)
                mask, same = d.mask, True
                if not whole:
                    canvas[y0:y1, x0:x1] = mask
                    mask = canvas
                if self.min_mask_region_area > 0:
                    mask, same = _remove_small_regions(mask, self.min_mask_region_area)
                code, area, box = summarize(mask)
                records[pos] = MaskRecord(
                    rle=code,
                    bbox=xyxy_to_xywh(box),
                    area=area,
                    predicted_iou=float(crop.iou[i]),
                    stability_score=d.stability,
                    point_coords=[crop.points[i].tolist()],
                    crop_box=(x0, y0, x1 - x0, y1 - y0),
                )
                unchanged[pos] = float(same)
                done += 1
                report(start + (1 - start) * done / len(order), "postprocess")
            if not whole:
                canvas[y0:y1, x0:x1] = False
            del decoder
        out = [r for r in records if r is not None]
        if self.min_mask_region_area > 0 and out:
            # As the reference: prefer masks that needed no cleaning, drop new duplicates.
            boxes = torch.tensor([_xyxy(r.bbox) for r in out], dtype=torch.float)
            again = batched_nms(
                boxes,
                torch.tensor(unchanged),
                torch.zeros(len(out)),
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
            out = [out[i] for i in again.tolist()]
        report(1.0, "postprocess")
        return out


class _Scaled:
    """Progress of one crop mapped into its share of the encoder + decoder stages."""

    def __init__(self, report: Progress, base: float, span: float, i: int, n: int) -> None:
        self.report, self.base, self.span = report, base, span
        self.suffix = f" (crop {i + 1}/{n})" if n > 1 else ""

    def __call__(self, fraction: float, stage: str) -> None:
        share = fraction / (_ENCODER + _DECODER)
        self.report(self.base + self.span * share, stage + self.suffix)


def _merge(crops: list[_Crop], crop_nms_thresh: float) -> list[tuple[int, int]]:
    """(crop, mask) pairs in output order: with one crop, its NMS order; with several, NMS
    across crops scored 1 / crop area (smaller crops win), as the reference."""
    pairs = [(c, i) for c, crop in enumerate(crops) for i in range(len(crop.low))]
    if len(crops) == 1 or not pairs:
        return pairs
    boxes = torch.cat([crop.boxes for crop in crops])
    crop_boxes = torch.tensor([list(crops[c].box) for c, _ in pairs])
    scores = 1 / box_area(crop_boxes)
    keep = batched_nms(boxes.float(), scores, torch.zeros(len(boxes)), crop_nms_thresh)
    return [pairs[k] for k in keep.tolist()]


def _remove_small_regions(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, bool]:
    """segment_anything's holes-then-islands clean-up; returns (mask, unchanged)."""
    mask, changed_holes = remove_small_regions(mask, min_area, mode="holes")
    mask, changed_islands = remove_small_regions(mask, min_area, mode="islands")
    return mask, not (changed_holes or changed_islands)


def _xyxy(bbox: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x, y, w, h = bbox
    return (x, y, x + w, y + h)
