"""The server's answer for raw images + texts equals the Keras pipeline's (trained, exported models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusionserve.preprocess import Vocabulary, decode_image, preprocess_image
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc

TOLERANCE = 1e-4  # the export parity gate's


@pytest.fixture(scope="module")
def stub(trained_server):
    return pb_grpc.FusionServiceStub(trained_server.channel())


@pytest.fixture(scope="module")
def keras_pipeline(trained_dir: Path):
    """The Keras models on the same raw inputs: the reference the server must match."""
    import keras

    image_model = keras.models.load_model(trained_dir / "image_encoder.keras")
    text_model = keras.models.load_model(trained_dir / "text_encoder.keras")
    fusion_model = keras.models.load_model(trained_dir / "fusion.keras")
    vocab = Vocabulary.load(trained_dir / "vocab.json")
    size = image_model.inputs[0].shape[1]

    def run(items):
        images = np.stack([preprocess_image(decode_image(img), size, size) for img, _ in items])
        tokens = vocab.encode([t for _, t in items])
        fi, ft = np.asarray(image_model(images)), np.asarray(text_model(tokens))
        return np.asarray(fusion_model([fi, ft])), fi, ft

    return run


def test_classify_matches_the_keras_pipeline_on_raw_inputs(stub, samples, keras_pipeline):
    items = samples[:32]
    response = stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items],
                                                return_embeddings=True))  # fmt: skip
    probs, fi, ft = keras_pipeline(items)
    got = np.array([list(r.probabilities) for r in response.results])
    assert got.shape == probs.shape
    assert np.max(np.abs(got - probs)) <= TOLERANCE
    assert np.max(np.abs(np.array([list(r.image_embedding) for r in response.results]) - fi)) <= TOLERANCE
    assert np.max(np.abs(np.array([list(r.text_embedding) for r in response.results]) - ft)) <= TOLERANCE
    assert [r.label for r in response.results] == [list(response.labels)[i] for i in probs.argmax(1)]
    assert response.model == "multimodal" and response.model_version == 1


def test_embed_matches_the_keras_encoders(stub, samples, keras_pipeline):
    items = samples[:5]
    response = stub.Embed(pb.EmbedRequest(images=[i for i, _ in items], texts=[t for _, t in items[:3]]))
    _, fi, ft = keras_pipeline(items)
    assert np.max(np.abs(np.array([list(e.values) for e in response.image_embeddings]) - fi)) <= TOLERANCE
    assert np.max(np.abs(np.array([list(e.values) for e in response.text_embeddings]) - ft[:3])) <= TOLERANCE
