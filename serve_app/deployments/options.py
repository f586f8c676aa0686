"""Each model's `args.models.<name>.options`: strict pydantic models, no Ray, no OpenCV.

Kept apart from the deployment classes so that config checks, the weights CLI and the
KubeRay generator can validate options (and learn the weights they name) without
importing Ray Serve, OpenCV or torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class BaseOptions(BaseModel):
    """`args.models.<name>.options` in config/serve.yaml; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")
    threads: int | None = None  # default: ceil(the replica's num_cpus)


class PigoOptions(BaseOptions):
    weights: str = "facefinder"
    # pigo's grayscale: "head" (the reference detections) or "v1_1_0" (what the OpenFaaS
    # store function was built with; differs by one level on some pixels).
    gray: Literal["head", "v1_1_0"] = "head"


class HaarOptions(BaseOptions):
    cascade: str = "haarcascade_frontalface_default.xml"  # a file in cv2.data.haarcascades


class CnnOptions(BaseOptions):
    weights: str = "res10_ssd"
    prototxt: str = "res10_prototxt"
    # 600 is the seed's blob; 300 is the net's native size, which finds large faces.
    blob_sizes: list[int] = [600, 300]
    min_inside: float = 0.8  # share of a box's area that must lie inside the image
    confidence: float = 0.85


class SamOptions(BaseOptions):
    variant: Literal["vit_b", "vit_l", "vit_h", "mobile", "tiny"]
    weights: str | None = None  # registry name in serve_app.models.weights
    # Runs the real code with untrained weights: for tests and benchmarks only, and
    # reported as such in /v1/models, since the masks mean nothing.
    random_weights: bool = False
    device: str = "auto"
    points_per_side: int = 32
    max_points_per_side: int = 64
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0
    embedding_cache_bytes: int = 256 * 2**20
    max_prompts: int = 64
