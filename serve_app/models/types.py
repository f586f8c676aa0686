"""Plain result types shared by the model code. No HTTP, no Ray."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Detection:
    """An axis-aligned face box in image pixel coordinates (x, y = top-left corner)."""

    x: int
    y: int
    w: int
    h: int
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LandmarkDetection(Detection):
    """A face box plus five landmarks: right eye, left eye, nose tip, right and left mouth
    corner (the subject's right/left, as YuNet orders them), each [x, y] in image pixels."""

    landmarks: tuple[tuple[float, float], ...] = ()

    def as_dict(self) -> dict:
        out = asdict(self)
        out["landmarks"] = [[round(x, 1), round(y, 1)] for x, y in self.landmarks]
        return out


class Cancelled(Exception):
    """Model work stopped because its caller gave up (set by the caller's cancel event)."""


def stop_if_cancelled(cancel: threading.Event | None, where: str) -> None:
    """Raise `Cancelled` when the caller has set `cancel`: called by model code between
    steps it cannot interrupt (a forward, a block, a batch)."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"cancelled {where}")
