"""The Open Inference Protocol (KServe V2) front-end, through our own stubs against a real server."""

from __future__ import annotations

import json
import queue
import shutil
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from fusionserve import __version__
from fusionserve.v1 import fusion_pb2, fusion_pb2_grpc
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2 import grpc_service_pb2_grpc as pb_grpc
from fusionserve.v2 import model_config_pb2 as mc
from fusionserve.v2_codec import decode_outputs, to_raw
from tests.device import ATOL
from tests.serving import RunningServer
from tests.tiny_repository import add_version

MODELS = ("image_encoder", "text_encoder", "fusion", "multimodal")
TYPED_FIELD = {"FP32": "fp32_contents", "INT32": "int_contents", "BYTES": "bytes_contents"}
NP_DTYPE = {"FP32": np.float32, "INT32": np.int32, "BYTES": np.object_}


# ---- helpers -----------------------------------------------------------------------------------
def config_of(repository: Path, model: str) -> dict:
    return json.loads((repository / model / "1" / "config.json").read_text())


def make_request(model: str, tensors: dict, *, typed: bool = False, outputs=(), **fields) -> pb.ModelInferRequest:
    """``tensors``: name → (datatype, array). Raw contents unless ``typed``."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    for name, (datatype, array) in tensors.items():
        array = np.asarray(array, dtype=NP_DTYPE[datatype])
        tensor = request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        if typed:
            values = array.reshape(-1).tolist()
            getattr(tensor.contents, TYPED_FIELD[datatype]).extend(values)
        else:
            request.raw_input_contents.append(to_raw(array, datatype))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs of a response, raw or typed, as NumPy arrays."""
    return decode_outputs(response)


def infer_error(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=30)
    return info.value


def stream(stub, requests: list[pb.ModelInferRequest], timeout: float = 60) -> list[pb.ModelStreamInferResponse]:
    return list(stub.ModelStreamInfer(iter(requests), timeout=timeout))


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(server):
    channel = server.channel()
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def sessions(repository: Path) -> dict[str, ort.InferenceSession]:
    """onnxruntime sessions on the repository's files: the reference the server must match."""
    return {
        m: ort.InferenceSession(str(repository / m / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for m in ("image_encoder", "text_encoder", "fusion")
    }


@pytest.fixture(scope="module")
def tensor_inputs(repository: Path) -> dict[str, dict]:
    """Inputs (name → (datatype, array)) for each tensor model, batch of 3."""
    rng = np.random.default_rng(7)
    feats = config_of(repository, "fusion")["inputs"]
    max_words = json.loads((repository / "multimodal" / "1" / "vocab.json").read_text())["max_words"]
    return {
        "image_encoder": {"image": ("FP32", rng.random((3, 64, 64, 3), dtype=np.float32))},
        "text_encoder": {"tokens": ("INT32", rng.integers(0, max_words, (3, 100), dtype=np.int32))},
        "fusion": {t["name"]: ("FP32", rng.standard_normal((3, t["shape"][1])).astype(np.float32)) for t in feats},
    }


def multimodal_inputs(samples, n: int = 3, start: int = 0) -> dict:
    items = samples[start : start + n]
    return {
        "IMAGE": ("BYTES", np.array([img for img, _ in items], dtype=np.object_)),
        "TEXT": ("BYTES", np.array([cap.encode() for _, cap in items], dtype=np.object_)),
    }


# ---- health and metadata -----------------------------------------------------------------------
def test_server_live_ready_and_metadata(stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert (meta.name, meta.version) == ("fusionserve", __version__)
    assert list(meta.extensions) == ["model_configuration", "model_repository", "statistics"]


@pytest.mark.parametrize("model", MODELS)
def test_model_ready(stub, model):
    assert stub.ModelReady(pb.ModelReadyRequest(name=model)).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=model, version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name=model, version="99")).ready


def test_model_ready_unknown_and_bad_version(stub):
    assert not stub.ModelReady(pb.ModelReadyRequest(name="no_such_model")).ready
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelReady(pb.ModelReadyRequest(name="fusion", version="latest"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_matches_the_repository(stub, repository, model):
    config = config_of(repository, model)
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model))
    assert (meta.name, list(meta.versions), meta.platform) == (model, ["1"], config["platform"])
    # An input of one value per row ([-1] in the repository) is described as [-1, 1], Triton's form.
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        (t["name"], t["datatype"], t["shape"] + [1] if len(t["shape"]) == 1 else t["shape"]) for t in config["inputs"]
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        (t["name"], t["datatype"], t["shape"]) for t in config["outputs"]
    ]
    assert stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version="1")) == meta


def test_multimodal_metadata_is_the_documented_interface(stub):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="multimodal"))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("IMAGE", "BYTES", [-1, 1]),
        ("TEXT", "BYTES", [-1, 1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("PROBABILITIES", "FP32", [-1, 2]),
        ("LABEL", "BYTES", [-1]),
    ]


@pytest.mark.parametrize(
    ("name", "version", "code"),
    [
        ("no_such_model", "", grpc.StatusCode.NOT_FOUND),
        ("fusion", "7", grpc.StatusCode.NOT_FOUND),
        ("fusion", "1.0", grpc.StatusCode.INVALID_ARGUMENT),
        ("../etc", "", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_model_metadata_errors(stub, name, version, code):
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version))
    assert info.value.code() == code


def test_reflection_lists_the_v2_service(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel = server.channel()
    try:
        assert "inference.GRPCInferenceService" in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        channel.close()


# ---- inference round trips ---------------------------------------------------------------------
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
@pytest.mark.parametrize("model", ["image_encoder", "text_encoder", "fusion"])
def test_tensor_models_match_onnxruntime(stub, sessions, tensor_inputs, model, typed):
    inputs = tensor_inputs[model]
    request = make_request(model, inputs, typed=typed, id=f"{model}-{typed}")
    response = stub.ModelInfer(request, timeout=30)
    assert (response.model_name, response.model_version, response.id) == (model, "1", f"{model}-{typed}")
    # Answered the way it was asked: raw for raw, typed for typed, never both.
    assert bool(response.raw_output_contents) is not typed
    assert all(bool(o.contents.ByteSize()) is typed for o in response.outputs)
    session = sessions[model]
    want = dict(
        zip(
            [o.name for o in session.get_outputs()],
            session.run(None, {k: a for k, (_, a) in inputs.items()}),
            strict=True,
        )
    )
    got = decode(response)
    assert list(got) == [o.name for o in session.get_outputs()]
    for name, value in got.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_multimodal_round_trip(stub, samples, repository, typed):
    labels = config_of(repository, "multimodal")["labels"]
    response = stub.ModelInfer(make_request("multimodal", multimodal_inputs(samples, 4), typed=typed), timeout=30)
    assert bool(response.raw_output_contents) is not typed
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("PROBABILITIES", "FP32", [4, 2]),
        ("LABEL", "BYTES", [4]),
    ]
    out = decode(response)
    np.testing.assert_allclose(out["PROBABILITIES"].sum(axis=1), 1.0, rtol=1e-5)
    assert [x.decode() for x in out["LABEL"]] == [labels[i] for i in out["PROBABILITIES"].argmax(axis=1)]


def test_multimodal_takes_its_inputs_as_n_by_1_too(stub, samples):
    """[n, 1] is how the metadata describes IMAGE and TEXT (Triton's form); [n] stays accepted."""
    flat = multimodal_inputs(samples, 3)
    column = {name: (datatype, array.reshape(-1, 1)) for name, (datatype, array) in flat.items()}
    a = decode(stub.ModelInfer(make_request("multimodal", flat), timeout=30))
    b = decode(stub.ModelInfer(make_request("multimodal", column), timeout=30))
    np.testing.assert_array_equal(a["PROBABILITIES"], b["PROBABILITIES"])
    assert list(a["LABEL"]) == list(b["LABEL"])


# ---- ModelConfig and ModelStatistics (Triton's extensions, what perf_analyzer reads) -------------
CONFIG_TYPES = {"FP32": mc.TYPE_FP32, "INT32": mc.TYPE_INT32, "BYTES": mc.TYPE_STRING}


@pytest.mark.parametrize("model", MODELS)
def test_model_config_describes_the_repositorys_model(stub, repository, model):
    want = config_of(repository, model)
    config = stub.ModelConfig(pb.ModelConfigRequest(name=model)).config
    assert (config.name, config.platform, config.max_batch_size) == (model, want["platform"], want["max_batch_size"])
    assert config.backend == ("fusionserve" if model == "multimodal" else "onnxruntime")
    for got, declared in ((config.input, want["inputs"]), (config.output, want["outputs"])):
        assert [t.name for t in got] == [t["name"] for t in declared]
        for tensor, spec in zip(got, declared, strict=True):
            assert tensor.data_type == CONFIG_TYPES[spec["datatype"]]
            # Without the batch dimension; one value per row is dims [1] with an empty reshape.
            assert list(tensor.dims) == (spec["shape"][1:] or [1])
            assert tensor.HasField("reshape") == (len(spec["shape"]) == 1)
    assert config.HasField("dynamic_batching") == (model != "multimodal")
    assert stub.ModelConfig(pb.ModelConfigRequest(name=model, version="1")) == pb.ModelConfigResponse(config=config)


@pytest.mark.parametrize(
    ("name", "version", "code"),
    [("no_such_model", "", grpc.StatusCode.NOT_FOUND), ("fusion", "7", grpc.StatusCode.NOT_FOUND),
     ("fusion", "x", grpc.StatusCode.INVALID_ARGUMENT)],
)  # fmt: skip
def test_model_config_and_statistics_errors(stub, name, version, code):
    for call, request in ((stub.ModelConfig, pb.ModelConfigRequest), (stub.ModelStatistics, pb.ModelStatisticsRequest)):
        with pytest.raises(grpc.RpcError) as info:
            call(request(name=name, version=version))
        assert info.value.code() == code


def _stats(stub, name: str = "") -> dict[str, pb.ModelStatistics]:
    return {s.name: s for s in stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)).model_stats}


def test_model_statistics_count_what_was_served(stub, samples, tensor_inputs):
    before = _stats(stub)
    assert set(before) == set(MODELS) and all(s.version == "1" for s in before.values())
    stub.ModelInfer(make_request("multimodal", multimodal_inputs(samples, 3)), timeout=30)
    stub.ModelInfer(make_request("multimodal", multimodal_inputs(samples, 2, start=3)), timeout=30)
    bad = multimodal_inputs(samples, 1)
    bad["IMAGE"] = ("BYTES", np.array([b"not an image"], np.object_))
    infer_error(stub, make_request("multimodal", bad))
    after = _stats(stub)
    pipe, pipe0 = after["multimodal"], before["multimodal"]
    assert pipe.inference_stats.success.count - pipe0.inference_stats.success.count == 2
    assert pipe.inference_stats.fail.count - pipe0.inference_stats.fail.count == 1
    assert pipe.inference_count - pipe0.inference_count == 5  # items of the successful runs
    assert pipe.execution_count - pipe0.execution_count == 2
    assert pipe.inference_stats.queue.count - pipe0.inference_stats.queue.count == 2
    assert pipe.inference_stats.success.ns > pipe0.inference_stats.success.ns
    assert pipe.last_inference > 0 and pipe.last_inference >= pipe0.last_inference
    # Its steps count their own batches; a step's counts agree with its per-batch-size breakdown. The
    # image encoder looked 6 images up in the embedding cache; what missed and decoded was computed.
    image, image0 = after["image_encoder"], before["image_encoder"]
    hits = image.inference_stats.cache_hit.count - image0.inference_stats.cache_hit.count
    misses = image.inference_stats.cache_miss.count - image0.inference_stats.cache_miss.count
    assert hits + misses == 6
    assert image.inference_count - image0.inference_count == misses - 1  # the bad image never reached the model
    assert image.execution_count == sum(b.compute_infer.count for b in image.batch_stats)
    assert image.inference_count == sum(b.batch_size * b.compute_infer.count for b in image.batch_stats)
    for part in ("compute_input", "compute_output"):  # perf_analyzer requires the three counts to agree
        assert getattr(image.inference_stats, part).count == image.inference_stats.compute_infer.count
    # A direct V2 call on a tensor model: one request, queued once.
    stub.ModelInfer(make_request("fusion", tensor_inputs["fusion"]), timeout=30)
    fusion = _stats(stub, "fusion")["fusion"]
    assert fusion.inference_stats.success.count - after["fusion"].inference_stats.success.count == 1
    assert fusion.inference_stats.queue.count > after["fusion"].inference_stats.queue.count


def test_multimodal_matches_typed_classify(server, stub, samples):
    channel = server.channel()
    try:
        typed = fusion_pb2_grpc.FusionServiceStub(channel).Classify(
            fusion_pb2.ClassifyRequest(items=[fusion_pb2.Item(image=img, text=cap) for img, cap in samples[10:16]]),
            timeout=30,
        )
    finally:
        channel.close()
    v2 = decode(stub.ModelInfer(make_request("multimodal", multimodal_inputs(samples, 6, start=10)), timeout=30))
    want = np.array([list(r.probabilities) for r in typed.results], dtype=np.float32)
    np.testing.assert_allclose(v2["PROBABILITIES"], want, rtol=0, atol=1e-6)
    assert [x.decode() for x in v2["LABEL"]] == [r.label for r in typed.results]


def test_multimodal_matches_the_three_tensor_models(stub, samples, repository):
    """The pipeline over V2 equals chaining its steps over V2 with the shared preprocessing."""
    from fusionserve.preprocess import Vocabulary, decode_image, preprocess_image

    items = samples[20:23]
    vocab = Vocabulary.load(repository / "multimodal" / "1" / "vocab.json")
    images = np.stack([preprocess_image(decode_image(img), 64, 64) for img, _ in items])
    tokens = vocab.encode([cap for _, cap in items])
    image_features = decode(stub.ModelInfer(make_request("image_encoder", {"image": ("FP32", images)})))
    text_features = decode(stub.ModelInfer(make_request("text_encoder", {"tokens": ("INT32", tokens)})))
    fused = decode(
        stub.ModelInfer(
            make_request(
                "fusion",
                {
                    "image_features": ("FP32", image_features["image_features"]),
                    "text_features": ("FP32", text_features["text_features"]),
                },
            )
        )
    )
    pipeline = decode(stub.ModelInfer(make_request("multimodal", multimodal_inputs(samples, 3, start=20))))
    np.testing.assert_allclose(pipeline["PROBABILITIES"], fused["probabilities"], atol=1e-6)


@pytest.mark.parametrize(
    ("typed", "flag", "raw_expected"),
    [(False, False, False), (True, True, True), (False, None, True), (True, None, False)],
)
def test_binary_data_output_parameter_overrides_the_form(stub, tensor_inputs, typed, flag, raw_expected):
    request = make_request("fusion", tensor_inputs["fusion"], typed=typed)
    if flag is not None:
        request.parameters["binary_data_output"].bool_param = flag
    response = stub.ModelInfer(request, timeout=30)
    assert bool(response.raw_output_contents) is raw_expected
    baseline = decode(stub.ModelInfer(make_request("fusion", tensor_inputs["fusion"]), timeout=30))
    np.testing.assert_allclose(decode(response)["probabilities"], baseline["probabilities"], atol=1e-6)


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
@pytest.mark.parametrize(
    "wanted", [["LABEL", "PROBABILITIES"], ["PROBABILITIES", "LABEL"], ["LABEL"], ["PROBABILITIES"]]
)
def test_requested_outputs_and_their_order(stub, samples, typed, wanted):
    request = make_request("multimodal", multimodal_inputs(samples, 2), typed=typed, outputs=wanted)
    response = stub.ModelInfer(request, timeout=30)
    assert [o.name for o in response.outputs] == wanted
    assert len(response.raw_output_contents) == (0 if typed else len(wanted))
    full = decode(stub.ModelInfer(make_request("multimodal", multimodal_inputs(samples, 2)), timeout=30))
    got = decode(response)
    for name in wanted:
        if name == "LABEL":
            assert list(got[name]) == list(full[name])
        else:
            np.testing.assert_allclose(got[name], full[name], atol=1e-6)


def test_model_version_latest_and_explicit(stub, tensor_inputs):
    for version in ("", "1"):
        request = make_request("fusion", tensor_inputs["fusion"], model_version=version, id="abc")
        response = stub.ModelInfer(request, timeout=30)
        assert (response.model_version, response.id) == ("1", "abc")


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_nan_and_inf_inputs_answer_what_the_graph_computes(stub, sessions, typed):
    """NaN and ±Inf are values like any other: the answer is onnxruntime's for them, row by row, and
    a clean row batched with them stays finite."""
    image = np.zeros((3, 64, 64, 3), np.float32)
    image[0, 0, 0, 0], image[1, 5, 5, 1], image[1, 6, 6, 2] = np.nan, np.inf, -np.inf
    out = decode(stub.ModelInfer(make_request("image_encoder", {"image": ("FP32", image)}, typed=typed)))
    want = sessions["image_encoder"].run(None, {"image": image})[0]
    np.testing.assert_allclose(out["image_features"], want, atol=ATOL)  # NaN where onnxruntime gives NaN
    assert np.isnan(out["image_features"][:2]).any() and np.isfinite(out["image_features"][2]).all()
    image_features = np.full((2, 64), np.nan, np.float32)
    image_features[1] = 0.5
    text_features = np.full((2, 64), np.inf, np.float32)
    text_features[1] = 0.5
    fused = {"image_features": ("FP32", image_features), "text_features": ("FP32", text_features)}
    out = decode(stub.ModelInfer(make_request("fusion", fused, typed=typed)))
    want = sessions["fusion"].run(None, {"image_features": image_features, "text_features": text_features})[0]
    np.testing.assert_allclose(out["probabilities"], want, atol=ATOL)
    assert np.isnan(out["probabilities"][0]).all() and np.isfinite(out["probabilities"][1]).all()
    assert stub.ServerLive(pb.ServerLiveRequest()).live


def test_timeout_parameter_is_a_deadline(stub, tensor_inputs):
    request = make_request("image_encoder", tensor_inputs["image_encoder"])
    request.parameters["timeout"].int64_param = 1  # microseconds: gone before the batch runs
    assert infer_error(stub, request).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    request.parameters["timeout"].int64_param = 30_000_000
    assert decode(stub.ModelInfer(request, timeout=30))["image_features"].shape == (3, 64)


def test_v2_calls_are_counted_in_metrics(server, stub, tensor_inputs):
    stub.ModelInfer(make_request("fusion", tensor_inputs["fusion"]), timeout=30)
    stream(stub, [make_request("fusion", tensor_inputs["fusion"])])
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'fusionserve_requests_total{api="v2",code="OK",model="fusion",version="1"}' in text
    assert 'fusionserve_requests_total{api="v2_stream",code="OK",model="fusion",version="1"}' in text


def test_requests_are_counted_under_the_version_that_served_or_failed_them(repository, tmp_path, tensor_inputs):
    repo = Path(shutil.copytree(repository, tmp_path / "repo"))
    add_version(repo, 2, seed=1)
    with RunningServer(repo, model_version_policy={"fusion": "all"}) as srv:
        stub = pb_grpc.GRPCInferenceServiceStub(srv.channel())
        for version in ("1", "2", "2", ""):  # "" is the latest: 2
            stub.ModelInfer(make_request("fusion", tensor_inputs["fusion"], model_version=version), timeout=30)
        # Refused by the V2 layer (an output the model lacks), and by the core (a tensor of the wrong shape).
        unknown_output = make_request("fusion", tensor_inputs["fusion"], outputs=("nope",), model_version="1")
        wrong_shape = make_request("fusion", {"image_features": ("FP32", np.zeros((1, 3), np.float32))},
                                   model_version="2")  # fmt: skip
        for bad in (unknown_output, wrong_shape):
            assert infer_error(stub, bad).code() == grpc.StatusCode.INVALID_ARGUMENT
        missing = make_request("fusion", tensor_inputs["fusion"], model_version="7")
        assert infer_error(stub, missing).code() == grpc.StatusCode.NOT_FOUND

        def count(version: str, code: str) -> float:
            labels = {"model": "fusion", "version": version, "api": "v2", "code": code}
            return srv.server.metrics.registry.get_sample_value("fusionserve_requests_total", labels) or 0.0

        assert (count("1", "OK"), count("2", "OK"), count("1", "INVALID_ARGUMENT"), count("2", "INVALID_ARGUMENT"),
                count("", "NOT_FOUND")) == (1, 3, 1, 1, 1)  # fmt: skip
        latency = {"model": "fusion", "version": "2", "api": "v2"}  # answered or refused, each request counts
        assert srv.server.metrics.registry.get_sample_value("fusionserve_request_latency_seconds_count", latency) == 4


# ---- bad requests --------------------------------------------------------------------------------
def _image(n: int = 1) -> np.ndarray:
    return np.zeros((n, 64, 64, 3), np.float32)


def _features(n: int = 1) -> np.ndarray:
    return np.zeros((n, 64), np.float32)


def _png(samples) -> bytes:
    return samples[0][0]


def case_unknown_model(s):
    return make_request("no_such_model", {"image": ("FP32", _image())})


def case_unknown_version(s):
    return make_request("image_encoder", {"image": ("FP32", _image())}, model_version="9")


def case_bad_version(s):
    return make_request("image_encoder", {"image": ("FP32", _image())}, model_version="v1")


def case_zero_version(s):
    return make_request("image_encoder", {"image": ("FP32", _image())}, model_version="0")


def case_unknown_input(s):
    return make_request("image_encoder", {"image": ("FP32", _image()), "extra": ("FP32", _image())})


def case_missing_input(s):
    return make_request("fusion", {"image_features": ("FP32", _features())})


def case_wrong_datatype(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.inputs[0].datatype = "FP64"
    request.raw_input_contents[0] = _image().astype(np.float64).tobytes()
    return request


def case_unknown_datatype(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.inputs[0].datatype = "FLOAT32"
    return request


def case_raw_too_short(s):
    request = make_request("image_encoder", {"image": ("FP32", _image(2))})
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
    return request


def case_raw_count_shape_mismatch(s):
    request = make_request("image_encoder", {"image": ("FP32", _image(1))})
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([2, 64, 64, 3])
    return request


def case_typed_count_mismatch(s):
    request = make_request(
        "fusion", {"image_features": ("FP32", _features()), "text_features": ("FP32", _features())}, typed=True
    )
    request.inputs[1].contents.fp32_contents.append(1.0)
    return request


def case_typed_wrong_field(s):
    request = make_request(
        "fusion", {"image_features": ("FP32", _features()), "text_features": ("FP32", _features())}, typed=True
    )
    request.inputs[0].contents.ClearField("fp32_contents")
    request.inputs[0].contents.int_contents.extend([0] * 64)
    return request


def case_typed_and_raw(s):
    request = make_request("fusion", {"image_features": ("FP32", _features()), "text_features": ("FP32", _features())})
    request.inputs[1].contents.fp32_contents.extend([0.0] * 64)
    return request


def case_raw_count_vs_inputs(s):
    request = make_request("fusion", {"image_features": ("FP32", _features()), "text_features": ("FP32", _features())})
    del request.raw_input_contents[1]
    return request


def case_shape_not_the_models(s):
    return make_request("image_encoder", {"image": ("FP32", np.zeros((1, 32, 32, 3), np.float32))})


def case_negative_dimension(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.inputs[0].shape[0] = -1
    return request


def case_duplicate_input(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.inputs.append(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    return request


def case_batch_over_maximum(s):
    # max_batch_size of the session repository's text encoder is read from its config below
    return make_request("text_encoder", {"tokens": ("INT32", np.zeros((s["max_batch"] + 1, 100), np.int32))})


def case_bytes_truncated_prefix(s):
    request = make_request("multimodal", multimodal_inputs(s["samples"], 1))
    request.raw_input_contents[0] += b"\x01\x00"
    return request


def case_bytes_length_past_end(s):
    request = make_request("multimodal", multimodal_inputs(s["samples"], 1))
    request.raw_input_contents[0] = (10_000_000).to_bytes(4, "little") + b"abc"
    return request


def case_bytes_count_mismatch(s):
    request = make_request("multimodal", multimodal_inputs(s["samples"], 2))
    request.inputs[0].shape[0] = 3
    return request


def case_batch_sizes_differ(s):
    inputs = multimodal_inputs(s["samples"], 2)
    inputs["TEXT"] = ("BYTES", inputs["TEXT"][1][:1])
    return make_request("multimodal", inputs)


def case_text_not_utf8(s):
    inputs = multimodal_inputs(s["samples"], 1)
    inputs["TEXT"] = ("BYTES", np.array([b"\xff\xfe bad"], dtype=np.object_))
    return make_request("multimodal", inputs)


def case_image_not_an_image(s):
    inputs = multimodal_inputs(s["samples"], 1)
    inputs["IMAGE"] = ("BYTES", np.array([b"definitely not a png"], dtype=np.object_))
    return make_request("multimodal", inputs)


def case_unknown_output(s):
    return make_request("multimodal", multimodal_inputs(s["samples"], 1), outputs=["LABEL", "LOGITS"])


def case_output_twice(s):
    return make_request("multimodal", multimodal_inputs(s["samples"], 1), outputs=["LABEL", "LABEL"])


def case_classification(s):
    request = make_request(
        "fusion",
        {"image_features": ("FP32", _features()), "text_features": ("FP32", _features())},
        outputs=["probabilities"],
    )
    request.outputs[0].parameters["classification"].int64_param = 1
    return request


def case_sequence_id(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.parameters["sequence_id"].int64_param = 42
    return request


def case_shared_memory(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.inputs[0].parameters["shared_memory_region"].string_param = "region0"
    return request


def case_binary_data_output_not_bool(s):
    request = make_request("image_encoder", {"image": ("FP32", _image())})
    request.parameters["binary_data_output"].string_param = "yes"
    return request


def case_token_out_of_the_vocabulary(s):
    tokens = np.zeros((1, 100), np.int32)
    tokens[0, 3] = 10_000  # the embedding has 10,000 rows
    return make_request("text_encoder", {"tokens": ("INT32", tokens)})


def case_negative_token(s):
    # ONNX Gather takes -10000..-1 as counted from the end: the server must refuse it before onnxruntime.
    tokens = np.zeros((2, 100), np.int32)
    tokens[1, 7] = -1
    return make_request("text_encoder", {"tokens": ("INT32", tokens)})


def case_empty_batch(s):
    return make_request("image_encoder", {"image": ("FP32", np.zeros((0, 64, 64, 3), np.float32))})


INVALID = grpc.StatusCode.INVALID_ARGUMENT
ERROR_CASES = [
    (case_unknown_model, grpc.StatusCode.NOT_FOUND, "no_such_model"),
    (case_unknown_version, grpc.StatusCode.NOT_FOUND, "version 9"),
    (case_bad_version, INVALID, "model_version"),
    (case_zero_version, INVALID, "model_version"),
    (case_unknown_input, INVALID, "'extra'"),
    (case_missing_input, INVALID, "'text_features'"),
    (case_wrong_datatype, INVALID, "'image'"),
    (case_unknown_datatype, INVALID, "'image'"),
    (case_raw_too_short, INVALID, "'image'"),
    (case_raw_count_shape_mismatch, INVALID, "'image'"),
    (case_typed_count_mismatch, INVALID, "'text_features'"),
    (case_typed_wrong_field, INVALID, "'image_features'"),
    (case_typed_and_raw, INVALID, "'text_features'"),
    (case_raw_count_vs_inputs, INVALID, "raw_input_contents"),
    (case_shape_not_the_models, INVALID, "'image'"),
    (case_negative_dimension, INVALID, "'image'"),
    (case_duplicate_input, INVALID, "'image'"),
    (case_batch_over_maximum, INVALID, "maximum"),
    (case_bytes_truncated_prefix, INVALID, "'IMAGE'"),
    (case_bytes_length_past_end, INVALID, "'IMAGE'"),
    (case_bytes_count_mismatch, INVALID, "'IMAGE'"),
    (case_batch_sizes_differ, INVALID, "batch size"),
    (case_text_not_utf8, INVALID, "'TEXT'"),
    (case_image_not_an_image, INVALID, "accepted format"),
    (case_unknown_output, INVALID, "'LOGITS'"),
    (case_output_twice, INVALID, "'LABEL'"),
    (case_classification, INVALID, "classification"),
    (case_sequence_id, INVALID, "sequence"),
    (case_shared_memory, INVALID, "'image'"),
    (case_binary_data_output_not_bool, INVALID, "binary_data_output"),
    (case_empty_batch, INVALID, "empty"),
    (case_token_out_of_the_vocabulary, INVALID, "input 'tokens': values must lie in [0, 10000)"),
    (case_negative_token, INVALID, "model 'text_encoder'), got -1 at flat index 107"),
]


@pytest.fixture(scope="module")
def case_env(repository, samples) -> dict:
    return {"samples": samples, "max_batch": config_of(repository, "text_encoder")["max_batch_size"]}


@pytest.mark.parametrize("call", ["unary", "stream"])
@pytest.mark.parametrize(("build", "code", "needle"), ERROR_CASES, ids=[c[0].__name__[5:] for c in ERROR_CASES])
def test_bad_requests(stub, case_env, build, code, needle, call):
    request = build(case_env)
    request.id = "bad-one"
    if call == "unary":
        error = infer_error(stub, request)
        assert error.code() == code, error.details()
        assert needle in error.details()
    else:
        (response,) = stream(stub, [request])
        assert response.error_message.startswith(f"{code.name}: "), response.error_message
        assert needle in response.error_message
        assert response.infer_response.id == "bad-one"


def test_errors_do_not_leak_internals_and_server_stays_up(stub, case_env):
    for build, _, _ in ERROR_CASES:
        try:
            stub.ModelInfer(build(case_env), timeout=30)
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.INTERNAL and "Traceback" not in e.details()
    assert stub.ServerReady(pb.ServerReadyRequest()).ready


# ---- streaming -------------------------------------------------------------------------------
def test_stream_answers_every_request_with_errors_in_band(stub, samples, tensor_inputs):
    requests = [
        make_request("multimodal", multimodal_inputs(samples, 2, start=30), id="mm-0"),
        make_request("multimodal", multimodal_inputs(samples, 1), outputs=["NOPE"], id="bad-1"),
        make_request("fusion", tensor_inputs["fusion"], id="fusion-2", typed=True),
        make_request("no_such_model", tensor_inputs["fusion"], id="bad-3"),
        make_request("multimodal", multimodal_inputs(samples, 3, start=40), id="mm-4", outputs=["LABEL"]),
    ]
    responses = {r.infer_response.id: r for r in stream(stub, requests)}
    assert sorted(responses) == sorted(r.id for r in requests)
    assert "'NOPE'" in responses["bad-1"].error_message
    assert responses["bad-3"].error_message.startswith("NOT_FOUND: ")
    for good in ("mm-0", "fusion-2", "mm-4"):
        assert responses[good].error_message == ""
        unary = stub.ModelInfer(next(r for r in requests if r.id == good), timeout=30)
        got, want = decode(responses[good].infer_response), decode(unary)
        assert list(got) == list(want)
        for name in want:
            if want[name].dtype == np.object_:
                assert list(got[name]) == list(want[name])
            else:
                np.testing.assert_allclose(got[name], want[name], atol=1e-6)


def test_stream_continues_after_an_error(stub, tensor_inputs):
    """One request at a time: the bad one is answered in-band, then the same stream still serves."""
    outbox: queue.Queue = queue.Queue()
    inbox: queue.Queue = queue.Queue()
    responses = stub.ModelStreamInfer(iter(outbox.get, None), timeout=60)

    def read() -> None:
        for response in responses:
            inbox.put(response)
        inbox.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        outbox.put(make_request("no_such_model", tensor_inputs["fusion"], id="first"))
        first = inbox.get(timeout=30)
        assert first.infer_response.id == "first" and first.error_message.startswith("NOT_FOUND: ")
        outbox.put(make_request("fusion", tensor_inputs["fusion"], id="second"))
        second = inbox.get(timeout=30)
        assert second.infer_response.id == "second" and second.error_message == ""
        assert decode(second.infer_response)["probabilities"].shape == (3, 2)
    finally:
        outbox.put(None)
    assert inbox.get(timeout=30) is None  # the stream ends cleanly when the client closes it
    reader.join(10)


def test_stream_handles_many_requests_concurrently(heavy_repository):
    """A stream does not wait for one answer before taking the next request: one-row requests of one
    stream meet in the batcher, which a request-by-request stream could never do.

    The heavy image encoder takes milliseconds per row, many times what reading a request takes, so
    a stream that reads on while a run goes on has queued several requests behind it.
    """
    rng = np.random.default_rng(0)
    images = rng.random((40, 1, 256, 256, 3), dtype=np.float32)
    with RunningServer(heavy_repository, max_stream_inflight=16) as srv:
        batcher = srv.server.core.registry.find("image_encoder").batcher
        batches_before, rows_before = batcher.batches_run, batcher.items_run
        requests = [make_request("image_encoder", {"image": ("FP32", image)}, id=str(i))
                    for i, image in enumerate(images)]  # fmt: skip
        responses = stream(pb_grpc.GRPCInferenceServiceStub(srv.channel()), requests)
        batches, rows = batcher.batches_run - batches_before, batcher.items_run - rows_before
    assert sorted(int(r.infer_response.id) for r in responses) == list(range(40))
    assert not any(r.error_message for r in responses)
    assert rows == 40
    assert batches < 40 / 2, f"{batches} runs for 40 requests: the stream was processed (nearly) serially"


def test_a_failed_model_over_v2_is_not_ready_and_unavailable(repository, tmp_path):
    repo = Path(shutil.copytree(repository, tmp_path / "repo"))
    onnx = repo / "image_encoder" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100] + b"\0" * 100)
    with RunningServer(repo, metrics_port=-1) as srv:
        v2 = pb_grpc.GRPCInferenceServiceStub(srv.channel())
        assert v2.ServerReady(pb.ServerReadyRequest()).ready  # the other models serve
        for name, ready in (("image_encoder", False), ("multimodal", False), ("fusion", True)):
            assert v2.ModelReady(pb.ModelReadyRequest(name=name)).ready is ready, name
        error = infer_error(v2, make_request("image_encoder", {"image": ("FP32", np.zeros((1, 64, 64, 3)))}))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "image_encoder" in error.details() and "FAILED" in error.details() and "sha256" in error.details()
