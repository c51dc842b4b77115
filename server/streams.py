"""Bidirectional-stream plumbing shared by the typed and V2 front-ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from fusionserve.errors import QueueFullError
from fusionserve.server.calls import each_request

Request = TypeVar("Request")
Response = TypeVar("Response")


class Streams:
    """The bidirectional streams of every front-end: how many may be open, how much each runs at once.

    One stream over ``max_open`` is RESOURCE_EXHAUSTED; each stream handles at most ``max_inflight``
    requests at a time and reads no further until one is done (backpressure).
    """

    def __init__(self, max_open: int, max_inflight: int, on_refusal: Callable[[str], None] | None = None) -> None:
        self.max_open = max_open
        self.max_inflight = max_inflight
        self.open = 0
        self._on_refusal = on_refusal  # told the reason of each stream refused

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one stream slot while the stream runs."""
        if self.open >= self.max_open:
            refusal = QueueFullError(f"too many open streams (limit {self.max_open}); retry later", reason="streams")
            if self._on_refusal is not None:
                self._on_refusal(refusal.reason)
            raise refusal
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1

    async def answer(
        self, requests: AsyncIterator[Request], handle: Callable[[Request], Awaitable[Response]]
    ) -> AsyncIterator[Response]:
        """One stream: hold a slot and :func:`answer_concurrently` its requests (each its own observed call)."""
        with self.slot():
            async for response in answer_concurrently(requests, each_request(handle), self.max_inflight):
                yield response


async def answer_concurrently(
    requests: AsyncIterator[Request], handle: Callable[[Request], Awaitable[Response]], window: int
) -> AsyncIterator[Response]:
    """Run ``handle`` on each request, at most ``window`` at once, yielding answers as they finish.

    ``handle`` must answer errors itself (in-band); an error reading ``requests`` ends the stream.
    """
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(window)
    done: asyncio.Queue[Response | None] = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    async def run(request: Request) -> None:
        try:
            response = await handle(request)
        finally:
            slots.release()
        await done.put(response)

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = loop.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            await done.put(None)

    reader = loop.create_task(read())
    try:
        while (response := await done.get()) is not None:
            yield response
        await reader  # surfaces a stream-level read failure
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
