"""Prometheus metrics, one registry per server (so several servers can live in one process)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fusionserve.server.batcher import BatchStats

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's metrics; names start with ``fusionserve_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fusionserve_requests", "Requests by model, API and gRPC status code", ["model", "api", "code"], registry=r
        )
        self.items = Counter("fusionserve_items", "Items (rows) inferred by model", ["model"], registry=r)
        self.latency = Histogram(
            "fusionserve_request_latency_seconds", "Request latency seen by the server", ["model", "api"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "fusionserve_queue_time_seconds", "Time work waited in a model's batch queue", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_time = Histogram(
            "fusionserve_compute_time_seconds", "onnxruntime time per batch", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fusionserve_batch_size", "Rows per onnxruntime run", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.inflight = Gauge("fusionserve_inflight_requests", "Requests being served", ["model"], registry=r)
        self.queued = Gauge("fusionserve_queued_items", "Items waiting in batch queues", ["model"], registry=r)
        self._http: Any = None
        self.port: int | None = None

    def batch_stats(self, model: str) -> BatchStats:
        """Hooks for one model's batcher."""
        compute, size, queue = (
            self.compute_time.labels(model),
            self.batch_size.labels(model),
            self.queue_time.labels(model),
        )
        items = self.items.labels(model)

        def on_batch(rows: int, seconds: float) -> None:
            compute.observe(seconds)
            size.observe(rows)
            items.inc(rows)

        return BatchStats(on_batch=on_batch, on_queue_time=queue.observe)

    def observe(self, model: str, api: str, code: str, seconds: float) -> None:
        """Count one finished request."""
        self.requests.labels(model, api, code).inc()
        self.latency.labels(model, api).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        self.port = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP exporter."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
