"""Draw face boxes on an image (what the seed's functions answered)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import cv2
import numpy as np


class Box(Protocol):
    """What is drawn: an axis-aligned box in pixels (a `models.types.Detection`, say).

    A protocol, not the models' type: rendering sits below the models that use its RLE
    codec, so it imports nothing of theirs.
    """

    x: int
    y: int
    w: int
    h: int


GREEN = (0, 255, 0)


def draw_boxes(
    image_bgr: np.ndarray, faces: Iterable[Box], color: tuple[int, int, int] = GREEN
) -> np.ndarray:
    """A copy of the image with one rectangle per face; line width grows with the image."""
    out = image_bgr.copy()
    thickness = max(2, round(max(out.shape[:2]) / 400))
    for f in faces:
        cv2.rectangle(out, (f.x, f.y), (f.x + f.w, f.y + f.h), color, thickness)
    return out
