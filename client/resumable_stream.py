"""The machinery behind ``classify_stream``: items over one bidirectional stream, resumed on a new one.

A window of items is in flight at a time. When the server drains or the connection breaks, the
unanswered items are sent again on a new stream (after a short backoff), in their order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any, TypeVar, Union

import grpc

from fusionserve.client.channel import RESUMABLE_CODES
from fusionserve.client.errors import FusionClientError
from fusionserve.client.results import StreamResult, stream_result
from fusionserve.v1 import fusion_pb2 as pb

logger = logging.getLogger(__name__)

T = TypeVar("T")
Items = Union[Iterable[Any], AsyncIterable[Any]]
"""(image, text) pairs, from a plain or an async iterable."""

_RESUMABLE = frozenset(getattr(grpc.StatusCode, name) for name in RESUMABLE_CODES)


class _Feed:
    """Items pulled one at a time; a pull interrupted by a stream restart is kept, not lost."""

    def __init__(self, items: Items) -> None:
        if isinstance(items, AsyncIterable):
            self._iterator: AsyncIterator[Any] = aiter(items)
        else:
            self._iterator = _async_iter(items)
        self._pull: asyncio.Future[tuple[bool, Any]] | None = None
        self.exhausted = False

    async def _next(self) -> tuple[bool, Any]:
        try:
            return True, await anext(self._iterator)
        except StopAsyncIteration:
            return False, None

    async def next(self) -> tuple[bool, Any]:
        """(True, item), or (False, None) once the items are exhausted."""
        if self.exhausted:
            return False, None
        if self._pull is None:
            self._pull = asyncio.ensure_future(self._next())
        # shield: cancelling the writer (a broken stream) must not cancel the caller's iterator.
        got, item = await asyncio.shield(self._pull)
        self._pull = None
        self.exhausted = not got
        return got, item

    def close(self) -> None:
        """Abandon a pull in progress (the caller stopped iterating)."""
        if self._pull is not None and not self._pull.done():
            self._pull.cancel()


async def _async_iter(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


class ResumableStream:
    """One classify_stream call: a window of items over a stream, resumed when it breaks."""

    def __init__(
        self,
        *,
        open_call: Any,
        items: Items,
        make_request: Any,
        window: int,
        timeout_s: float,
        max_resumes: int,
    ) -> None:
        self._open_call = open_call
        self._feed = _Feed(items)
        self._make_request = make_request
        self._window = window
        self._timeout_s = timeout_s
        self._max_resumes = max_resumes
        self._pending: dict[int, pb.ClassifyRequest | None] = {}  # taken, not yet yielded
        self._resend: collections.deque[int] = collections.deque()
        self._next_index = 0
        # Per attempt (one stream):
        self._attempt = 0
        self._events: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()
        self._sent: dict[int, float] = {}  # index → send time on this stream, in send order
        self._draining = False
        self._drain_error: FusionClientError | None = None
        self._slots = asyncio.Semaphore(window)
        self._call: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def results(self) -> AsyncIterator[StreamResult]:
        """Yield results as they arrive; replace the stream when it breaks with UNAVAILABLE."""
        failures = 0  # streams replaced in a row without an answer in between
        try:
            while True:
                self._start()
                broken: FusionClientError | None = None  # why this stream must be replaced
                cause: BaseException | None = None
                ended = False
                while broken is None:
                    attempt, kind, value = await self._next_event()
                    if kind == "local":  # an item that failed before it was sent
                        if self._pending.pop(value.index, False) is not False:
                            yield value
                    elif attempt != self._attempt:
                        continue  # from a stream already abandoned
                    elif kind == "response":
                        index = _index(value.request_id)
                        if index is None or self._sent.pop(index, None) is None:
                            continue  # not an answer we wait for on this stream
                        result = stream_result(index, value)
                        if result.error is not None and result.error.code in _RESUMABLE:
                            # This replica cannot serve now (it drains): send nothing more here,
                            # and send this item again on a new stream once the others are in.
                            self._draining = True
                            broken = result.error if not self._sent else None
                            self._drain_error = result.error
                            continue
                        failures = 0
                        del self._pending[index]
                        yield result
                        self._slots.release()
                        if self._draining and not self._sent:
                            broken = self._drain_error
                    elif kind == "end":
                        ended = True
                        if any(r is not None for r in self._pending.values()) or not self._feed.exhausted:
                            broken = self._drain_error or FusionClientError(
                                grpc.StatusCode.UNAVAILABLE, "the server ended the stream before answering every item"
                            )
                    elif kind == "broken":
                        if value.code() not in _RESUMABLE:
                            raise FusionClientError.from_rpc_error(value) from value
                        broken, cause = FusionClientError.from_rpc_error(value), value
                    else:  # "failed": the caller's items raised, or a bug in the writer
                        raise value
                    if ended and not self._pending:
                        return
                await self._stop()
                failures += 1
                unanswered = sorted(i for i, r in self._pending.items() if r is not None)
                if failures > self._max_resumes:
                    raise FusionClientError(
                        broken.code,
                        f"stream failed {failures} times in a row, {len(unanswered)} items unanswered: "
                        f"{broken.details}",
                    ) from cause
                logger.warning(
                    "classify_stream: %s; sending %d unanswered items again on a new stream (%d/%d)",
                    broken, len(unanswered), failures, self._max_resumes,
                )  # fmt: skip
                self._resend = collections.deque(unanswered)
                await asyncio.sleep(min(0.05 * 2 ** (failures - 1), 1.0) * random.uniform(0.5, 1.0))
        finally:
            await self._stop()
            self._feed.close()

    def _start(self) -> None:
        self._attempt += 1
        self._sent = {}
        self._draining = False
        self._drain_error = None
        self._slots = asyncio.Semaphore(self._window)
        self._call = self._open_call()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._write(self._attempt, self._call, self._slots)),
            loop.create_task(self._read(self._attempt, self._call)),
        ]

    async def _stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks, self._call = [], None

    async def _next_event(self) -> tuple[int, str, Any]:
        """The next event; raises DEADLINE_EXCEEDED when the oldest item in flight is overdue."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._events.empty():
                return self._events.get_nowait()
            wait = self._timeout_s
            if self._sent:
                index, sent_at = next(iter(self._sent.items()))  # the oldest: dicts keep send order
                wait = sent_at + self._timeout_s - loop.time()
                if wait <= 0:
                    raise FusionClientError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"item {index} got no answer within {self._timeout_s:g}s"
                    )
            try:
                return await asyncio.wait_for(self._events.get(), wait)
            except asyncio.TimeoutError:
                continue

    async def _write(self, attempt: int, call: Any, slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await slots.acquire()
                if self._draining:
                    return
                if self._resend:
                    index = self._resend.popleft()
                    request = self._pending[index]
                else:
                    got, item = await self._feed.next()
                    if not got:
                        break
                    index = self._next_index
                    self._next_index += 1
                    try:
                        request = self._make_request(item, index)
                    except FusionClientError as e:  # a bad item: answer it here, the stream goes on
                        self._pending[index] = None
                        self._events.put_nowait((attempt, "local", StreamResult(index, error=e)))
                        slots.release()
                        continue
                    self._pending[index] = request
                self._sent[index] = loop.time()
                await call.write(request)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the stream is over; the reader says how
        except Exception as e:
            self._events.put_nowait((attempt, "failed", e))

    async def _read(self, attempt: int, call: Any) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    self._events.put_nowait((attempt, "end", None))
                    return
                self._events.put_nowait((attempt, "response", response))
        except grpc.aio.AioRpcError as e:
            self._events.put_nowait((attempt, "broken", e))


def _index(request_id: str) -> int | None:
    try:
        return int(request_id)
    except ValueError:
        return None
