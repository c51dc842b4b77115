"""The app factory: one ServingCore behind the typed API, health, reflection and metrics.

``FusionServer`` is the public way to run a server, in tests (port 0) as in production
(``fusionserve serve``): start → serve → stop(grace) drains in-flight work.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from fusionserve.server import grpc_counts
from fusionserve.server.admission import Backlog, pushback_s
from fusionserve.server.auth import TokenAuthInterceptor, load_tokens, server_credentials
from fusionserve.server.call_limit import CallLimit
from fusionserve.server.core import ServingCore
from fusionserve.server.grpc_errors import ErrorInterceptor
from fusionserve.server.metrics import Metrics
from fusionserve.server.observe import Observer
from fusionserve.server.registry import READY
from fusionserve.server.settings import ServerSettings
from fusionserve.server.streams import Streams
from fusionserve.server.typed_servicer import FusionServicer
from fusionserve.v1 import fusion_pb2, fusion_pb2_grpc

logger = logging.getLogger(__name__)

TYPED_SERVICE = fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name


class FusionServer:
    """A running fusionserve server: the core, the gRPC server, health and metrics.

    ``worker`` (1, 2, …) makes it one of the processes of ``serve --workers N`` (server/supervisor.py):
    it binds the port with ``SO_REUSEPORT`` beside its siblings and its metrics go to the
    supervisor's files; 0 is a process of its own.
    """

    def __init__(self, settings: ServerSettings, *, worker: int = 0) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = Metrics()
        self.core = ServingCore(settings, self.metrics)
        self.streams = Streams(settings.max_concurrent_streams, settings.max_stream_inflight,
                               on_refusal=self.metrics.shed_one)  # fmt: skip
        self.calls = CallLimit(settings.max_concurrent_rpcs, retry_after_s=self._calls_pushback_s,
                               on_refusal=self.metrics.shed_one)  # fmt: skip
        self.core.on_change = self._publish_health  # versions loaded or unloaded while serving
        self._health_names: set[str] = set()
        self.health = HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._refresher: asyncio.Task | None = None
        self._server_id: int | None = None  # gRPC core's channelz id of this server, when it can be told
        self._backlog_watch: asyncio.Task | None = None
        self.observer: Observer | None = None

    async def start(self) -> None:
        """Load and warm up the models, then bind and start serving."""
        credentials = server_credentials(self.settings)  # fail on bad TLS files before loading models
        # Tracing and the access log (None when both are off): fails on a missing extra before loading models.
        self.observer = Observer.from_settings(self.settings, self.metrics, worker=self.worker)
        interceptors: list[grpc.aio.ServerInterceptor] = [self.observer.interceptor()] if self.observer else []
        if self.settings.auth_token_file:
            tokens = load_tokens(self.settings.auth_token_file)
            interceptors.append(TokenAuthInterceptor(tokens, exempt_health=self.settings.auth_exempt_health))
        interceptors.append(ErrorInterceptor(calls=self.calls))
        await self.core.start()
        limit = self.settings.max_message_bytes
        before = grpc_counts.server_ids()
        # No maximum_concurrent_rpcs here: grpc.aio's would hold the excess in gRPC's accept queue
        # instead of refusing it; self.calls refuses it with RESOURCE_EXHAUSTED (server/call_limit.py).
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Workers share the port; a process of its own must not share it with a stray server.
                ("grpc.so_reuseport", 1 if self.worker else 0),
                # gRPC's own accept queue (see ServerSettings.max_pending_rpcs): far above any load the
                # event loop falls behind on, since gRPC answers its overflow CANCELLED.
                ("grpc.server.max_pending_requests", self.settings.max_pending_rpcs),
                ("grpc.server.max_pending_requests_hard_limit", self.settings.max_pending_rpcs),
                *self._connection_age_options(),
            ],
        )
        ours = grpc_counts.server_ids() - before
        if len(ours) == 1:  # several servers made at once in one process (tests) cannot tell theirs apart
            self._server_id = server_id = ours.pop()
            self.metrics.watch(self.metrics.grpc_calls_received, lambda: grpc_counts.calls_started(server_id))
        fusion_pb2_grpc.add_FusionServiceServicer_to_server(FusionServicer(self.core, self.streams), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        services = [TYPED_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        services += self._add_extra_services(server)
        reflection.enable_server_reflection([*services, reflection.SERVICE_NAME], server)
        address = f"{self.settings.host}:{self.settings.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"cannot bind gRPC to {address}")
        await server.start()
        self._server = server
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        await self._publish_health()
        if self._server_id is not None:
            self._backlog_watch = asyncio.get_running_loop().create_task(self._watch_backlog(self._server_id))
        if self.worker:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_metrics())
            # Not "listening on": the supervisor says that once every worker is serving.
            logger.info("worker %d serving on %s (port %d)", self.worker, self.settings.host, self.port)
        else:
            logger.info("fusionserve listening on %s (port %d)", self.settings.host, self.port)

    def _calls_pushback_s(self) -> float:
        """When a caller refused for too many calls in flight should come back: once the work ahead drains."""
        return pushback_s(self.core.admission.estimated_wait_s())

    async def _watch_backlog(self, server_id: int) -> None:
        """Keep the door's estimate of the loop's lag in taking calls up from gRPC current (server/admission.py)."""
        loop = asyncio.get_running_loop()
        backlog = Backlog(self.calls.taken, loop.time())
        while True:
            await asyncio.sleep(backlog.next_read_s)
            received = grpc_counts.calls_started(server_id)
            self.core.admission.lag_s = backlog.read(received, self.calls.taken, loop.time())

    async def _refresh_metrics(self) -> None:
        """A worker's gauges read at scrape time in one process are copied to its files each second."""
        while True:
            self.metrics.refresh()
            await asyncio.sleep(1.0)

    def _connection_age_options(self) -> list[tuple[str, int]]:
        age = self.settings.max_connection_age_s
        if age <= 0:
            return []
        return [
            ("grpc.max_connection_age_ms", int(age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.settings.max_connection_age_grace_s * 1000)),
        ]

    def _add_extra_services(self, server: grpc.aio.Server) -> list[str]:
        """Front-ends beyond the typed API; returns their service names for reflection."""
        from fusionserve.server import v2_servicer

        return [v2_servicer.add_to_server(self.core, self.streams, server)]

    async def _publish_health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", serving if self.core.registry.ready else not_serving)
        await self.health.set(TYPED_SERVICE, serving if self.core.registry.ready else not_serving)
        registry = self.core.registry
        names = set(registry.names())
        for name in sorted(names):
            up = registry.find(name).state == READY and not registry.draining
            await self.health.set(name, serving if up else not_serving)
        for name in sorted(self._health_names - names):  # unloaded models
            await self.health.set(name, not_serving)
        self._health_names |= names

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: health NOT_SERVING, refuse new calls (UNAVAILABLE), let in-flight calls finish."""
        if self._stopped.is_set():
            return
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        logger.info("shutting down: draining for up to %.1fs", grace)
        self.core.begin_drain()
        await self._publish_health()
        if self._server is not None:
            # Calls that reach a stopping grpc server are reset (CANCELLED); calls that reach us while
            # draining get a clean UNAVAILABLE that every client retries. Let clients move away first.
            delay = min(grace, self.settings.drain_delay_s)
            await asyncio.sleep(delay)
            await self._server.stop(grace - delay)
        await self.core.aclose()
        if self.observer is not None:
            await self.observer.aclose()
        for task in (self._refresher, self._backlog_watch):
            if task is not None:
                task.cancel()
        self.metrics.close()
        self._stopped.set()
        logger.info("shut down")

    async def wait(self) -> None:
        """Wait until the server has been stopped."""
        await self._stopped.wait()


async def serve(settings: ServerSettings, *, worker: int = 0, on_started: Callable[[], None] | None = None) -> int:
    """Run a server until SIGTERM or SIGINT, then drain and return 0.

    Args:
        settings: what to serve, and how.
        worker: this process's number under ``serve --workers N`` (0: a process of its own).
        on_started: called once the server is serving (a worker tells its supervisor so).
    """
    server = FusionServer(settings, worker=worker)
    await server.start()
    if on_started is not None:
        on_started()
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task] = []

    def on_signal(signum: int) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        if not stopping:
            stopping.append(loop.create_task(server.stop()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await server.wait()
    return 0
