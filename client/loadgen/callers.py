"""Callers: one request number → its status code name, over unary calls or long-lived streams."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from fusionserve.client.loadgen.requests import typed_stream_reply, v2_stream_reply, with_id
from fusionserve.client.loadgen.settings import LoadSettings


class UnaryCaller:
    """Unary calls spread round-robin over the channels; responses are left unparsed."""

    def __init__(self, channels: list[grpc.aio.Channel], method: str, payloads: list[bytes], s: LoadSettings, md):
        self._calls = [ch.unary_unary(method) for ch in channels]  # bytes in, bytes out
        self._payloads = payloads
        self._timeout_s = s.timeout_s
        self._metadata = md

    async def __call__(self, n: int, lane: int) -> str:
        """Send request ``n`` on lane ``lane``; its status code name."""
        call = self._calls[lane % len(self._calls)]
        try:
            await call(self._payloads[n % len(self._payloads)], timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"


class Stream:
    """One open bidirectional stream; waiters are futures keyed by request id."""

    def __init__(self, channel: grpc.aio.Channel, method: str, parse: Callable[[bytes], tuple[str, str]], md):
        self.call = channel.stream_stream(method)(metadata=md)
        self.waiting: dict[str, asyncio.Future[str]] = {}
        self.lock = asyncio.Lock()  # one write at a time per call
        self.closed = False
        self._parse = parse
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        end = "UNAVAILABLE"  # the server closed a stream we had not closed
        try:
            while (data := await self.call.read()) is not grpc.aio.EOF:
                rid, code = self._parse(data)
                future = self.waiting.pop(rid, None)
                if future is None and not rid and self.waiting:  # no id in an error reply: oldest waiter
                    future = self.waiting.pop(next(iter(self.waiting)))
                if future is not None and not future.done():
                    future.set_result(code)
        except grpc.aio.AioRpcError as e:
            end = e.code().name
        except asyncio.CancelledError:
            end = "CANCELLED"
            raise
        finally:
            self.closed = True
            for future in self.waiting.values():
                if not future.done():
                    future.set_result(end)
            self.waiting.clear()

    async def close(self) -> None:
        """Stop writing, wait briefly for the last replies, then cancel."""
        self.closed = True
        try:
            async with self.lock:
                await self.call.done_writing()
            await asyncio.wait_for(asyncio.shield(self.reader), 5)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, asyncio.TimeoutError):
            pass
        finally:
            self.call.cancel()
            self.reader.cancel()


class StreamCaller:
    """Requests written to long-lived streams and matched to their replies by id."""

    def __init__(self, channels: list[grpc.aio.Channel], method: str, payloads: list[bytes], s: LoadSettings, md):
        self._channels = channels
        self._method = method
        self._payloads = payloads
        self._timeout_s = s.timeout_s
        self._metadata = md
        self.with_id = with_id(s.api)
        self._parse = typed_stream_reply if s.api == "typed" else v2_stream_reply
        n = s.streams or (4 if s.open_loop else s.concurrency)
        self._streams: list[Stream | None] = [None] * n

    def _stream(self, lane: int) -> Stream:
        slot = lane % len(self._streams)
        stream = self._streams[slot]
        if stream is None or stream.closed:  # a broken stream is replaced for the next request
            stream = Stream(self._channels[slot % len(self._channels)], self._method, self._parse, self._metadata)
            self._streams[slot] = stream
        return stream

    async def __call__(self, n: int, lane: int) -> str:
        """Write request ``n`` to lane ``lane``'s stream and wait for its reply; its status code name."""
        stream = self._stream(lane)
        rid = str(n)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        stream.waiting[rid] = future
        timer = loop.call_later(self._timeout_s, expire, future)
        try:
            async with stream.lock:
                await stream.call.write(self.with_id(self._payloads[n % len(self._payloads)], rid))
            return await future
        except grpc.aio.AioRpcError as e:
            return e.code().name
        except asyncio.InvalidStateError:
            return "UNAVAILABLE"
        finally:
            timer.cancel()
            stream.waiting.pop(rid, None)

    async def aclose(self) -> None:
        """Close every stream."""
        await asyncio.gather(*(s.close() for s in self._streams if s is not None), return_exceptions=True)


def expire(future: asyncio.Future[str]) -> None:
    """A stream request's deadline passed: it counts as DEADLINE_EXCEEDED."""
    if not future.done():
        future.set_result("DEADLINE_EXCEEDED")
