"""How a model deployment is called: one policy for the router and the jobs deployment.

- Not done within the model's `timeout_s`: the call is cancelled and answered 504 `timeout`.
- The model's queue is full (Serve's BackPressureError): 503 `overloaded`, Retry-After.
- The replica died mid-call: one retry, which Serve routes to a live replica (or to the
  replacement) within the same deadline; a second death is 503 `replica_died`. Model calls
  have no side effects, so the retry is safe.

Ray's own error text (pids, actor ids, node addresses) goes to this replica's log only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from serve_app.errors import RETRY_SOON_S, ServiceError, Unavailable

log = logging.getLogger("ray.serve")
T = TypeVar("T")


async def _await(response: Any) -> Any:
    return await response


async def call_model(
    name: str,
    timeout_s: float,
    start: Callable[[], Any],
    consume: Callable[[Any], Awaitable[T]] = _await,
) -> T:
    """`consume(start())` under the policy above.

    `start` makes the call (a `DeploymentResponse`, or a response generator for a stream)
    and is called again for the retry; `consume` turns it into the result.
    """
    deadline = asyncio.get_running_loop().time() + timeout_s
    for attempt in (1, 2):
        response = start()
        try:
            async with asyncio.timeout_at(deadline):
                return await consume(response)
        except TimeoutError:
            response.cancel()
            raise ServiceError(
                504,
                "timeout",
                f"{name} did not answer within {timeout_s} s (args.models.{name}.timeout_s)",
            ) from None
        except BackPressureError:
            # Mapped here rather than left to api.py: Serve installs its own handler for this
            # exception on the ingress app, which answers plain text.
            raise Unavailable(
                "overloaded", f"{name}'s queue is full; retry shortly", RETRY_SOON_S
            ) from None
        except (ActorDiedError, ActorUnavailableError) as err:
            log.warning("%s: replica died during a call (attempt %d): %r", name, attempt, err)
            if attempt == 2:
                raise Unavailable(
                    "replica_died",
                    f"{name}'s replica stopped during the call; retry shortly",
                    RETRY_SOON_S,
                ) from None
    raise AssertionError("unreachable")
