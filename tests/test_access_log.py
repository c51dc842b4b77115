"""The access log: one JSON line per call with its fields, sampling, inputs only when asked, a bounded writer.

Real servers write to a file; the lines are read back once the writer thread has written them
(polled, with a timeout). The writer's bound is tested on a pipe nobody reads.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

from fusionserve.server.access_log import AccessLog, share_logged
from fusionserve.server.calls import Call
from fusionserve.server.settings import ServerSettings
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from fusionserve.v2 import grpc_service_pb2 as v2
from fusionserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.processes import wait_until
from tests.serving import RunningServer

CLASSIFY = "/fusionserve.v1.FusionService/Classify"
STREAM = "/fusionserve.v1.FusionService/ClassifyStream"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def request(samples, **kw) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in samples], **kw)


def fusion_request() -> v2.ModelInferRequest:
    """One row of zeros for the ``fusion`` tensor model, typed contents."""
    inputs = []
    for name in ("image_features", "text_features"):
        tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype="FP32", shape=[1, 64])
        tensor.contents.fp32_contents.extend([0.0] * 64)
        inputs.append(tensor)
    return v2.ModelInferRequest(model_name="fusion", inputs=inputs)


def lines(path: Path, count: int) -> list[dict]:
    """The first ``count`` lines of the log, once the writer thread has written them."""
    assert wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= count, 10), (
        path.read_text() if path.exists() else "no log file")  # fmt: skip
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_call_with_its_fields(repository, tmp_path, samples):
    path = tmp_path / "access.log"
    with RunningServer(repository, access_log="all", access_log_file=path) as server:
        channel = server.channel()
        typed, v2_stub = pb_grpc.FusionServiceStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
        typed.Classify(request(samples[:3]), metadata=[("traceparent", TRACEPARENT)])
        v2_stub.ModelInfer(fusion_request())
        with pytest.raises(grpc.RpcError):
            typed.Classify(request(samples[:1], model="no_such_model"))
        list(typed.ClassifyStream(iter([request(samples[i : i + 1], request_id=f"r{i}") for i in range(2)])))
        got = lines(path, 6)
        assert "fusionserve_access_log_dropped_total 0.0" in urllib.request.urlopen(server.metrics_url).read().decode()
    assert len(got) == 6  # the stream's two requests and the stream itself
    for line in got:
        assert list(line) == ["time", "method", "model", "version", "items", "code", "duration_ms", "queue_ms",
                              "peer", "trace_id", "stream_item"]  # fmt: skip
        assert line["time"].endswith("Z") and line["peer"].startswith("ipv4:127.0.0.1:")
        assert line["duration_ms"] >= line["queue_ms"] >= 0
    unary, tensor, failed, *stream = got
    assert (unary["method"], unary["model"], unary["version"], unary["items"], unary["code"]) == (
        CLASSIFY, "multimodal", 1, 3, "OK")  # fmt: skip
    assert unary["queue_ms"] > 0 and unary["trace_id"] == TRACE  # the caller's trace, tracing off
    assert (tensor["method"], tensor["model"], tensor["version"], tensor["items"], tensor["code"]) == (
        "/inference.GRPCInferenceService/ModelInfer", "fusion", 1, 1, "OK")  # fmt: skip
    assert tensor["trace_id"] is None
    assert (failed["method"], failed["model"], failed["version"], failed["code"]) == (
        CLASSIFY, "_unknown", None, "NOT_FOUND")  # fmt: skip
    items = [line for line in stream if line["stream_item"]]
    (whole,) = [line for line in stream if not line["stream_item"]]
    assert [(i["method"], i["model"], i["items"], i["code"]) for i in items] == [(STREAM, "multimodal", 1, "OK")] * 2
    assert (whole["method"], whole["items"], whole["code"]) == (STREAM, 2, "OK")


def test_inputs_are_logged_only_when_asked(repository, tmp_path, samples):
    for asked in (False, True):
        path = tmp_path / f"access-{asked}.log"
        with RunningServer(repository, access_log="all", access_log_file=path, access_log_inputs=asked) as server:
            pb_grpc.FusionServiceStub(server.channel()).Classify(request(samples[30:32]))
            (line,) = lines(path, 1)
        text = path.read_text()
        images = [base64.b64encode(image).decode() for image, _ in samples[30:32]]
        if asked:
            assert line["texts"] == [t for _, t in samples[30:32]] and line["images"] == images
        else:
            assert "texts" not in line and "images" not in line
            assert not any(caption in text for _, caption in samples[30:32]) and not any(i in text for i in images)


def test_a_share_logs_that_share_of_successes_and_every_failure(repository, tmp_path, samples):
    path = tmp_path / "access.log"
    with RunningServer(repository, access_log="1e-9", access_log_file=path) as server:
        stub = pb_grpc.FusionServiceStub(server.channel())
        for i in range(20):
            stub.Classify(request(samples[i : i + 1]))
        for model in ("nope", "still_nope"):  # lines are written in order: the last one closes the check
            with pytest.raises(grpc.RpcError):
                stub.Classify(request(samples[:1], model=model))
        got = lines(path, 2)
    assert [line["code"] for line in got] == ["NOT_FOUND", "NOT_FOUND"]


def test_the_setting_takes_off_all_or_a_share():
    assert (share_logged("off"), share_logged("all"), share_logged("0.25"), share_logged("ALL")) == (0, 1, 0.25, 1)
    for bad in ("sometimes", "2", "-0.1"):
        with pytest.raises(ValueError, match="access_log"):
            ServerSettings.load(env={"FUSIONSERVE_ACCESS_LOG": bad})
    assert ServerSettings.load(env={"FUSIONSERVE_ACCESS_LOG": "0.01"}).access_log == "0.01"


def test_a_writer_that_falls_behind_drops_lines_and_counts_them_never_blocking_the_caller(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, but nobody reads yet: the pipe fills
    dropped: list[int] = []
    log = AccessLog(1.0, fifo, max_pending=10, on_dropped=lambda: dropped.append(1))
    calls = 3000  # far more than the pipe (64 KiB), the writer's batch and the queue hold
    for _ in range(calls):  # the event loop's side: each write returns at once, full pipe or not
        call = Call(CLASSIFY, "ipv4:127.0.0.1:1", trace=None, trace_id=None, close=log.write)
        call.close()
    assert log.dropped == len(dropped) > 0
    received = bytearray()
    os.set_blocking(reader, True)

    def read_to_the_end() -> None:
        while chunk := os.read(reader, 65536):
            received.extend(chunk)

    drain = threading.Thread(target=read_to_the_end)
    drain.start()
    log.close()
    drain.join(10)
    os.close(reader)
    written = received.decode().splitlines()
    assert len(written) == calls - log.dropped
    assert all(json.loads(line)["method"] == CLASSIFY for line in written)
