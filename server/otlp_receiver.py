"""A small OTLP/gRPC trace receiver: OpenTelemetry's ``collector.trace.v1`` service, keeping what it is sent.

The tests and benchmarks receive a server's spans with it, and it shows a server's spans without a
collector (the ``tracing`` extra, and ``opentelemetry-proto``, which that brings)::

    python -m fusionserve.server.otlp_receiver --port 4317          # one line per span received
    FUSIONSERVE_TRACE_ENDPOINT=http://127.0.0.1:4317 fusionserve serve ...
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SPAN_KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass
class ReceivedSpan:
    """One span as a collector received it (ids in lowercase hex; '' for no parent)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    status_message: str
    links: list[tuple[str, str]]  # (trace id, span id)
    trace_state: str = ""
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        """The span's duration in milliseconds."""
        return (self.end_ns - self.start_ns) / 1e6


class _Service(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: SpanReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - the proto's name
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), SPAN_KINDS.get(s.kind, ""),
                        s.start_time_unix_nano, s.end_time_unix_nano, _attributes(s.attributes), s.status.code,
                        s.status.message, [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        s.trace_state, resource,
                    ))  # fmt: skip
        self._receiver._add(spans)
        return trace_service_pb2.ExportTraceServiceResponse()


class SpanReceiver:
    """An OTLP/gRPC receiver on ``host:port`` (0: a free port) keeping up to ``keep`` spans.

    ``on_span`` (optional) is told of each span as it arrives, on the receiver's threads.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keep: int = 1_000_000,
                 on_span: Callable[[ReceivedSpan], None] | None = None) -> None:  # fmt: skip
        self._spans: list[ReceivedSpan] = []
        self._keep = keep
        self._on_span = on_span
        self._arrived = threading.Condition()
        self.received = 0
        self._server = grpc.server(ThreadPoolExecutor(4, thread_name_prefix="otlp-receiver"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Service(self), self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"
        """What a server's ``trace_endpoint`` (or OTEL_EXPORTER_OTLP_ENDPOINT) should say."""
        self._server.start()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._arrived:
            self.received += len(spans)
            self._spans.extend(spans[: max(0, self._keep - len(self._spans))])
            self._arrived.notify_all()
        if self._on_span is not None:
            for span in spans:
                self._on_span(span)

    def spans(self) -> list[ReceivedSpan]:
        """Every span kept so far, in the order they arrived."""
        with self._arrived:
            return list(self._spans)

    def clear(self) -> None:
        """Forget the spans kept so far."""
        with self._arrived:
            self._spans.clear()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout_s: float) -> list[ReceivedSpan]:
        """Wait until ``predicate(spans)`` holds (woken by each export), up to ``timeout_s``; the spans then."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while not predicate(self._spans) and (left := deadline - time.monotonic()) > 0:
                self._arrived.wait(left)
            return list(self._spans)

    def stop(self) -> None:
        """Stop serving at once."""
        self._server.stop(0).wait()

    def __enter__(self) -> SpanReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    """Print each span received, until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    args = parser.parse_args()

    def show(span: ReceivedSpan) -> None:
        print(f"{span.trace_id} {span.span_id} <- {span.parent_span_id or '-':16} {span.duration_ms:9.3f} ms "
              f"{span.name} {span.attributes}", flush=True)  # fmt: skip

    receiver = SpanReceiver(args.host, args.port, on_span=show)
    print(f"receiving OTLP/gRPC spans on {receiver.endpoint}", flush=True)
    try:
        receiver._server.wait_for_termination()
    except KeyboardInterrupt:
        receiver.stop()


if __name__ == "__main__":
    main()
