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

import os
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
    Needs the ``tracing`` extra (:func:`check` first).
    """

    def __init__(self, endpoint: str = "", *, worker: int = 0) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "fusionserve"}))
        ours: dict[str, Any] = {"service.version": __version__, "process.pid": os.getpid()}
        if worker:
            ours["fusionserve.worker"] = worker
        self.provider = TracerProvider(resource=resource.merge(Resource(ours)))  # sampler: OTEL_TRACES_SAMPLER
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint or None)))
        self.tracer = self.provider.get_tracer("fusionserve", __version__)
        self._trace, self._propagate = trace, propagate
        self._server_kind = trace.SpanKind.SERVER
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
        service, _, name = method.strip("/").partition("/")
        span = self.tracer.start_span(
            method.lstrip("/"), context=parent, kind=self._server_kind, start_time=self.ns(started),
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name, **_peer_attributes(peer)},
        )  # fmt: skip
        if not span.is_recording():
            return None
        return CallSpan(self, span, method.lstrip("/"))

    def shutdown(self) -> None:
        """Export what is buffered and stop the exporter thread."""
        self.provider.shutdown()


class CallSpan:
    """The recording span of one sampled call: its children are recorded through it (see calls.CallTrace)."""

    __slots__ = ("tracing", "otel_span", "name", "context", "trace_id")

    def __init__(self, tracing: Tracing, otel_span: Any, name: str) -> None:
        self.tracing, self.otel_span, self.name = tracing, otel_span, name
        self.context = tracing._trace.set_span_in_context(otel_span)
        self.trace_id = format(otel_span.get_span_context().trace_id, "032x")

    def span(self, name: str, started: float, ended: float, attributes: dict[str, Any], link: Any = None) -> Any:
        """Record a finished child span; returns its span context (for links)."""
        t = self.tracing
        links = [t._trace.Link(link)] if link is not None else None
        child = t.tracer.start_span(name, context=self.context, start_time=t.ns(started), attributes=attributes,
                                    links=links)  # fmt: skip
        child.end(end_time=t.ns(ended))
        return child.get_span_context()

    def item(self, started: float) -> CallSpan:
        """The span of one request of this stream (a child of the stream's span)."""
        t = self.tracing
        span = t.tracer.start_span(f"{self.name} request", context=self.context, start_time=t.ns(started))
        return CallSpan(t, span, self.name)

    def end(self, ended: float, code: str, message: str) -> None:
        """End the span: its gRPC status code, and an error status for anything but OK."""
        span, otel = self.otel_span, self.tracing._trace
        span.set_attribute("rpc.grpc.status_code", STATUS_NUMBERS.get(code, 2))  # 2: UNKNOWN
        if code != "OK":
            span.set_status(otel.Status(otel.StatusCode.ERROR, f"{code}: {message}" if message else code))
        span.end(end_time=self.tracing.ns(ended))
