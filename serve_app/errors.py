"""Errors a model deployment raises for conditions that are not the caller's fault."""

from __future__ import annotations


class ModelUnavailable(Exception):
    """The model cannot serve right now (weights missing, disabled); answered as 503.

    Same shape as `InputError` (status, error, detail) so the router answers both alike;
    it crosses Ray's process boundary, hence the explicit `__reduce__`.
    """

    def __init__(self, error: str, detail: str, status: int = 503) -> None:
        super().__init__(error, detail, status)
        self.status = int(status)
        self.error = str(error)
        self.detail = str(detail)

    def __reduce__(self) -> tuple[type[ModelUnavailable], tuple[str, str, int]]:
        return (type(self), (self.error, self.detail, self.status))

    def __str__(self) -> str:
        return f"{self.status} {self.error}: {self.detail}"
