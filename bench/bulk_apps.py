"""The two baselines of the bulk bench, doing the same per-image work as visionserve's pigo.

- `build_thin`: the thinnest Ray Serve app: an ingress deployment that reads the body and
  calls a 2-replica model deployment through a handle (`/thin`), plus the same with
  `@serve.batch` on the model method (`/thin/batched`) to see whether Serve's own request
  batching gains anything for this model.
- `plain_app`: a plain Starlette app for `uvicorn --workers 2`, one model per worker process.

The work is the replica class's own `_detect` (decode, pigo, JSON), so only the serving path
differs between the sides.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

MODEL = "face-detect-pigo"
MODEL_DIR_ENV = "VS_BENCH_MODEL_DIR"


class Worker:
    """pigo as its deployment runs it: one instance, one image at a time."""

    def __init__(self, model_dir: str, threads: int = 1) -> None:
        from serve_app.deployments.params import parse_params
        from serve_app.registry import MODELS

        cls = MODELS[MODEL].deployment_class().func_or_class
        self.replica = cls(MODEL, {"threads": threads}, model_dir, 50_000_000)
        self.model = self.replica.ready_model()
        self.params = parse_params({**self.replica.PARAMS, **self.replica.RENDER_PARAMS}, {})

    def __call__(self, data: bytes) -> dict[str, Any]:
        return self.replica._detect(self.model, data, self.params, "json", None)


# -- the thinnest Serve app ----------------------------------------------------------------
def build_thin(args: dict[str, Any]) -> Any:
    from ray import serve

    @serve.deployment(
        name="thin-model",
        num_replicas=2,
        max_ongoing_requests=8,
        ray_actor_options={"num_cpus": 0.1},
    )
    class ThinModel:
        def __init__(self, model_dir: str) -> None:
            self.work = Worker(model_dir)

        async def detect(self, data: bytes) -> dict[str, Any]:
            return await asyncio.to_thread(self.work, data)

        @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
        async def detect_batched(self, items: list[bytes]) -> list[dict[str, Any]]:
            return await asyncio.to_thread(lambda: [self.work(d) for d in items])

    @serve.deployment(name="thin-ingress", num_replicas=1, ray_actor_options={"num_cpus": 0.1})
    class ThinIngress:
        def __init__(self, model: Any) -> None:
            self.model = model

        async def __call__(self, request: Request) -> JSONResponse:
            data = await request.body()
            if request.url.path.rstrip("/").endswith("/batched"):
                return JSONResponse(await self.model.detect_batched.remote(data))
            return JSONResponse(await self.model.detect.remote(data))

    return ThinIngress.bind(ThinModel.bind(args["model_dir"]))


# -- the plain ASGI app ----------------------------------------------------------------
_worker: Worker | None = None


async def _detect(request: Request) -> JSONResponse:
    global _worker
    if _worker is None:
        _worker = Worker(os.environ[MODEL_DIR_ENV])
    data = await request.body()
    result = await asyncio.to_thread(_worker, data)
    # Which worker process answered: the bench spreads its connections over both.
    return JSONResponse(result, headers={"X-Worker": str(os.getpid())})


async def _ready(request: Request) -> JSONResponse:
    global _worker
    if _worker is None:
        _worker = Worker(os.environ[MODEL_DIR_ENV])
    return JSONResponse({"pid": os.getpid()}, headers={"X-Worker": str(os.getpid())})


plain_app = Starlette(routes=[Route("/detect", _detect, methods=["POST"]), Route("/ready", _ready)])
