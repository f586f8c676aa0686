"""Bytes -> decoded image, refusing what should not reach the decoder."""

from __future__ import annotations

import logging

import cv2
import numpy as np

from serve_app.errors import ServiceError
from serve_app.inputs.imageinfo import check_accepted, check_pixels, sniff

log = logging.getLogger("ray.serve")
OPENCV_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"


def opencv_pixel_limit() -> int:
    """The pixel limit OpenCV enforces in this process.

    OpenCV reads OPENCV_IO_MAX_IMAGE_PIXELS once, when cv2 is imported (measured with
    4.14: setting it later has no effect), so serve_app/__init__.py records the value the
    import saw. Replicas get it from the app's runtime_env in config/serve.yaml, which the
    config check keeps equal to limits.max_pixels.
    """
    from serve_app import OPENCV_LIMITS_AT_IMPORT

    return OPENCV_LIMITS_AT_IMPORT[OPENCV_PIXELS_ENV]


def check_opencv_limit(max_pixels: int) -> None:
    """Log loudly (once, at replica start) when OpenCV's own limit is laxer than ours."""
    limit = opencv_pixel_limit()
    if limit > max_pixels:
        log.warning(
            "OpenCV's pixel limit in this process is %d, above limits.max_pixels %d: set "
            "runtime_env.env_vars.%s in config/serve.yaml (the header check still applies)",
            limit,
            max_pixels,
            OPENCV_PIXELS_ENV,
        )


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray:
    """Decode to a 3-channel BGR uint8 array; the pixel limit is checked from the header first.

    Fails closed: bytes that are no accepted image are 415, an image whose header size cannot
    be read is 422, one over `max_pixels` is 413, and anything OpenCV itself refuses is 422.
    """
    if not data:
        raise ServiceError(400, "empty_body", "no image: the request body is empty")
    info = check_accepted(sniff(data))
    check_pixels(info, max_pixels)
    if info.format == "png":
        check_png_chunks(data)
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as err:
        # OpenCV's own size/format assertions: the caller's bytes, not our fault. Its text
        # names the build's source paths, so it goes to the log only.
        log.info("decode refused by OpenCV (%s, %d bytes): %s", info.format, len(data), err)
        raise ServiceError(
            422, "bad_image", f"the {info.format} data could not be decoded"
        ) from None
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
