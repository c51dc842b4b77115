"""Prometheus metrics, one registry per server (so several servers can live in one process)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fusionserve.server.batcher import BatchStats

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ModelTotals:
    """Running totals of one model since the server started, as the V2 statistics extension reports them.

    Durations are in nanoseconds. A tensor model's executions are its batches (``compute`` per
    batch, ``queue`` per request); a pipeline's are its runs (one per request, ``compute`` the
    whole run, ``queue`` counted with no time), and its steps count their own batches under their
    own names.
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches (tensor models) or runs (pipelines); compute_ns is their total
    last_inference_ms: int = 0  # since the epoch
    cache_hit_count: int = 0  # items answered from the embedding cache
    cache_hit_ns: int = 0
    cache_miss_count: int = 0  # items looked up there and computed
    cache_miss_ns: int = 0
    by_batch_size: dict[int, list[int]] = field(default_factory=dict)  # rows → [executions, compute ns]

    def executed(self, rows: int, seconds: float) -> None:
        """One execution of ``rows`` rows that took ``seconds``."""
        ns = int(seconds * 1e9)
        self.inference_count += rows
        self.execution_count += 1
        self.compute_ns += ns
        entry = self.by_batch_size.setdefault(rows, [0, 0])
        entry[0] += 1
        entry[1] += ns


class Metrics:
    """The server's metrics; names start with ``fusionserve_``.

    Besides the Prometheus registry it keeps :class:`ModelTotals` per model, which the V2
    ``ModelStatistics`` RPC reports (Triton's statistics extension, read by perf_analyzer).
    """

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
        self.cache_hits = Counter("fusionserve_embedding_cache_hits", "Encoder inputs answered from the cache",
                                  ["model"], registry=r)  # fmt: skip
        self.cache_misses = Counter("fusionserve_embedding_cache_misses", "Encoder inputs looked up and computed",
                                    ["model"], registry=r)  # fmt: skip
        self.cache_evictions = Counter("fusionserve_embedding_cache_evictions", "Entries evicted to stay in bounds",
                                       ["model"], registry=r)  # fmt: skip
        self.cache_held = Gauge("fusionserve_embedding_cache_bytes", "Bytes the embedding cache holds",
                                ["model"], registry=r)  # fmt: skip
        self.serving_version = Gauge(
            "fusionserve_model_serving_version", "The version a call for the latest gets (0: none ready)", ["model"],
            registry=r,
        )  # fmt: skip
        self.loads = Counter("fusionserve_model_loads", "Model versions loaded, by outcome", ["model", "outcome"],
                             registry=r)  # fmt: skip
        self.unloads = Counter("fusionserve_model_unloads", "Model versions unloaded", ["model"], registry=r)
        self.load_time = Histogram(
            "fusionserve_model_load_seconds", "Time to load and warm up one model version", ["model"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), registry=r,
        )  # fmt: skip
        self.unload_time = Histogram(
            "fusionserve_model_unload_seconds", "Time from UNLOADING (in-flight calls finishing) to released",
            ["model"], buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0), registry=r,
        )  # fmt: skip
        self.totals: dict[str, ModelTotals] = {}
        self._cache_counters: dict[str, tuple[Counter, Counter]] = {}
        self._serving: set[str] = set()
        self._http: Any = None
        self.port: int | None = None

    def cache_lookup(self, model: str, *, hits: int, misses: int, seconds: float) -> None:
        """One lookup of ``hits + misses`` inputs of ``model``'s encoder, which took ``seconds``."""
        counters = self._cache_counters.get(model)
        if counters is None:  # labels() costs microseconds: once per model, not per lookup
            counters = self._cache_counters[model] = (self.cache_hits.labels(model), self.cache_misses.labels(model))
        if hits:
            counters[0].inc(hits)
        if misses:
            counters[1].inc(misses)
        totals, ns = self.totals_of(model), int(seconds * 1e9)
        n = hits + misses
        totals.cache_hit_count += hits
        totals.cache_miss_count += misses
        if n:
            totals.cache_hit_ns += ns * hits // n
            totals.cache_miss_ns += ns * misses // n

    def cache_evicted(self, model: str) -> None:
        """One entry of ``model`` evicted."""
        self.cache_evictions.labels(model).inc()

    def watch_cache_bytes(self, model: str, held: Callable[[], float]) -> None:
        """Export ``held()`` (read at each scrape) as the bytes the cache holds for ``model``."""
        self.cache_held.labels(model).set_function(held)

    def model_loaded(self, model: str, seconds: float) -> None:
        """One version of ``model`` loaded and warmed up in ``seconds``."""
        self.loads.labels(model, "success").inc()
        self.load_time.labels(model).observe(seconds)

    def model_load_failed(self, model: str) -> None:
        """One version of ``model`` could not be loaded."""
        self.loads.labels(model, "failure").inc()

    def model_unloaded(self, model: str, seconds: float) -> None:
        """One version of ``model`` released, ``seconds`` after it stopped taking calls."""
        self.unloads.labels(model).inc()
        self.unload_time.labels(model).observe(seconds)

    def serving(self, model: str, version: int) -> None:
        """Record the version calls for the latest ``model`` get (0: none)."""
        self.serving_version.labels(model).set(version)
        self._serving.add(model)

    def serving_names(self) -> set[str]:
        """The models the serving-version gauge has a value for."""
        return set(self._serving)

    def reset_totals(self) -> None:
        """Zero every model's :class:`ModelTotals` (in place: the batchers' hooks hold them)."""
        for totals in self.totals.values():
            totals.__dict__.update(ModelTotals().__dict__)

    def totals_of(self, model: str) -> ModelTotals:
        """The running totals of ``model`` (created on first use)."""
        totals = self.totals.get(model)
        if totals is None:
            totals = self.totals[model] = ModelTotals()
        return totals

    def batch_stats(self, model: str) -> BatchStats:
        """Hooks for one model's batcher."""
        compute, size, queue = (
            self.compute_time.labels(model),
            self.batch_size.labels(model),
            self.queue_time.labels(model),
        )
        items = self.items.labels(model)
        totals = self.totals_of(model)

        def on_batch(rows: int, seconds: float) -> None:
            compute.observe(seconds)
            size.observe(rows)
            items.inc(rows)
            totals.executed(rows, seconds)

        def on_queue_time(seconds: float) -> None:
            queue.observe(seconds)
            totals.queue_count += 1
            totals.queue_ns += int(seconds * 1e9)

        return BatchStats(on_batch=on_batch, on_queue_time=on_queue_time)

    def pipeline_run(self, model: str, rows: int, seconds: float) -> None:
        """Count one run of a pipeline over ``rows`` items (its steps count their own batches)."""
        self.items.labels(model).inc(rows)
        totals = self.totals_of(model)
        totals.executed(rows, seconds)
        # No queue of its own (its steps queue, in their own totals), but counted as queued once with
        # no wait, as Triton counts an ensemble's requests: clients find the model's active version so.
        totals.queue_count += 1

    def observe(self, model: str, api: str, code: str, seconds: float) -> None:
        """Count one finished request."""
        self.requests.labels(model, api, code).inc()
        self.latency.labels(model, api).observe(seconds)
        if model == "_unknown":
            return
        totals = self.totals_of(model)
        if code == "OK":
            totals.success_count += 1
            totals.success_ns += int(seconds * 1e9)
        else:
            totals.fail_count += 1
            totals.fail_ns += int(seconds * 1e9)
        totals.last_inference_ms = int(time.time() * 1000)

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
