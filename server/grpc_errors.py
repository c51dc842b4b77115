"""Exceptions → gRPC status codes, in one table and one interceptor for every RPC kind.

Unknown exceptions are bugs: they are logged with their traceback and the caller sees
``INTERNAL "internal error"`` (never grpc's raw "Unexpected <class ...>", which leaks internals).
The same wrapper counts each call against the server's :class:`~fusionserve.server.call_limit.CallLimit`,
so a call refused there is answered like any other error.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from fusionserve.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    FusionServeError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    QueueFullError,
    RepositoryError,
    UnauthenticatedError,
    UnsupportedError,
)
from fusionserve.server.call_limit import CallLimit

logger = logging.getLogger(__name__)

STATUS_OF: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (RepositoryError, grpc.StatusCode.UNAVAILABLE),
)
INTERNAL_MESSAGE = "internal error"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a caller should see for ``error``."""
    for kind, code in STATUS_OF:
        if isinstance(error, kind):
            return code, str(error)
    if isinstance(error, FusionServeError):
        return grpc.StatusCode.INTERNAL, str(error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _log_unexpected(error: BaseException, method: str) -> None:
    if not isinstance(error, FusionServeError):
        logger.exception("bug in %s", method, exc_info=error)


# The four kinds of RPC handler and the grpc factory that builds each (request → response streaming).
HANDLER_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    """Which of the four kinds ``handler`` is (the attribute holding its behaviour)."""
    return next(kind for kind in HANDLER_FACTORIES if getattr(handler, kind))


class _Malformed:
    """Stands in for a request message that did not parse, so the handler can answer INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns _Malformed instead of raising (grpc would answer UNKNOWN)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError, or anything a broken payload provokes
            return _Malformed(e)

    return parse


def _malformed_error(method: str, malformed: _Malformed) -> InvalidInputError:
    return InvalidInputError(f"request to {method} is not a valid protobuf message: {malformed.error}")


def _checked(requests: Any, method: str) -> Any:
    """Request stream that raises InvalidInputError at the first message that did not parse."""

    async def iterate() -> Any:
        async for request in requests:
            if isinstance(request, _Malformed):
                raise _malformed_error(method, request)
            yield request

    return iterate()


def _prepared(request: Any, method: str) -> Any:
    """The request, or the error for a message that did not parse; a request stream gets checked as it is read."""
    if isinstance(request, _Malformed):
        raise _malformed_error(method, request)
    if not hasattr(request, "DESCRIPTOR"):  # a request stream
        return _checked(request, method)
    return request


PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""gRPC's retry pushback trailer: a client whose retry policy covers the status waits this long before
its retry (and does not retry at all when the value is negative)."""


def pushback(error: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata telling the caller when to retry, for errors that know (else none)."""
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is None:
        return ()
    return ((PUSHBACK_KEY, str(max(1, round(retry_after_s * 1000)))),)


async def _abort(e: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    _log_unexpected(e, method)
    code, message = status_of(e)
    if trailer := pushback(e):
        context.set_trailing_metadata(trailer)
    await context.abort(code, message)


def _wrap_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, calls: CallLimit
) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            calls.enter()
            try:
                return await behavior(_prepared(request, method), context)
            finally:
                calls.leave()
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(e, context, method)

    return wrapper


def _wrap_stream(behavior: Callable[..., Any], method: str, calls: CallLimit) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            calls.enter()
            try:
                async for response in behavior(_prepared(request, method), context):
                    yield response
            finally:
                calls.leave()
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(e, context, method)

    return wrapper


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by our handlers (unary or streaming) to status codes.

    It also holds each call's place in ``calls`` while the call runs (no bound when None). Only our own
    services are wrapped: health and reflection handle their own errors and are never refused for lack
    of room.
    """

    def __init__(
        self, prefixes: tuple[str, ...] = ("/fusionserve.", "/inference."), calls: CallLimit | None = None
    ) -> None:
        self._prefixes = prefixes
        self._calls = calls if calls is not None else CallLimit(2**62)
        # A method's handler is the same for every call of it: wrapped once, not once per call.
        self._wrapped: dict[tuple[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap our handlers' behaviour so exceptions become status codes."""
        self._calls.took()
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        wrapped = self._wrapped.get((method, handler))
        if wrapped is None:
            wrapped = self._wrapped[(method, handler)] = self._wrap(handler, method)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        kind = handler_kind(handler)
        wrap = _wrap_stream if kind.endswith("_stream") else _wrap_unary
        return HANDLER_FACTORIES[kind](
            wrap(getattr(handler, kind), method, self._calls),
            _tolerant(handler.request_deserializer),
            handler.response_serializer,
        )
