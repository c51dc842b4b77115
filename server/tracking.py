"""Per-request bookkeeping shared by the front-ends: latency, status code, the version served, in-flight gauge.

The request being counted is this task's (a context variable): the core tells it which version serves
the call (:func:`serving`) as it pins that version, so a request's latency and status code are counted
under the version that served it (or failed it), ``""`` when none was resolved (an unknown model, say).
"""

from __future__ import annotations

import asyncio
import contextvars
import time

import grpc

from fusionserve.errors import QueueFullError
from fusionserve.server.calls import current as current_call
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.metrics import Metrics

_current: contextvars.ContextVar[Tracked | None] = contextvars.ContextVar("fusionserve_tracked", default=None)


def serving(version: int) -> None:
    """Say which version of its model serves the request being counted in this task (if one is)."""
    if (tracked := _current.get()) is not None:
        tracked.version = str(version)


def track(metrics: Metrics, model: str, api: str) -> Tracked:
    """Count one request of ``api`` on ``model`` in a ``with`` block: its latency, status code, and while it runs."""
    return Tracked(metrics, model[:64], api)  # never let a caller blow up label cardinality with long names


class Tracked:
    """One request being counted (see :func:`track`).

    A class rather than ``contextlib.contextmanager``: every request has one, and a generator-based
    context manager costs several times as much.
    """

    __slots__ = ("metrics", "model", "api", "version", "_gauge", "_started", "_token")

    def __init__(self, metrics: Metrics, model: str, api: str) -> None:
        self.metrics, self.model, self.api = metrics, model, api
        self.version = ""  # until the core says which version serves the request (see serving())

    def __enter__(self) -> None:
        self._token = _current.set(self)
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
        _current.reset(self._token)
        self.metrics.observe(self.model, self.version, self.api, code.name, time.perf_counter() - self._started)
        if (call := current_call()) is not None:
            call.finished(self.model, code.name)
