"""The blocking client: a thin wrapper that runs :class:`AsyncFusionClient` on a private loop thread.

Why this direction (and not an async wrapper over grpc's blocking stubs): the windowed, resumable
stream needs a reader and a writer at once, which asyncio does in one thread; grpc.aio channels
belong to one event loop, and a loop of our own (never the caller's) means the blocking client
works the same from plain scripts, threads, and inside code that already runs an event loop.
Every blocking call hands a coroutine to that loop and waits for it; nothing is written twice.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from fusionserve.client.aio import AsyncFusionClient
from fusionserve.client.channel import TLSConfig
from fusionserve.client.results import StreamResult

P = ParamSpec("P")
R = TypeVar("R")
_END = object()


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fusionclient-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        """Run a coroutine on the loop and wait for its result (Ctrl-C cancels it)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def _blocking(
    method: Callable[Concatenate[AsyncFusionClient, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[FusionClient, P], R]:
    """A blocking method running the async client's method of the same name."""

    @functools.wraps(method)
    def call(self: FusionClient, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._thread.run(method(self._client, *args, **kwargs))

    return call


async def _threaded(items: Iterable[Any]) -> AsyncIterator[Any]:
    """The caller's iterable, advanced in a worker thread so a slow one never blocks the loop."""
    iterator = iter(items)
    while (item := await asyncio.to_thread(next, iterator, _END)) is not _END:
        yield item


class FusionClient:
    """The blocking fusionserve client; the same methods and arguments as :class:`AsyncFusionClient`.

    Use it as a context manager, or call :meth:`close`. It is safe to share between threads.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        tls: bool | TLSConfig = False,
        token: str | None = None,
        timeout_s: float = 30.0,
        **options: Any,
    ) -> None:
        self._thread = _LoopThread()

        async def create() -> AsyncFusionClient:  # grpc.aio binds the channel to the running loop
            return AsyncFusionClient(target, tls=tls, token=token, timeout_s=timeout_s, **options)

        try:
            self._client = self._thread.run(create())
        except BaseException:
            self._thread.close()
            raise

    @property
    def target(self) -> str | Sequence[str]:
        """The target or targets this client was given."""
        return self._client.target

    def close(self) -> None:
        """Close the channels and stop the loop thread."""
        try:
            self._thread.run(self._client.aclose())
        finally:
            self._thread.close()

    def __enter__(self) -> FusionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    classify = _blocking(AsyncFusionClient.classify)
    classify_batch = _blocking(AsyncFusionClient.classify_batch)
    embed = _blocking(AsyncFusionClient.embed)
    rank = _blocking(AsyncFusionClient.rank)
    models = _blocking(AsyncFusionClient.models)
    model = _blocking(AsyncFusionClient.model)
    load_model = _blocking(AsyncFusionClient.load_model)
    unload_model = _blocking(AsyncFusionClient.unload_model)
    health = _blocking(AsyncFusionClient.health)

    def classify_stream(self, items: Iterable[Any], *, window: int = 16, **kwargs: Any) -> Iterator[StreamResult]:
        """Blocking :meth:`AsyncFusionClient.classify_stream`: iterate the results as they arrive.

        ``items`` is read in a worker thread, one item at a time, so it may block (read files, wait
        on a queue). Stop early with ``break``; the stream is then cancelled.
        """
        results = self._client.classify_stream(_threaded(items), window=window, **kwargs)  # checks arguments now

        def iterate() -> Iterator[StreamResult]:
            try:
                while True:
                    try:
                        yield self._thread.run(_next(results))
                    except StopAsyncIteration:
                        return
            finally:
                if not self._thread.loop.is_closed():
                    self._thread.run(_aclose(results))

        return iterate()


async def _next(iterator: AsyncIterator[R]) -> R:
    return await anext(iterator)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()
