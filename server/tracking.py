"""Per-request bookkeeping shared by the front-ends: latency, status code, in-flight gauge."""

from __future__ import annotations

import asyncio
import time

import grpc

from fusionserve.errors import QueueFullError
from fusionserve.server.calls import current as current_call
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.metrics import Metrics


def track(metrics: Metrics, model: str, api: str) -> Tracked:
    """Count one request of ``api`` on ``model`` in a ``with`` block: its latency, status code, and while it runs."""
    return Tracked(metrics, model[:64], api)  # never let a caller blow up label cardinality with long names


class Tracked:
    """One request being counted (see :func:`track`).

    A class rather than ``contextlib.contextmanager``: every request has one, and a generator-based
    context manager costs several times as much.
    """

    __slots__ = ("metrics", "model", "api", "_gauge", "_started")

    def __init__(self, metrics: Metrics, model: str, api: str) -> None:
        self.metrics, self.model, self.api = metrics, model, api

    def __enter__(self) -> None:
        self._started = time.perf_counter()
        self._gauge = self.metrics.child(self.metrics.inflight, self.model)
        self._gauge.inc()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        code = grpc.StatusCode.OK
        if error is not None:
            cancelled = isinstance(error, (GeneratorExit, asyncio.CancelledError))
            code = grpc.StatusCode.CANCELLED if cancelled else status_of(error)[0]
            if isinstance(error, QueueFullError):
                self.metrics.shed_one(error.reason)
        self._gauge.dec()
        self.metrics.observe(self.model, self.api, code.name, time.perf_counter() - self._started)
        if (call := current_call()) is not None:
            call.finished(self.model, code.name)
