"""visionserve: face detection and Segment Anything served over HTTP with Ray Serve."""

import os

# OpenCV reads its decoder limits once, when cv2 is first imported, so they are set here,
# before any module of ours imports cv2. Only the OPENCV_-prefixed names are honoured.
# The service's own, stricter pixel limit (config: limits.max_pixels) is checked from the
# image header before decoding; these are the last line of defence inside the decoder.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(2**30))
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_WIDTH", str(2**17))
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_HEIGHT", str(2**17))
