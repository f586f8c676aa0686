"""YuNet face detector (libfacedetection), run by OpenCV's `cv2.FaceDetectorYN`, multi-scale.

One YuNet forward sees faces from about 10 to 300 px. A request is therefore planned as a few
passes, each on the image resized by its own scale:

- the main pass, at the image's own size (scaled down when its longer side is over `max_side`,
  which bounds the default cost of large photos);
- a large-face pass on a small copy (longer side `large_side`) when faces too big for the main
  pass are possible, i.e. when the main pass's shorter side is over `KEEP_MAX["main"]`;
- with `small_faces`, a pass at `small_scale` x the main scale (upscaled, or the full-resolution
  image when the main pass was scaled down), run in overlapping tiles so that memory stays that
  of one tile.

Each pass keeps only faces in the size range it sees well (`keep_min`..`keep_max`, original
pixels, longer side); the ranges overlap a little and one NMS over all passes merges what both
neighbours kept. `plan()` says how many pixels the model will look at before anything runs, so
the caller can refuse work over its budget.

Pure model code: numpy/cv2 in, detections out; no HTTP, no Ray. One instance runs one image at a
time (FaceDetectorYN keeps its input size and buffers as state; it is not thread-safe).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from serve_app.models.types import LandmarkDetection, stop_if_cancelled

# Face sizes (longer side, in the pixels of the pass) each kind of pass keeps; see plan().
# Chosen on the dev set (docs/accuracy.md).
KEEP_MIN = {"small": 0.0, "main": 16.0, "large": 48.0}
KEEP_MAX = {"small": 40.0, "main": 320.0, "large": math.inf}
# Passes within this factor of the main pass's scale add nothing and are skipped.
MIN_SCALE_STEP = 1.5
TILE_SIDE = 1280  # largest side a single forward gets in a tiled pass
SIZE_STEP = 64  # inputs are padded to a multiple of this (YuNet itself pads to 32)
MAX_NETS = 4  # FaceDetectorYN instances kept, one per input size (least recently used goes)
TILE_OVERLAP = 2 * int(KEEP_MAX["small"]) + 16  # a kept face lies wholly inside some tile


@dataclass(frozen=True)
class ScalePass:
    """One forward (or tiled forwards) at `scale`, keeping faces with longer side in
    [keep_min, keep_max) original pixels."""

    name: str
    scale: float
    keep_min: float
    keep_max: float
    width: int  # size of the resized image this pass looks at
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class PlanSettings:
    max_side: int = 1280
    large_side: int = 320
    small_scale: float = 2.0


def plan(width: int, height: int, *, small_faces: bool, settings: PlanSettings) -> list[ScalePass]:
    """The passes for an image of this size, largest scale first. Deterministic and cheap."""
    longest = max(width, height)
    s_main = min(1.0, settings.max_side / longest)
    scales: list[tuple[str, float]] = [("main", s_main)]
    s_large = settings.large_side / longest
    if min(width, height) * s_main > KEEP_MAX["main"] and s_large * MIN_SCALE_STEP <= s_main:
        scales.append(("large", s_large))
    if small_faces:
        s_small = min(settings.small_scale, settings.small_scale * s_main)
        if s_small >= s_main * MIN_SCALE_STEP:
            scales.insert(0, ("small", s_small))

    # Scales run largest first. Between two neighbours, the larger-scale pass keeps faces
    # under its KEEP_MAX and the smaller-scale one faces from its KEEP_MIN (each in its own
    # pixels); the outermost passes are open-ended.
    passes = []
    for i, (name, s) in enumerate(scales):
        lo = KEEP_MIN[name] / s if i > 0 else 0.0
        hi = KEEP_MAX[name] / s if i < len(scales) - 1 else math.inf
        passes.append(
            ScalePass(name, s, lo, hi, max(1, round(width * s)), max(1, round(height * s)))
        )
    return passes


def work_pixels(passes: list[ScalePass]) -> int:
    return sum(p.pixels for p in passes)


class YuNet:
    """`cv2.FaceDetectorYN` on an ONNX file (yunet_n or yunet_s), multi-scale."""

    def __init__(self, model_path: str | Path, *, top_k: int = 5000) -> None:
        self._path = str(model_path)
        self._top_k = top_k
        # One FaceDetectorYN per input size: setInputSize rebuilds the net's buffers (measured
        # ~15-30 ms, a third of a 1 MP forward), and a request alternates between sizes (main,
        # large-face, tiles). Inputs are padded to SIZE_STEP so similar photos share one.
        self._nets: OrderedDict[tuple[int, int], cv2.FaceDetectorYN] = OrderedDict()
        self._net_for((320, 320))  # fail at load time, not on the first request

    def _net_for(self, size: tuple[int, int]) -> cv2.FaceDetectorYN:
        net = self._nets.pop(size, None)
        if net is None:
            net = cv2.FaceDetectorYN.create(self._path, "", size, 0.5, 0.3, self._top_k)
            while len(self._nets) >= MAX_NETS:
                self._nets.popitem(last=False)
        self._nets[size] = net  # most recently used last
        return net

    def forward(
        self, image_bgr: np.ndarray, score_threshold: float, nms_threshold: float = 0.3
    ) -> np.ndarray:
        """Raw rows (N x 15: x, y, w, h, 5 landmark x/y pairs, score) at the image's size."""
        h, w = image_bgr.shape[:2]
        pw, ph = -(-w // SIZE_STEP) * SIZE_STEP, -(-h // SIZE_STEP) * SIZE_STEP
        if (pw, ph) != (w, h):  # black below and to the right: coordinates are unchanged
            image_bgr = cv2.copyMakeBorder(
                image_bgr, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=(0, 0, 0)
            )
        net = self._net_for((pw, ph))
        net.setScoreThreshold(score_threshold)
        net.setNMSThreshold(nms_threshold)
        _, faces = net.detect(image_bgr)
        return np.zeros((0, 15), np.float32) if faces is None else faces

    def _run_pass(
        self,
        image_bgr: np.ndarray,
        p: ScalePass,
        score: float,
        nms: float = 0.3,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """Rows of one pass in original pixel coordinates, before the keep filter. A set
        `cancel` stops it before its next tile."""
        h, w = image_bgr.shape[:2]
        # Only a pass whose kept faces fit in the tile overlap can be tiled (the small-face
        # pass); the others are bounded by max_side and run whole.
        tiled = p.keep_max * p.scale <= TILE_OVERLAP - 16
        if not tiled or (p.width <= TILE_SIDE and p.height <= TILE_SIDE):
            return self._rescaled(self.forward(_resize(image_bgr, p), score, nms), p.scale, 0, 0)
        rows = []
        (xs, tw), (ys, th) = _tiles(p.width), _tiles(p.height)
        for j, ty in enumerate(ys):
            for i, tx in enumerate(xs):
                stop_if_cancelled(cancel, "between tiles")
                # The source region of this tile, resized alone: never the whole upscaled image.
                x0, y0 = math.floor(tx / p.scale), math.floor(ty / p.scale)
                x1 = min(w, math.ceil((tx + tw) / p.scale))
                y1 = min(h, math.ceil((ty + th) / p.scale))
                tile = cv2.resize(
                    image_bgr[y0:y1, x0:x1],
                    (round((x1 - x0) * p.scale), round((y1 - y0) * p.scale)),
                    interpolation=cv2.INTER_LINEAR if p.scale > 1 else cv2.INTER_AREA,
                )
                r = self._rescaled(self.forward(tile, score, nms), p.scale, x0, y0)
                # Each face is kept by the one tile whose core holds its centre; cores split
                # every overlap in its middle, and the overlap is wider than any kept face, so
                # that tile saw the face whole.
                cx, cy = r[:, 0] + r[:, 2] / 2, r[:, 1] + r[:, 3] / 2
                (cx0, cx1), (cy0, cy1) = _core(xs, tw, i, p.scale), _core(ys, th, j, p.scale)
                rows.append(r[(cx >= cx0) & (cx < cx1) & (cy >= cy0) & (cy < cy1)])
        return np.concatenate(rows) if rows else np.zeros((0, 15), np.float32)

    @staticmethod
    def _rescaled(rows: np.ndarray, scale: float, x0: int, y0: int) -> np.ndarray:
        out = rows.astype(np.float64, copy=True)
        out[:, :14] /= scale
        out[:, [0, 4, 6, 8, 10, 12]] += x0  # box corner and landmark x
        out[:, [1, 5, 7, 9, 11, 13]] += y0
        return out

    def detect(
        self,
        image_bgr: np.ndarray,
        passes: list[ScalePass],
        *,
        score_threshold: float = 0.7,
        nms_threshold: float = 0.3,
        cancel: threading.Event | None = None,
    ) -> list[LandmarkDetection]:
        """Faces of all `passes`. A set `cancel` stops the work before its next forward
        (one pass, or one tile of a tiled pass: ~0.1 s each) with `Cancelled`."""
        h, w = image_bgr.shape[:2]
        kept = []
        for p in passes:
            stop_if_cancelled(cancel, "between passes")
            rows = self._run_pass(image_bgr, p, score_threshold, nms_threshold, cancel)
            size = np.maximum(rows[:, 2], rows[:, 3])
            kept.append(rows[(size >= p.keep_min) & (size < p.keep_max)])
        rows = np.concatenate(kept) if kept else np.zeros((0, 15))
        if len(passes) > 1 and len(rows) > 1:
            keep = cv2.dnn.NMSBoxes(
                rows[:, :4].tolist(), rows[:, 14].tolist(), score_threshold, nms_threshold
            )
            rows = rows[np.asarray(keep, dtype=int).ravel()]
        rows = rows[np.argsort(-rows[:, 14], kind="stable")]
        return [_detection(r, w, h) for r in rows]


def _resize(image_bgr: np.ndarray, p: ScalePass) -> np.ndarray:
    h, w = image_bgr.shape[:2]
    if (p.width, p.height) == (w, h):
        return image_bgr
    interp = cv2.INTER_LINEAR if p.scale > 1 else cv2.INTER_AREA
    return cv2.resize(image_bgr, (p.width, p.height), interpolation=interp)


def _tiles(length: int) -> tuple[list[int], int]:
    """Tile origins along one axis (pass pixels) and the tile side: as few tiles as fit in
    TILE_SIDE, all the same size, neighbours overlapping by at least TILE_OVERLAP."""
    if length <= TILE_SIDE:
        return [0], length
    n = math.ceil((length - TILE_OVERLAP) / (TILE_SIDE - TILE_OVERLAP))
    side = math.ceil((length + (n - 1) * TILE_OVERLAP) / n)
    step = (length - side) / (n - 1)
    return [round(k * step) for k in range(n)], side


def _core(starts: list[int], side: int, k: int, scale: float) -> tuple[float, float]:
    """The part of tile k (original pixels) whose face centres that tile keeps."""
    lo = -math.inf if k == 0 else (starts[k] + starts[k - 1] + side) / 2 / scale
    hi = math.inf if k == len(starts) - 1 else (starts[k + 1] + starts[k] + side) / 2 / scale
    return lo, hi


def _detection(row: np.ndarray, width: int, height: int) -> LandmarkDetection:
    """A pixel box clipped to the image (YuNet's boxes may overhang it) with its landmarks."""
    x0, y0 = max(0.0, row[0]), max(0.0, row[1])
    x1, y1 = min(float(width), row[0] + row[2]), min(float(height), row[1] + row[3])
    ix0, iy0 = int(round(x0)), int(round(y0))
    marks = tuple((float(row[4 + 2 * i]), float(row[5 + 2 * i])) for i in range(5))
    return LandmarkDetection(
        ix0,
        iy0,
        max(1, int(round(x1)) - ix0),
        max(1, int(round(y1)) - iy0),
        round(float(row[14]), 4),
        landmarks=marks,
    )
