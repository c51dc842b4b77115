"""What one call did, for its access log line and its trace: opened at the gRPC edge, filled in by the core.

With tracing and the access log both off (the default) no :class:`Call` ever exists: :func:`current`
returns None and each hook in the core costs one ``if``. Otherwise the edge (server/observe.py) opens
a Call for each RPC, and :func:`each_request` one for each request of a stream, and makes it current
(a context variable, which every task the call starts inherits). The core's hooks tell it the model
version and items it was admitted with, how long each step took (:meth:`Call.step`) and which batch
of which model it rode in (:meth:`Call.batched`); closing it writes the log line and ends the span.
Times are ``time.perf_counter()`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from fusionserve.server.batcher import DynamicBatcher

Request = TypeVar("Request")
Response = TypeVar("Response")


class CallTrace(Protocol):
    """The span of one call (server/tracing.py), as the core's hooks use it."""

    trace_id: str

    def span(self, name: str, started: float, ended: float, attributes: dict[str, Any], link: Any = None) -> Any:
        """Record a finished child span; returns its span context (for links)."""

    def item(self, started: float) -> CallTrace:
        """The span of one request of this stream, a child of the stream's."""

    def end(self, ended: float, code: str, message: str) -> None:
        """End the call's span with its status."""


_CURRENT: ContextVar[Call | None] = ContextVar("fusionserve_call", default=None)

current = _CURRENT.get
"""The Call being served in this task, or None (observability off, or outside an RPC)."""


class Call:
    """One RPC, or one request of a stream, as the access log and the trace see it."""

    __slots__ = ("method", "peer", "wall_time", "started", "ended", "trace", "trace_id", "model", "version",
                 "items", "code", "message", "queue_s", "stream_item", "texts", "images", "_close")  # fmt: skip

    def __init__(
        self, method: str, peer: str, *, trace: CallTrace | None, trace_id: str | None,
        close: Callable[[Call], None], keep_inputs: bool = False, stream_item: bool = False,
    ) -> None:  # fmt: skip
        self.method, self.peer = method, peer
        self.wall_time, self.started = time.time(), time.perf_counter()
        self.ended = self.started
        self.trace = trace
        """The call's span, when it is sampled."""
        self.trace_id = trace.trace_id if trace is not None else trace_id
        self.model: str | None = None
        self.version: int | None = None
        self.items = 0
        self.code, self.message = "OK", ""
        self.queue_s = 0.0
        """Time this call's work waited in batch queues, summed over them."""
        self.stream_item = stream_item
        self.texts: list[str] | None = [] if keep_inputs else None
        self.images: list[bytes] | None = [] if keep_inputs else None
        self._close = close

    # ---- hooks for the core ------------------------------------------------------------------
    def admitted(self, model: str, version: int, items: int) -> None:
        """Passed the door for ``items`` items of ``model`` v``version``: the admission span ends here."""
        self.model, self.version, self.items = model, version, items
        if self.trace is not None:
            self.trace.span("admission", self.started, time.perf_counter(),
                            {"fusionserve.model": model, "fusionserve.model.version": version,
                             "fusionserve.items": items})  # fmt: skip

    def step(self, name: str, started: float, ended: float | None = None, **attributes: Any) -> None:
        """A step of this call that began at ``started`` ended at ``ended``, or now (decode, tokenise, cache lookup)."""
        if self.trace is not None:
            self.trace.span(name, started, time.perf_counter() if ended is None else ended, attributes)

    def batched(self, batcher: DynamicBatcher, enqueued: float, started: float, run_s: float, rows: int,
                calls: int, leader: Any) -> Any:  # fmt: skip
        """The call's rows, queued at ``enqueued``, ran in a batch of ``rows`` rows from ``calls`` calls.

        ``leader`` is the batch span of the first traced call in the same batch (None for the first):
        every other one links to it, so one call's path through a shared batch can be followed.
        Returns the leader for the next call of the batch.
        """
        self.queue_s += started - enqueued
        if self.trace is None:
            return leader
        self.trace.span(f"queue {batcher.name}", enqueued, started,
                        {"fusionserve.model": batcher.name, "fusionserve.model.version": batcher.version})  # fmt: skip
        return self.ran(batcher, started, run_s, rows, calls, leader)

    def ran(self, batcher: DynamicBatcher, started: float, run_s: float, rows: int, calls: int, leader: Any) -> Any:
        """The call's rows ran in a batch of ``batcher``'s model (see :meth:`batched`, which queues too)."""
        if self.trace is None:
            return leader
        batch = self.trace.span(f"batch {batcher.name}", started, started + run_s, {
            "fusionserve.model": batcher.name, "fusionserve.model.version": batcher.version,
            "fusionserve.batch.size": rows, "fusionserve.batch.calls": calls, "fusionserve.provider": batcher.provider,
        }, link=leader)  # fmt: skip
        return batch if leader is None else leader

    def finished(self, model: str, code: str) -> None:
        """The front-end's bookkeeping (server/tracking.py) ended this call with ``code`` for ``model``."""
        if self.model is None:
            self.model = model
        self.code = code

    def saw(self, *, texts: Sequence[str] = (), images: Sequence[bytes] = ()) -> None:
        """The inputs of this call (kept only when the access log was asked to log them)."""
        if self.texts is not None and self.images is not None:
            self.texts.extend(texts)
            self.images.extend(images)

    # ---- the edge ----------------------------------------------------------------------------
    def item(self) -> Call:
        """A new Call for one request of this stream."""
        self.items += 1
        trace = self.trace.item(time.perf_counter()) if self.trace is not None else None
        return Call(self.method, self.peer, trace=trace, trace_id=self.trace_id, close=self._close,
                    keep_inputs=self.texts is not None, stream_item=True)  # fmt: skip

    def close(self, code: str | None = None, message: str = "") -> None:
        """The call is over (with ``code``, if the edge knows better): end its span, write its log line."""
        self.ended = time.perf_counter()
        if code is not None:
            self.code, self.message = code, message
        self._close(self)


def each_request(
    handle: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """``handle``, giving each request of the current stream its own Call (its own log line and span).

    Outside an observed call, ``handle`` itself: nothing per request.
    """
    stream = current()
    if stream is None:
        return handle

    async def observed(request: Request) -> Response:
        call = stream.item()
        token = _CURRENT.set(call)
        try:
            return await handle(request)
        finally:
            _CURRENT.reset(token)
            call.close()

    return observed


def opened(call: Call) -> Any:
    """Make ``call`` current in this task; returns the token :func:`closed` takes."""
    return _CURRENT.set(call)


def closed(token: Any) -> None:
    """Undo :func:`opened` (a stream's handler finalised elsewhere has nothing to undo)."""
    try:
        _CURRENT.reset(token)
    except ValueError:  # "created in a different Context": an async generator closed by another task
        pass
