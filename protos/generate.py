"""Regenerate the Python stubs from the .proto files: ``python protos/generate.py``.

Run from anywhere; protoc runs with ``protos/`` as its root so import paths mirror the Python
package path (``fusionserve.v1``, ``fusionserve.v2``). The stubs are committed; a test regenerates
them into a temporary folder and fails on any difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PROTOS = ("fusionserve/v1/fusion.proto", "fusionserve/v2/model_config.proto", "fusionserve/v2/grpc_service.proto")


def generate(out: Path = ROOT) -> None:
    """Write ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` for every proto under ``out``."""
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
