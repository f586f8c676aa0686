"""COCO run-length encoding of binary masks (pycocotools), JSON-ready.

COCO RLE runs go down columns (Fortran order) and alternate background/foreground,
starting with background. `counts` is kept as the compressed ASCII string so a record
serialises to JSON as is; pycocotools itself wants bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict[str, Any]  # {"size": [h, w], "counts": str}


def encode(mask: np.ndarray) -> Rle:
    """RLE of a 2-D mask (bool or 0/1). Fortran-ordered uint8 input is encoded without a copy."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        mask = mask.view(np.uint8)
    elif mask.dtype != np.uint8:
        mask = (mask != 0).view(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode()}


def _coco(rle: Rle) -> dict[str, Any]:
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, e.g. from segment_anything
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return {
        "size": list(rle["size"]),
        "counts": counts.encode() if isinstance(counts, str) else counts,
    }


def decode(rle: Rle) -> np.ndarray:
    """The bool (h, w) mask of a compressed (str or bytes) or uncompressed (list) RLE."""
    return mask_utils.decode(_coco(rle)).view(np.bool_)


def area(rle: Rle) -> int:
    return int(mask_utils.area(_coco(rle)))


def bbox(rle: Rle) -> list[float]:
    """COCO [x, y, w, h] with w, h counted in pixels (max - min + 1); zeros if empty."""
    return [float(v) for v in mask_utils.toBbox(_coco(rle))]
