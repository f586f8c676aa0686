"""Work budgets: what a request's parameters imply, refused before any of it is done.

A detector's cost is set by its parameters and the image size, both known before decoding
(the size from the header): Pico classifies windows at every scale, Haar at every pyramid
level. Each detector says how to count its windows; this module compares the count with the
model's budget (`options.max_windows` in config/serve.yaml) and refuses with a 422 that
names the parameter most to blame: the one whose default alone would shrink the work most.
SAM's automatic masks count decoder prompts the same way (their number does not depend on
the image size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from serve_app.errors import ServiceError


def check_work(
    count: Callable[[Mapping[str, Any]], int],
    params: Mapping[str, Any],
    defaults: Mapping[str, Any],
    tunable: Sequence[str],
    budget: int,
    *,
    width: int | None = None,
    height: int | None = None,
    unit: str = "windows",
    option: str = "max_windows",
) -> int:
    """The work `params` imply (on a width x height image, when the size matters); ServiceError
    422 if over `budget`."""
    work = count(params)
    if work <= budget:
        return work
    blame, best = None, work
    for name in tunable:
        if params[name] == defaults[name]:
            continue
        alone = count({**params, name: defaults[name]})
        if alone < best:
            blame, best = name, alone
    sized = width is not None and height is not None
    size = f" on a {width}x{height} image" if sized else ""
    if blame is None:
        what = f"these parameters{size}"
        advice = "send a smaller image" if sized else "use parameters nearer their defaults"
    else:
        what = f"{blame}={params[blame]}{size}"
        advice = f"use a {blame} nearer its default {defaults[blame]}"
        advice += ", or a smaller image" if sized else ""
    raise ServiceError(
        422,
        "over_work_budget",
        f"{what} implies {_amount(work)} {unit}; this model's budget is {_amount(budget)} "
        f"(options.{option}): {advice}",
    )


def _amount(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 10**6 else f"{n:,}"
