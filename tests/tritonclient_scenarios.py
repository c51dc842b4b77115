"""Scenarios run with the official ``tritonclient.grpc`` client, unchanged, against a fusionserve server.

Usage: ``python tests/tritonclient_scenarios.py SCENARIO URL REPOSITORY``; exits 0 when the scenario
holds, non-zero (with a traceback) when it does not. It runs in its own process because tritonclient
and ``fusionserve.v2`` both define the ``inference.*`` protobuf symbols and cannot share a process;
it imports nothing from ``fusionserve.v2`` and nothing that does.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

from fusionserve import data
from fusionserve.preprocess import Vocabulary, decode_image, encode_png, preprocess_image

MODELS = ("image_encoder", "text_encoder", "fusion", "multimodal")
SCENARIOS: dict[str, Callable[[str, Path], None]] = {}


def scenario(fn: Callable[[str, Path], None]) -> Callable[[str, Path], None]:
    SCENARIOS[fn.__name__] = fn
    return fn


def config(repository: Path, model: str) -> dict:
    return json.loads((repository / model / "1" / "config.json").read_text())


def samples(n: int, seed: int = 99) -> tuple[list[bytes], list[str]]:
    ds = data.generate(n, seed=seed)
    return [encode_png(img) for img in ds.images], list(ds.captions)


def tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    value = grpcclient.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def multimodal_inputs(images: list[bytes], texts: list[str]) -> list[grpcclient.InferInput]:
    return [
        tensor("IMAGE", np.array(images, dtype=np.object_), "BYTES"),
        tensor("TEXT", np.array([t.encode() for t in texts], dtype=np.object_), "BYTES"),
    ]


def expect_error(status: str, needle: str, call: Callable[[], object]) -> InferenceServerException:
    try:
        call()
    except InferenceServerException as e:
        assert e.status() == f"StatusCode.{status}", (e.status(), e.message())
        assert needle in e.message(), e.message()
        return e
    raise AssertionError(f"expected {status} mentioning {needle!r}, the call succeeded")


@scenario
def health(url: str, repository: Path) -> None:
    client = grpcclient.InferenceServerClient(url)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "fusionserve" and meta.version, meta
    as_json = client.get_server_metadata(as_json=True)
    assert as_json["name"] == "fusionserve", as_json
    for model in MODELS:
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    assert not client.is_model_ready("no_such_model")
    client.close()


@scenario
def metadata(url: str, repository: Path) -> None:
    client = grpcclient.InferenceServerClient(url)
    for model in MODELS:
        want = config(repository, model)
        meta = client.get_model_metadata(model)
        assert meta.name == model and list(meta.versions) == ["1"] and meta.platform == want["platform"]
        # One value per row ([-1] in the repository) is described as [-1, 1], Triton's form for it.
        declared_in = [(t["name"], t["datatype"], t["shape"] + [1] if len(t["shape"]) == 1 else t["shape"])
                       for t in want["inputs"]]  # fmt: skip
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == declared_in, meta.inputs
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
            (t["name"], t["datatype"], t["shape"]) for t in want["outputs"]
        ], meta.outputs
        as_json = client.get_model_metadata(model, model_version="1", as_json=True)
        assert as_json["name"] == model
    client.close()


@scenario
def config_and_statistics(url: str, repository: Path) -> None:
    """Triton's model configuration and statistics extensions, read through tritonclient's own types."""
    client = grpcclient.InferenceServerClient(url)
    for model in MODELS:
        want = config(repository, model)
        got = client.get_model_config(model).config
        assert (got.name, got.max_batch_size) == (model, want["max_batch_size"]), got
        assert [(t.name, list(t.dims)) for t in got.input] == [
            (t["name"], t["shape"][1:] or [1]) for t in want["inputs"]
        ], got.input
        as_json = client.get_model_config(model, as_json=True)
        assert as_json["config"]["name"] == model, as_json
    images, texts = samples(3)
    before = client.get_inference_statistics("multimodal").model_stats[0]
    client.infer("multimodal", multimodal_inputs(images, texts))
    after = client.get_inference_statistics("multimodal").model_stats[0]
    assert (after.name, after.version) == ("multimodal", "1")
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 3
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    assert sorted(s["name"] for s in every) == sorted(MODELS), every
    expect_error("NOT_FOUND", "no_such_model", lambda: client.get_model_config("no_such_model"))
    expect_error("NOT_FOUND", "no_such_model", lambda: client.get_inference_statistics("no_such_model"))
    client.close()


@scenario
def infer_tensor_models(url: str, repository: Path) -> None:
    """Each tensor model through tritonclient equals onnxruntime on the repository's own file."""
    client = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(3)
    vocab = json.loads((repository / "multimodal" / "1" / "vocab.json").read_text())
    cases = {
        "image_encoder": {"image": rng.random((4, 64, 64, 3), dtype=np.float32)},
        "text_encoder": {"tokens": rng.integers(0, vocab["max_words"], (4, 100), dtype=np.int32)},
        "fusion": {
            "image_features": rng.standard_normal((4, 64)).astype(np.float32),
            "text_features": rng.standard_normal((4, 64)).astype(np.float32),
        },
    }
    for model, arrays in cases.items():
        declared = {t["name"]: t["datatype"] for t in config(repository, model)["inputs"]}
        inputs = [tensor(name, array, declared[name]) for name, array in arrays.items()]
        outputs = [grpcclient.InferRequestedOutput(t["name"]) for t in config(repository, model)["outputs"]]
        result = client.infer(model, inputs, outputs=outputs, request_id=f"id-{model}", priority=1)
        response = result.get_response()
        assert (response.id, response.model_name, response.model_version) == (f"id-{model}", model, "1")
        session = ort.InferenceSession(str(repository / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for spec, want in zip(session.get_outputs(), session.run(None, arrays), strict=True):
            got = result.as_numpy(spec.name)
            assert got.dtype == np.float32 and got.shape == want.shape, (got.dtype, got.shape)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    client.close()


@scenario
def infer_multimodal(url: str, repository: Path) -> None:
    """BYTES in, FP32 + BYTES out; equals chaining the three tensor models with the same preprocessing."""
    client = grpcclient.InferenceServerClient(url)
    labels = config(repository, "multimodal")["labels"]
    images, texts = samples(5)
    result = client.infer("multimodal", multimodal_inputs(images, texts), request_id="mm")
    probabilities, label = result.as_numpy("PROBABILITIES"), result.as_numpy("LABEL")
    assert probabilities.shape == (5, 2) and label.shape == (5,)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert [x.decode() for x in label] == [labels[i] for i in probabilities.argmax(axis=1)]

    vocab = Vocabulary.load(repository / "multimodal" / "1" / "vocab.json")
    pixels = np.stack([preprocess_image(decode_image(img), 64, 64) for img in images])
    image_features = client.infer("image_encoder", [tensor("image", pixels, "FP32")]).as_numpy("image_features")
    tokens = vocab.encode(texts)
    text_features = client.infer("text_encoder", [tensor("tokens", tokens, "INT32")]).as_numpy("text_features")
    fused = client.infer(
        "fusion", [tensor("image_features", image_features, "FP32"), tensor("text_features", text_features, "FP32")]
    ).as_numpy("probabilities")
    np.testing.assert_allclose(probabilities, fused, atol=1e-6)
    client.close()


@scenario
def requested_outputs(url: str, repository: Path) -> None:
    client = grpcclient.InferenceServerClient(url)
    images, texts = samples(2)
    full = client.infer("multimodal", multimodal_inputs(images, texts))
    for wanted in (["LABEL", "PROBABILITIES"], ["PROBABILITIES", "LABEL"], ["LABEL"], ["PROBABILITIES"]):
        outputs = [grpcclient.InferRequestedOutput(name) for name in wanted]
        result = client.infer("multimodal", multimodal_inputs(images, texts), outputs=outputs)
        assert [o.name for o in result.get_response().outputs] == wanted
        for name in wanted:
            got, want = result.as_numpy(name), full.as_numpy(name)
            if name == "LABEL":
                assert list(got) == list(want)
            else:
                np.testing.assert_allclose(got, want, atol=1e-6)
        for name in {"LABEL", "PROBABILITIES"} - set(wanted):
            assert result.as_numpy(name) is None, name
    client.close()


@scenario
def stream(url: str, repository: Path) -> None:
    """start_stream + async_stream_infer: every request answered, a bad one in-band, the stream lives on."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    images, texts = samples(6, seed=5)
    sent = {}
    for i in range(6):
        if i == 3:  # a bad request in the middle
            client.async_stream_infer(
                "multimodal",
                multimodal_inputs(images[:1], texts[:1]),
                outputs=[grpcclient.InferRequestedOutput("NOPE")],
                request_id="bad",
            )
        client.async_stream_infer(
            "multimodal", multimodal_inputs(images[i : i + 1], texts[i : i + 1]), request_id=f"r{i}"
        )
        sent[f"r{i}"] = i
    client.async_stream_infer(
        "fusion",
        [
            tensor("image_features", np.zeros((1, 64), np.float32), "FP32"),
            tensor("text_features", np.zeros((1, 64), np.float32), "FP32"),
        ],
        request_id="fusion",
    )
    results, errors = {}, []
    for _ in range(len(sent) + 2):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(error)
        else:
            results[result.get_response().id] = result
    client.stop_stream()
    assert len(errors) == 1 and "NOPE" in errors[0].message() and "INVALID_ARGUMENT" in errors[0].message()
    assert sorted(results) == sorted([*sent, "fusion"]), sorted(results)
    assert results["fusion"].as_numpy("probabilities").shape == (1, 2)
    unary = client.infer("multimodal", multimodal_inputs(images, texts)).as_numpy("PROBABILITIES")
    for request_id, i in sent.items():
        np.testing.assert_allclose(results[request_id].as_numpy("PROBABILITIES")[0], unary[i], atol=1e-6)
    client.close()


@scenario
def errors(url: str, repository: Path) -> None:
    """Errors surface as InferenceServerException carrying the right gRPC status."""
    client = grpcclient.InferenceServerClient(url)
    image = np.zeros((1, 64, 64, 3), np.float32)
    expect_error("NOT_FOUND", "no_such_model", lambda: client.infer("no_such_model", [tensor("image", image, "FP32")]))
    expect_error(
        "NOT_FOUND",
        "version",
        lambda: client.infer("image_encoder", [tensor("image", image, "FP32")], model_version="3"),
    )
    expect_error(
        "INVALID_ARGUMENT",
        "model_version",
        lambda: client.infer("image_encoder", [tensor("image", image, "FP32")], model_version="x"),
    )
    small = np.zeros((1, 32, 32, 3), np.float32)
    expect_error("INVALID_ARGUMENT", "'image'", lambda: client.infer("image_encoder", [tensor("image", small, "FP32")]))
    expect_error(
        "INVALID_ARGUMENT",
        "'image'",
        lambda: client.infer("image_encoder", [tensor("image", image.astype(np.float64), "FP64")]),
    )
    expect_error(
        "INVALID_ARGUMENT", "'pixels'", lambda: client.infer("image_encoder", [tensor("pixels", image, "FP32")])
    )
    expect_error(
        "INVALID_ARGUMENT",
        "'text_features'",
        lambda: client.infer("fusion", [tensor("image_features", np.zeros((1, 64), np.float32), "FP32")]),
    )
    expect_error(
        "INVALID_ARGUMENT",
        "'NOPE'",
        lambda: client.infer(
            "image_encoder", [tensor("image", image, "FP32")], outputs=[grpcclient.InferRequestedOutput("NOPE")]
        ),
    )
    expect_error(
        "INVALID_ARGUMENT",
        "classification",
        lambda: client.infer(
            "image_encoder",
            [tensor("image", image, "FP32")],
            outputs=[grpcclient.InferRequestedOutput("image_features", class_count=1)],
        ),
    )
    expect_error(
        "INVALID_ARGUMENT",
        "sequence",
        lambda: client.infer("image_encoder", [tensor("image", image, "FP32")], sequence_id=7),
    )
    images, texts = samples(1)
    bad_text = [
        tensor("IMAGE", np.array(images, dtype=np.object_), "BYTES"),
        tensor("TEXT", np.array([b"\xff\xfe"], dtype=np.object_), "BYTES"),
    ]
    expect_error("INVALID_ARGUMENT", "'TEXT'", lambda: client.infer("multimodal", bad_text))
    expect_error(
        "DEADLINE_EXCEEDED",
        "deadline",
        lambda: client.infer("image_encoder", [tensor("image", image, "FP32")], timeout=1),
    )
    expect_error("NOT_FOUND", "no_such_model", lambda: client.get_model_metadata("no_such_model"))
    assert client.is_server_ready()
    client.close()


@scenario
def asyncio_client(url: str, repository: Path) -> None:
    """tritonclient.grpc.aio: unary infer and stream_infer."""

    async def run() -> None:
        client = aioclient.InferenceServerClient(url)
        images, texts = samples(3, seed=8)
        assert await client.is_server_ready()
        unary = await client.infer("multimodal", multimodal_inputs(images, texts))

        async def requests():
            for i in range(3):
                yield {
                    "model_name": "multimodal",
                    "inputs": multimodal_inputs(images[i : i + 1], texts[i : i + 1]),
                    "request_id": str(i),
                }

        got = {}
        async for result, error in client.stream_infer(requests()):
            assert error is None, error
            got[int(result.get_response().id)] = result.as_numpy("PROBABILITIES")[0]
            if len(got) == 3:
                break
        for i, row in got.items():
            np.testing.assert_allclose(row, unary.as_numpy("PROBABILITIES")[i], atol=1e-6)
        await client.close()

    asyncio.run(run())


@scenario
def repository_control(url: str, repository: Path) -> None:
    """Needs a server run with --model-control-mode explicit: index, unload, load, as tritonclient drives them."""
    client = grpcclient.InferenceServerClient(url)
    images, texts = samples(2)
    before = client.infer("multimodal", multimodal_inputs(images, texts)).as_numpy("PROBABILITIES")
    index = {(m["name"], m.get("version", ""), m.get("state", ""))
             for m in client.get_model_repository_index(as_json=True)["models"]}  # fmt: skip
    assert index == {(m, "1", "READY") for m in MODELS}, index
    client.unload_model("multimodal")
    assert not client.is_model_ready("multimodal")
    expect_error("NOT_FOUND", "multimodal", lambda: client.infer("multimodal", multimodal_inputs(images, texts)))
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert "state" not in index["multimodal"] and index["fusion"]["state"] == "READY", index
    client.load_model("multimodal")
    assert client.is_model_ready("multimodal")
    after = client.infer("multimodal", multimodal_inputs(images, texts)).as_numpy("PROBABILITIES")
    np.testing.assert_allclose(after, before, atol=1e-6)
    expect_error("UNIMPLEMENTED", "config", lambda: client.load_model("fusion", config="{}"))
    expect_error("FAILED_PRECONDITION", "step of multimodal", lambda: client.unload_model("image_encoder"))
    client.close()


@scenario
def traceparent(url: str, repository: Path) -> None:
    """The caller's W3C trace context as request headers (gRPC metadata), unary and streaming.

    The context comes from FUSIONSERVE_TEST_TRACEPARENT; the tracing tests read the server's spans.
    """
    headers = {"traceparent": os.environ["FUSIONSERVE_TEST_TRACEPARENT"], "tracestate": "fusionserve=test"}
    client = grpcclient.InferenceServerClient(url)
    images, texts = samples(2, seed=7)
    client.infer("multimodal", multimodal_inputs(images, texts), headers=headers, request_id="unary")
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
    for i in range(2):
        client.async_stream_infer("multimodal", multimodal_inputs(images[i : i + 1], texts[i : i + 1]),
                                  request_id=f"s{i}")  # fmt: skip
    for _ in range(2):
        result, error = answers.get(timeout=30)
        assert error is None, error
    client.stop_stream()
    client.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in SCENARIOS:
        sys.stderr.write(f"usage: tritonclient_scenarios.py {{{','.join(SCENARIOS)}}} URL REPOSITORY\n")
        return 2
    name, url, repository = argv
    SCENARIOS[name](url, Path(repository))
    sys.stdout.write(f"scenario {name}: ok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
