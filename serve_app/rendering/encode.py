"""Encode an image for the HTTP answer."""

from __future__ import annotations

import cv2
import numpy as np

MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def encode_image(image_bgr: np.ndarray, fmt: str, jpeg_quality: int = 90) -> bytes:
    if fmt == "jpeg":
        ok, buf = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    elif fmt == "png":
        ok, buf = cv2.imencode(".png", image_bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image_bgr.shape} image as {fmt}")
    return buf.tobytes()
