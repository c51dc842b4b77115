"""OpenTelemetry tracing of each call, exported over OTLP/gRPC (the ``tracing`` extra).

Off unless asked for: :func:`asked_by` says whether ``ServerSettings.trace_endpoint`` or one of the
standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` variables does (the
standard ``OTEL_SDK_DISABLED=true`` and ``OTEL_TRACES_EXPORTER=none`` turn it off). The rest is
OpenTelemetry's own configuration, read from its variables: the sampler (``OTEL_TRACES_SAMPLER``,
by default ``parentbased_always_on``: a call follows its caller's sampling decision), the service
name (``OTEL_SERVICE_NAME``, else ``fusionserve``), exporter headers, timeouts, batching. A call
joins its caller's trace through the W3C ``traceparent`` / ``tracestate`` gRPC metadata (or
whatever ``OTEL_PROPAGATORS`` names).

Spans are recorded after the fact, with the times the core measured (``time.perf_counter()``,
converted here): nothing of OpenTelemetry runs in the core, only :class:`CallSpan` methods for the
calls that are sampled. docs/OBSERVABILITY.md lists every span and attribute.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from fusionserve import __version__
from fusionserve.extras import require

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
STATUS_NUMBERS = {code.name: code.value[0] for code in grpc.StatusCode}


def asked_by(trace_endpoint: str, env: Mapping[str, str] = os.environ) -> str | None:
    """What asks for tracing (a setting or a variable, by name), or None when tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    if trace_endpoint:
        return "trace_endpoint"
    return next((name for name in ENDPOINT_VARIABLES if env.get(name)), None)


def check(trace_endpoint: str, env: Mapping[str, str] = os.environ) -> str | None:
    """What asks for tracing (see :func:`asked_by`), or None.

    Raises:
        FusionServeError: tracing is asked for and the ``tracing`` extra is not installed (one line naming it).
    """
    why = asked_by(trace_endpoint, env)
    if why is not None:
        require("tracing", f"tracing (asked for by {why})")
    return why


class _DropsOncePerMinute(logging.Filter):
    """Lets through one of OpenTelemetry's "Queue full, dropping Span." warnings a minute, with the count.

    It warns once for each span it drops when the exporter falls behind: on the event loop, thousands
    a second, each written to the log.
    """

    def __init__(self) -> None:
        super().__init__()
        self._next_s, self._dropped = 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.msg.startswith("Queue full"):
            return True
        self._dropped += 1
        now = time.monotonic()
        if now < self._next_s:
            return False
        record.msg = f"{record.msg} ({self._dropped} spans dropped in the last minute: sample fewer calls, "
        record.msg += "OTEL_TRACES_SAMPLER_ARG, or raise OTEL_BSP_MAX_QUEUE_SIZE)"
        self._next_s, self._dropped = now + 60.0, 0
        return True


def _mute_drop_warnings() -> None:
    log = logging.getLogger("opentelemetry.sdk._shared_internal")
    if not any(isinstance(f, _DropsOncePerMinute) for f in log.filters):
        log.addFilter(_DropsOncePerMinute())


def _peer_attributes(peer: str) -> dict[str, Any]:
    """``ipv4:10.0.0.5:43210`` or ``ipv6:[::1]:43210`` → the client's address and port."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {"network.peer.address": peer} if peer else {}
    address, _, port = rest.rpartition(":")
    out: dict[str, Any] = {"network.peer.address": address.strip("[]")}
    if port.isdigit():
        out["network.peer.port"] = int(port)
    return out


class Tracing:
    """One server process's tracer: a TracerProvider exporting over OTLP/gRPC in batches (a thread).

    ``endpoint``: the collector; empty, OpenTelemetry's variables (or its default, localhost:4317) say.
    ``exporter``: another SpanExporter instead (the benchmarks time the spans in memory). Needs the
    ``tracing`` extra (:func:`check` first).

    A call's own span goes through the SDK (it decides sampling and reads the caller's context); the
    spans below it, finished when they are recorded, are handed to the exporter as they are, which
    skips most of the SDK's start-and-end work for each (the cost: docs/OBSERVABILITY.md#cost).
    """

    def __init__(self, endpoint: str = "", *, worker: int = 0, exporter: Any = None) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "fusionserve"}))
        ours: dict[str, Any] = {"service.version": __version__, "process.pid": os.getpid()}
        if worker:
            ours["fusionserve.worker"] = worker
        self.provider = TracerProvider(resource=resource.merge(Resource(ours)))  # sampler: OTEL_TRACES_SAMPLER
        _mute_drop_warnings()
        self._processor = BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint or None))
        self.provider.add_span_processor(self._processor)
        self.tracer = self.provider.get_tracer("fusionserve", __version__)
        self._trace, self._propagate, self._readable = trace, propagate, ReadableSpan
        self._scope = InstrumentationScope("fusionserve", __version__)
        self._offset_ns = time.time_ns() - time.perf_counter_ns()

    def ns(self, perf_s: float) -> int:
        """A ``time.perf_counter()`` reading as OpenTelemetry's time: nanoseconds since the epoch."""
        return self._offset_ns + int(perf_s * 1e9)

    def start(self, method: str, metadata: Sequence[tuple[str, Any]] | None, peer: str,
              started: float) -> CallSpan | None:  # fmt: skip
        """The span of a call to ``method`` (``/package.Service/Method``) that began at ``started``.

        Its parent is the caller's span from the metadata, if any. None when it is not sampled.
        """
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        parent = self._propagate.extract(carrier)
        span = self.tracer.start_span(method.lstrip("/"), context=parent, kind=self._trace.SpanKind.SERVER,
                                      start_time=self.ns(started))  # fmt: skip
        if not span.is_recording():
            return None  # what follows is for the sampled calls only
        service, _, name = method.strip("/").partition("/")
        span.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                             **_peer_attributes(peer)})  # fmt: skip
        return CallSpan(self, method.lstrip("/"), span.get_span_context(), started, sdk_span=span)

    def child_context(self, parent: Any) -> Any:
        """A new span context in ``parent``'s trace (its sampling flags and trace state)."""
        span_id = random.getrandbits(64) or 1
        return self._trace.SpanContext(parent.trace_id, span_id, is_remote=False, trace_flags=parent.trace_flags,
                                       trace_state=parent.trace_state)  # fmt: skip

    def record(self, name: str, context: Any, parent: Any, started: float, ended: float,
               attributes: dict[str, Any], links: Sequence[Any] = (), status: Any = None) -> None:  # fmt: skip
        """Hand a finished span to the exporter."""
        self._processor.on_end(self._readable(
            name, context=context, parent=parent, resource=self.provider.resource, attributes=attributes,
            links=links, start_time=self.ns(started), end_time=self.ns(ended), instrumentation_scope=self._scope,
            **({"status": status} if status is not None else {}),
        ))  # fmt: skip

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter thread."""
        self.provider.shutdown()


class CallSpan:
    """The span of one sampled call, or of one request of a stream: its children are recorded through it.

    See calls.CallTrace for what the core does with it.
    """

    __slots__ = ("tracing", "name", "context", "started", "sdk_span", "parent", "trace_id")

    def __init__(self, tracing: Tracing, name: str, context: Any, started: float, *, sdk_span: Any = None,
                 parent: Any = None) -> None:  # fmt: skip
        self.tracing, self.name, self.context, self.started = tracing, name, context, started
        self.sdk_span, self.parent = sdk_span, parent
        self.trace_id = format(context.trace_id, "032x")

    def span(self, name: str, started: float, ended: float, attributes: dict[str, Any], link: Any = None) -> Any:
        """Record a finished child span; returns its span context (for links)."""
        t = self.tracing
        context = t.child_context(self.context)
        t.record(name, context, self.context, started, ended, attributes,
                 [t._trace.Link(link)] if link is not None else ())  # fmt: skip
        return context

    def item(self, started: float) -> CallSpan:
        """The span of one request of this stream (a child of the stream's span)."""
        return CallSpan(self.tracing, f"{self.name} request", self.tracing.child_context(self.context), started,
                        parent=self.context)  # fmt: skip

    def end(self, ended: float, code: str, message: str) -> None:
        """End the span: its gRPC status code, and an error status for anything but OK."""
        otel = self.tracing._trace
        status = otel.Status(otel.StatusCode.ERROR, f"{code}: {message}" if message else code) if code != "OK" else None
        number = STATUS_NUMBERS.get(code, 2)  # 2: UNKNOWN
        if self.sdk_span is None:
            self.tracing.record(self.name, self.context, self.parent, self.started, ended,
                                {"rpc.grpc.status_code": number}, status=status)  # fmt: skip
            return
        self.sdk_span.set_attribute("rpc.grpc.status_code", number)
        if status is not None:
            self.sdk_span.set_status(status)
        self.sdk_span.end(end_time=self.tracing.ns(ended))
