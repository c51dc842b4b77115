"""What the tests expect of the device the servers run on (``pytest --device``, default cpu).

Reference answers come from onnxruntime sessions on the CPU. A server on the CPU gives the same
floats up to summation order; on CUDA, other kernels (and cuDNN algorithms chosen per batch size)
round differently, so answers are compared to ``ATOL`` there (the export parity tolerance).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

DEVICE = os.environ.get("FUSIONSERVE_DEVICE", "cpu")
PROVIDER = "CUDAExecutionProvider" if DEVICE == "cuda" else "CPUExecutionProvider"
ATOL = 1e-4 if DEVICE == "cuda" else 1e-6


def reference_session(path: Path | str) -> ort.InferenceSession:
    """An onnxruntime session on the CPU: the reference the server's answers are compared with."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
