"""Pico face-detection cascades (nenadmarkus/pico), bit-exact with esimov/pigo.

Scope: pigo's face finder (``classifyRegion``, angle 0), its scan over window sizes, its
``ClusterDetections`` and the store function's ``q > threshold`` filter. Results equal pigo's to
the last float32 bit; the reference data in ``shared/data/pico`` is the contract.

pigo classifies one window at a time and leaves the cascade at the first threshold it fails.
Here a compiled (numba) kernel runs a whole row of windows tree by tree and level by level,
compacting the survivors after each tree. The scan is inherently large (store parameters on
1800x1200: 4.3 M windows, 11.8 M tree evaluations); a numpy port of it ran ~2.5x slower and
is gone. tests/test_pico.py keeps a plain per-window loop as the reference for parity.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numba
import numpy as np

from serve_app.models.types import Cancelled, Detection

# pigo's Detection struct: window centre, window side, score.
DETECTION_DTYPE = np.dtype(
    [("row", np.int64), ("col", np.int64), ("scale", np.int64), ("q", np.float32)]
)

_HEADER = 16  # 8 bytes pigo skips, then uint32 tree depth and uint32 tree count
_MAX_DEPTH = 7  # node numbers (< 2**(depth+1)) are kept in uint8; the facefinder has 6

# Windows per kernel task: enough to amortise a task's overhead, few enough that the threads
# get equal shares.
_TASK_WINDOWS = 1 << 14
_TABLE_CACHE = 2


@dataclass(frozen=True)
class PicoParams:
    """Scan and clustering parameters; the defaults are the OpenFaaS store function's."""

    min_size: int = 20
    max_size: int = 2000
    shift_factor: float = 0.1
    scale_factor: float = 1.1
    iou_threshold: float = 0.18
    q_threshold: float = 5.0

    def __post_init__(self) -> None:
        if self.min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {self.min_size}")
        if not self.shift_factor > 0:
            raise ValueError(f"shift_factor must be > 0, got {self.shift_factor}")
        if not self.scale_factor >= 1:
            raise ValueError(f"scale_factor must be >= 1, got {self.scale_factor}")

    def scales(self) -> list[int]:
        """Window sides pigo scans, smallest first."""
        out = []
        s = self.min_size
        while s <= self.max_size:
            out.append(s)
            # pigo HEAD grows by at least 2 px so that small scale factors cannot stall; float64
            # throughout, truncated like Go's int().
            s = int(s + max(2.0, s * self.scale_factor - s))
        return out

    def grid(self, rows: int, cols: int) -> list[tuple[int, range, range]]:
        """(window side, centre rows, centre cols) of every scale with at least one window:
        the scan of ``run_cascade``, as ranges, so its size is known before any work."""
        out = []
        for scale in self.scales():
            step = int(max(self.shift_factor * scale, 1.0))
            offset = scale // 2 + 1
            rr = range(offset, rows - offset + 1, step)
            cc = range(offset, cols - offset + 1, step)
            if len(rr) and len(cc):
                out.append((scale, rr, cc))
        return out

    def windows(self, rows: int, cols: int) -> int:
        """Windows the scan of a rows x cols image classifies (at least their first tree)."""
        return sum(len(rr) * len(cc) for _, rr, cc in self.grid(rows, cols))


STORE_PARAMS = PicoParams()
README_PARAMS = PicoParams(max_size=1000, iou_threshold=0.2)


def to_gray_pigo(
    image: np.ndarray,
    channel_order: Literal["bgr", "rgb"],
    variant: Literal["head", "v1_1_0"] = "head",
) -> np.ndarray:
    """pigo's grayscale of an 8-bit colour (HxWx3) or grayscale (HxW) image.

    ``head``: ``uint8((.299*R16 + .587*G16 + .114*B16) / 256)`` with ``R16 = R8*257`` (Go's
    ``color.RGBA()``); ``v1_1_0`` (what the store function was built with):
    ``uint8(.299*R8 + .587*G8 + .114*B8)``. Both in float64, left to right, truncated, so the
    bytes equal Go's given the same decoded RGB. A grayscale input goes through the same formula
    with R = G = B, as Go's NRGBA conversion does (v1.1.0 then maps some levels to level - 1).

    The formula is evaluated once per (R, G, B) into a 16 MiB uint8 table (float32 is not
    exact: 113 of the 2^24 inputs of ``head`` differ); images are then looked up in bands of
    rows, so a 50 MP image costs its uint8 output plus a few MiB, not 2 GiB of float64.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if channel_order not in ("bgr", "rgb"):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    if variant not in ("head", "v1_1_0"):
        raise ValueError(f"variant must be 'head' or 'v1_1_0', got {variant!r}")
    if image.ndim == 2:
        return _gray_levels(variant)[image]
    if not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    lut = _gray_lut(variant).reshape(-1)
    r_at, b_at = (2, 0) if channel_order == "bgr" else (0, 2)
    rows, cols = image.shape[:2]
    out = np.empty((rows, cols), np.uint8)
    band = max(1, _GRAY_BAND // max(cols, 1))
    index = np.empty((band, cols), np.uint32)
    tmp = np.empty((band, cols), np.uint32)
    for y0 in range(0, rows, band):
        part = image[y0 : y0 + band]
        n = part.shape[0]
        idx, t = index[:n], tmp[:n]
        np.left_shift(part[..., r_at], 16, out=idx, dtype=np.uint32)
        np.left_shift(part[..., 1], 8, out=t, dtype=np.uint32)
        idx |= t
        np.copyto(t, part[..., b_at])
        idx |= t
        np.take(lut, idx, out=out[y0 : y0 + n])
    return out


_GRAY_BAND = 1 << 18  # pixels per band of to_gray_pigo: 1 MiB of uint32 indices


def _gray_formula(r, g, b, variant: str):
    """pigo's formulas in float64, in its order of operations (see to_gray_pigo)."""
    if variant == "head":
        return (0.299 * (r * 257.0) + 0.587 * (g * 257.0) + 0.114 * (b * 257.0)) / 256.0
    return 0.299 * r + 0.587 * g + 0.114 * b


@functools.cache
def _gray_lut(variant: str) -> np.ndarray:
    """lut[r, g, b] = the grayscale level of that colour, exactly as the float64 formula."""
    lut = np.empty((256, 256, 256), np.uint8)
    g = np.arange(256, dtype=np.float64)[:, None]
    b = np.arange(256, dtype=np.float64)[None, :]
    for r in range(256):
        lut[r] = _gray_formula(np.float64(r), g, b, variant).astype(np.uint8)
    return lut


@functools.cache
def _gray_levels(variant: str) -> np.ndarray:
    v = np.arange(256, dtype=np.float64)
    return _gray_formula(v, v, v, variant).astype(np.uint8)


class PicoCascade:
    """A parsed pigo cascade: binary trees of pixel-comparison tests with early exits."""

    def __init__(
        self, depth: int, codes: np.ndarray, preds: np.ndarray, thresholds: np.ndarray
    ) -> None:
        # codes[t, n] = (r1, c1, r2, c2) of node n (heap order from 1; node 0 unused) in 1/256
        # of the window side; preds[t, leaf]; a window dies when its running sum after tree t
        # is <= thresholds[t].
        self.depth = depth
        self.ntrees = len(thresholds)
        self.codes = codes
        self.preds = preds
        self.thresholds = thresholds
        leaves = 1 << depth
        self._leaves = leaves
        # Codes as 0..255 indices into a per-scale table of (code * scale) >> 8.
        self._code_idx = (codes.astype(np.intp) + 128).transpose(2, 0, 1).copy()
        self._table_cache: dict[tuple[int, tuple[int, ...]], _Tables] = {}
        self._table_lock = threading.Lock()

    def _tables(self, cols: int, scales: tuple[int, ...]) -> _Tables:
        # They depend only on the image width and the window sizes; images of one size tend to
        # come in runs (a camera, a benchmark), so the last few are kept.
        key = (cols, scales)
        with self._table_lock:
            tables = self._table_cache.get(key)
        if tables is None:
            tables = _Tables(self, cols, np.array(scales, dtype=np.intp))
            with self._table_lock:
                while len(self._table_cache) >= _TABLE_CACHE:
                    self._table_cache.pop(next(iter(self._table_cache)))
                self._table_cache[key] = tables
        return tables

    @classmethod
    def from_file(cls, path: str | Path) -> PicoCascade:
        return cls.from_bytes(Path(path).read_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> PicoCascade:
        """Parse pigo's cascade format; ValueError unless the bytes are exactly one cascade."""
        if len(data) < _HEADER:
            raise ValueError(f"not a pico cascade: {len(data)} bytes, the header alone is 16")
        depth, ntrees = struct.unpack_from("<II", data, 8)
        if not 1 <= depth <= _MAX_DEPTH:
            raise ValueError(f"not a pico cascade: tree depth {depth} is outside 1..{_MAX_DEPTH}")
        leaves = 1 << depth
        tree_size = 4 * (leaves - 1) + 4 * leaves + 4
        if ntrees < 1 or len(data) != _HEADER + ntrees * tree_size:
            raise ValueError(
                f"not a pico cascade: {len(data)} bytes, but depth {depth} and {ntrees} trees "
                f"take {_HEADER + ntrees * tree_size}"
            )
        body = np.frombuffer(data, dtype=np.uint8, offset=_HEADER).reshape(ntrees, tree_size)
        codes = np.zeros((ntrees, leaves, 4), dtype=np.int8)
        codes[:, 1:] = body[:, : 4 * (leaves - 1)].view(np.int8).reshape(ntrees, leaves - 1, 4)
        floats = body[:, 4 * (leaves - 1) :].copy().view("<f4").astype(np.float32)
        preds = np.ascontiguousarray(floats[:, :leaves])
        thresholds = np.ascontiguousarray(floats[:, leaves])
        if not (np.isfinite(preds).all() and np.isfinite(thresholds).all()):
            raise ValueError("not a pico cascade: non-finite leaf or threshold values")
        return cls(depth, codes, preds, thresholds)

    # ------------------------------------------------------------------ scanning

    def run_cascade(
        self,
        gray: np.ndarray,
        params: PicoParams = STORE_PARAMS,
        threads: int | None = None,
        cancel: threading.Event | None = None,
    ) -> np.ndarray:
        """pigo's ``RunCascade``: every window with q > 0, scale ascending, then row, then col.

        Returns a ``DETECTION_DTYPE`` array. ``threads`` (default: the CPU count, at most 2)
        splits independent rows of windows across threads (the kernel releases the GIL); it
        does not change the result. ``cancel``: when set, the scan stops at its next band of
        windows (a few ms) and raises ``Cancelled``.
        """
        gray = _check_gray(gray)
        rows, cols = gray.shape
        scales, grids = [], []
        for scale, rr, cc in params.grid(rows, cols):
            scales.append(scale)
            grids.append(
                _Grid(
                    np.arange(rr.start, rr.stop, rr.step, dtype=np.intp),
                    np.arange(cc.start, cc.stop, cc.step, dtype=np.intp),
                )
            )
        if not scales:
            return np.empty(0, DETECTION_DTYPE)
        tables = self._tables(cols, tuple(scales))
        return _scan(self, gray, tables, grids, _threads(threads), cancel)

    # ------------------------------------------------------------------ clustering

    @staticmethod
    def cluster(raw: np.ndarray, iou_threshold: float) -> np.ndarray:
        """pigo's ``ClusterDetections``, in its output order (a ``DETECTION_DTYPE`` array).

        Detections are sorted by q ascending; each one not yet assigned starts a cluster of every
        detection (assigned or not) overlapping it by IoU > threshold; a cluster is the truncated
        integer mean of row, col and scale, and the float32 sum of q in sorted order.
        """
        if raw.size == 0:
            return np.empty(0, DETECTION_DTYPE)
        # Go sorts unstably; the two agree unless two raw windows have bit-identical q.
        dets = raw[np.argsort(raw["q"], kind="stable")]
        r = dets["row"].astype(np.float64)
        c = dets["col"].astype(np.float64)
        s = dets["scale"].astype(np.float64)
        q = dets["q"]
        assigned = np.zeros(dets.size, bool)
        clusters = []
        for i in range(dets.size):
            if assigned[i]:
                continue
            # pigo's calcIoU, same float64 operations in the same order.
            over_r = np.maximum(
                0.0, np.minimum(r[i] + s[i] / 2, r + s / 2) - np.maximum(r[i] - s[i] / 2, r - s / 2)
            )
            over_c = np.maximum(
                0.0, np.minimum(c[i] + s[i] / 2, c + s / 2) - np.maximum(c[i] - s[i] / 2, c - s / 2)
            )
            iou = over_r * over_c / (s[i] * s[i] + s * s - over_r * over_c)
            members = np.flatnonzero(iou > iou_threshold)
            if members.size == 0:
                continue
            assigned[members] = True
            n = members.size
            qsum = np.float32(0.0)
            for m in members:  # sequential float32 sum, as Go does; numpy's sum is pairwise
                qsum = np.float32(qsum + q[m])
            clusters.append(
                (
                    int(dets["row"][members].sum()) // n,
                    int(dets["col"][members].sum()) // n,
                    int(dets["scale"][members].sum()) // n,
                    qsum,
                )
            )
        return np.array(clusters, dtype=DETECTION_DTYPE)

    def detect(
        self,
        gray: np.ndarray,
        params: PicoParams = STORE_PARAMS,
        threads: int | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Detection]:
        """Faces as the store function draws them: clusters with q > q_threshold.

        The box is the square window, top-left at (col - scale/2, row - scale/2) with Go's
        integer division; ``score`` is the cluster's q.
        """
        raw = self.run_cascade(gray, params, threads, cancel)
        clusters = self.cluster(raw, params.iou_threshold)
        # Go compares the float32 q with the constant converted to float32.
        kept = clusters[clusters["q"] > np.float32(params.q_threshold)]
        return [
            Detection(
                x=int(d["col"] - d["scale"] // 2),
                y=int(d["row"] - d["scale"] // 2),
                w=int(d["scale"]),
                h=int(d["scale"]),
                score=float(d["q"]),
            )
            for d in kept
        ]


@dataclass(frozen=True)
class _Grid:
    """The windows of one size: centre rows x centre cols."""

    rows: np.ndarray
    cols: np.ndarray

    @property
    def size(self) -> int:
        return self.rows.size * self.cols.size


class _Tables:
    """Per window size, the flat pixel offsets of both test points of every node.

    pigo reads ((r*256 + code*s) >> 8)*dim + ((c*256 + code*s) >> 8); r*256 being a multiple of
    256 that is r*dim + c + ((code_r*s) >> 8)*dim + ((code_c*s) >> 8): the window's own flat
    index plus a constant per (tree, node, size). numpy's >> on signed ints is arithmetic like
    Go's, so negative codes round towards -inf as they must. pigo's scan keeps every tested pixel
    inside the image (offset = s/2 + 1 > the largest reach), so no bounds checks are needed.
    """

    def __init__(self, cascade: PicoCascade, cols: int, scales: np.ndarray) -> None:
        self.scales = scales
        # shift[k, v + 128] = (v * scales[k]) >> 8 for every int8 code v.
        shift = (np.arange(-128, 128, dtype=np.intp)[None, :] * scales[:, None]) >> 8
        ci = cascade._code_idx  # (4, trees, leaves)
        # (trees, sizes, leaves): one tree's table for all sizes is contiguous.
        self.off1 = np.empty((cascade.ntrees, scales.size, cascade._leaves), np.intp)
        self.off2 = np.empty_like(self.off1)
        for k in range(scales.size):
            col = shift[k]
            row = col * cols
            self.off1[:, k] = row[ci[0]] + col[ci[1]]
            self.off2[:, k] = row[ci[2]] + col[ci[3]]


def _scan(
    cascade: PicoCascade,
    gray: np.ndarray,
    tables: _Tables,
    grids: list[_Grid],
    workers: int,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """The whole scan with the compiled kernel: rows of windows, split across threads.

    Each task scores its own band and keeps only the windows that pass, so memory stays a
    band's worth however many windows the scan has (a score per window up front was 400 MiB
    at the store parameters on 50 MP); tasks come back in scan order. A set ``cancel`` stops
    the scan at the next task.
    """
    c = cascade
    flat = gray.reshape(-1)
    cols = gray.shape[1]
    # Tasks of about equal work: the windows of a size, cut into row bands.
    tasks = []
    for k, g in enumerate(grids):
        band = max(1, _TASK_WINDOWS // g.cols.size)
        tasks += [(k, r0, min(g.rows.size, r0 + band)) for r0 in range(0, g.rows.size, band)]

    def run(task: tuple[int, int, int]) -> np.ndarray:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the scan was cancelled")
        k, r0, r1 = task
        grid = grids[k]
        q = np.zeros((r1 - r0, grid.cols.size), np.float32)
        _scan_rows(
            flat,
            cols,
            grid.rows[r0:r1],
            grid.cols,
            tables.off1,
            tables.off2,
            k,
            c.preds,
            c.thresholds,
            c.depth,
            q,
        )
        r, col = np.nonzero(q > 0)  # row-major: pigo's scan order
        dets = np.empty(r.size, DETECTION_DTYPE)
        dets["row"], dets["col"] = grid.rows[r0:r1][r], grid.cols[col]
        dets["scale"] = tables.scales[k]
        dets["q"] = q[r, col]
        return dets

    if workers > 1 and len(tasks) > 1:
        with ThreadPoolExecutor(workers) as pool:
            found = list(pool.map(run, tasks))
    else:
        found = [run(task) for task in tasks]
    return np.concatenate(found) if found else np.empty(0, DETECTION_DTYPE)


# pigo's classifyRegion over rows of windows, compiled on first use.
#
# Tree by tree and level by level over a whole row of windows rather than window by window as
# pigo does: the windows of one level are independent, so the CPU overlaps their memory
# reads instead of waiting on one window's chain of dependent loads; the survivors of each
# tree are compacted without branches. Sums are float32 and tested after every tree, exactly
# as in pigo (no fastmath: the additions must happen in pigo's order).
@numba.njit(nogil=True, cache=True, boundscheck=False)
def _scan_rows(pix, cols, centre_rows, centre_cols, off1, off2, size, preds, thr, depth, q):
    leaves = 1 << depth
    ntrees = thr.shape[0]
    nc = centre_cols.shape[0]
    base = np.empty(nc, np.int64)
    pos = np.empty(nc, np.int64)
    node = np.empty(nc, np.int64)
    out = np.empty(nc, np.float32)
    for a in range(centre_rows.shape[0]):
        n = nc
        for b in range(nc):
            base[b] = centre_rows[a] * cols + centre_cols[b]
            pos[b] = b
            out[b] = np.float32(0.0)
        for t in range(ntrees):
            t1 = off1[t, size]
            t2 = off2[t, size]
            for k in range(n):
                bs = base[k]
                node[k] = 2 + (pix[bs + t1[1]] <= pix[bs + t2[1]])
            for _ in range(1, depth):
                for k in range(n):
                    bs = base[k]
                    i = node[k]
                    node[k] = 2 * i + (pix[bs + t1[i]] <= pix[bs + t2[i]])
            th = thr[t]
            pt = preds[t]
            m = 0
            for k in range(n):
                o = np.float32(out[k] + pt[node[k] - leaves])
                base[m] = base[k]
                pos[m] = pos[k]
                out[m] = o
                m += o > th
            n = m
            if n == 0:
                break
        for k in range(n):
            q[a, pos[k]] = np.float32(out[k] - thr[ntrees - 1])


def _threads(threads: int | None) -> int:
    if threads is None:
        return min(2, os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads


def _check_gray(gray: np.ndarray) -> np.ndarray:
    if not isinstance(gray, np.ndarray) or gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError("expected a 2-D uint8 grayscale image (see to_gray_pigo)")
    return np.ascontiguousarray(gray)
