"""A model repository of tiny random-weight ONNX graphs built with ``onnx.helper``: no TensorFlow.

The graphs have the shapes and the kinds of ops of the exported models (a convolution for images,
an embedding + one LSTM op for tokens, concatenation + product + two dense layers + softmax for the
fusion), so the serving tests exercise what the real models exercise in milliseconds. What their
answers mean does not matter here: tests compare the server with onnxruntime run directly.

    build(tmp_path / "repo")                       # image 64×64, tokens [N, 100], vocabulary 10 000
    build(path, image_size=(32, 48), max_length=20)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fusionserve import data as gen
from fusionserve.preprocess import ImagePreprocessing, Vocabulary
from fusionserve.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    PIPELINE_NAME,
    PLATFORM_ONNX,
    PLATFORM_PIPELINE,
    SEQUENCE_LENGTH_DYNAMIC,
    ModelConfig,
    TensorSpec,
    sha256_file,
    write_json,
)

OPSET = 17
FEATURES = 64  # width of both embeddings, as in the exported models
HIDDEN = 8  # LSTM state and convolution channels
GAINS = {"image": 2.0, "lstm": 1.0, "text": 2.0, "out": 6.0}  # outputs spread over (0.1, 0.6), both labels occur


def _init(rng: np.random.Generator, name: str, *shape: int, gain: float = 1.0) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return numpy_helper.from_array(rng.normal(0, gain / fan_in**0.5, shape).astype(np.float32), name)


def _model(nodes, inputs, outputs, initializers, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="fusionserve-tests")
    model.ir_version = 8  # onnxruntime releases of the last two years all read IR 8
    onnx.checker.check_model(model, full_check=True)
    return model


def image_encoder(rng: np.random.Generator, height: int, width: int, channels: int = HIDDEN) -> onnx.ModelProto:
    """``image`` float [N, H, W, 3] (BGR in [0, 1]) → ``image_features`` [N, FEATURES].

    ``channels``: the convolution's output channels (more make each item cost more to run).
    """
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense_w"], ["dense"]),
        helper.make_node("Add", ["dense", "dense_b"], ["image_features"]),
    ]
    inits = [
        _init(rng, "conv_w", channels, 3, 3, 3),
        _init(rng, "conv_b", channels, gain=0.1),
        _init(rng, "dense_w", channels, FEATURES, gain=GAINS["image"]),
        _init(rng, "dense_b", FEATURES, gain=0.1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", height, width, 3])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", FEATURES])],
        inits,
        "image_encoder",
    )


def text_encoder(rng: np.random.Generator, vocabulary_size: int, max_length: int,
                 token_type: int = TensorProto.INT32, *, variable_length: bool = False) -> onnx.ModelProto:  # fmt: skip
    """``tokens`` int32 (or ``token_type``) [N, L] → embedding → one LSTM → dense → ``text_features`` [N, FEATURES].

    ``variable_length``: tokens [N, T] of any T, padded at the back with 0, which the LSTM skips
    (``sequence_lens``: each row's count of other ids), as an export that cuts batches to their longest.
    """
    lengths = ["lengths"] if variable_length else []
    nodes = [
        *([helper.make_node("Equal", ["tokens", "pad"], ["is_pad"]),
           helper.make_node("Not", ["is_pad"], ["is_token"]),
           helper.make_node("Cast", ["is_token"], ["is_token_int"], to=TensorProto.INT32),
           helper.make_node("ReduceSum", ["is_token_int", "axis1"], ["lengths"], keepdims=0)]
          if variable_length else []),
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]),  # [N, L, HIDDEN]
        helper.make_node("Transpose", ["embedded"], ["time_major"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["time_major", "lstm_w", "lstm_r", "lstm_b", *lengths], ["", "last"],
                         hidden_size=HIDDEN),
        helper.make_node("Squeeze", ["last", "axis0"], ["state"]),  # [N, HIDDEN]
        helper.make_node("MatMul", ["state", "dense_w"], ["dense"]),
        helper.make_node("Add", ["dense", "dense_b"], ["text_features"]),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (vocabulary_size, HIDDEN)).astype(np.float32), "embedding"),
        _init(rng, "lstm_w", 1, 4 * HIDDEN, HIDDEN, gain=GAINS["lstm"]),
        _init(rng, "lstm_r", 1, 4 * HIDDEN, HIDDEN, gain=GAINS["lstm"]),
        _init(rng, "lstm_b", 1, 8 * HIDDEN, gain=0.1),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        _init(rng, "dense_w", HIDDEN, FEATURES, gain=GAINS["text"]),
        _init(rng, "dense_b", FEATURES, gain=0.1),
    ]
    if variable_length:
        inits += [numpy_helper.from_array(np.array(0, helper.tensor_dtype_to_np_dtype(token_type)), "pad"),
                  numpy_helper.from_array(np.array([1], np.int64), "axis1")]  # fmt: skip
    return _model(
        nodes,
        [helper.make_tensor_value_info("tokens", token_type, ["batch", "length" if variable_length else max_length])],
        [helper.make_tensor_value_info("text_features", TensorProto.FLOAT, ["batch", FEATURES])],
        inits,
        "text_encoder",
    )


def fusion(rng: np.random.Generator, classes: int, *, features_only: bool = False,
           text_first: bool = False) -> onnx.ModelProto:  # fmt: skip
    """Both features, concatenated with their product → dense + relu → dense + softmax.

    ``features_only``: the concatenation itself is the output (``probabilities`` then holds [N, 3 × FEATURES]
    fused features); ``text_first``: the graph lists its text input first.
    """
    if features_only:
        nodes = [helper.make_node("Mul", ["image_features", "text_features"], ["product"]),
                 helper.make_node("Concat", ["image_features", "text_features", "product"], ["probabilities"], axis=1)]
        inits = []
        classes = 3 * FEATURES
    else:
        nodes, inits = _classifier(rng, classes)
    inputs = [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", FEATURES]),
              helper.make_tensor_value_info("text_features", TensorProto.FLOAT, ["batch", FEATURES])]
    return _model(
        nodes,
        inputs[::-1] if text_first else inputs,
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        inits,
        "fusion",
    )  # fmt: skip


def _classifier(rng: np.random.Generator, classes: int) -> tuple[list, list]:
    nodes = [
        helper.make_node("Mul", ["image_features", "text_features"], ["product"]),
        helper.make_node("Concat", ["image_features", "text_features", "product"], ["joined"], axis=1),
        helper.make_node("MatMul", ["joined", "hidden_w"], ["hidden_mm"]),
        helper.make_node("Add", ["hidden_mm", "hidden_b"], ["hidden_pre"]),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "out_w"], ["logits_mm"]),
        helper.make_node("Add", ["logits_mm", "out_b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [
        _init(rng, "hidden_w", 3 * FEATURES, FEATURES),
        _init(rng, "hidden_b", FEATURES, gain=0.1),
        _init(rng, "out_w", FEATURES, classes, gain=GAINS["out"]),
        _init(rng, "out_b", classes, gain=0.1),
    ]
    return nodes, inits


def _renamed(model: onnx.ModelProto, names: Mapping[str, str]) -> onnx.ModelProto:
    """The graph with its inputs and outputs renamed (``names``: old → new)."""
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        value.name = names.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    onnx.checker.check_model(model, full_check=True)
    return model


def build(
    repository: Path,
    *,
    image_size: tuple[int, int] = (64, 64),
    image_channels: int = HIDDEN,
    max_length: int = 100,
    vocabulary_size: int = 10_000,
    max_batch_size: int = 64,
    color_order: str = "BGR",
    padding: str = "pre",
    tensors: Mapping[str, str] | None = None,
    models: Mapping[str, str] | None = None,
    seed: int = 0,
    version: int = 1,
    labels: tuple[str, ...] = tuple(gen.LABELS),
    positive_label: str | None = None,
    features_only: bool = False,
    text_first: bool = False,
    token_datatype: str = "INT32",
    pipeline_tensors: Mapping[str, str] | None = None,
    variable_length: bool = False,
) -> Path:
    """Write version 1 of the three models and the ``multimodal`` pipeline over them; return the path.

    ``tensors`` renames tensors (``image``, ``image_features``, ``tokens``, ``text_features``,
    ``probabilities``) and ``models`` names the models of the roles (``image_encoder``,
    ``text_encoder``, ``fusion``); the pipeline config says which is which. ``seed`` draws the weights
    (another seed, other answers); ``version`` numbers every model; ``image_channels`` sets how much
    an image-encoder run costs per item. ``labels`` are the classes, and
    ``positive_label`` the one Rank scores (the config says so only when given); ``features_only``
    makes the fusion output fused features (no labels); ``text_first`` lists the fusion graph's text
    input first; ``token_datatype`` is the text encoder's id type; ``pipeline_tensors`` renames the
    pipeline's own tensors (``image``, ``text``, ``probabilities``, ``label``, ``features``) and lists
    them in its config in reverse order, named in ``roles.pipeline``; ``variable_length`` makes the text
    encoder one that takes each batch cut to its longest caption (padding at the back; its config says
    ``"sequence_length": "dynamic"``).
    """
    repository = Path(repository)
    rng = np.random.default_rng(seed)
    height, width = image_size
    t = {n: n for n in ("image", "image_features", "tokens", "text_features", "probabilities")} | dict(tensors or {})
    m = {r: r for r in ("image_encoder", "text_encoder", "fusion")} | dict(models or {})
    labels = () if features_only else tuple(labels)
    token_type = {"INT32": TensorProto.INT32, "INT64": TensorProto.INT64}[token_datatype]
    fused_width = 3 * FEATURES if features_only else len(labels)
    vocab = Vocabulary.fit(gen.generate(200, seed=seed).captions, max_words=vocabulary_size, max_length=max_length)
    padding = "post" if variable_length else padding
    vocab = Vocabulary(vocab.word_index, vocabulary_size, max_length, padding=padding, truncating=padding)
    image_spec = {"type": "image", **ImagePreprocessing(height, width, color_order=color_order).to_json()}
    text_spec = {"type": "text", "max_length": max_length, "padding": padding, "truncating": padding,
                 "vocabulary_file": "vocab.json"}  # fmt: skip
    if variable_length:
        text_spec.update(pad_value=vocab.pad_value, sequence_length=SEQUENCE_LENGTH_DYNAMIC)
    plans = [
        (m["image_encoder"], image_encoder(rng, height, width, image_channels),
         [TensorSpec(t["image"], "FP32", (-1, height, width, 3))],
         [TensorSpec(t["image_features"], "FP32", (-1, FEATURES))], image_spec),
        (m["text_encoder"], text_encoder(rng, vocabulary_size, max_length, token_type, variable_length=variable_length),
         [TensorSpec(t["tokens"], token_datatype, (-1, -1 if variable_length else max_length), (0, vocabulary_size))],
         [TensorSpec(t["text_features"], "FP32", (-1, FEATURES))], text_spec),
        (m["fusion"], fusion(rng, len(labels), features_only=features_only, text_first=text_first),
         [TensorSpec(t["image_features"], "FP32", (-1, FEATURES)),
          TensorSpec(t["text_features"], "FP32", (-1, FEATURES))][::-1 if text_first else 1],
         [TensorSpec(t["probabilities"], "FP32", (-1, fused_width))], {}),
    ]  # fmt: skip
    for name, model, inputs, outputs, preprocessing in plans:
        vdir = repository / name / str(version)
        vdir.mkdir(parents=True)
        onnx.save(_renamed(model, t), str(vdir / MODEL_FILE))
        if name == m["text_encoder"]:
            vocab.save(vdir / "vocab.json")
        config = ModelConfig(
            name=name, version=version, platform=PLATFORM_ONNX, inputs=tuple(inputs), outputs=tuple(outputs),
            max_batch_size=max_batch_size, model_file=MODEL_FILE, sha256=sha256_file(vdir / MODEL_FILE), opset=OPSET,
            preprocessing=preprocessing, labels=labels if name == m["fusion"] else (),
            vocabulary_file="vocab.json" if name == m["text_encoder"] else None,
        )  # fmt: skip
        write_json(vdir / CONFIG_FILE, config.to_json())
    pdir = repository / PIPELINE_NAME / str(version)
    pdir.mkdir(parents=True)
    vocab.save(pdir / "vocab.json")
    write_json(pdir / "labels.json", list(labels))
    roles = {
        "image_encoder": {"model": m["image_encoder"], "input": t["image"], "output": t["image_features"]},
        "text_encoder": {"model": m["text_encoder"], "input": t["tokens"], "output": t["text_features"]},
        "fusion": {"model": m["fusion"], "image_input": t["image_features"], "text_input": t["text_features"],
                   "output": t["probabilities"]},
    }  # fmt: skip
    if features_only:
        roles["fusion"]["outputs"] = "features"
    if positive_label is not None:
        roles["fusion"]["positive_label"] = positive_label
    own = {"image": "IMAGE", "text": "TEXT"}
    own.update({"features": "FEATURES"} if features_only else {"probabilities": "PROBABILITIES", "label": "LABEL"})
    own.update(pipeline_tensors or {})
    kinds = {"image": ("BYTES", (-1,)), "text": ("BYTES", (-1,)), "probabilities": ("FP32", (-1, fused_width)),
             "label": ("BYTES", (-1,)), "features": ("FP32", (-1, fused_width))}  # fmt: skip
    order = list(own)[::-1] if pipeline_tensors else list(own)
    if pipeline_tensors:
        roles["pipeline"] = own
    pipeline = ModelConfig(
        name=PIPELINE_NAME, version=version, platform=PLATFORM_PIPELINE,
        inputs=tuple(TensorSpec(own[r], *kinds[r]) for r in order if r in ("image", "text")),
        outputs=tuple(TensorSpec(own[r], *kinds[r]) for r in order if r not in ("image", "text")),
        max_batch_size=max_batch_size, steps={m[r]: version for r in ("image_encoder", "text_encoder", "fusion")},
        roles=roles, preprocessing={"image": image_spec, "text": text_spec}, labels=labels,
        vocabulary_file="vocab.json",
    )  # fmt: skip
    write_json(pdir / CONFIG_FILE, pipeline.to_json())
    return repository


def add_version(repository: Path, version: int, *, seed: int, skip_pipeline: bool = False) -> None:
    """Add ``version`` of every model (weights from ``seed``) as ``fusionserve export`` does: each
    version folder written aside and renamed into place, the steps before the pipeline."""
    staging = Path(repository) / f".staging-{version}"
    build(staging, seed=seed, version=version)
    for model in ("image_encoder", "text_encoder", "fusion", *(() if skip_pipeline else (PIPELINE_NAME,))):
        (staging / model / str(version)).rename(Path(repository) / model / str(version))
