"""Run a real FusionServer on a loopback port in a background thread (its own event loop)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc

from fusionserve.server.app import FusionServer
from fusionserve.server.settings import ServerSettings
from tests.device import DEVICE


class RunningServer:
    """A started server; ``target`` is ``127.0.0.1:PORT``. Stop with :meth:`stop`."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        values = {"repository": repository, "host": "127.0.0.1", "port": 0, "metrics_port": 0, "device": DEVICE}
        values["metrics_host"] = "127.0.0.1"
        values.update(settings)
        self.settings = ServerSettings().updated(values)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self._thread.start()
        self.server = FusionServer(self.settings)
        try:
            self.call(self.server.start(), timeout=120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            raise
        self.target = f"127.0.0.1:{self.server.port}"
        self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def call(self, coro, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace_s: float = 1.0) -> None:
        """Drain and stop the server, then its loop."""
        try:
            self.call(self.server.stop(grace_s), timeout=grace_s + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def channel(self) -> grpc.Channel:
        """A new blocking channel to this server, ready to use."""
        channel = grpc.insecure_channel(self.target)
        grpc.channel_ready_future(channel).result(timeout=10)
        return channel

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServicerServer:
    """A bare grpc.aio server around one typed-API servicer (a test double), on its own loop thread."""

    def __init__(self, servicer: Any) -> None:
        from fusionserve.v1 import fusion_pb2_grpc

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server()
            fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.target = f"127.0.0.1:{port}"

    def stop(self) -> None:
        """Stop the server at once and end its loop thread."""
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
