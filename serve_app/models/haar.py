"""OpenCV Haar cascade face detector (the seeds' `face-detect-opencv`, `basic-face-detection`)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from serve_app.models.types import Detection

FRONTALFACE_DEFAULT = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"


class HaarDetector:
    def __init__(self, cascade_path: str | Path = FRONTALFACE_DEFAULT) -> None:
        self._cascade = cv2.CascadeClassifier(str(cascade_path))
        if self._cascade.empty():
            raise ValueError(f"could not load Haar cascade {cascade_path}")

    def detect(
        self,
        image_bgr: np.ndarray,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 30,
    ) -> list[Detection]:
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        # Histogram equalisation would change answers vs the seed functions, which ran
        # detectMultiScale on the plain gray image.
        boxes = self._cascade.detectMultiScale(
            gray,
            scaleFactor=scale_factor,
            minNeighbors=min_neighbors,
            minSize=(min_size, min_size),
        )
        # Haar gives no score; 1.0 keeps the JSON schema uniform across detectors.
        return [Detection(int(x), int(y), int(w), int(h), 1.0) for (x, y, w, h) in boxes]
