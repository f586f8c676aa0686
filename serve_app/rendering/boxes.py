"""Draw face boxes on an image (what the seed's functions answered)."""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np

from serve_app.models.types import Detection

GREEN = (0, 255, 0)


def draw_boxes(
    image_bgr: np.ndarray, faces: Iterable[Detection], color: tuple[int, int, int] = GREEN
) -> np.ndarray:
    """A copy of the image with one rectangle per face; line width grows with the image."""
    out = image_bgr.copy()
    thickness = max(2, round(max(out.shape[:2]) / 400))
    for f in faces:
        cv2.rectangle(out, (f.x, f.y), (f.x + f.w, f.y + f.h), color, thickness)
    return out
