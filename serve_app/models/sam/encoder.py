"""Image -> SAM image embedding, exactly as segment_anything's SamPredictor.set_image."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor, nn

from serve_app.models.sam import vit


@dataclass(frozen=True)
class Embedding:
    features: Tensor  # (1, 256, 64, 64)
    orig_hw: tuple[int, int]
    input_hw: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


def model_device(sam: nn.Module) -> torch.device:
    return sam.pixel_mean.device


def check_image(image_rgb: np.ndarray) -> None:
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(
            f"expected an HxWx3 uint8 RGB image, got {image_rgb.shape} {image_rgb.dtype}"
        )


@torch.inference_mode()
def embed(
    sam: nn.Module,
    image_rgb: np.ndarray,
    fused: bool = True,
    dtype: torch.dtype = torch.float32,
    cancel: threading.Event | None = None,
) -> Embedding:
    """Resize (long side img_size, PIL bilinear as upstream), normalise, pad, encode.

    `fused`: run SAM's ViT with fused attention (vit.py); False runs the stock module.
    `dtype`: bfloat16 runs the encoder (any variant) under autocast (see precision.py);
    the embedding is float32 either way, so the decoder is unaffected.
    `cancel`: checked between the fused encoder's blocks (vit.forward); the stock module
    and MobileSAM's TinyViT (~0.1-0.5 s) run whole.
    """
    check_image(image_rgb)
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    resized = transform.apply_image(image_rgb)
    x = torch.as_tensor(resized, device=model_device(sam)).permute(2, 0, 1).contiguous()[None]
    x = sam.preprocess(x)
    low = dtype != torch.float32
    with torch.autocast(x.device.type, dtype=dtype if low else None, enabled=low):
        if fused and vit.supports(sam.image_encoder):
            features = vit.forward(sam.image_encoder, x, cancel)
        else:
            features = sam.image_encoder(x)
    features = features.float()
    return Embedding(features, tuple(image_rgb.shape[:2]), tuple(resized.shape[:2]))
