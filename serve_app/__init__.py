"""visionserve: face detection and Segment Anything served over HTTP with Ray Serve."""

import os
import sys

# The service's pixel limit unless config/serve.yaml says otherwise (limits.max_pixels).
DEFAULT_MAX_PIXELS = 50_000_000
# OpenCV's own defaults, what it enforces when it was imported before these were set.
_OPENCV_DEFAULTS = {
    "OPENCV_IO_MAX_IMAGE_PIXELS": 2**30,
    "OPENCV_IO_MAX_IMAGE_WIDTH": 2**20,
    "OPENCV_IO_MAX_IMAGE_HEIGHT": 2**20,
}

# OpenCV reads its decoder limits once, when cv2 is first imported, so they are set here,
# before any module of ours imports cv2. Only the OPENCV_-prefixed names are honoured.
# Replicas get OPENCV_IO_MAX_IMAGE_PIXELS = limits.max_pixels from the app's runtime_env
# (config/serve.yaml; the config check keeps the two equal). The header check in
# inputs/imageinfo.py refuses first; these are the last line of defence inside the decoder.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_WIDTH", str(2**17))
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_HEIGHT", str(2**17))


def _effective(name: str) -> int:
    if "cv2" in sys.modules:  # imported before us: it read whatever was there, or its default
        return _OPENCV_DEFAULTS[name]
    try:
        return int(os.environ[name])
    except ValueError:
        return _OPENCV_DEFAULTS[name]


# What this process's OpenCV enforces (serve_app.inputs.decode reports it).
OPENCV_LIMITS_AT_IMPORT = {name: _effective(name) for name in _OPENCV_DEFAULTS}
