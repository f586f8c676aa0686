"""The one exception type for anything a caller may be told: status, stable code, safe text.

Raised by the input layer, the router, the jobs deployment and the model deployments
(which map their models' plain Python errors onto it); `serve_app.api` turns it into
`{"error": code, "detail": message, "request_id": ...}`. It crosses Ray's process boundary
from replicas back to the router, so it pickles by its fields. `message` is for the person
who sent the request: never an exception's text, a path, a pid or an address; internal
detail goes to the replica log under the request id instead.
"""

from __future__ import annotations

import uuid
from typing import Any


def request_id(given: str | None = None) -> str:
    """Serve's id for the current request (its `X-Request-Id`, on every replica log line of
    the call); outside a Serve request the caller's `given` X-Request-Id, else a new one."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # Ray absent or not in a replica: no Serve request here
        rid = ""
    return rid or given or uuid.uuid4().hex


def _rebuild(cls: type[ServiceError], fields: tuple[Any, ...]) -> ServiceError:
    err = cls.__new__(cls)
    ServiceError.__init__(err, *fields)
    return err


class ServiceError(Exception):
    """A refusal or failure answered with `status` (4xx/5xx) and a stable `code`.

    `retry_after_s`, when set, becomes the answer's Retry-After header.
    """

    def __init__(
        self, status: int, code: str, message: str = "", retry_after_s: int | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = int(status)
        self.code = str(code)
        self.message = str(message)
        self.retry_after_s = retry_after_s

    # By the fields, whatever a subclass's __init__ takes: unpickling must not depend on
    # `args` or on a subclass's signature.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), (self.status, self.code, self.message, self.retry_after_s)))

    def __str__(self) -> str:
        head = f"{self.status} {self.code}"
        return f"{head}: {self.message}" if self.message else head

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r}, {self.code!r}, {self.message!r})"

    def body(self, request_id: str | None = None) -> dict[str, Any]:
        """The JSON body to answer with (the status goes on the response line)."""
        body: dict[str, Any] = {"error": self.code, "detail": self.message}
        if request_id is not None:
            body["request_id"] = request_id
        return body


# Overload and a replaced replica clear in seconds; missing weights or a disabled model
# take an operator.
RETRY_SOON_S = 2
RETRY_LATER_S = 30


class Unavailable(ServiceError):
    """The service cannot do this right now (overloaded, weights missing, disabled): 503."""

    def __init__(self, code: str, message: str, retry_after_s: int = RETRY_LATER_S) -> None:
        super().__init__(503, code, message, retry_after_s)
