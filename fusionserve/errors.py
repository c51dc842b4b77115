"""One exception hierarchy for the whole project, free of any transport.

Front-ends map these to their own status codes in one place (the gRPC error interceptor);
nothing here knows about gRPC or HTTP.
"""

from __future__ import annotations


class FusionServeError(Exception):
    """Base of every error fusionserve raises on purpose."""


class InvalidInputError(FusionServeError):
    """The caller sent something the model cannot take; the message says what to fix."""


class ModelNotFoundError(FusionServeError):
    """No model (or no such version of it) is in the repository."""


class ModelNotReadyError(FusionServeError):
    """The model exists but cannot serve now (loading, failed, or the server is draining)."""


class QueueFullError(FusionServeError):
    """Refused for lack of room (a full batch queue, pipeline or stream table); back off and retry.

    ``reason`` names the bound that refused (the shed metric's label); ``retry_after_s``, when known,
    is how long the caller should wait before trying again.
    """

    def __init__(self, message: str, *, reason: str = "capacity", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class DeadlineExceededError(FusionServeError):
    """The caller's deadline passed before the work was done."""


class UnauthenticatedError(FusionServeError):
    """The call carries no valid credentials."""


class FailedPreconditionError(FusionServeError):
    """A valid call that the server's settings or state refuse (model control in the wrong mode, say)."""


class UnsupportedError(FusionServeError):
    """A valid request for something this server does not implement."""


class RepositoryError(FusionServeError):
    """The model repository on disk is missing, malformed, or does not match its config."""


class DeviceUnavailableError(FusionServeError):
    """``--device cuda`` was asked for and the CUDA execution provider cannot run here."""


class ExportError(FusionServeError):
    """An export step failed (conversion, graph gate, parity, or bad input files)."""
