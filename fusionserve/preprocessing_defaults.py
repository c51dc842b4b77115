"""The preprocessing settings a user can declare, and their defaults, in one place (no OpenCV, no NumPy).

Read by :mod:`fusionserve.preprocess` (which applies them) and by the command line (which lists them
in its help without importing OpenCV).
"""

from __future__ import annotations

from typing import Any

SIDES = ("pre", "post")  # where pad_sequences pads and truncates
# Keras' pad_sequences defaults; maxlen=None (the longest text of each call) is the text model's input length.
PAD_SEQUENCES_DEFAULTS: dict[str, Any] = {"maxlen": None, "padding": "pre", "truncating": "pre", "value": 0}
# keras.applications' preprocess_input modes (and the seed's), as ImagePreprocessing settings. Images
# arrive decoded as BGR; Keras' modes take RGB, so "caffe" (which flips RGB to BGR) stays in BGR here.
IMAGE_MODES: dict[str, dict[str, Any]] = {
    "seed": {"color_order": "BGR", "scale": "1/255"},
    "caffe": {"color_order": "BGR", "scale": 1.0, "mean": (103.939, 116.779, 123.68)},
    "tf": {"color_order": "RGB", "scale": "1/127.5", "offset": -1.0},
    "torch": {"color_order": "RGB", "scale": "1/255", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
}
