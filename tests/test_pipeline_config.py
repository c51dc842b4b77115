"""A pipeline is built from its config: other tensor and model names, image size, colour order,
token length and padding are served as declared, and a config that contradicts its models is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from fusionserve.errors import RepositoryError
from fusionserve.preprocess import Vocabulary, decode_image
from fusionserve.repository import list_models, load_config, version_dir
from fusionserve.server.pipeline_config import resolve
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from fusionserve.v2 import grpc_service_pb2 as v2pb
from fusionserve.v2 import grpc_service_pb2_grpc as v2pb_grpc
from fusionserve.v2_codec import decode_outputs, serialize_bytes
from tests import tiny_repository
from tests.device import ATOL, reference_session
from tests.serving import RunningServer

TENSORS = {"image": "pixels", "image_features": "look", "tokens": "ids", "text_features": "read",
           "probabilities": "scores"}  # fmt: skip
MODELS = {"image_encoder": "vision", "text_encoder": "language", "fusion": "head"}
SIZE, LENGTH = (32, 48), 20


@pytest.fixture(scope="module")
def other_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repository.build(tmp_path_factory.mktemp("other") / "repo", image_size=SIZE, max_length=LENGTH,
                                 color_order="RGB", padding="post", tensors=TENSORS, models=MODELS)  # fmt: skip


def reference(repo: Path, items) -> np.ndarray:
    """The three graphs run directly, with the declared preprocessing written out by hand."""
    images = np.stack([
        cv2.cvtColor(cv2.resize(decode_image(img), SIZE[::-1], interpolation=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
        for img, _ in items
    ]).astype(np.float32) / np.float32(255)  # fmt: skip
    vocab = Vocabulary.load(repo / "multimodal" / "1" / "vocab.json")
    tokens = vocab.encode([text for _, text in items])
    assert tokens.shape == (len(items), LENGTH) and (tokens[:, 0] != 0).all(), "post padding keeps words first"
    look = reference_session(repo / "vision" / "1" / "model.onnx").run(None, {"pixels": images})[0]
    read = reference_session(repo / "language" / "1" / "model.onnx").run(None, {"ids": tokens})[0]
    return reference_session(repo / "head" / "1" / "model.onnx").run(None, {"look": look, "read": read})[0]


def test_other_names_size_length_colour_and_padding_are_served_as_declared(other_repository, samples):
    items = samples[:12]
    want = reference(other_repository, items)
    with RunningServer(other_repository, metrics_port=-1) as srv:
        channel = srv.channel()
        typed = pb_grpc.FusionServiceStub(channel).Classify(
            pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items])
        )
        np.testing.assert_allclose([list(r.probabilities) for r in typed.results], want, atol=ATOL)
        request = v2pb.ModelInferRequest(model_name="multimodal")
        for name, values in (("IMAGE", [i for i, _ in items]), ("TEXT", [t for _, t in items])):
            request.inputs.add(name=name, datatype="BYTES", shape=[len(items)])
            request.raw_input_contents.append(serialize_bytes(values))
        v2 = decode_outputs(v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request))
        np.testing.assert_allclose(v2["PROBABILITIES"], want, atol=ATOL)
        tensor = v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            v2pb.ModelInferRequest(model_name="vision", inputs=[v2pb.ModelInferRequest.InferInputTensor(
                name="pixels", datatype="FP32", shape=[1, *SIZE, 3],
                contents=v2pb.InferTensorContents(fp32_contents=[0.5] * (SIZE[0] * SIZE[1] * 3)))])
        )  # fmt: skip
        assert [o.name for o in tensor.outputs] == ["look"]


def _edit(repo: Path, model: str, edit) -> None:
    path = repo / model / "1" / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _plan(repo: Path):
    pipeline = load_config(repo, "multimodal", 1)
    steps = {m: load_config(repo, m, v) for m, v in pipeline.steps.items()}
    return resolve(pipeline, steps, version_dir(repo, "multimodal", 1))


def test_a_pipeline_config_without_roles_takes_them_from_its_steps(repository, tmp_path):
    repo = Path(shutil.copytree(repository, tmp_path / "repo"))
    _edit(repo, "multimodal", lambda c: c.pop("roles"))
    plan = _plan(repo)
    assert (plan.image.inputs, plan.image.output) == (("image",), "image_features")
    assert plan.fusion.inputs == ("image_features", "text_features")
    assert (plan.image_preprocessing.height, plan.vocabulary.max_length) == (64, 100)


CONTRADICTIONS = {
    "image size": (lambda c: c["preprocessing"]["image"].update(height=64),
                   "preprocessing.image resizes to 64x48, but the image encoder's input 'pixels' is 32x48"),
    "tensor name": (lambda c: c["roles"]["image_encoder"].update(output="features"),
                    "model 'vision' has no output 'features' \\(its outputs: \\['look'\\]\\)"),
    "token length": (lambda c: c["preprocessing"]["text"].update(max_length=100),
                     "preprocessing.text max_length is 100, but the text encoder and vocabulary say 20"),
    "padding": (lambda c: c["preprocessing"]["text"].update(padding="pre"),
                "preprocessing.text padding is 'pre', but the text encoder and vocabulary say 'post'"),
    "unknown role": (lambda c: c["roles"].update(audio_encoder={"model": "vision"}),
                     "unknown roles \\[.audio_encoder.\\]"),
    "role outside the steps": (lambda c: c["roles"]["fusion"].update(model="fusion"),
                               "role fusion is model 'fusion', which is not among the steps"),
    "labels": (lambda c: c.update(labels=["a", "b", "c"]), "fusion output 'scores' is \\[-1, 2\\], for 3 labels"),
    "colour order": (lambda c: c["preprocessing"]["image"].update(color_order="CMYK"),
                     "preprocessing.image: color_order must be BGR or RGB"),
}  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), CONTRADICTIONS.values(), ids=CONTRADICTIONS.keys())
def test_a_config_that_contradicts_its_models_is_refused(other_repository, tmp_path, edit, message):
    repo = Path(shutil.copytree(other_repository, tmp_path / "repo"))
    _edit(repo, "multimodal", edit)
    with pytest.raises(RepositoryError, match=message):
        _plan(repo)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda v: v.update(padding="pre"), "preprocessing.text padding is 'post', but the text encoder and vocabulary "
                                        "say 'pre'"),
    (lambda v: v.update(pad_index=3), "padded at the back with 0, but the vocabulary pads 'post' with 3"),
    (lambda v: v.update(max_length=30), "the vocabulary pads to 30 tokens, but the text encoder's input 'tokens' "
                                        "takes 24"),
])  # fmt: skip
def test_a_vocabulary_that_contradicts_a_text_encoder_cut_to_the_longest_caption_is_refused(tmp_path, edit, message):
    repo = tiny_repository.build(tmp_path / "repo", max_length=24, variable_length=True)
    assert _plan(repo).cut_text
    vocab = repo / "multimodal" / "1" / "vocab.json"
    data = json.loads(vocab.read_text())
    edit(data)
    vocab.write_text(json.dumps(data))
    with pytest.raises(RepositoryError, match=message):
        _plan(repo)


def test_the_pipeline_says_how_long_its_text_encoders_rows_are_as_the_text_encoder_does(tmp_path):
    repo = tiny_repository.build(tmp_path / "repo", max_length=24, variable_length=True)
    _edit(repo, "multimodal", lambda c: c["preprocessing"]["text"].update(sequence_length=24))
    with pytest.raises(RepositoryError, match="preprocessing.text sequence_length is 24, but the text encoder and "
                                              "vocabulary say 'dynamic'"):
        _plan(repo)


def test_the_server_marks_such_a_pipeline_failed_and_serves_the_rest(other_repository, tmp_path):
    repo = Path(shutil.copytree(other_repository, tmp_path / "repo"))
    _edit(repo, "multimodal", CONTRADICTIONS["image size"][0])
    with RunningServer(repo, metrics_port=-1) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        states = {m.name: (m.state, m.reason) for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert states["multimodal"][0] == "FAILED" and "resizes to 64x48" in states["multimodal"][1]
        assert {name: state for name, (state, _) in states.items() if name != "multimodal"} == dict.fromkeys(
            ("head", "language", "vision"), "READY")
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=b"x", text="y")]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_graph_that_contradicts_its_config_fails_that_model(other_repository, tmp_path):
    repo = Path(shutil.copytree(other_repository, tmp_path / "repo"))
    _edit(repo, "vision", lambda c: c["inputs"][0].update(shape=[-1, 64, 64, 3]))
    with RunningServer(repo, metrics_port=-1) as srv:
        vision = srv.server.core.registry.find("vision")
        assert vision.state == "FAILED"
        assert "tensor 'pixels' is FP32 [-1, 32, 48, 3] in the graph but FP32 [-1, 64, 64, 3] in the config" in (
            vision.reason)
    assert sorted(list_models(repo)) == ["head", "language", "multimodal", "vision"]
