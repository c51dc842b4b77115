"""Property-based fuzzing of the typed API: the server never crashes, never answers INTERNAL/UNKNOWN.

Short versions run in the suite; ``FUSIONSERVE_FUZZ_EXAMPLES`` raises the count (bench/fuzz runs).
"""

from __future__ import annotations

import os

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc

EXAMPLES = int(os.environ.get("FUSIONSERVE_FUZZ_EXAMPLES", "150"))
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TRIED = {"count": 0}


@pytest.fixture(scope="module")
def raw(server):
    channel = server.channel()
    yield {
        "classify": channel.unary_unary("/fusionserve.v1.FusionService/Classify"),
        "embed": channel.unary_unary("/fusionserve.v1.FusionService/Embed"),
        "stream": channel.stream_stream("/fusionserve.v1.FusionService/ClassifyStream"),
        "stub": pb_grpc.FusionServiceStub(channel),
        "health": health_pb2_grpc.HealthStub(channel),
    }
    print(f"\nfuzz: {TRIED['count']} inputs tried")


def _status(fn) -> grpc.StatusCode:
    TRIED["count"] += 1
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, f"{e.code()}: {e.details()}"
        return e.code()


def _valid(samples) -> bytes:
    item = pb.Item(image=samples[0][0], text=samples[0][1])
    return pb.ClassifyRequest(items=[item], request_id="r").SerializeToString()


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_random_bytes_as_messages(raw, payload):
    _status(lambda: raw["classify"](payload, timeout=10))
    _status(lambda: raw["embed"](payload, timeout=10))
    _status(lambda: list(raw["stream"](iter([payload]), timeout=10)))


@FUZZ
@given(data=st.data())
def test_mutated_valid_messages(raw, samples, data):
    message = bytearray(_valid(samples))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(message) - 1))
        message[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(message)))
    _status(lambda: raw["classify"](bytes(message[:cut]), timeout=10))


def _truncated_or_wrong(samples, data) -> bytes:
    kind = data.draw(st.sampled_from(["random", "truncated", "corrupted", "gif", "tiny", "huge_header"]))
    png = samples[data.draw(st.integers(0, 20))][0]
    if kind == "random":
        return data.draw(st.binary(max_size=4096))
    if kind == "truncated":
        return png[: data.draw(st.integers(0, len(png)))]
    if kind == "corrupted":
        b = bytearray(png)
        for _ in range(data.draw(st.integers(1, 16))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        return bytes(b)
    if kind == "gif":
        return b"GIF89a" + data.draw(st.binary(max_size=64))
    if kind == "tiny":
        ok, buf = cv2.imencode(data.draw(st.sampled_from([".png", ".jpg", ".bmp"])), np.zeros((1, 1, 3), np.uint8))
        return buf.tobytes()
    return png[:16] + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + png[24:]


@FUZZ
@given(data=st.data(), text=st.text(max_size=300))
def test_bad_images_and_arbitrary_unicode_texts(raw, samples, data, text):
    image = _truncated_or_wrong(samples, data)
    stub = raw["stub"]
    request = pb.ClassifyRequest(items=[pb.Item(image=image, text=text), pb.Item(image=samples[1][0], text=text)])
    _status(lambda: stub.Classify(request, timeout=10))
    TRIED["count"] += 1
    (response,) = list(stub.ClassifyStream(iter([request]), timeout=10))
    codes = [r.error.code for r in response.results if r.HasField("error")]
    if response.HasField("error"):
        codes.append(response.error.code)
    assert set(codes) <= {"INVALID_ARGUMENT"}, codes


@FUZZ
@given(text=st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "So", "Lo"]), max_size=50))
def test_control_characters_in_texts(raw, samples, text):
    request = pb.ClassifyRequest(items=[pb.Item(image=samples[2][0], text=text)])
    code = _status(lambda: raw["stub"].Classify(request, timeout=10))
    if text.strip():
        assert code == grpc.StatusCode.OK


def test_server_is_healthy_after_the_fuzzing(raw, samples):
    health = raw["health"].Check(health_pb2.HealthCheckRequest(service="multimodal"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    response = raw["stub"].Classify(pb.ClassifyRequest(items=[pb.Item(image=samples[0][0], text=samples[0][1])]))
    assert response.results[0].label in ("match", "mismatch")


V2_MODELS = ["image_encoder", "text_encoder", "fusion", "multimodal", "nope"]
V2_TYPES = ["FP32", "INT32", "INT64", "BYTES", "FP16", "UINT8", "BOOL", "FP64", "WHAT"]
V2_NAMES = ["image", "tokens", "image_features", "text_features", "IMAGE", "TEXT", "x"]


@pytest.fixture(scope="module")
def v2(server):
    from fusionserve.v2 import grpc_service_pb2, grpc_service_pb2_grpc

    return grpc_service_pb2, grpc_service_pb2_grpc.GRPCInferenceServiceStub(server.channel())


@FUZZ
@given(data=st.data())
def test_v2_random_tensors_wrong_shapes_and_non_finite_values(v2, data):
    pb2, stub = v2
    request = pb2.ModelInferRequest(model_name=data.draw(st.sampled_from(V2_MODELS)))
    raw = data.draw(st.booleans())
    for _ in range(data.draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=data.draw(st.sampled_from(V2_NAMES)),
            datatype=data.draw(st.sampled_from(V2_TYPES)),
            shape=data.draw(st.lists(st.integers(-2, 6), max_size=4)),
        )
        if raw:
            request.raw_input_contents.append(data.draw(st.binary(max_size=512)))
        else:
            floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
            tensor.contents.fp32_contents.extend(data.draw(st.lists(floats, max_size=300)))
            tensor.contents.int_contents.extend(data.draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5)))
    _status(lambda: stub.ModelInfer(request, timeout=10))


@FUZZ
@given(data=st.data())
def test_v2_well_formed_token_tensors_with_any_values(v2, data):
    """Right name, type and shape, any int32 values: a token outside the vocabulary is the caller's error."""
    pb2, stub = v2
    rows = data.draw(st.integers(1, 3))
    in_range = st.integers(0, 9_999)
    tokens = data.draw(st.lists(st.one_of(in_range, st.integers(-(2**31), 2**31 - 1)), min_size=rows * 100,
                                max_size=rows * 100))  # fmt: skip
    request = pb2.ModelInferRequest(model_name="text_encoder")
    request.inputs.add(name="tokens", datatype="INT32", shape=[rows, 100]).contents.int_contents.extend(tokens)
    code = _status(lambda: stub.ModelInfer(request, timeout=10))
    if all(0 <= t < 10_000 for t in tokens):
        assert code == grpc.StatusCode.OK
    else:  # negative ids included: ONNX Gather would take -10000..-1 as counted from the end
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(values=st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1e38, -1e38]), min_size=64,
                       max_size=64))  # fmt: skip
def test_v2_non_finite_features_never_crash_the_fusion_model(v2, values):
    pb2, stub = v2
    request = pb2.ModelInferRequest(model_name="fusion")
    for name in ("image_features", "text_features"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(values)
    assert _status(lambda: stub.ModelInfer(request, timeout=10)) == grpc.StatusCode.OK
