"""Draw masks as translucent random colours, as the OpenFaaS function did.

Largest mask first, so smaller masks stay visible on top. Masks are decoded one at a
time from their RLE, so memory is the image plus one mask whatever their number.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np


class _HasMask(Protocol):
    area: int

    def mask(self) -> np.ndarray: ...


def overlay(
    image_bgr: np.ndarray,
    masks: Iterable[_HasMask],
    alpha: float = 0.35,
    seed: int | None = None,
) -> np.ndarray:
    """A copy of the image with each mask blended in a random colour at `alpha`."""
    out = image_bgr.copy()
    rng = np.random.default_rng(seed)
    for record in sorted(masks, key=lambda r: r.area, reverse=True):
        color = rng.integers(0, 256, size=3).astype(np.float32)
        m = record.mask()
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask {m.shape} does not match image {out.shape[:2]}")
        px = out[m].astype(np.float32)
        out[m] = np.rint(px * (1.0 - alpha) + color * alpha).astype(np.uint8)
    return out
