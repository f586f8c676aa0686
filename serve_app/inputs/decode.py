"""Bytes -> decoded image, refusing what should not reach the decoder."""

from __future__ import annotations

import cv2
import numpy as np

from serve_app.errors import ServiceError
from serve_app.inputs.imageinfo import check_pixels, sniff

DECODABLE = {"jpeg", "png", "webp", "bmp", "tiff"}


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode to a 3-channel BGR uint8 array; the pixel limit is checked from the header first."""
    if not data:
        raise ServiceError(400, "empty_body", "no image: the request body is empty")
    info = sniff(data)
    if info is None or info.format not in DECODABLE:
        kind = "an unsupported image type" if info else "not an image"
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"{kind}; send JPEG, PNG, WebP, BMP or TIFF bytes, or an image URL",
        )
    check_pixels(info, max_pixels)
    if info.format == "png":
        check_png_chunks(data)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ServiceError(422, "bad_image", f"the {info.format} data could not be decoded")
    if image.shape[0] * image.shape[1] > max_pixels:  # header lied about its size
        raise ServiceError(413, "too_many_pixels", f"image has more than {max_pixels} pixels")
    return image


PNG_SIGNATURE_LEN = 8
MAX_PNG_CHUNKS = 1_000_000


def check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunk lengths run past the data, before OpenCV sees it.

    OpenCV's PNG reader allocates a chunk's declared length (up to 2 GiB) before it finds
    the bytes missing, so a 200-byte upload could cost gigabytes per request.
    """
    view = memoryview(data)
    offset, end = PNG_SIGNATURE_LEN, len(data)
    for _ in range(MAX_PNG_CHUNKS):
        if offset + 8 > end:
            raise ServiceError(422, "bad_image", "truncated PNG: missing IEND chunk")
        length = int.from_bytes(view[offset : offset + 4], "big")
        kind = bytes(view[offset + 4 : offset + 8])
        if length > 2**31 - 1 or offset + 12 + length > end:
            raise ServiceError(
                422, "bad_image", f"truncated PNG: chunk {kind!r} declares {length} bytes"
            )
        if kind == b"IEND":
            return
        offset += 12 + length
    raise ServiceError(422, "bad_image", "PNG with too many chunks")
