"""What a pipeline's fusion model outputs and how its tensors are bound come from its config.

Any number of classes with the class Rank scores named in the config; a fusion model that outputs
features (no classifier) served as an embedding model; tensors bound by name whatever their order;
text encoders that take int64 ids (PyTorch exports). Tiny graphs, real servers, no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from fusionserve.client import FusionClient, FusionClientError
from fusionserve.preprocess import ImagePreprocessing, Vocabulary, decode_image
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from fusionserve.v2 import grpc_service_pb2 as v2pb
from fusionserve.v2 import grpc_service_pb2_grpc as v2pb_grpc
from fusionserve.v2_codec import decode_outputs, serialize_bytes
from tests import tiny_repository
from tests.device import ATOL, reference_session
from tests.serving import RunningServer

THREE = ("cat", "dog", "bird")


def reference(repo: Path, items, *, text_first: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image features, text features and the fusion output, by onnxruntime on the repository's graphs."""
    images = np.stack([ImagePreprocessing(64, 64).apply(decode_image(img)) for img, _ in items])
    vocab = Vocabulary.load(repo / "multimodal" / "1" / "vocab.json")
    text_session = reference_session(repo / "text_encoder" / "1" / "model.onnx")
    tokens = vocab.encode([t for _, t in items]).astype(np.int64 if "int64" in text_session.get_inputs()[0].type
                                                       else np.int32)  # fmt: skip
    look = reference_session(repo / "image_encoder" / "1" / "model.onnx").run(None, {"image": images})[0]
    read = text_session.run(None, {"tokens": tokens})[0]
    fused = reference_session(repo / "fusion" / "1" / "model.onnx").run(
        None, {"image_features": look, "text_features": read})[0]  # fmt: skip
    return look, read, fused


def v2_infer(channel, items, image: str = "IMAGE", text: str = "TEXT") -> dict[str, np.ndarray]:
    request = v2pb.ModelInferRequest(model_name="multimodal")
    for name, values in ((image, [i for i, _ in items]), (text, [t.encode() for _, t in items])):
        request.inputs.add(name=name, datatype="BYTES", shape=[len(items)])
        request.raw_input_contents.append(serialize_bytes(values))
    return decode_outputs(v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request))


def test_three_classes_and_the_positive_label_named_in_the_config(tmp_path, samples):
    repo = tiny_repository.build(tmp_path / "repo", labels=THREE, positive_label="dog")
    items = samples[:6]
    _, _, probabilities = reference(repo, items)
    with RunningServer(repo, metrics_port=-1) as srv, FusionClient(srv.target) as client:
        results = client.classify_batch(items)
        np.testing.assert_allclose([r.probabilities for r in results], probabilities, atol=ATOL)
        assert [r.label for r in results] == [THREE[i] for i in probabilities.argmax(1)]
        ranked = client.rank(image=items[0][0], texts=[t for _, t in items])
        _, _, pairs = reference(repo, [(items[0][0], t) for _, t in items])
        np.testing.assert_allclose([c.score for c in sorted(ranked, key=lambda c: c.index)], pairs[:, 1], atol=ATOL)
        response = pb_grpc.FusionServiceStub(srv.channel()).Rank(
            pb.RankRequest(image=items[0][0], texts=[t for _, t in items]))  # fmt: skip
        assert response.positive_label == "dog"


def test_without_a_named_positive_label_rank_scores_the_last(tmp_path, samples):
    repo = tiny_repository.build(tmp_path / "repo", labels=("match", "mismatch", "unsure"))
    items = samples[:4]
    _, _, pairs = reference(repo, [(items[0][0], t) for _, t in items])
    with RunningServer(repo, metrics_port=-1) as srv:
        response = pb_grpc.FusionServiceStub(srv.channel()).Rank(
            pb.RankRequest(image=items[0][0], texts=[t for _, t in items]))  # fmt: skip
    assert response.positive_label == "unsure"  # the last, even with a label called "match" before it
    np.testing.assert_allclose(response.scores, pairs[:, 2], atol=ATOL)


@pytest.fixture(scope="module")
def embedding_repository(tmp_path_factory) -> Path:
    return tiny_repository.build(tmp_path_factory.mktemp("embedding") / "repo", features_only=True)


def test_a_features_fusion_is_served_as_an_embedding_model(embedding_repository, samples):
    items = samples[:5]
    look, read, fused = reference(embedding_repository, items)
    assert fused.shape == (5, 3 * tiny_repository.FEATURES)
    with RunningServer(embedding_repository, metrics_port=-1) as srv, FusionClient(srv.target) as client:
        got = client.embed(images=[i for i, _ in items], texts=[t for _, t in items])
        np.testing.assert_allclose(got.fused, fused, atol=ATOL)
        np.testing.assert_allclose(got.image, look, atol=ATOL)
        np.testing.assert_allclose(got.text, read, atol=ATOL)
        assert client.embed(images=[items[0][0]]).fused is None  # no pairs, nothing fused
        outputs = v2_infer(srv.channel(), items)
        assert list(outputs) == ["FEATURES"]
        np.testing.assert_allclose(outputs["FEATURES"], fused, atol=ATOL)
        for call in (lambda: client.classify(*items[0]), lambda: client.rank(image=items[0][0], texts=["a", "b"])):
            with pytest.raises(FusionClientError) as info:
                call()
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert "this pipeline has no classes: its fusion model outputs fused features" in info.value.details
        info_ = client.model("multimodal")
        assert [t.name for t in info_.outputs] == ["FEATURES"] and not info_.labels


def test_tensors_are_bound_by_name_in_any_order(tmp_path, samples):
    own = {"image": "picture", "text": "caption", "probabilities": "p", "label": "class_name"}
    repo = tiny_repository.build(tmp_path / "repo", text_first=True, pipeline_tensors=own, token_datatype="INT64")
    items = samples[:6]
    _, _, probabilities = reference(repo, items)
    with RunningServer(repo, metrics_port=-1) as srv, FusionClient(srv.target) as client:
        np.testing.assert_allclose([r.probabilities for r in client.classify_batch(items)], probabilities, atol=ATOL)
        outputs = v2_infer(srv.channel(), items, image="picture", text="caption")
        np.testing.assert_allclose(outputs["p"], probabilities, atol=ATOL)
        assert outputs["class_name"].tolist() == [["mismatch", "match"][i].encode() for i in probabilities.argmax(1)]
