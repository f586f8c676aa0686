"""Every model the service knows, in one table: what it is and what it needs.

Config validation, the app graph, `/v1/models`, the OpenFaaS listing, the weights CLI and
the KubeRay generator all read this table; none of them names a model. Adding a model is one
entry here (with its options class if it needs its own), one entry under `args.models`
(and `deployments`) in config/serve.yaml, its deployment class and its model code.

Light on purpose (pydantic only): the deployment class is named by import path and loaded
on demand, so that config checks, the weights CLI and the KubeRay generator can validate
options and learn the weights they name without importing Ray Serve, OpenCV or torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelKind = Literal["detector", "segmenter"]


# -- each model's `args.models.<name>.options` (strict: unknown keys are refused) ------------
class BaseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    threads: int | None = None  # default: ceil(the replica's num_cpus)


class DetectorOptions(BaseOptions):
    # Tests only: each request may ask for `test_delay_s` of service time, spent holding the
    # model (and cancellable), so that load tests do not depend on the machine's speed.
    test_delay_param: bool = False


class PigoOptions(DetectorOptions):
    weights: str = "facefinder"
    # pigo's grayscale: "head" (the reference detections) or "v1_1_0" (what the OpenFaaS
    # store function was built with; differs by one level on some pixels).
    gray: Literal["head", "v1_1_0"] = "head"
    # Windows one request may scan (serve_app/deployments/budget.py): the store parameters on
    # a 50 MP image are 103 M (4.1 s on one 2-core laptop); min_size=4, shift_factor=0.01 are
    # 5.7 G. Window sides scanned: each costs the scan a 0.5 MiB offset table.
    max_windows: int = Field(200_000_000, gt=0)
    max_scales: int = Field(128, gt=0)


class HaarOptions(DetectorOptions):
    cascade: str = "haarcascade_frontalface_default.xml"  # a file in cv2.data.haarcascades
    # Windows one request may scan: the defaults (1.1, 30) on a 50 MP image are 86 M (~30 s
    # on one 2-core laptop); scale_factor=1.01, min_size=1 is 1.1 G.
    max_windows: int = Field(100_000_000, gt=0)


class CnnOptions(DetectorOptions):
    weights: str = "res10_ssd"
    prototxt: str = "res10_prototxt"
    # 600 is the seed's blob; 300 is the net's native size, which finds large faces.
    blob_sizes: list[int] = [600, 300]
    min_inside: float = 0.8  # share of a box's area that must lie inside the image
    confidence: float = 0.85
    # The net's work is its blobs' pixels, fixed by blob_sizes (no request parameter changes
    # it), so the budget is checked once, here, when the config is loaded.
    max_blob_pixels: int = Field(2 * 1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _blobs_within_budget(self) -> CnnOptions:
        work = sum(s * s for s in self.blob_sizes)
        if not self.blob_sizes or min(self.blob_sizes) < 32:
            raise ValueError("blob_sizes must be sides of at least 32 pixels")
        if work > self.max_blob_pixels:
            raise ValueError(
                f"blob_sizes {self.blob_sizes} are {work} pixels a request, over "
                f"max_blob_pixels {self.max_blob_pixels}"
            )
        return self


class YuNetOptions(DetectorOptions):
    weights: Literal["yunet_n", "yunet_s"] = "yunet_n"
    score_threshold: float = Field(0.7, gt=0, le=1)
    nms_threshold: float = Field(0.3, gt=0, lt=1)
    max_side: int = Field(1280, ge=64)  # the main pass's longer side (models/yunet.py)
    large_side: int = Field(320, ge=64)
    small_scale: float = Field(2.0, gt=1, le=4)
    # Pixels one request may make the model look at, all passes together (its CPU time).
    max_work_pixels: int = Field(24_000_000, gt=0)


class SamOptions(BaseOptions):
    variant: Literal["vit_b", "vit_l", "vit_h", "mobile", "tiny"]
    weights: str | None = None  # registry name in serve_app.models.weights
    # Runs the real code with untrained weights: for tests and benchmarks only, and
    # reported as such in /v1/models, since the masks mean nothing.
    random_weights: bool = False
    device: str = "auto"
    # Image encoder precision (serve_app/models/sam/precision.py): auto = bfloat16 where the
    # CPU/GPU has native bf16 (AVX512-BF16, AMX, Arm BF16, CUDA), else float32.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    dtype_probe: bool = False  # auto: also time a bf16 vs float32 product at start
    points_per_side: int = 32
    max_points_per_side: int = 64
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    # Crop layers (segment_anything's): each layer n adds 4**n crops, each a full encoder run.
    crop_n_layers: int = Field(0, ge=0)
    max_crop_n_layers: int = Field(1, ge=0, le=3)
    crop_nms_thresh: float = Field(0.7, ge=0.0, le=1.0)
    crop_overlap_ratio: float = Field(512 / 1500, ge=0.0, lt=1.0)
    crop_n_points_downscale_factor: int = Field(1, ge=1)
    embedding_cache_bytes: int = 256 * 2**20
    max_prompts: int = 64
    # Decoder prompts one automatic request may run, all crops together
    # (serve_app/models/sam/work.py): 32x32 points are 1,024, with one crop layer 5,120
    # (~500 s of vit_b on a 2-core laptop); 64x64 with one crop layer would be 20,480.
    max_decoder_prompts: int = Field(8192, gt=0)

    @model_validator(mode="after")
    def _crop_default_within_max(self) -> SamOptions:
        if self.crop_n_layers > self.max_crop_n_layers:
            raise ValueError("crop_n_layers must not exceed max_crop_n_layers")
        return self


# -- the table -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One model. `name` is its Serve deployment name, URL path segment and function name."""

    name: str
    kind: ModelKind
    deployment: str  # "module:Class", imported only when the app graph is built
    options: type[BaseOptions]
    # The weight files (serve_app.models.weights names) these validated options need.
    weights: Callable[[Any], list[str]]
    # What `/function/NAME` answers without `?format=`: the OpenFaaS function it replaces.
    default_output: str = "jpeg"
    # Box colour of annotated images, and of the web page's own drawing (#rrggbb).
    box_color: str = "#00ff00"

    def deployment_class(self) -> Any:
        module, _, attr = self.deployment.partition(":")
        return getattr(importlib.import_module(module), attr)

    def box_bgr(self) -> tuple[int, int, int]:
        """`box_color` in OpenCV's channel order."""
        r, g, b = (int(self.box_color[i : i + 2], 16) for i in (1, 3, 5))
        return (b, g, r)


def _no_weights(_: Any) -> list[str]:
    return []


def _sam_weights(o: SamOptions) -> list[str]:
    return [] if o.random_weights or not o.weights else [o.weights]


_DETECTORS = "serve_app.deployments.detectors"
_SAM = "serve_app.deployments.segmenters:SamDeployment"

# The function names of the OpenFaaS setup this replaces, plus YuNet and two new SAM variants.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "face-detect-pigo",
            "detector",
            f"{_DETECTORS}:PigoDetector",
            PigoOptions,
            lambda o: [o.weights],
        ),
        ModelSpec(
            "face-detect-opencv", "detector", f"{_DETECTORS}:HaarDetector", HaarOptions, _no_weights
        ),
        # The seed's Python Haar function: blue boxes, answered as base64 text.
        ModelSpec(
            "basic-face-detection",
            "detector",
            f"{_DETECTORS}:BasicHaarDetector",
            HaarOptions,
            _no_weights,
            default_output="base64",
            box_color="#0000ff",
        ),
        ModelSpec(
            "cnn-face-detection",
            "detector",
            f"{_DETECTORS}:CnnDetector",
            CnnOptions,
            lambda o: [o.weights, o.prototxt],
        ),
        ModelSpec(
            "yunet-face-detection",
            "detector",
            f"{_DETECTORS}:YuNetDetector",
            YuNetOptions,
            lambda o: [o.weights],
        ),
        ModelSpec("sam-segmentation-light", "segmenter", _SAM, SamOptions, _sam_weights),
        ModelSpec("sam-segmentation", "segmenter", _SAM, SamOptions, _sam_weights),
        ModelSpec("sam-vit-h", "segmenter", _SAM, SamOptions, _sam_weights),
        ModelSpec("sam-mobile", "segmenter", _SAM, SamOptions, _sam_weights),
    )
}


def names_of(kind: ModelKind) -> list[str]:
    return [name for name, spec in MODELS.items() if spec.kind == kind]
