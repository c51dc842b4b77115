"""Per-request bookkeeping shared by the front-ends: latency, status code, in-flight gauge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from fusionserve.errors import QueueFullError
from fusionserve.server.calls import current as current_call
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.metrics import Metrics


@contextmanager
def track(metrics: Metrics, model: str, api: str) -> Iterator[None]:
    """Count one request of ``api`` on ``model``: its latency, its status code, and while it runs."""
    started = time.perf_counter()
    model = model[:64]  # never let a caller blow up label cardinality with long names
    gauge = metrics.child(metrics.inflight, model)
    gauge.inc()
    code = grpc.StatusCode.OK
    try:
        yield
    except BaseException as e:
        code = grpc.StatusCode.CANCELLED if isinstance(e, (GeneratorExit, asyncio.CancelledError)) else status_of(e)[0]
        if isinstance(e, QueueFullError):
            metrics.shed_one(e.reason)
        raise
    finally:
        gauge.dec()
        metrics.observe(model, api, code.name, time.perf_counter() - started)
        if (call := current_call()) is not None:
            call.finished(model, code.name)
