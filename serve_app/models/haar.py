"""OpenCV Haar cascade face detector (the seeds' `face-detect-opencv`, `basic-face-detection`)."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from serve_app.models.types import Cancelled, Detection

FRONTALFACE_DEFAULT = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
# OpenCV's grouping eps in detectMultiScale (cascadedetect.cpp GROUP_EPS).
GROUP_EPS = 0.2
# Windows per detectMultiScale call when a scan is split to be cancellable (~0.5 s here);
# scans smaller than this run as one call, exactly as before.
CHUNK_WINDOWS = 1_500_000


class HaarDetector:
    def __init__(self, cascade_path: str | Path = FRONTALFACE_DEFAULT) -> None:
        self._cascade = cv2.CascadeClassifier(str(cascade_path))
        if self._cascade.empty():
            raise ValueError(f"could not load Haar cascade {cascade_path}")
        self.window = tuple(int(v) for v in self._cascade.getOriginalWindowSize())

    def levels(
        self, width: int, height: int, scale_factor: float, min_size: int
    ) -> list[tuple[int, int, int]]:
        """(window width, window height, windows) of each pyramid level detectMultiScale scans.

        Mirrors cascadedetect.cpp: factors 1, s, s^2, ... until the window outgrows the image;
        levels whose window is under min_size are skipped; the scaled image is searched with
        a step of 2 pixels (1 once the factor passes 2).
        """
        win_w, win_h = self.window
        out = []
        factor = 1.0
        while True:
            ww, wh = round(win_w * factor), round(win_h * factor)
            if ww > width or wh > height:
                break
            if ww >= min_size and wh >= min_size:
                sw, sh = round(width / factor), round(height / factor)
                if sw < win_w or sh < win_h:
                    break
                step = 1 if factor > 2 else 2
                out.append((ww, wh, ((sw - win_w) // step + 1) * ((sh - win_h) // step + 1)))
            factor *= scale_factor
        return out

    def windows(self, width: int, height: int, scale_factor: float, min_size: int) -> int:
        return sum(n for _, _, n in self.levels(width, height, scale_factor, min_size))

    def detect(
        self,
        image_bgr: np.ndarray,
        *,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: int = 30,
        cancel: threading.Event | None = None,
    ) -> list[Detection]:
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        h, w = gray.shape
        levels = self.levels(w, h, scale_factor, min_size)
        # Histogram equalisation would change answers vs the seed functions, which ran
        # detectMultiScale on the plain gray image.
        if sum(n for _, _, n in levels) <= CHUNK_WINDOWS or cancel is None:
            boxes = self._cascade.detectMultiScale(
                gray,
                scaleFactor=scale_factor,
                minNeighbors=min_neighbors,
                minSize=(min_size, min_size),
            )
        else:
            boxes = self._chunked(gray, levels, scale_factor, min_neighbors, cancel)
        # Haar gives no score; 1.0 keeps the JSON schema uniform across detectors.
        return [Detection(int(x), int(y), int(w), int(h), 1.0) for (x, y, w, h) in boxes]

    def _chunked(self, gray, levels, scale_factor, min_neighbors, cancel) -> list:
        """The same scan as one call, a few pyramid levels per call so that a cancel is seen
        between them: raw windows per range of window sizes (minNeighbors=0 skips OpenCV's
        grouping), then grouped once, as detectMultiScale groups them."""
        raw: list[list[int]] = []
        first = 0
        count = 0
        for i, (ww, wh, n) in enumerate(levels):
            count += n
            last = i + 1 == len(levels)
            # A chunk ends only where the window grows: levels of one rounded window size
            # (1.00 and 1.01 both give 24 px) are told apart by nothing but that size.
            if not last and (count < CHUNK_WINDOWS or levels[i + 1][:2] == (ww, wh)):
                continue
            if cancel.is_set():
                raise Cancelled("the scan was cancelled")
            found = self._cascade.detectMultiScale(
                gray,
                scaleFactor=scale_factor,
                minNeighbors=0,
                minSize=levels[first][:2],
                maxSize=(ww, wh),
            )
            raw.extend([int(v) for v in box] for box in found)
            first, count = i + 1, 0
        if min_neighbors <= 0 or not raw:
            return raw
        grouped, _ = cv2.groupRectangles(raw, min_neighbors, GROUP_EPS)
        return list(grouped)
