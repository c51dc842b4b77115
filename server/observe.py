"""Per-call observability at the gRPC edge: tracing and the access log, behind one interceptor.

:meth:`Observer.from_settings` returns None when tracing and the access log are both off (the
default): then no interceptor is installed and no :class:`~fusionserve.server.calls.Call` is ever
made. Otherwise the interceptor, outermost, opens a Call for every RPC of our services (calls
refused by authentication or overload included), makes it current while the handler runs, and closes
it with the status the caller got: the span ends (server/tracing.py) and the log line is queued
(server/access_log.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc

from fusionserve.server import tracing
from fusionserve.server.access_log import AccessLog, share_logged
from fusionserve.server.calls import Call, closed, opened
from fusionserve.server.grpc_errors import HANDLER_FACTORIES, handler_kind, status_of
from fusionserve.server.metrics import Metrics
from fusionserve.server.settings import ServerSettings

OUR_SERVICES = ("/fusionserve.", "/inference.")
SHUTDOWN_WAIT_S = 5.0
"""How long a stopping server waits for the last spans and log lines to be written."""


def caller_trace_id(metadata: Any) -> str | None:
    """The trace id of the caller's W3C ``traceparent`` (``00-<trace id>-<span id>-<flags>``), if valid."""
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            parts = value.strip().split("-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1].strip("0"):
                return parts[1].lower()
    return None


def _outcome(error: BaseException | None, context: grpc.aio.ServicerContext) -> tuple[str, str]:
    """The status code (by name) and message the caller got."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED", ""
    code = context.code()
    if code is not None:
        details = context.details()
        return code.name, details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        code, message = status_of(error)
        return code.name, message
    return "OK", ""


class Observer:
    """What a server observes of its calls: its tracer and its access log (either may be None)."""

    def __init__(self, trace: tracing.Tracing | None, access_log: AccessLog | None) -> None:
        self.tracing = trace
        self.access_log = access_log
        self._keep_inputs = access_log is not None and access_log.inputs

    @classmethod
    def from_settings(cls, settings: ServerSettings, metrics: Metrics, *, worker: int = 0) -> Observer | None:
        """The observer ``settings`` ask for, or None when they ask for neither tracing nor an access log.

        Raises:
            FusionServeError: tracing is asked for and the ``tracing`` extra is not installed.
        """
        why = tracing.check(settings.trace_endpoint)
        share = share_logged(settings.access_log)
        if why is None and share == 0:
            return None
        trace = tracing.Tracing(settings.trace_endpoint, worker=worker) if why is not None else None
        log = None
        if share > 0:
            log = AccessLog(share, settings.access_log_file, inputs=settings.access_log_inputs,
                            on_dropped=metrics.access_log_dropped.inc)  # fmt: skip
        return cls(trace, log)

    def open(self, method: str, context: grpc.aio.ServicerContext) -> Call:
        """A Call for an RPC to ``method`` now starting."""
        metadata = context.invocation_metadata()
        peer = context.peer()
        trace = self.tracing.start(method, metadata, peer, time.perf_counter()) if self.tracing is not None else None
        return Call(method, peer, trace=trace, trace_id=None if trace is not None else caller_trace_id(metadata),
                    close=self._closed, keep_inputs=self._keep_inputs)  # fmt: skip

    @contextlib.contextmanager
    def observed(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[Call]:
        """A Call, current while the RPC to ``method`` runs, closed with the status its caller got."""
        call = self.open(method, context)
        token = opened(call)
        error: BaseException | None = None
        try:
            yield call
        except BaseException as e:  # GeneratorExit too: a stream the caller left
            error = e
            raise
        finally:
            closed(token)
            call.close(*_outcome(error, context))

    def _closed(self, call: Call) -> None:
        if call.trace is not None:
            call.trace.end(call.ended, call.code, call.message)
        if self.access_log is not None:
            self.access_log.write(call)

    def interceptor(self) -> ObserveInterceptor:
        """The server interceptor that opens and closes a Call for each RPC."""
        return ObserveInterceptor(self)

    async def aclose(self) -> None:
        """Export the buffered spans and write the queued lines, waiting up to ``SHUTDOWN_WAIT_S``."""
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def close() -> None:
            try:
                if self.tracing is not None:
                    self.tracing.shutdown()
                if self.access_log is not None:
                    self.access_log.close(SHUTDOWN_WAIT_S)
            finally:
                loop.call_soon_threadsafe(done.set)

        # A daemon thread: an unreachable collector must not hold the process past its drain.
        threading.Thread(target=close, name="observer-close", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), SHUTDOWN_WAIT_S)
        except TimeoutError:
            pass


class ObserveInterceptor(grpc.aio.ServerInterceptor):
    """Opens a :class:`Call` for each RPC of our services and closes it with the caller's status."""

    def __init__(self, observer: Observer) -> None:
        self._observer = observer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wrap our handlers' behaviour in a Call."""
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(OUR_SERVICES):
            return handler
        kind = handler_kind(handler)
        wrap = self._stream if kind.endswith("_stream") else self._unary
        return HANDLER_FACTORIES[kind](
            wrap(getattr(handler, kind), method), handler.request_deserializer, handler.response_serializer
        )

    def _unary(self, behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
        observer = self._observer

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with observer.observed(method, context):
                return await behavior(request, context)

        return wrapper

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        observer = self._observer

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with observer.observed(method, context):
                async for response in behavior(request, context):
                    yield response

        return wrapper
