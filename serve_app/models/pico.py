"""Pico face-detection cascades (nenadmarkus/pico), bit-exact with esimov/pigo.

Scope: pigo's face finder (``classifyRegion``, angle 0), its scan over window sizes, its
``ClusterDetections`` and the store function's ``q > threshold`` filter. Results equal pigo's to
the last float32 bit; the reference data in ``shared/data/pico`` is the contract.

pigo classifies one window at a time and leaves the cascade at the first threshold it fails.
Here every window of a batch takes the same tree at the same time, as numpy gathers, and the
survivors are compacted after the trees that reject. Most windows die in the first few trees, so
the first trees run on large batches (one window size each) and the long tail of the cascade on
one merged batch of the few windows left from all sizes, several trees per numpy call.

The scan is inherently large (store parameters on 1800x1200: 4.3 M windows, 11.8 M tree
evaluations), and numpy pays ~10 array passes per tree level; where numba is installed a
compiled kernel doing the same tree-by-tree scan runs instead (``backend``), ~2.5x faster.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

try:  # optional: a compiled kernel, same results, several times faster than the numpy one
    import numba
except ImportError:  # pragma: no cover - depends on the environment
    numba = None

import numpy as np

from serve_app.models.types import Detection

# pigo's Detection struct: window centre, window side, score.
DETECTION_DTYPE = np.dtype(
    [("row", np.int64), ("col", np.int64), ("scale", np.int64), ("q", np.float32)]
)

_HEADER = 16  # 8 bytes pigo skips, then uint32 tree depth and uint32 tree count
_MAX_DEPTH = 7  # node numbers (< 2**(depth+1)) are kept in uint8; the facefinder has 6

# Elements (windows x trees) per numpy call: large enough that Python's per-call overhead is
# noise, small enough that the working arrays stay in cache.
_WORK = 1 << 16
# Window sizes with fewer windows than this share batches instead of paying the per-batch
# overhead of the first trees each; batches stay small enough for the cache.
_BIG_SCALE = 1 << 14
_BATCH = 1 << 16
_TABLE_CACHE = 2
_TABLE_TREES = 32
# Merged batches smaller than this are not worth a second thread.
_MIN_SPLIT = 1 << 12


Backend = Literal["auto", "numpy", "numba"]
NUMBA_AVAILABLE = numba is not None


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
    """
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if channel_order not in ("bgr", "rgb"):
        raise ValueError(f"channel_order must be 'bgr' or 'rgb', got {channel_order!r}")
    if image.ndim == 2:
        r = g = b = image
    elif image.ndim == 3 and image.shape[2] == 3:
        first, g, last = image[..., 0], image[..., 1], image[..., 2]
        r, b = (last, first) if channel_order == "bgr" else (first, last)
    else:
        raise ValueError(f"expected an HxW or HxWx3 image, got shape {image.shape}")
    r, g, b = (np.asarray(c, dtype=np.float64) for c in (r, g, b))
    if variant == "head":
        y = (0.299 * (r * 257.0) + 0.587 * (g * 257.0) + 0.114 * (b * 257.0)) / 256.0
    elif variant == "v1_1_0":
        y = 0.299 * r + 0.587 * g + 0.114 * b
    else:
        raise ValueError(f"variant must be 'head' or 'v1_1_0', got {variant!r}")
    return y.astype(np.uint8)


class PicoCascade:
    """A parsed pigo cascade: binary trees of pixel-comparison tests with early exits."""

    def __init__(self, depth: int, codes: np.ndarray, preds: np.ndarray,
                 thresholds: np.ndarray) -> None:
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
        self._preds_flat = preds.reshape(-1)
        # Codes as 0..255 indices into a per-scale table of (code * scale) >> 8.
        self._code_idx = (codes.astype(np.intp) + 128).transpose(2, 0, 1).copy()
        # Lowest running sum reachable after each tree, rounded like the real sums (float32
        # rounding is monotonic): a threshold below it can never reject, so it is not checked.
        low = np.float32(0.0)
        checks = np.empty(self.ntrees, bool)
        for t in range(self.ntrees):
            low = np.float32(low + preds[t].min())
            checks[t] = low <= thresholds[t]
        self._checks = checks
        # Trees that reject for real (not the -15 "never" fillers) end a group of trees run
        # together, so that windows they kill stop costing work straight away.
        stage = thresholds > thresholds.min()
        stage[-1] = True
        nxt = np.empty(self.ntrees, np.intp)
        end = self.ntrees
        for t in range(self.ntrees - 1, -1, -1):
            if stage[t]:
                end = t + 1
            nxt[t] = end
        self._group_end = nxt
        # The first trees run on each window size's own batch; windows still alive after them
        # are few enough to merge.
        stages = np.flatnonzero(stage)
        self._split = int(stages[min(7, stages.size - 1)]) + 1
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
        floats = body[:, 4 * (leaves - 1):].copy().view("<f4").astype(np.float32)
        preds = np.ascontiguousarray(floats[:, :leaves])
        thresholds = np.ascontiguousarray(floats[:, leaves])
        if not (np.isfinite(preds).all() and np.isfinite(thresholds).all()):
            raise ValueError("not a pico cascade: non-finite leaf or threshold values")
        return cls(depth, codes, preds, thresholds)

    # ------------------------------------------------------------------ scanning

    def run_cascade(self, gray: np.ndarray, params: PicoParams = STORE_PARAMS,
                    threads: int | None = None, backend: Backend = "auto") -> np.ndarray:
        """pigo's ``RunCascade``: every window with q > 0, scale ascending, then row, then col.

        Returns a ``DETECTION_DTYPE`` array. ``threads`` (default: the CPU count, at most 2)
        splits independent windows across threads (numpy and the numba kernel release the
        GIL). ``backend``: "numba" (compiled, ~3x faster; needs numba), "numpy", or "auto" =
        numba when it is installed. Neither choice changes the result.
        """
        gray = _check_gray(gray)
        rows, cols = gray.shape
        scales, grids = [], []
        for scale in params.scales():
            step = int(max(params.shift_factor * scale, 1.0))
            offset = scale // 2 + 1
            rr = np.arange(offset, rows - offset + 1, step, dtype=np.intp)
            cc = np.arange(offset, cols - offset + 1, step, dtype=np.intp)
            if rr.size and cc.size:
                scales.append(scale)
                grids.append(_Grid(rr, cc))
        if not scales:
            return np.empty(0, DETECTION_DTYPE)
        scan = _Scan(self, gray, self._tables(cols, tuple(scales)))
        workers = _threads(threads)
        if _use_numba(backend):
            return scan.run_numba(grids, workers)
        split = self._split
        # Large window sizes alone (one size: cheaper level 0), the many small ones together.
        firsts = []
        small = []
        for k, grid in enumerate(grids):
            if grid.size >= _BIG_SCALE:
                firsts += _Batch.of_grid(k, grid, cols).split_max(_BATCH)
            else:
                small.append(_Batch.of_grid(k, grid, cols))
        if small:
            firsts += _concat(small).split_max(_BATCH)
        merged = _concat(_map(lambda b: scan.advance(b, 0, split), firsts, workers))
        parts = merged.split(workers if merged.base.size >= 2 * _MIN_SPLIT else 1)
        batches = _map(lambda b: scan.advance(b, split, self.ntrees), parts, workers)
        done = _concat(batches)
        q = done.out - self.thresholds[-1]
        keep = q > 0
        base, slot, q = done.base[keep], done.slot[keep], q[keep]
        order = np.lexsort((base, slot))
        dets = np.empty(order.size, DETECTION_DTYPE)
        dets["row"], dets["col"] = np.divmod(base[order], cols)
        dets["scale"] = scan.scales[slot[order]]
        dets["q"] = q[order]
        return dets

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
            over_r = np.maximum(0.0, np.minimum(r[i] + s[i] / 2, r + s / 2)
                                - np.maximum(r[i] - s[i] / 2, r - s / 2))
            over_c = np.maximum(0.0, np.minimum(c[i] + s[i] / 2, c + s / 2)
                                - np.maximum(c[i] - s[i] / 2, c - s / 2))
            iou = over_r * over_c / (s[i] * s[i] + s * s - over_r * over_c)
            members = np.flatnonzero(iou > iou_threshold)
            if members.size == 0:
                continue
            assigned[members] = True
            n = members.size
            qsum = np.float32(0.0)
            for m in members:  # sequential float32 sum, as Go does; numpy's sum is pairwise
                qsum = np.float32(qsum + q[m])
            clusters.append((int(dets["row"][members].sum()) // n,
                             int(dets["col"][members].sum()) // n,
                             int(dets["scale"][members].sum()) // n, qsum))
        return np.array(clusters, dtype=DETECTION_DTYPE)

    def detect(self, gray: np.ndarray, params: PicoParams = STORE_PARAMS,
               threads: int | None = None, backend: Backend = "auto") -> list[Detection]:
        """Faces as the store function draws them: clusters with q > q_threshold.

        The box is the square window, top-left at (col - scale/2, row - scale/2) with Go's
        integer division; ``score`` is the cluster's q.
        """
        raw = self.run_cascade(gray, params, threads, backend)
        clusters = self.cluster(raw, params.iou_threshold)
        # Go compares the float32 q with the constant converted to float32.
        kept = clusters[clusters["q"] > np.float32(params.q_threshold)]
        return [
            Detection(x=int(d["col"] - d["scale"] // 2), y=int(d["row"] - d["scale"] // 2),
                      w=int(d["scale"]), h=int(d["scale"]), score=float(d["q"]))
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


@dataclass
class _Batch:
    """Windows at the same point of the cascade: flat index of the centre pixel, window-size
    slot, running float32 sum. Kept in scan order (slot, then flat index)."""

    base: np.ndarray
    slot: np.ndarray
    out: np.ndarray

    @classmethod
    def of_grid(cls, slot: int, grid: _Grid, cols: int) -> _Batch:
        base = (grid.rows[:, None] * cols + grid.cols[None, :]).reshape(-1)
        return cls(base, np.full(base.size, slot, np.intp), np.zeros(base.size, np.float32))

    def split(self, n: int) -> list[_Batch]:
        cuts = np.linspace(0, self.base.size, n + 1).astype(np.intp)
        return [_Batch(self.base[a:b], self.slot[a:b], self.out[a:b])
                for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def split_max(self, size: int) -> list[_Batch]:
        return self.split(max(1, -(-self.base.size // size)))


def _concat(batches: list[_Batch]) -> _Batch:
    return _Batch(*(np.concatenate([getattr(b, f) for b in batches])
                    for f in ("base", "slot", "out")))


def _map(fn, batches: list[_Batch], workers: int) -> list[_Batch]:
    if workers > 1 and len(batches) > 1:
        with ThreadPoolExecutor(min(workers, len(batches))) as pool:
            return list(pool.map(fn, batches))
    return [fn(b) for b in batches]


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
        self._cols = cols
        self._code_idx = cascade._code_idx  # (4, trees, leaves)
        # shift[k, v + 128] = (v * scales[k]) >> 8 for every int8 code v.
        self._shift = (np.arange(-128, 128, dtype=np.intp)[None, :] * scales[:, None]) >> 8
        # (trees, sizes, leaves): one tree's table for all sizes is contiguous. Filled on
        # demand, front to back: most windows die early and the back is rarely all needed.
        self.off1 = np.empty((cascade.ntrees, scales.size, cascade._leaves), np.intp)
        self.off2 = np.empty_like(self.off1)
        self._ready = 0
        self._lock = threading.Lock()

    def ensure(self, upto: int) -> None:
        """Make the tables of trees < upto valid."""
        if upto <= self._ready:
            return
        with self._lock:
            start = self._ready
            if upto <= start:
                return
            stop = min(self.off1.shape[0], max(upto, start + _TABLE_TREES))
            ci = self._code_idx[:, start:stop]
            for k in range(self.scales.size):
                col = self._shift[k]
                row = col * self._cols
                self.off1[start:stop, k] = row[ci[0]] + col[ci[1]]
                self.off2[start:stop, k] = row[ci[2]] + col[ci[3]]
            self._ready = stop


class _Scan:
    """One image at several window sizes: the tree loops."""

    def __init__(self, cascade: PicoCascade, gray: np.ndarray, tables: _Tables) -> None:
        self.cascade = cascade
        self.gray = gray
        self.flat = gray.reshape(-1)
        self.tables = tables
        self.scales = tables.scales
        self.off1, self.off2 = tables.off1, tables.off2

    def run_numba(self, grids: list[_Grid], workers: int) -> np.ndarray:
        """The whole scan with the compiled kernel: rows of windows, split across threads."""
        c = self.cascade
        self.tables.ensure(c.ntrees)
        scores = [np.zeros((g.rows.size, g.cols.size), np.float32) for g in grids]
        cols = self.gray.shape[1]
        # Tasks of about equal work: the windows of a size, cut into row bands.
        band = max(1, _BATCH // 4)
        tasks = [(k, r0, min(g.rows.size, r0 + max(1, band // g.cols.size)))
                 for k, g in enumerate(grids)
                 for r0 in range(0, g.rows.size, max(1, band // g.cols.size))]

        def run(task: tuple[int, int, int]) -> None:
            k, r0, r1 = task
            _numba_scan_rows(self.flat, cols, grids[k].rows[r0:r1], grids[k].cols, self.off1,
                             self.off2, k, c.preds, c.thresholds, c.depth, scores[k][r0:r1])

        if workers > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, tasks))
        else:
            for task in tasks:
                run(task)
        found = []
        for k, (grid, q) in enumerate(zip(grids, scores, strict=True)):
            r, col = np.nonzero(q > 0)  # row-major: pigo's scan order
            dets = np.empty(r.size, DETECTION_DTYPE)
            dets["row"], dets["col"] = grid.rows[r], grid.cols[col]
            dets["scale"] = self.scales[k]
            dets["q"] = q[r, col]
            found.append(dets)
        return np.concatenate(found)

    def advance(self, batch: _Batch, t0: int, t1: int) -> _Batch:
        """Run trees t0..t1-1 on the batch; return the windows still alive, in order."""
        c = self.cascade
        depth, leaves = c.depth, c._leaves
        flat, off1, off2 = self.flat, self.off1, self.off2
        base, slot, out = batch.base, batch.slot, batch.out.copy()
        # Work arrays are (trees, windows): windows innermost so that every numpy loop is long.
        size = max(base.size, _WORK)
        buf_node, buf_key, buf_addr = (np.empty(size, np.intp) for _ in range(3))
        buf_p1, buf_p2, buf_le = (np.empty(size, np.uint8) for _ in range(3))
        buf_n8 = np.empty(size, np.uint8)
        buf_pred = np.empty(size, np.float32)
        t = t0
        while t < t1 and base.size:
            n = base.size
            g = int(max(1, min(min(c._group_end[t], t1) - t, _WORK // n)))
            self.tables.ensure(t + g)
            shape = (g, n)
            node, key, addr = (x[:g * n].reshape(shape) for x in (buf_node, buf_key, buf_addr))
            p1, p2, le, n8 = (x[:g * n].reshape(shape) for x in (buf_p1, buf_p2, buf_le, buf_n8))
            pred = buf_pred[:g * n].reshape(shape)
            if slot[0] == slot[-1]:
                # One window size: a (tree, node) table row serves every window.
                tab1 = off1[t:t + g, slot[0]].reshape(-1)
                tab2 = off2[t:t + g, slot[0]].reshape(-1)
                key0 = (np.arange(g, dtype=np.intp) * leaves)[:, None]
            else:
                tab1 = off1[t:t + g].reshape(-1)
                tab2 = off2[t:t + g].reshape(-1)
                key0 = (np.arange(g, dtype=np.intp) * (self.scales.size * leaves))[:, None] \
                    + slot[None, :] * leaves
            plain = key0.shape == (1, 1) and key0[0, 0] == 0  # the node number is the key
            # Level 0: every window is at node 1.
            np.add(np.take(tab1, key0 + 1), base, out=addr)
            np.take(flat, addr, out=p1, mode="clip")
            np.add(np.take(tab2, key0 + 1), base, out=addr)
            np.take(flat, addr, out=p2, mode="clip")
            np.less_equal(p1, p2, out=le.view(bool))
            np.add(le, 2, out=n8)
            for _ in range(1, depth):
                # Node numbers stay uint8 (cheap arithmetic); take() wants intp indices.
                np.copyto(node, n8)
                if plain:
                    key = node
                else:
                    np.add(node, key0, out=key)
                np.take(tab1, key, out=addr, mode="clip")
                addr += base
                np.take(flat, addr, out=p1, mode="clip")
                np.take(tab2, key, out=addr, mode="clip")
                addr += base
                np.take(flat, addr, out=p2, mode="clip")
                np.less_equal(p1, p2, out=le.view(bool))
                n8 += n8
                n8 += le
            np.copyto(node, n8)
            node += (np.arange(t, t + g, dtype=np.intp) * leaves - leaves)[:, None]
            np.take(c._preds_flat, node, out=pred, mode="clip")
            alive = None
            for j in range(g):
                out += pred[j]  # float32, tree by tree, as pigo accumulates
                if c._checks[t + j]:
                    ok = out > c.thresholds[t + j]
                    alive = ok if alive is None else alive & ok
            if alive is not None and not alive.all():
                base, slot, out = base[alive], slot[alive], out[alive]
            t += g
        return _Batch(base, slot, out)


def _use_numba(backend: Backend) -> bool:
    if backend == "numba" and numba is None:
        raise RuntimeError("backend='numba' needs the numba package")
    if backend not in ("auto", "numpy", "numba"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'numba', got {backend!r}")
    return numba is not None and backend != "numpy"


# pigo's classifyRegion over rows of windows, compiled on first use (numba is optional).
#
# Tree by tree and level by level over a whole row of windows rather than window by window as
# pigo does: the windows of one level are independent, so the CPU overlaps their memory
# reads instead of waiting on one window's chain of dependent loads; the survivors of each
# tree are compacted without branches. Sums are float32 and tested after every tree, exactly
# as in pigo (no fastmath: the additions must happen in pigo's order).
if numba is not None:
    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _numba_scan_rows(pix, cols, centre_rows, centre_cols, off1, off2, size, preds, thr,
                         depth, q):
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
