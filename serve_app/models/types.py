"""Plain result types shared by the model code. No HTTP, no Ray."""

from __future__ import annotations

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
