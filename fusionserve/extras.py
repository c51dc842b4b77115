"""Which extra each part of fusionserve needs, and one clear error when it is not installed.

``pip install fusionserve`` is the light client (grpcio, protobuf, numpy). Serving needs the
``server`` extra, training and export the ``export`` extra, OpenTelemetry tracing the ``tracing``
extra; a command run without its extra ends with one line that says what to install.
"""

from __future__ import annotations

import importlib.util

from fusionserve.errors import FusionServeError

EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("onnxruntime", "cv2", "prometheus_client", "grpc_health", "grpc_reflection"),
    "export": ("tensorflow", "keras", "tf2onnx", "onnx"),
    "import": ("onnxruntime", "cv2", "onnx"),
    "tracing": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc"),
}


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (a dotted name whose parent cannot be is missing too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def require(extra: str, what: str) -> None:
    """Raise FusionServeError naming ``extra`` when any module it brings is missing.

    Args:
        extra: a key of ``EXTRAS``.
        what: what needs it, for the message (``'fusionserve serve'``, say).
    """
    missing = [m for m in EXTRAS[extra] if not _installed(m)]
    if missing:
        raise FusionServeError(
            f"{what} needs the {extra} extra: pip install 'fusionserve[{extra}]' (missing: {', '.join(missing)})"
        )
