"""Python client library, CLI commands and load generator for fusionserve servers.

``FusionClient`` (blocking) and ``AsyncFusionClient`` (asyncio) share one implementation; every
failure is a ``FusionClientError`` carrying the gRPC status code and the server's message.
Names are imported on first use, so ``fusionserve --help`` does not load gRPC.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusionserve.client.aio import AsyncFusionClient
    from fusionserve.client.channel import TLSConfig
    from fusionserve.client.errors import FusionClientError
    from fusionserve.client.results import (
        Classification,
        Embeddings,
        ModelInfo,
        RankedCandidate,
        StreamResult,
        TensorInfo,
    )
    from fusionserve.client.sync import FusionClient

_EXPORTS = {
    "AsyncFusionClient": "fusionserve.client.aio",
    "FusionClient": "fusionserve.client.sync",
    "FusionClientError": "fusionserve.client.errors",
    "TLSConfig": "fusionserve.client.channel",
    "Classification": "fusionserve.client.results",
    "Embeddings": "fusionserve.client.results",
    "ModelInfo": "fusionserve.client.results",
    "RankedCandidate": "fusionserve.client.results",
    "StreamResult": "fusionserve.client.results",
    "TensorInfo": "fusionserve.client.results",
}
__all__ = [
    "AsyncFusionClient",
    "Classification",
    "Embeddings",
    "FusionClient",
    "FusionClientError",
    "ModelInfo",
    "RankedCandidate",
    "StreamResult",
    "TLSConfig",
    "TensorInfo",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
