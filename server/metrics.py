"""Prometheus metrics, one registry per server (so several servers can live in one process).

Under ``serve --workers N`` each worker is started with ``PROMETHEUS_MULTIPROC_DIR`` set, so
prometheus_client keeps every value in per-process files there, and the supervisor serves their sum
(:func:`multiprocess_registry`): the same names and labels as one process. Gauges say how they add
up (``multiprocess_mode``; ignored in one process), and values read when scraped (``set_function``,
invisible to the files) are copied into them by :meth:`Metrics.refresh` instead. The V2 statistics'
:class:`~fusionserve.server.model_totals.ModelTotals` are mirrored into files of their own
(server/model_totals.py), summed when ``ModelStatistics`` is called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from fusionserve.server.batcher import BatchStats
from fusionserve.server.model_totals import TOTALS_FOLDER, ModelTotals, TotalsFile, read_totals

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> Path | None:
    """The folder a worker's metrics go to (None in one process)."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def multiprocess_registry(path: Path, restarts: Callable[[], dict[int, int]] | None = None) -> CollectorRegistry:
    """A registry holding the sum over every worker that wrote to ``path`` (the supervisor serves it).

    ``restarts`` gives, per worker number, how often the supervisor has started it again
    (``fusionserve_worker_restarts_total{worker}``, read at each scrape).
    """
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    if restarts is not None:
        registry.register(_Restarts(restarts))
    return registry


class _Restarts(Collector):
    def __init__(self, restarts: Callable[[], dict[int, int]]) -> None:
        self._restarts = restarts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("fusionserve_worker_restarts", "Workers started again after they died",
                                     labels=["worker"])  # fmt: skip
        for worker, count in sorted(self._restarts().items()):
            family.add_metric([str(worker)], count)
        yield family


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> float:
    """The resident memory of this process now (Linux: /proc/self/statm; elsewhere its peak, from getrusage)."""
    try:
        return float(int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE_BYTES)
    except (OSError, IndexError, ValueError):
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class Metrics:
    """The server's metrics; names start with ``fusionserve_``.

    Besides the Prometheus registry it keeps :class:`ModelTotals` per model, which the V2
    ``ModelStatistics`` RPC reports (Triton's statistics extension, read by perf_analyzer).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fusionserve_requests", "Requests by model, the version that served them (empty when none was resolved), "
            "API and gRPC status code", ["model", "version", "api", "code"], registry=r
        )
        self.items = Counter("fusionserve_items", "Items (rows) inferred by model", ["model"], registry=r)
        self.latency = Histogram(
            "fusionserve_request_latency_seconds", "Request latency seen by the server", ["model", "version", "api"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Per model *version*: each version has its own batcher, so a rollout can be compared side by side.
        self.queue_time = Histogram(
            "fusionserve_queue_time_seconds", "Time work waited in a model version's batch queue",
            ["model", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_time = Histogram(
            "fusionserve_compute_time_seconds", "onnxruntime time per batch", ["model", "version"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "fusionserve_batch_size", "Rows per onnxruntime run", ["model", "version"], buckets=_BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        # A pipeline's decoding, per image: rate(seconds) / rate(images). Wall time, so it includes taking
        # Python's lock back after each image (OpenCV gives it up while it decodes).
        self.image_decodes = Counter("fusionserve_image_decodes", "Images a pipeline version decoded",
                                     ["model", "version"], registry=r)  # fmt: skip
        self.image_decode_time = Counter("fusionserve_image_decode_seconds", "Time a pipeline version's batches that "
                                         "decoded images spent checking, decoding and resizing them",
                                         ["model", "version"], registry=r)  # fmt: skip
        # multiprocess_mode: how workers' values add up (livesum: over live workers); ignored in one process.
        self.inflight = Gauge("fusionserve_inflight_requests", "Requests being served", ["model"], registry=r,
                              multiprocess_mode="livesum")  # fmt: skip
        self.queued = Gauge("fusionserve_queued_items", "Items waiting in batch queues", ["model"], registry=r,
                            multiprocess_mode="livesum")  # fmt: skip
        self.cache_hits = Counter("fusionserve_embedding_cache_hits", "Encoder inputs answered from the cache",
                                  ["model"], registry=r)  # fmt: skip
        self.cache_misses = Counter("fusionserve_embedding_cache_misses", "Encoder inputs looked up and computed",
                                    ["model"], registry=r)  # fmt: skip
        self.cache_evictions = Counter("fusionserve_embedding_cache_evictions", "Entries evicted to stay in bounds",
                                       ["model"], registry=r)  # fmt: skip
        self.cache_held = Gauge("fusionserve_embedding_cache_bytes", "Bytes the embedding cache holds",
                                ["model"], registry=r, multiprocess_mode="livesum")  # fmt: skip
        self.serving_version = Gauge(
            "fusionserve_model_serving_version", "The version a call for the latest gets (0: none ready)", ["model"],
            registry=r, multiprocess_mode="livemax",  # workers poll on their own: the newest any of them serves
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
        self.shed = Counter("fusionserve_shed_requests",
                            "Calls (or stream requests) refused before any work, by reason", ["reason"],
                            registry=r)  # fmt: skip
        self.admission_limit = Gauge("fusionserve_admission_limit_items",
                                     "Items the overload control admits at once now (capacity x target delay)",
                                     registry=r, multiprocess_mode="livesum")  # fmt: skip
        self.admission_capacity = Gauge("fusionserve_admission_capacity_items_per_second",
                                        "Items per second completed while busy (overload control's estimate)",
                                        registry=r, multiprocess_mode="livesum")  # fmt: skip
        self.grpc_calls_received = Gauge(
            "fusionserve_grpc_calls_received",
            "Calls gRPC received since the server started, those it shed from a full accept queue included "
            "(gRPC core's own count): less fusionserve_requests_total and health/control calls, what gRPC shed",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.resident_memory = Gauge(
            "fusionserve_resident_memory_bytes", "Resident memory of the serving processes (summed over workers)",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.access_log_dropped = Counter(
            "fusionserve_access_log_dropped", "Access log lines dropped because the writer fell behind", registry=r
        )
        self.totals: dict[str, ModelTotals] = {}
        folder = multiprocess_dir()
        self._totals_folder = folder / TOTALS_FOLDER if folder is not None else None
        self._totals_file = TotalsFile(self._totals_folder) if self._totals_folder is not None else None
        self._watched: dict[Any, Callable[[], float]] = {}  # gauge child → its value, copied by refresh()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see child()
        self._serving: set[str] = set()
        self._http: Any = None
        self.port: int | None = None
        self.watch(self.resident_memory, resident_bytes)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, made once: labels() costs microseconds, and calls count several per request.

        The labels a request brings are bounded (model names the registry knows, ``_unknown`` otherwise;
        the APIs; the status codes), so this keeps few children.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def shed_one(self, reason: str) -> None:
        """Count one call refused by overload control, by ``reason``."""
        self.child(self.shed, reason).inc()

    def cache_lookup(self, model: str, *, hits: int, misses: int, seconds: float) -> None:
        """One lookup of ``hits + misses`` inputs of ``model``'s encoder, which took ``seconds``."""
        if hits:
            self.child(self.cache_hits, model).inc(hits)
        if misses:
            self.child(self.cache_misses, model).inc(misses)
        self.totals_of(model).looked_up(hits, misses, seconds)

    def cache_evicted(self, model: str) -> None:
        """One entry of ``model`` evicted."""
        self.cache_evictions.labels(model).inc()

    def watch_cache_bytes(self, model: str, held: Callable[[], float]) -> None:
        """Export ``held()`` (read at each scrape) as the bytes the cache holds for ``model``."""
        self.watch(self.cache_held.labels(model), held)

    def watch(self, gauge: Any, value: Callable[[], float]) -> None:
        """Export ``value()`` as the gauge child ``gauge`` (use it instead of ``set_function``).

        In one process the value is read at each scrape; in a worker, where a scrape reads files that
        ``set_function`` never writes, :meth:`refresh` copies it there each second.
        """
        if self._totals_file is None:
            gauge.set_function(value)
        else:
            self._watched[gauge] = value

    def refresh(self) -> None:
        """Copy every watched value into its gauge (a worker's files); nothing to do in one process."""
        for gauge, value in list(self._watched.items()):
            gauge.set(value())

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
            totals.reset()

    def totals_of(self, model: str) -> ModelTotals:
        """The running totals of ``model`` in this process (created on first use)."""
        totals = self.totals.get(model)
        if totals is None:
            mirror = self._totals_file.mirror(model) if self._totals_file is not None else None
            totals = self.totals[model] = ModelTotals(mirror=mirror)
        return totals

    def all_totals(self) -> dict[str, ModelTotals]:
        """Totals per model as the V2 statistics report them.

        In one process its own; in a worker the sum over every worker of the server, read from their
        files (a few file reads per call, nothing per request).
        """
        if self._totals_folder is None:
            return self.totals
        return read_totals(self._totals_folder)

    def batch_stats(self, model: str, version: int) -> BatchStats:
        """Hooks for the batcher of one model version."""
        compute, size, queue = (
            self.compute_time.labels(model, str(version)),
            self.batch_size.labels(model, str(version)),
            self.queue_time.labels(model, str(version)),
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
            totals.queued(seconds)

        return BatchStats(on_batch=on_batch, on_queue_time=on_queue_time)

    def pipeline_stats(self, model: str, version: int) -> BatchStats:
        """Hooks for the batcher of one pipeline version: its decoding (its models count their own batches)."""
        labels = (model, str(version))
        images, seconds_spent = self.image_decodes.labels(*labels), self.image_decode_time.labels(*labels)

        def on_decode(count: int, seconds: float) -> None:
            images.inc(count)
            seconds_spent.inc(seconds)

        return BatchStats(on_decode=on_decode)

    def pipeline_run(self, model: str, rows: int, seconds: float) -> None:
        """Count one run of a pipeline over ``rows`` items (its steps count their own batches)."""
        self.child(self.items, model).inc(rows)
        totals = self.totals_of(model)
        totals.executed(rows, seconds)
        # Its queue's waits are counted in its steps' totals (each step's wait for its run), but it is
        # counted as queued once with no wait, as Triton counts an ensemble's requests: clients find the
        # model's active version so.
        totals.queued(0.0)

    def observe(self, model: str, version: str, api: str, code: str, seconds: float) -> None:
        """Count one finished request, under the version that served it (``""``: none was resolved)."""
        self.child(self.requests, model, version, api, code).inc()
        self.child(self.latency, model, version, api).observe(seconds)
        if model == "_unknown":
            return
        self.totals_of(model).finished(code == "OK", seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        self.port = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        """Stop the HTTP exporter (and unmap a worker's totals file)."""
        if self._totals_file is not None:
            self._totals_file.close()
            self._totals_file = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
