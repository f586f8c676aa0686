"""Per-request model parameters: typed, bounded, and refused with a 422 when out of range."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serve_app.errors import ServiceError


@dataclass(frozen=True)
class Param:
    type: type  # int, float, bool or str (str: one of `choices`)
    default: Any
    lo: float | None = None
    hi: float | None = None
    help: str = ""
    choices: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        out = {
            "type": self.type.__name__,
            "default": self.default,
            "min": self.lo,
            "max": self.hi,
            "help": self.help,
        }
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out


def _convert(name: str, spec: Param, raw: Any) -> Any:
    if spec.type is str:
        value = str(raw).strip().lower()
        if spec.choices is not None and value not in spec.choices:
            raise ServiceError(
                422, "bad_parameter", f"{name}: expected one of {list(spec.choices)}, got {raw!r}"
            )
        return value
    if spec.type is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ServiceError(422, "bad_parameter", f"{name}: expected true or false, got {raw!r}")
    if isinstance(raw, bool):
        raise ServiceError(422, "bad_parameter", f"{name}: expected a number, got {raw!r}")
    try:
        value = spec.type(raw) if spec.type is float else int(str(raw).strip())
    except (TypeError, ValueError):
        raise ServiceError(
            422, "bad_parameter", f"{name}: expected {spec.type.__name__}, got {raw!r}"
        ) from None
    if value != value:  # NaN
        raise ServiceError(422, "bad_parameter", f"{name}: NaN is not a value")
    if (spec.lo is not None and value < spec.lo) or (spec.hi is not None and value > spec.hi):
        raise ServiceError(
            422, "bad_parameter", f"{name}={value} is out of range [{spec.lo}, {spec.hi}]"
        )
    return value


def parse_params(specs: Mapping[str, Param], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validated values for every spec: the caller's where given, else the default."""
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise ServiceError(
            422,
            "unknown_parameter",
            f"unknown parameter(s) {unknown}; this model takes {sorted(specs)}",
        )
    return {
        name: (_convert(name, spec, raw[name]) if name in raw else spec.default)
        for name, spec in specs.items()
    }
