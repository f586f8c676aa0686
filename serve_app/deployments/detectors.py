"""The face-detection deployments: one Serve deployment class per detector.

Each replica decodes the image bytes it is sent (decoding is the heavy part of a request
and so scales with the model's replicas, not with the router), runs its model and renders
the answer the caller asked for: JSON data, an annotated JPEG/PNG, or base64 JPEG text.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Any, ClassVar

import numpy as np
from ray import serve

from serve_app import metrics
from serve_app.deployments.base import ModelDeployment
from serve_app.deployments.budget import check_work
from serve_app.deployments.params import Param, parse_params
from serve_app.errors import ServiceError
from serve_app.inputs.decode import decode_image
from serve_app.inputs.imageinfo import check_pixels, sniff
from serve_app.models import weights
from serve_app.models.types import Cancelled, Detection
from serve_app.rendering.encode import MEDIA_TYPES, encode_image
from serve_app.rendering.faces import DRAW_MODES, render_faces

OUTPUTS = ("json", "jpeg", "png", "base64")


class DetectorDeployment(ModelDeployment):
    PARAMS: ClassVar[dict[str, Param]]
    # How an image answer shows the faces; the model never sees these.
    RENDER_PARAMS: ClassVar[dict[str, Param]] = {
        "draw": Param(
            str, "box", help="image answers: box the faces, or hide them", choices=DRAW_MODES
        ),
    }

    def run(
        self, model: Any, image_bgr, params: dict[str, Any], cancel: threading.Event
    ) -> list[Detection]:
        raise NotImplementedError

    def check_work(self, model: Any, width: int, height: int, params: dict[str, Any]) -> None:
        """Refuse (422) parameters whose work on a width x height image is over budget."""

    @staticmethod
    def _model_params(p: dict[str, Any]) -> dict[str, Any]:
        """The parameters the model takes: the test-only delay is not one of them."""
        return {k: v for k, v in p.items() if k != "test_delay_s"}

    def describe(self) -> dict[str, Any]:
        specs = {**self.PARAMS, **self.RENDER_PARAMS}
        return {"parameters": {k: p.describe() for k, p in specs.items()}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # OpenCV's dnn.Net and CascadeClassifier keep per-call state, so one model instance
        # runs one image at a time; decoding and rendering still overlap across requests.
        self._model_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        # Instance-level, so that options (a configured default, the test delay) show in
        # /v1/models and in answers.
        self.PARAMS = self.request_params()
        if self.options.test_delay_param:
            self.PARAMS["test_delay_s"] = Param(
                float, 0.0, 0.0, 600.0, "TESTS ONLY: seconds to hold the model"
            )

    def request_params(self) -> dict[str, Param]:
        return dict(type(self).PARAMS)

    async def detect(
        self, data: bytes, params: dict[str, Any], output: str = "json", filename: str | None = None
    ) -> dict[str, Any]:
        if output not in OUTPUTS:
            raise ServiceError(422, "bad_parameter", f"format must be one of {list(OUTPUTS)}")
        p = parse_params({**self.PARAMS, **self.RENDER_PARAMS}, params)
        model = self.ready_model()
        # The model runs in a worker thread so the replica's event loop keeps answering
        # health checks and queueing the next request meanwhile. A thread cannot be killed:
        # when the caller gives up (the router's timeout cancels the call, which Serve turns
        # into CancelledError here) the event tells the model to stop at its next check.
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._detect, model, data, p, output, filename, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise

    async def detect_batch(
        self, images: list[tuple[bytes, str | None]], params: dict[str, Any], output: str = "json"
    ) -> list[dict[str, Any]]:
        """`detect` for each (bytes, filename) in one call; a bad image gets an error entry."""
        if output not in OUTPUTS:
            raise ServiceError(422, "bad_parameter", f"format must be one of {list(OUTPUTS)}")
        # Shared by every image: a bad one fails the whole batch.
        p = parse_params({**self.PARAMS, **self.RENDER_PARAMS}, params)
        model = self.ready_model()
        return await asyncio.to_thread(detect_each, self._detect, model, images, p, output)

    def _detect(
        self,
        model,
        data: bytes,
        p: dict[str, Any],
        output: str,
        filename: str | None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        # In-process callers (benchmarks) have nobody to cancel them.
        cancel = cancel or threading.Event()
        t0 = time.perf_counter()
        model_params = self._model_params({k: p[k] for k in self.PARAMS})
        info = sniff(data)  # the size from the header: the budget is checked before decoding
        if info is not None and info.width and info.height:
            check_pixels(info, self.max_pixels)  # too big at all (413) before too much work
            self.check_work(model, info.width, info.height, model_params)
        image = decode_image(data, max_pixels=self.max_pixels)
        t1 = time.perf_counter()
        with self._model_lock:
            try:
                if cancel.is_set():  # given up while waiting for the model
                    raise Cancelled("cancelled before it ran")
                if p.get("test_delay_s"):
                    cancel.wait(p["test_delay_s"])
                faces = self.run(model, image, model_params, cancel)
            except Cancelled:
                # Nobody waits for this answer any more; the router has already answered 504.
                raise ServiceError(504, "cancelled", "the request was cancelled") from None
        t2 = time.perf_counter()
        result: dict[str, Any] = {
            "model": self.name,
            "filename": filename,
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "count": len(faces),
            "faces": [f.as_dict() for f in faces],
            "parameters": model_params,  # what the model ran with (not how it was drawn)
        }
        if output != "json":
            fmt = "jpeg" if output == "base64" else output
            drawn = render_faces(
                image, faces, p["draw"], self.spec.box_bgr(), landmarks=p.get("landmarks", False)
            )
            encoded = encode_image(drawn, fmt)
            if output == "base64":
                result["image_base64"] = base64.b64encode(encoded).decode("ascii")
            else:
                result["image"] = encoded
                result["media_type"] = MEDIA_TYPES[fmt]
        t3 = time.perf_counter()
        result["timing_ms"] = {
            "decode": round((t1 - t0) * 1e3, 2),
            "inference": round((t2 - t1) * 1e3, 2),
            "render": round((t3 - t2) * 1e3, 2),
            "total": round((t3 - t0) * 1e3, 2),
        }
        metrics.record_answer(self.name, self.spec.kind, result)
        return result


def detect_each(
    detect: Any, model: Any, images: list[tuple[bytes, str | None]], p: dict[str, Any], output: str
) -> list[dict[str, Any]]:
    """`detect` on each image in turn; an image's 4xx `ServiceError` becomes its entry."""
    results: list[dict[str, Any]] = []
    for data, filename in images:
        try:
            results.append(detect(model, data, p, output, filename))
        except ServiceError as err:
            if err.status >= 500:  # the service's fault, not the image's: the call fails
                raise
            results.append({"error": err.code, "detail": err.message, "status": err.status})
    return results


@serve.deployment
class PigoDetector(DetectorDeployment):
    """Pico cascade (pigo's `facefinder`), with the OpenFaaS store function's parameters."""

    PARAMS = {
        "min_size": Param(int, 20, 4, 10000, "smallest face side in pixels"),
        "max_size": Param(int, 2000, 4, 20000, "largest face side in pixels"),
        "shift_factor": Param(float, 0.1, 0.01, 1.0, "window step as a fraction of its size"),
        "scale_factor": Param(float, 1.1, 1.01, 2.0, "window growth between scales"),
        "iou_threshold": Param(float, 0.18, 0.0, 1.0, "overlap that merges two detections"),
        "q_threshold": Param(float, 5.0, 0.0, 1000.0, "minimum cluster score to keep a face"),
    }

    def load(self):
        from serve_app.models.pico import PicoCascade

        cascade = PicoCascade.from_file(weights.find(self.options.weights, self.model_dir))
        # The first call compiles the numba kernel (seconds); do it before taking traffic.
        cascade.detect(np.zeros((64, 64), np.uint8), threads=self.threads)
        return cascade

    def check_work(self, model, width, height, params):
        from serve_app.models.pico import PicoParams

        if params["min_size"] > params["max_size"]:
            raise ServiceError(422, "bad_parameter", "min_size must not exceed max_size")
        defaults = {k: p.default for k, p in self.PARAMS.items()}
        tunable = ("min_size", "max_size", "shift_factor", "scale_factor")
        o = self.options
        check_work(
            lambda q: PicoParams(**q).windows(height, width),
            params,
            defaults,
            tunable,
            o.max_windows,
            width=width,
            height=height,
        )
        check_work(
            lambda q: len(PicoParams(**q).grid(height, width)),
            params,
            defaults,
            tunable,
            o.max_scales,
            width=width,
            height=height,
            unit="window sizes",
            option="max_scales",
        )

    def run(self, model, image_bgr, params, cancel):
        from serve_app.models.pico import PicoParams, to_gray_pigo

        gray = to_gray_pigo(image_bgr, channel_order="bgr", variant=self.options.gray)
        return model.detect(gray, PicoParams(**params), threads=self.threads, cancel=cancel)


def _haar_params(scale: float, neighbours: int) -> dict[str, Param]:
    return {
        "scale_factor": Param(float, scale, 1.01, 2.0, "image pyramid step"),
        "min_neighbors": Param(int, neighbours, 0, 50, "overlapping hits needed for a face"),
        "min_size": Param(int, 30, 1, 10000, "smallest face side in pixels"),
    }


class _HaarBase(DetectorDeployment):
    def load(self):
        from pathlib import Path

        import cv2

        from serve_app.models.haar import HaarDetector

        return HaarDetector(Path(cv2.data.haarcascades) / self.options.cascade)

    def check_work(self, model, width, height, params):
        defaults = {k: p.default for k, p in self.PARAMS.items()}
        check_work(
            lambda q: model.windows(width, height, q["scale_factor"], q["min_size"]),
            params,
            defaults,
            ("scale_factor", "min_size"),
            self.options.max_windows,
            width=width,
            height=height,
        )

    def run(self, model, image_bgr, params, cancel):
        return model.detect(image_bgr, **params, cancel=cancel)


@serve.deployment
class HaarDetector(_HaarBase):
    """OpenCV Haar cascade; answers the annotated image like the store's face-detect-opencv."""

    PARAMS = _haar_params(1.1, 5)


@serve.deployment
class BasicHaarDetector(_HaarBase):
    """The seed's Python Haar function: detectMultiScale(gray, 1.3, 5), blue boxes, base64."""

    PARAMS = _haar_params(1.3, 5)


@serve.deployment
class CnnDetector(DetectorDeployment):
    """OpenCV DNN res10 SSD on square blobs (600x600 as the seed, plus 300), confidence 0.85."""

    PARAMS: ClassVar[dict[str, Param]] = {}

    def request_params(self) -> dict[str, Param]:
        return {
            "confidence": Param(
                float, self.options.confidence, 0.05, 1.0, "minimum detection confidence"
            )
        }

    def load(self):
        from serve_app.models.res10 import Res10Detector

        return Res10Detector(
            weights.find(self.options.prototxt, self.model_dir),
            weights.find(self.options.weights, self.model_dir),
            blob_sizes=self.options.blob_sizes,
            min_inside=self.options.min_inside,
        )

    def run(self, model, image_bgr, params, cancel):
        return model.detect(image_bgr, confidence=params["confidence"], cancel=cancel)


@serve.deployment
class YuNetDetector(DetectorDeployment):
    """YuNet (libfacedetection) via cv2.FaceDetectorYN: multi-scale, five landmarks a face."""

    PARAMS: ClassVar[dict[str, Param]] = {}
    RENDER_PARAMS = {
        **DetectorDeployment.RENDER_PARAMS,
        "landmarks": Param(bool, True, help="draw=box: mark eyes, nose tip and mouth corners"),
    }

    def request_params(self) -> dict[str, Param]:
        o = self.options
        return {
            "score_threshold": Param(float, o.score_threshold, 0.05, 1.0, "minimum face score"),
            "nms_threshold": Param(
                float, o.nms_threshold, 0.05, 0.95, "overlap above which two boxes are one face"
            ),
            "small_faces": Param(
                bool, False, help="also look for faces under ~20 px (an upscaled pass, slower)"
            ),
            "max_side": Param(
                int, o.max_side, 64, 8192, "longer side the main pass scales large images to"
            ),
        }

    def load(self):
        from serve_app.models.yunet import YuNet

        return YuNet(weights.find(self.options.weights, self.model_dir))

    def run(self, model, image_bgr, params, cancel):
        from serve_app.models.yunet import PlanSettings, plan, work_pixels

        h, w = image_bgr.shape[:2]
        settings = PlanSettings(
            params["max_side"], self.options.large_side, self.options.small_scale
        )
        passes = plan(w, h, small_faces=params["small_faces"], settings=settings)
        work, budget = work_pixels(passes), self.options.max_work_pixels
        if work > budget:
            raise ServiceError(
                422,
                "over_work_budget",
                f"max_side={params['max_side']}, small_faces={params['small_faces']} on a "
                f"{w}x{h} image would make the model look at {work / 1e6:.1f} MP, over this "
                f"service's work budget of {budget / 1e6:.1f} MP "
                f"(args.models.{self.name}.options.max_work_pixels); lower max_side or turn "
                f"small_faces off",
            )
        return model.detect(
            image_bgr,
            passes,
            score_threshold=params["score_threshold"],
            nms_threshold=params["nms_threshold"],
            cancel=cancel,
        )
