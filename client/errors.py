"""The one exception the fusionserve client raises: a gRPC status code and the server's message."""

from __future__ import annotations

import grpc

from fusionserve.errors import FusionServeError


class FusionClientError(FusionServeError):
    """A call failed; ``code`` is the gRPC status code, ``details`` the server's message.

    Raised ``from`` the ``grpc.RpcError`` when there was one. In-band errors of a stream item are
    instances too (carried in :attr:`StreamResult.error`, not raised).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FusionClientError:
        """The client error for a failed RPC (raise it ``from error``)."""
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        return cls(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN, details or str(error))

    @classmethod
    def from_code_name(cls, code_name: str, details: str) -> FusionClientError:
        """The client error for an in-band ``fusionserve.v1.Error`` (code given by name)."""
        code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
        return cls(code, details)
