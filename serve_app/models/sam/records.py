"""The mask result type shared by the automatic and the prompted paths."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.rendering import rle as rle_codec


@dataclass(frozen=True)
class MaskRecord:
    """One mask at original resolution, stored as COCO RLE (str counts, JSON-ready).

    `bbox` is [x, y, w, h] in original pixels with segment_anything's convention: w and h
    are max - min of the mask's pixel indices (so a one-pixel mask has w = h = 0), which
    is what SamAutomaticMaskGenerator reports.
    """

    rle: rle_codec.Rle
    bbox: tuple[int, int, int, int]
    area: int
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]] = field(default_factory=list)
    box_prompt: list[float] | None = None
    crop_box: tuple[int, int, int, int] | None = None  # XYWH; None: the whole image

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.rle["size"]
        return int(h), int(w)

    def mask(self) -> np.ndarray:
        """The (H, W) bool mask (decoded on demand: one full-size array per call)."""
        return rle_codec.decode(self.rle)

    def as_dict(self) -> dict[str, Any]:
        """The record as SamAutomaticMaskGenerator(output_mode="coco_rle") writes it."""
        h, w = self.size
        out: dict[str, Any] = {
            "segmentation": self.rle,
            "area": self.area,
            "bbox": list(self.bbox),
            "predicted_iou": self.predicted_iou,
            "point_coords": self.point_coords,
            "stability_score": self.stability_score,
            "crop_box": list(self.crop_box) if self.crop_box is not None else [0, 0, w, h],
        }
        if self.box_prompt is not None:
            out["box_prompt"] = self.box_prompt
        return out


def xyxy_to_xywh(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    return (x0, y0, x1 - x0, y1 - y0)
