"""Kubernetes resource quantities ("500m", "3584Mi", "11Gi") as numbers.

Only the forms this project writes are accepted; anything else is an error rather than a
guess, because a misread memory size silently breaks every fit check downstream.
"""

from __future__ import annotations

import re

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_CPU = re.compile(r"^(\d+(?:\.\d+)?)(m)?$")


def memory_bytes(value: str | int) -> int:
    """Bytes in a memory quantity such as "3584Mi", "4G" or 1073741824."""
    text = str(value).strip()
    match = _MEMORY.match(text)
    if not match:
        raise ValueError(f"not a memory quantity: {value!r} (use e.g. 512Mi, 4Gi)")
    number, unit = match.groups()
    scale = _BINARY.get(unit) or _DECIMAL.get(unit) or 1
    return int(float(number) * scale)


def cpu_cores(value: str | int | float) -> float:
    """Cores in a CPU quantity such as "500m", "2" or 1.5."""
    text = str(value).strip()
    match = _CPU.match(text)
    if not match:
        raise ValueError(f"not a CPU quantity: {value!r} (use e.g. 500m, 2)")
    number, milli = match.groups()
    return float(number) / 1000 if milli else float(number)


def gib(n_bytes: float) -> str:
    """A byte count for people: "2.5 GiB"."""
    return f"{n_bytes / 2**30:.2f}".rstrip("0").rstrip(".") + " GiB"
