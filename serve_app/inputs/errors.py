"""The one exception type the input layer raises for anything the caller got wrong.

It travels from replicas back to the HTTP ingress through Ray, so it must survive pickling
with its fields intact; the HTTP layer turns it into ``status`` + ``{"error", "detail"}``.
"""

from __future__ import annotations


class InputError(Exception):
    """A request input was refused.

    ``status`` is the HTTP status to answer with (400, 413, 415, 422, ...), ``error`` a short
    stable machine code (``"bad_url"``, ``"fetch_refused"``, ``"too_large"``, ...) and
    ``detail`` a message meant for the human who sent the request.
    """

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(status, error, detail)
        self.status = int(status)
        self.error = str(error)
        self.detail = str(detail)

    # Explicit so that subclasses or later attribute edits cannot desynchronise ``args`` from
    # the fields: unpickling rebuilds from the fields, not from whatever ``args`` holds.
    def __reduce__(self) -> tuple[type[InputError], tuple[int, str, str]]:
        return (type(self), (self.status, self.error, self.detail))

    def __str__(self) -> str:
        head = f"{self.status} {self.error}"
        return f"{head}: {self.detail}" if self.detail else head

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r}, {self.error!r}, {self.detail!r})"

    def to_dict(self) -> dict[str, str]:
        """The JSON body to answer with (the status goes on the response line)."""
        return {"error": self.error, "detail": self.detail}
