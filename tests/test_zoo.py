"""Users' own Keras models of many architectures, exported and served as their Keras code runs them.

Each combination is built the way a user writes it (random weights, small inputs), saved, exported
with ``fusionserve export`` and its own tokenizer and image preprocessing, and served; raw image bytes
and captions through the running server must equal the user's own pipeline (OpenCV decode, RGB,
resize, ``keras.applications.<family>.preprocess_input``; their tokenizer and ``pad_sequences``, or
the TextVectorization inside their model; their three models) within 1e-4.

How the combinations are chosen: every image encoder, text encoder and fusion head of the zoo appears
at least once (not the cross product: each export costs seconds), each with another way to prepare
text (Keras Tokenizer without and with ``oov_token``, ``char_level``, TextVectorization with word and
character split) and images (``caffe``, ``tf``, ``torch``, a JSON declaration), padding at both ends,
two and three classes and a features-only head. Architectures tf2onnx or the gate cannot take are
refused at export, naming the layer.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from fusionserve.cli import main as cli
from fusionserve.client import FusionClient
from fusionserve.errors import ExportError
from fusionserve.repository import load_config
from tests import zoo_models as zoo
from tests.serving import RunningServer
from tests.test_preprocess import _picture

pytestmark = [pytest.mark.tf, pytest.mark.slow]
TOLERANCE = 1e-4
SIZE, LENGTH, FEATURES = 32, 12, 16
CORPUS = ["a red dog under the blue sky", "the green star is small", "a photo of a blue circle",
          "Straße, café and 日本語!", "the sky is blue", "red red red circle"]  # fmt: skip
CAPTIONS = ["a red dog under the blue sky", "The BLUE sky, with an unknown zebra!", "日本語 café straße",
            "circle " * 30, "x", "punctuation... everywhere?! (yes)"]  # fmt: skip


@dataclass
class Case:
    image: str  # one of zoo.IMAGE_ENCODERS
    family: str | None  # keras.applications module whose preprocess_input the user calls
    declared: str | dict  # --image-preprocessing
    text: str  # one of zoo.TEXT_ENCODERS
    tokenizer: dict | None  # tf_keras Tokenizer options; None: TextVectorization inside the text model
    fusion: str  # one of zoo.FUSIONS
    classes: int = 2
    pad: dict = field(default_factory=dict)
    vectorizer: dict = field(default_factory=dict)


CASES = {
    "vgg16 + lstm + mlp (the recipe)": Case("VGG16", "vgg16", "caffe", "lstm", {"num_words": 10_000}, "mlp"),
    "mobilenetv2 + gru + gated, 3 classes": Case("MobileNetV2", "mobilenet_v2", "tf", "gru",
                                                 {"num_words": 30, "oov_token": "<OOV>"}, "gated", classes=3,
                                                 pad={"padding": "post", "truncating": "post"}),
    "resnet50 + bilstm + concat (features)": Case("ResNet50", "resnet50", "caffe", "bilstm", None, "concat"),
    "efficientnetb0 + conv1d + mlp": Case("EfficientNetB0", "efficientnet", {"color_order": "RGB", "scale": 1},
                                          "conv1d", {"char_level": True}, "mlp"),
    "cnn + transformer + gated": Case("cnn", None, "torch", "transformer", None, "gated",
                                      vectorizer={"split": "character", "standardize": "lower"}),
}  # fmt: skip


def test_the_cases_cover_every_model_of_the_zoo() -> None:
    for kinds, used in ((zoo.IMAGE_ENCODERS, {c.image for c in CASES.values()}),
                        (zoo.TEXT_ENCODERS, {c.text for c in CASES.values()}),
                        (zoo.FUSIONS, {c.fusion for c in CASES.values()})):  # fmt: skip
        assert set(kinds) == used


def awkward_images() -> list[bytes]:
    shapes = [(37, 53, 3), (32, 32, 3), (45, 29, None), (23, 61, 4), (64, 48, 3), (33, 90, 3)]
    return [cv2.imencode(".png", _picture(h, w, c, seed=i))[1].tobytes() for i, (h, w, c) in enumerate(shapes)]


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_users_keras_models_are_served_as_their_keras_code_runs_them(case: Case, tmp_path: Path) -> None:
    import keras
    from tf_keras.preprocessing import sequence, text

    keras.utils.set_random_seed(3)
    tokenizer = vectorizer = None
    if case.tokenizer is not None:
        tokenizer = text.Tokenizer(**case.tokenizer)
        tokenizer.fit_on_texts(CORPUS)
        (tmp_path / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    else:
        vectorizer = keras.layers.TextVectorization(max_tokens=40, output_sequence_length=LENGTH, **case.vectorizer)
        vectorizer.adapt(CORPUS)
    # The user's own image preprocessing: OpenCV decodes BGR, Keras' families take RGB.
    images, captions = awkward_images(), CAPTIONS
    rgb = [cv2.cvtColor(cv2.resize(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), (SIZE, SIZE)),
                        cv2.COLOR_BGR2RGB).astype(np.float32) for b in images]  # fmt: skip
    if case.family is not None:
        rgb = [importlib.import_module(f"keras.applications.{case.family}").preprocess_input(x) for x in rgb]
    else:  # the plain CNN was trained on torch-style inputs, written out by hand
        rgb = [(x / np.float32(255) - np.float32([0.485, 0.456, 0.406])) / np.float32([0.229, 0.224, 0.225])
               for x in rgb]  # fmt: skip
    rows = 10_000 if case.tokenizer and case.tokenizer.get("num_words") == 10_000 else 64
    models = {"image": zoo.image_model(case.image, SIZE, FEATURES),
              "text": zoo.text_model(case.text, LENGTH, FEATURES, rows, vectorizer),
              "fusion": zoo.fusion_model(case.fusion, FEATURES, case.classes)}  # fmt: skip
    zoo.calibrate(models["image"], np.stack(rgb))
    for role, model in models.items():
        model.save(tmp_path / f"{role}.keras")
    declared = case.declared
    if isinstance(declared, dict):
        (tmp_path / "image.json").write_text(json.dumps(declared))
        declared = str(tmp_path / "image.json")
    argv = ["export", "--image-model", str(tmp_path / "image.keras"), "--text-model", str(tmp_path / "text.keras"),
            "--fusion-model", str(tmp_path / "fusion.keras"), "--image-preprocessing", declared,
            "--repository", str(tmp_path / "repo")]  # fmt: skip
    if tokenizer is not None:
        argv += ["--tokenizer", str(tmp_path / "tokenizer.json")]
    for key, value in case.pad.items():
        argv += [f"--{key}", value]
    labels = ["no", "yes", "maybe"][: case.classes]
    if case.fusion != "concat":
        (tmp_path / "labels.json").write_text(json.dumps(labels))
        argv += ["--labels", str(tmp_path / "labels.json")]
    assert cli.main(argv) == 0

    # The user's own pipeline, on the models as they saved them.
    mine = {role: keras.models.load_model(tmp_path / f"{role}.keras") for role in models}
    image_features = np.asarray(mine["image"](np.stack(rgb)))
    assert image_features.std() > 0.1  # the image counts in the answer (see zoo.calibrate)
    if tokenizer is not None:
        ids = sequence.pad_sequences(tokenizer.texts_to_sequences(captions), maxlen=LENGTH, **case.pad)
        text_features = np.asarray(mine["text"](ids))
    else:
        text_features = np.asarray(mine["text"](np.array(captions)[:, None]))
    expected = np.asarray(mine["fusion"]([image_features, text_features]))

    with RunningServer(tmp_path / "repo", metrics_port=-1) as srv, FusionClient(srv.target) as client:
        if case.fusion == "concat":
            got = client.embed(images=images, texts=captions).fused
        else:
            got = np.array([r.probabilities for r in client.classify_batch(list(zip(images, captions, strict=True)))])
    assert got.shape == expected.shape
    assert float(np.max(np.abs(got - expected))) <= TOLERANCE
    if case.fusion != "concat":
        assert load_config(tmp_path / "repo", "multimodal", 1).labels == tuple(labels)


REFUSED = {
    "a GRU tf2onnx turns into a Loop": ("gru", r"text_encoder: graph holds control-flow ops \['Loop'\] \(from layer "
                                               r"'my_gru'\).*unroll=True"),
    "an activation outside the allow-list": ("softplus", r"text_encoder: graph holds ops outside the CUDA-provider "
                                                         r"allow-list: \['Softplus'\] \(from layer 'my_softplus'\)"),
}  # fmt: skip


@pytest.mark.parametrize(("layer", "message"), REFUSED.values(), ids=REFUSED.keys())
def test_what_tf2onnx_or_the_gate_cannot_take_is_refused_naming_the_layer(layer, message, tmp_path):
    import keras
    from keras import layers

    from fusionserve.export.convert import export
    from fusionserve.preprocess import Vocabulary

    ids = keras.Input((LENGTH,), dtype="int32")
    x = layers.Embedding(64, 8)(ids)
    if layer == "gru":
        x = layers.GRU(FEATURES, name="my_gru")(x)
    else:
        x = layers.Activation("softplus", name="my_softplus")(layers.GlobalAveragePooling1D()(x))
        x = layers.Dense(FEATURES)(x)
    with pytest.raises(ExportError, match=message):
        export(zoo.image_model("cnn", SIZE, FEATURES), keras.Model(ids, x), zoo.fusion_model("mlp", FEATURES),
               Vocabulary({"a": 2}, 64, LENGTH), ["no", "yes"], tmp_path / "repo")  # fmt: skip
    assert not list((tmp_path / "repo").iterdir())
