"""OpenTelemetry tracing against a real OTLP/gRPC receiver (opentelemetry-proto's collector service).

The span tree of a call, its parent from the caller's ``traceparent`` (typed API, V2 through
tritonclient's headers, streams per request), the attributes, batches shared by calls linked, the
sampler, the standard variables turning it on, and a server without the ``tracing`` extra.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fusionserve.server import tracing
from fusionserve.server.otlp_receiver import ReceivedSpan, SpanReceiver
from fusionserve.server.process import ServerProcess
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.serving import RunningServer

ROOT = Path(__file__).resolve().parent.parent
CALLER_SPAN = "00f067aa0ba902b7"
WAIT_S = 20
PROVIDERS = {"CPUExecutionProvider", "CUDAExecutionProvider"}


def trace_id(n: int) -> str:
    return f"{n:032x}"


def traceparent(trace: str, span: str = CALLER_SPAN, sampled: bool = True) -> str:
    return f"00-{trace}-{span}-{'01' if sampled else '00'}"


def request(samples, **kw) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in samples], **kw)


def wait_for_root(receiver: SpanReceiver, trace: str, name: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """The span named ``name`` of ``trace`` and every span of that trace, once it has arrived.

    A call's span ends after all its children, so they are exported before it or with it.
    """
    spans = receiver.wait_for(lambda got: any(s.trace_id == trace and s.name == name for s in got), WAIT_S)
    ours = [s for s in spans if s.trace_id == trace]
    roots = [s for s in ours if s.name == name]
    assert len(roots) == 1, f"{len(roots)} spans named {name!r} in trace {trace}: {[s.name for s in ours]}"
    return roots[0], ours


@pytest.fixture(scope="module")
def receiver():
    with SpanReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def quick_export():
    """Spans leave the server every 20 ms instead of every 5 s (OpenTelemetry's batch processor delay)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        yield patch


@pytest.fixture(scope="module")
def traced(repository, receiver, quick_export):
    with RunningServer(repository, trace_endpoint=receiver.endpoint) as running:
        yield running


def test_a_calls_spans_form_one_tree_under_the_callers_span(traced, receiver, samples):
    trace = trace_id(1)
    stub = pb_grpc.FusionServiceStub(traced.channel())
    stub.Classify(request(samples[10:12]), metadata=[("traceparent", traceparent(trace))])
    root, spans = wait_for_root(receiver, trace, "fusionserve.v1.FusionService/Classify")

    assert (root.parent_span_id, root.kind) == (CALLER_SPAN, "SERVER")
    assert root.attributes["rpc.grpc.status_code"] == 0 and root.status_code != 2
    assert (root.attributes["rpc.service"], root.attributes["rpc.method"]) == ("fusionserve.v1.FusionService",
                                                                                "Classify")  # fmt: skip
    assert root.attributes["network.peer.address"] == "127.0.0.1"
    assert root.resource["service.name"] == "fusionserve"
    children = {s.name: s for s in spans if s is not root}
    assert len(spans) == len(children) + 1, sorted(s.name for s in spans)
    assert sorted(children) == sorted([
        "admission", "tokenise", "cache image_encoder", "cache text_encoder",
        "queue multimodal", "batch multimodal",  # the call's job, in a batch of the pipeline's
        "decode", "batch image_encoder", "batch text_encoder", "batch fusion",  # the parts of that batch
    ]), sorted(children)  # fmt: skip
    for child in children.values():
        assert child.parent_span_id == root.span_id, child.name
        assert root.start_ns <= child.start_ns <= child.end_ns <= root.end_ns, child.name
    admission = children["admission"].attributes
    assert admission == {"fusionserve.model": "multimodal", "fusionserve.model.version": 1, "fusionserve.items": 2}
    assert children["decode"].attributes["fusionserve.images"] == 2
    assert children["cache image_encoder"].attributes["fusionserve.cache.misses"] == 2
    pipeline, queue = children["batch multimodal"], children["queue multimodal"]
    assert queue.end_ns == pipeline.start_ns  # the wait ends where the run starts
    assert pipeline.attributes["fusionserve.batch.size"] >= 2
    for part in ("decode", "batch image_encoder", "batch text_encoder", "batch fusion"):
        assert pipeline.start_ns <= children[part].start_ns <= children[part].end_ns <= pipeline.end_ns, part
    for model in ("image_encoder", "text_encoder", "fusion"):
        batch = children[f"batch {model}"]
        assert batch.attributes["fusionserve.model"] == model
        assert batch.attributes["fusionserve.model.version"] == 1
        assert batch.attributes["fusionserve.batch.size"] >= 2  # this call's two rows, at least
        assert batch.attributes["fusionserve.batch.calls"] >= 1
        assert batch.attributes["fusionserve.provider"] in PROVIDERS


def test_a_call_without_a_caller_starts_its_own_trace_and_an_unsampled_caller_is_followed(traced, receiver,
                                                                                          samples):  # fmt: skip
    stub = pb_grpc.FusionServiceStub(traced.channel())
    unsampled = trace_id(2)
    receiver.clear()  # the tests before waited for their last spans
    stub.Classify(request(samples[:1]), metadata=[("traceparent", traceparent(unsampled, sampled=False))])
    stub.Classify(request(samples[:1]))
    spans = receiver.wait_for(lambda got: any(s.name == "fusionserve.v1.FusionService/Classify" for s in got),
                              WAIT_S)  # fmt: skip
    # Spans leave in the order they end: the unsampled call's would have come first.
    assert not [s for s in spans if s.trace_id == unsampled]
    (root,) = [s for s in spans if s.name == "fusionserve.v1.FusionService/Classify"]
    assert root.parent_span_id == ""  # a trace of its own
    assert {s.trace_id for s in spans} == {root.trace_id}


def test_each_request_of_a_stream_is_a_span_of_its_own(traced, receiver, samples):
    trace = trace_id(3)
    stub = pb_grpc.FusionServiceStub(traced.channel())
    requests = [request(samples[20 + i : 21 + i], request_id=f"r{i}") for i in range(3)]
    answers = list(stub.ClassifyStream(iter(requests), metadata=[("traceparent", traceparent(trace))]))
    assert sorted(a.request_id for a in answers) == ["r0", "r1", "r2"]
    root, spans = wait_for_root(receiver, trace, "fusionserve.v1.FusionService/ClassifyStream")
    assert root.parent_span_id == CALLER_SPAN
    items = [s for s in spans if s.name == "fusionserve.v1.FusionService/ClassifyStream request"]
    assert len(items) == 3 and all(s.parent_span_id == root.span_id for s in items)
    for item in items:
        mine = {s.name for s in spans if s.parent_span_id == item.span_id}
        assert {"admission", "batch image_encoder", "batch text_encoder", "batch fusion"} <= mine, mine
        assert item.attributes["rpc.grpc.status_code"] == 0


def test_a_failed_call_is_an_error_span_with_its_status(traced, receiver, samples):
    trace = trace_id(4)
    stub = pb_grpc.FusionServiceStub(traced.channel())
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(request(samples[:1], model="no_such_model"), metadata=[("traceparent", traceparent(trace))])
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    root, _ = wait_for_root(receiver, trace, "fusionserve.v1.FusionService/Classify")
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert root.status_code == 2 and root.status_message.startswith("NOT_FOUND: ")
    assert "no_such_model" in root.status_message


@pytest.fixture(scope="module")
def heavy_repository(tmp_path_factory):
    """256×256 tiny graphs: an image-encoder run leaves the event loop, so concurrent calls meet in batches."""
    from tests import tiny_repository

    return tiny_repository.build(tmp_path_factory.mktemp("heavy") / "repo", image_size=(256, 256))


def test_calls_that_share_a_batch_link_to_its_first_calls_batch_span(heavy_repository, receiver, quick_export,
                                                                    samples):  # fmt: skip
    with RunningServer(heavy_repository, trace_endpoint=receiver.endpoint, embedding_cache_mb=0) as server:
        stub = pb_grpc.FusionServiceStub(server.channel())
        receiver.clear()
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: stub.Classify(request([samples[i % 64]])), range(160)))
        spans = receiver.wait_for(
            lambda got: sum(s.name == "fusionserve.v1.FusionService/Classify" for s in got) >= 160, WAIT_S
        )
    batches = {(s.trace_id, s.span_id): s for s in spans if s.name == "batch image_encoder"}
    calls = {(s.trace_id, s.span_id): s for s in spans if s.name == "fusionserve.v1.FusionService/Classify"}
    assert len(batches) == len(calls) == 160  # one run per call, each in its own trace
    followers = [s for s in batches.values() if s.links]
    assert followers, "no two calls shared an image-encoder batch"
    for follower in followers:
        assert len(follower.links) == 1
        leader = batches[follower.links[0]]
        assert not leader.links and leader.trace_id != follower.trace_id  # another call's, the batch's first
        assert (leader.start_ns, leader.end_ns) == (follower.start_ns, follower.end_ns)
        assert leader.attributes == follower.attributes and follower.attributes["fusionserve.batch.calls"] >= 2
        assert (follower.trace_id, follower.parent_span_id) in calls  # still a child of its own call
    shared = [s for s in batches.values() if s.attributes["fusionserve.batch.calls"] >= 2]
    assert len(followers) == len(shared) - sum(1 for s in shared if not s.links)


def test_tritonclient_headers_join_the_callers_trace_unary_and_streaming(traced, receiver, repository, monkeypatch):
    trace = trace_id(5)
    monkeypatch.setenv("FUSIONSERVE_TEST_TRACEPARENT", traceparent(trace))
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "tritonclient_scenarios.py"), "traceparent",
                           traced.target, str(repository)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    root, spans = wait_for_root(receiver, trace, "inference.GRPCInferenceService/ModelStreamInfer")
    (unary,) = [s for s in spans if s.name == "inference.GRPCInferenceService/ModelInfer"]
    for call in (unary, root):
        assert call.parent_span_id == CALLER_SPAN and call.trace_state == "fusionserve=test", call.name
    unary_children = {s.name for s in spans if s.parent_span_id == unary.span_id}
    assert {"admission", "decode", "batch image_encoder", "batch fusion"} <= unary_children, unary_children
    items = [s for s in spans if s.parent_span_id == root.span_id]
    assert [s.name for s in items] == ["inference.GRPCInferenceService/ModelStreamInfer request"] * 2


def test_the_standard_variables_turn_tracing_on_and_choose_the_sampler(repository, samples, monkeypatch):
    with SpanReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "fusion-canary")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")  # no trace of its own; callers' decisions followed
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
        with RunningServer(repository) as server:
            stub = pb_grpc.FusionServiceStub(server.channel())
            stub.Classify(request(samples[:1]))
            stub.Classify(request(samples[:1]), metadata=[("traceparent", traceparent(trace_id(6), sampled=False))])
            stub.Classify(request(samples[:1]), metadata=[("traceparent", traceparent(trace_id(7)))])
            root, _ = wait_for_root(receiver, trace_id(7), "fusionserve.v1.FusionService/Classify")
        assert root.resource["service.name"] == "fusion-canary"
        assert {s.trace_id for s in receiver.spans()} == {trace_id(7)}  # the other two were not sampled


def test_tracing_is_off_unless_asked_for(repository, samples):
    assert tracing.asked_by("", {}) is None
    assert tracing.asked_by("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}) == (
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")  # fmt: skip
    assert tracing.asked_by("http://c:4317", {}) == "trace_endpoint"
    for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        assert tracing.asked_by("http://c:4317", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", **off}) is None
    with RunningServer(repository) as server:
        assert server.server.observer is None  # no interceptor, no call records: the hooks see None
        stub = pb_grpc.FusionServiceStub(server.channel())
        assert len(stub.Classify(request(samples[:1]), metadata=[("traceparent", traceparent(trace_id(8)))]).results)


@pytest.fixture(scope="module")
def without_opentelemetry(tmp_path_factory) -> dict[str, str]:
    """The environment of a Python that cannot import opentelemetry (as without the ``tracing`` extra)."""
    folder = tmp_path_factory.mktemp("no-otel")
    (folder / "sitecustomize.py").write_text('import sys\nsys.modules["opentelemetry"] = None\n')
    path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "PYTHONPATH": path}


def test_without_the_tracing_extra_asking_for_tracing_is_one_line_naming_it(repository, without_opentelemetry):
    env = {**without_opentelemetry, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    done = subprocess.run([sys.executable, "-m", "fusionserve", "serve", "--repository", str(repository),
                           "--port", "0", "--metrics-port", "-1"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fusionserve serve: error: tracing (asked for by OTEL_EXPORTER_OTLP_ENDPOINT) needs the tracing extra: "
        "pip install 'fusionserve[tracing]' (missing: opentelemetry.sdk, opentelemetry.exporter.otlp.proto.grpc)"
    ]


def test_without_the_tracing_extra_a_server_serves_unchanged(repository, without_opentelemetry, samples):
    env = {**without_opentelemetry, "FUSIONSERVE_ACCESS_LOG": "all"}  # the access log needs no extra either
    with ServerProcess(repository, env=env) as server:
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.FusionServiceStub(channel)
        assert len(stub.Classify(request(samples[:2])).results) == 2
        channel.close()
        assert server.close() == 0
    assert '"method": "/fusionserve.v1.FusionService/Classify"' in "".join(server.log)


def test_spans_dropped_by_a_full_export_queue_are_one_warning_a_minute(receiver, monkeypatch, caplog):
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")  # the exporter falls behind at once
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    traced = tracing.Tracing(receiver.endpoint)
    caplog.set_level("WARNING", logger="opentelemetry")
    for _ in range(200):
        call = traced.start("/fusionserve.v1.FusionService/Classify", [], "", 0.0)
        assert call is not None
        for _ in range(5):
            call.span("decode", 0.0, 0.001, {})
        call.end(0.002, "OK", "")
    traced.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "Queue full" in r.getMessage()]
    assert len(warnings) == 1 and "spans dropped in the last minute" in warnings[0], warnings
