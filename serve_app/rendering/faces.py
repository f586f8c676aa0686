"""How faces appear in an image answer: boxed (with landmarks where the model gives them),
blurred or pixelated. Hiding faces is the privacy use of a face service; it changes the pixels
of each face box and nothing outside them."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from serve_app.rendering.boxes import GREEN, Box, draw_boxes

DRAW_MODES = ("box", "blur", "pixelate")
# Landmark colours: eyes, nose tip, mouth corners (BGR).
LANDMARK_COLORS = ((255, 0, 0), (255, 0, 0), (0, 0, 255), (0, 255, 255), (0, 255, 255))
PIXELATE_BLOCKS = 8  # blocks across a face's longer side: enough to hide who it is


def render_faces(
    image_bgr: np.ndarray,
    faces: Sequence[Box],
    draw: str = "box",
    color: tuple[int, int, int] = GREEN,
    landmarks: bool = True,
) -> np.ndarray:
    """A copy of the image with the faces boxed, blurred or pixelated."""
    if draw == "box":
        out = draw_boxes(image_bgr, faces, color)
        if landmarks:
            _draw_landmarks(out, faces)
        return out
    if draw not in DRAW_MODES:
        raise ValueError(f"draw must be one of {DRAW_MODES}, got {draw!r}")
    out = image_bgr.copy()
    h, w = out.shape[:2]
    for f in faces:
        x0, y0 = max(0, f.x), max(0, f.y)
        x1, y1 = min(w, f.x + f.w), min(h, f.y + f.h)
        if x1 <= x0 or y1 <= y0:
            continue
        # Each face from the original pixels, so overlapping boxes do not blur twice.
        roi = image_bgr[y0:y1, x0:x1]
        out[y0:y1, x0:x1] = _blur(roi) if draw == "blur" else _pixelate(roi)
    return out


def _blur(roi: np.ndarray) -> np.ndarray:
    # A kernel half the face wide leaves no recognisable feature; blurring the box alone keeps
    # the rest of the image untouched (border pixels are reflected, not taken from outside).
    k = max(3, (max(roi.shape[:2]) // 2) | 1)
    return cv2.GaussianBlur(roi, (k, k), 0)


def _pixelate(roi: np.ndarray) -> np.ndarray:
    h, w = roi.shape[:2]
    block = max(2, max(h, w) // PIXELATE_BLOCKS)
    small = cv2.resize(roi, (max(1, w // block), max(1, h // block)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _draw_landmarks(out: np.ndarray, faces: Sequence[Box]) -> None:
    for f in faces:
        points = getattr(f, "landmarks", ())  # models.types.LandmarkDetection has them
        radius = max(2, round(max(f.w, f.h) / 40))
        for (x, y), c in zip(points, LANDMARK_COLORS, strict=False):
            cv2.circle(out, (int(round(x)), int(round(y))), radius, c, -1)
