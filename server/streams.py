"""Bidirectional-stream plumbing shared by the typed and V2 front-ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

from fusionserve.errors import QueueFullError

Request = TypeVar("Request")
Response = TypeVar("Response")


class StreamLimit:
    """Counts open streams across every front-end; one more than the limit is RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one stream slot while the stream runs."""
        if self.open >= self.limit:
            raise QueueFullError(f"too many open streams (limit {self.limit}); retry later")
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


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
