"""From the decoder's low-res logits to original-resolution masks, one mask at a time.

SAM's reference upsamples 256x256 logits to 1024x1024 (bilinear), crops the unpadded
part (the "input" size, long side 1024), then resizes that to the original image size.
Here:

* Only the top-left `low` crop of the 256 grid that the input region reads is kept
  (`Geometry.low_hw`); upsampling that crop 4x reproduces the reference 1024-scale values
  bit for bit, since the scale factor is still exactly 1/4 and the clamped border is never
  read.
* The full-resolution pass is split into a width pass over the whole (input-height)
  mask and a height pass over column strips. Each strip is a complete resize of those
  columns, so the result is bit-identical to the reference's single resize (checked in
  the tests), while only one strip of float logits exists at a time. The binary mask is
  written into a Fortran-ordered byte buffer, the layout COCO RLE encodes without a copy.
* `band_boxes` finds original-resolution boxes from the 1024-scale logits by evaluating
  only a few full-resolution rows/columns near each edge (for NMS before any full-res
  decoding happens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from serve_app.rendering import rle as rle_codec


@dataclass(frozen=True)
class Geometry:
    orig_hw: tuple[int, int]  # original image (H, W)
    input_hw: tuple[int, int]  # resized to long side img_size, before padding
    img_size: int  # model input side (1024)
    low_size: int  # decoder logit side (256)
    low_hw: tuple[int, int]  # crop of the low-res logits the input region depends on
    grid_hw: tuple[int, int]  # crop of the embedding grid that produces low_hw

    @property
    def factor(self) -> int:
        return self.img_size // self.low_size

    @property
    def upsamples(self) -> bool:
        """True when the original is larger than the model's input (long side > img_size)."""
        return self.orig_hw[0] * self.orig_hw[1] > self.input_hw[0] * self.input_hw[1]


def input_size(h: int, w: int, long_side: int) -> tuple[int, int]:
    """segment_anything's ResizeLongestSide.get_preprocess_shape."""
    scale = long_side * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _needed_low(n_input: int, factor: int, n_low: int) -> int:
    # Last input pixel samples low-res coordinate (i + 0.5) / factor - 0.5 and its next
    # neighbour; everything after that is never read.
    last = math.floor((n_input - 0.5) / factor - 0.5)
    return min(n_low, max(last, 0) + 2)


def geometry(orig_hw: tuple[int, int], img_size: int = 1024, low_size: int = 256) -> Geometry:
    h, w = orig_hw
    ih, iw = input_size(h, w, img_size)
    factor = img_size // low_size
    lh, lw = _needed_low(ih, factor, low_size), _needed_low(iw, factor, low_size)
    grid = low_size // 4  # the decoder's upscaler is two 2x transposed convolutions
    gh, gw = min(grid, math.ceil(lh / 4)), min(grid, math.ceil(lw / 4))
    return Geometry((h, w), (ih, iw), img_size, low_size, (lh, lw), (gh, gw))


def to_input_scale(low: Tensor, g: Geometry) -> Tensor:
    """(..., lh, lw) cropped low-res logits -> (..., ih, iw) logits at model input scale."""
    lead = low.shape[:-2]
    x = low.reshape(-1, 1, *low.shape[-2:])
    lh, lw = low.shape[-2:]
    up = F.interpolate(x, (lh * g.factor, lw * g.factor), mode="bilinear", align_corners=False)
    ih, iw = g.input_hw
    return up[..., :ih, :iw].reshape(*lead, ih, iw)


def to_orig(inter: Tensor, g: Geometry) -> Tensor:
    """(..., ih, iw) -> (..., H, W): the reference's final resize, for small originals."""
    lead = inter.shape[:-2]
    x = inter.reshape(-1, 1, *inter.shape[-2:])
    out = F.interpolate(x, g.orig_hw, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *g.orig_hw)


def stability_score(logits: Tensor, threshold: float, offset: float) -> Tensor:
    """segment_anything's calculate_stability_score (same integer counting)."""
    hi = (logits > (threshold + offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    lo = (logits > (threshold - offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return hi / lo


@dataclass(frozen=True)
class _Axis:
    """Bilinear (align_corners=False) source indices and weights along one axis."""

    i0: Tensor
    i1: Tensor
    w0: Tensor
    w1: Tensor

    @classmethod
    def make(cls, n_in: int, n_out: int) -> _Axis:
        scale = n_in / n_out
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
        i0 = src.floor().long().clamp_max(n_in - 1)
        lam = (src - i0).clamp(0, 1).float()
        i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
        return cls(i0, i1, 1 - lam, lam)


class BandBoxes:
    """Original-resolution boxes of thresholded logits given at model-input scale.

    A bilinear output is a convex combination of its source samples, so an output row
    (column) can only be positive if one of its source rows (columns) has a positive
    value: the first candidate row is an outer bound and the true edge lies a few rows
    in. Those rows are evaluated at full resolution, nothing else. Values come from the
    same bilinear formula as the reference, though not bit for bit (another summation
    order), so a pixel within ~1e-5 of the threshold can land on the other side.
    """

    def __init__(self, g: Geometry) -> None:
        self.g = g
        (ih, iw), (h, w) = g.input_hw, g.orig_hw
        self.rows = _Axis.make(ih, h)
        self.cols = _Axis.make(iw, w)
        # A source sample influences about (out/in) outputs; scan a little more per try.
        self.band_r = math.ceil(2 * h / ih) + 2
        self.band_c = math.ceil(2 * w / iw) + 2

    @staticmethod
    def _interp(x: Tensor, ax: _Axis, idx: Tensor, dim: int) -> Tensor:
        a = x.index_select(dim, ax.i0[idx])
        b = x.index_select(dim, ax.i1[idx])
        shape = [1] * x.ndim
        shape[dim] = -1
        return a * ax.w0[idx].view(shape) + b * ax.w1[idx].view(shape)

    def _full_rows(self, x: Tensor, idx: Tensor) -> Tensor:
        """Full-res rows `idx` of one (ih, iw) logit map -> (len(idx), W)."""
        r = self._interp(x, self.rows, idx, 0)
        return self._interp(r, self.cols, torch.arange(self.g.orig_hw[1]), 1)

    def _full_cols(self, x: Tensor, idx: Tensor) -> Tensor:
        c = self._interp(x, self.cols, idx, 1)
        return self._interp(c, self.rows, torch.arange(self.g.orig_hw[0]), 0)

    def _edge(self, x: Tensor, cand: Tensor, along_rows: bool, from_end: bool, thr: float) -> int:
        """First (or last) full-res row/column with a value above thr; -1 if none."""
        idx = torch.nonzero(cand).flatten()
        if from_end:
            idx = idx.flip(0)
        band = self.band_r if along_rows else self.band_c
        for start in range(0, len(idx), band):
            chunk = idx[start : start + band]
            if along_rows:
                hit = (self._full_rows(x, chunk) > thr).any(1)
            else:
                hit = (self._full_cols(x, chunk) > thr).any(0)
            if bool(hit.any()):
                return int(chunk[int(hit.int().argmax())])
        return -1

    def __call__(self, inter: Tensor, thr: float = 0.0) -> Tensor:
        """(N, ih, iw) logits -> (N, 4) XYXY boxes at original resolution (inclusive)."""
        pos = inter > thr
        src_rows = pos.any(-1)  # (N, ih)
        src_cols = pos.any(-2)  # (N, iw)
        r_cand = src_rows[:, self.rows.i0] | src_rows[:, self.rows.i1]  # (N, H)
        c_cand = src_cols[:, self.cols.i0] | src_cols[:, self.cols.i1]
        boxes = torch.zeros(inter.shape[0], 4, dtype=torch.long)
        for n in range(inter.shape[0]):
            if not bool(c_cand[n].any()):
                continue
            x = inter[n]
            x0 = self._edge(x, c_cand[n], False, False, thr)
            if x0 < 0:
                continue
            x1 = self._edge(x, c_cand[n], False, True, thr)
            y0 = self._edge(x, r_cand[n], True, False, thr)
            y1 = self._edge(x, r_cand[n], True, True, thr)
            boxes[n] = torch.tensor([x0, y0, x1, y1])
        return boxes


@dataclass
class Decoded:
    """One mask at original resolution plus what the reference reports about it."""

    mask: np.ndarray  # (H, W) bool, Fortran order; a view of the decoder's buffer
    stability: float

    def summary(self) -> tuple[rle_codec.Rle, int, tuple[int, int, int, int]]:
        """(COCO RLE, area, XYXY inclusive box), area and box read off the RLE."""
        return summarize(self.mask)


def summarize(mask: np.ndarray) -> tuple[rle_codec.Rle, int, tuple[int, int, int, int]]:
    code = rle_codec.encode(mask)
    area = rle_codec.area(code)
    if area == 0:
        return code, 0, (0, 0, 0, 0)
    x, y, w, h = (int(v) for v in rle_codec.bbox(code))
    return code, area, (x, y, x + w - 1, y + h - 1)  # COCO's w counts pixels: max - min + 1


class FullResDecoder:
    """Decodes one low-res logit crop at a time into a reused original-size buffer.

    Works on the transposed image so that each strip of image columns comes out of the
    resize contiguous, in the Fortran layout COCO RLE reads, and is thresholded straight
    into the buffer. Peak memory: the (H, W) bool buffer, the (W, ih) width-resized
    logits and one strip of floats, whatever the number of masks.
    """

    def __init__(self, g: Geometry, strip_floats: int = 1 << 22) -> None:
        self.g = g
        h, w = g.orig_hw
        self.buf = np.zeros((h, w), dtype=np.bool_, order="F")
        self._cols = torch.from_numpy(self.buf.T)  # (W, H) view: one row per image column
        self.strip = max(8, min(w, strip_floats // max(h, 1)))

    def decode(self, low: Tensor, threshold: float = 0.0, offset: float = 1.0) -> Decoded:
        g = self.g
        (h, w), (ih, iw) = g.orig_hw, g.input_hw
        inter_t = to_input_scale(low, g).T.contiguous().view(1, 1, iw, ih)
        wide_t = F.interpolate(inter_t, (w, ih), mode="bilinear", align_corners=False)[0, 0]
        hi = lo = 0
        for c0 in range(0, w, self.strip):
            part = wide_t[c0 : c0 + self.strip][None, None]
            out = F.interpolate(part, (part.shape[2], h), mode="bilinear", align_corners=False)
            out = out[0, 0]
            torch.gt(out, threshold, out=self._cols[c0 : c0 + out.shape[0]])
            # Same counts as calculate_stability_score on the full-size logits.
            hi += int(torch.count_nonzero(out > threshold + offset))
            lo += int(torch.count_nonzero(out > threshold - offset))
        stab = float(torch.tensor(hi, dtype=torch.int32) / torch.tensor(lo, dtype=torch.int32))
        return Decoded(self.buf, stab)
