"""Convert Keras models to ONNX with tf2onnx, gate and parity-check them, write a model repository.

Imports TensorFlow. Nothing is half-written: every model is converted and checked in a staging folder
inside the repository first (export/staging.py), and only then moved into place as the next version
of each model. Any architecture tf2onnx converts into ops the gate (export/gate.py) allows is taken;
a text model that starts with a ``TextVectorization`` layer is split at it (export/text_vectorization.py).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fusionserve import data as gen
from fusionserve.errors import ExportError
from fusionserve.export import DEFAULT_OPSET, text_vectorization, variable_length
from fusionserve.export.gate import gate
from fusionserve.export.staging import (
    CLASSES,
    FEATURES,
    ExportedModel,
    ExportResult,
    Roles,
    Staging,
    class_labels,
    created_now,
    fusion_order,
    image_step_preprocessing,
    staging,
    text_step_preprocessing,
)
from fusionserve.preprocess import ImagePreprocessing, Vocabulary, decode_image, encode_png
from fusionserve.repository import DEFAULT_MAX_BATCH_SIZE, ModelConfig, TensorSpec
from fusionserve.user_preprocessing import image_preprocessing, read_tokenizer, with_pad_sequences

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
PARITY_SAMPLES = 64
PARITY_SEED = 1_000_003


def tool_versions() -> dict[str, str]:
    """Versions of everything that shaped the exported graphs."""
    import keras
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf2onnx": tf2onnx.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def load_keras_model(path: Path, role: str):
    """Load a ``.keras`` file, with errors that name the file and the role it plays."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{role} model {str(path)!r} does not exist")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # keras raises many types for "this is not a model"
        raise ExportError(f"{role} model {str(path)!r} is not a Keras model file: {e}") from e


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    return tuple(-1 if d is None else int(d) for d in shape)


def check_models(image_model, text_model, fusion_model, vocab: Vocabulary) -> tuple[int, int]:
    """Check that the three models fit together; raise ExportError saying what does not.

    Returns:
        the fusion model's (image input, text input) positions (see staging.fusion_order).
    """
    for role, model, n_in in (("image", image_model, 1), ("text", text_model, 1), ("fusion", fusion_model, 2)):
        if len(model.inputs) != n_in or len(model.outputs) != 1:
            raise ExportError(
                f"{role} model must have {n_in} input(s) and 1 output, "
                f"has {len(model.inputs)} and {len(model.outputs)}"
            )
    image_in = _dims(image_model.inputs[0].shape)
    if len(image_in) != 4 or image_in[3] != 3 or image_in[1] < 1 or image_in[2] < 1:
        raise ExportError(f"image model input must be [N, H, W, 3] with fixed H and W, is {list(image_in)}")
    text_in = _dims(text_model.inputs[0].shape)
    if len(text_in) != 2 or text_in[1] != vocab.max_length:
        raise ExportError(
            f"text model input must be [N, {vocab.max_length}] (the tokenizer's padded length), is {list(text_in)}"
        )
    image_out = _dims(image_model.outputs[0].shape)
    text_out = _dims(text_model.outputs[0].shape)
    for role, shape in (("image", image_out), ("text", text_out)):
        if len(shape) != 2:
            raise ExportError(f"{role} model output must be features [N, width], is {list(shape)}")
    names, widths = [t.name for t in fusion_model.inputs], [_dims(t.shape)[1:] for t in fusion_model.inputs]
    order = fusion_order(names, widths, image_out[1:], text_out[1:])
    fusion_in = [_dims(fusion_model.inputs[i].shape) for i in order]
    if fusion_in[0][1:] != image_out[1:] or fusion_in[1][1:] != text_out[1:]:
        raise ExportError(
            "fusion model inputs do not match the encoders' outputs: fusion takes "
            f"{[list(s) for s in fusion_in]}, encoders give image {list(image_out)} and text {list(text_out)}"
        )
    fusion_out = _dims(fusion_model.outputs[0].shape)
    if len(fusion_out) != 2 or fusion_out[1] < 1:
        raise ExportError(f"fusion model output must be [N, classes] or [N, features], is {list(fusion_out)}")
    low, rows = token_range(text_model, vocab)
    ids = [vocab.max_words - 1, vocab.pad_value]
    if min(ids) < low or max(ids) >= rows:
        raise ExportError(f"text model's embedding takes ids [{low}, {rows}), but the tokenizer gives ids up to "
                          f"{vocab.max_words - 1} and pads with {vocab.pad_value}")  # fmt: skip
    return order


def token_range(text_model, vocab: Vocabulary) -> tuple[int, int]:
    """The token ids the text model takes: [0, rows of its first Embedding), else [0, vocabulary size)."""
    import keras

    layers = list(text_model.layers)
    while layers:
        layer = layers.pop(0)
        if isinstance(layer, keras.layers.Embedding):
            return 0, int(layer.input_dim)
        layers[:0] = getattr(layer, "layers", [])  # a nested model's own layers, in order
    return 0, vocab.max_words


def layer_names(model) -> set[str]:
    """Every layer's name, nested models' included (the gate names culprits by them)."""
    names, layers = set(), list(model.layers)
    while layers:
        layer = layers.pop()
        names.add(layer.name)
        layers += getattr(layer, "layers", [])
    return names


def fusion_outputs_of(fusion_model) -> str:
    """``probabilities`` when the fusion model's output layer is a softmax, else ``features``."""
    import keras

    layer = fusion_model.outputs[0]._keras_history[0]
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    return CLASSES if isinstance(layer, keras.layers.Softmax) or activation == "softmax" else FEATURES


def _rename_io(model_proto, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Give the graph's inputs/outputs our canonical names and a named dynamic batch axis."""
    graph = model_proto.graph
    renames = {}
    for value, new in [*zip(graph.input, inputs, strict=True), *zip(graph.output, outputs, strict=True)]:
        if value.name != new:
            renames[value.name] = new
            value.name = new
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    if renames:
        for node in graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = renames.get(name, name)
            for i, name in enumerate(node.output):
                node.output[i] = renames.get(name, name)


def to_onnx(model, name: str, input_names: Sequence[str], output_names: Sequence[str], opset: int):
    """Convert one Keras model with tf2onnx (explicit input signature, dynamic batch axis)."""
    import tensorflow as tf
    import tf2onnx

    signature = [
        tf.TensorSpec((None, *t.shape[1:]), t.dtype, name=n) for t, n in zip(model.inputs, input_names, strict=True)
    ]
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    except Exception as e:
        raise ExportError(f"{name}: tf2onnx conversion failed: {e}") from e
    _rename_io(proto, input_names, output_names)
    return proto


def parity(keras_model, onnx_model: Path | bytes, inputs: dict[str, np.ndarray], name: str) -> float:
    """Max absolute difference between Keras and onnxruntime on the same inputs (in the Keras model's order)."""
    import onnxruntime as ort

    try:
        model = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{name}: onnxruntime cannot load the exported model: {e}") from e
    expected = np.asarray(keras_model(list(inputs.values()) if len(inputs) > 1 else next(iter(inputs.values()))))
    got = session.run(None, inputs)[0]
    if got.shape != expected.shape:
        raise ExportError(f"{name}: onnxruntime output shape {got.shape} != Keras {expected.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"{name}: onnxruntime differs from Keras by {diff:.3g} (max abs) on {len(got)} samples, "
            f"over the {PARITY_TOLERANCE:g} tolerance"
        )
    return diff


def parity_inputs(
    preprocessing: ImagePreprocessing, vocab: Vocabulary, n: int, seed: int = PARITY_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out generated samples, preprocessed exactly as the server will (PNG bytes → tensors)."""
    ds = gen.generate(n, seed)
    images = np.stack([preprocessing.apply(decode_image(encode_png(img))) for img in ds.images])
    return images, vocab.encode(ds.captions)


def export(
    image_model,
    text_model,
    fusion_model,
    vocab: Vocabulary | None,
    labels: Sequence[str] | None,
    repository: Path,
    *,
    preprocessing: ImagePreprocessing | str | None = None,
    positive_label: str | None = None,
    fusion_outputs: str | None = None,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    samples: int = PARITY_SAMPLES,
    source: dict[str, Any] | None = None,
) -> ExportResult:
    """Convert, gate and parity-check the three models; add them as new versions to ``repository``.

    Args:
        image_model: Keras model, float32 [N, H, W, 3] → features.
        text_model: Keras model, token ids [N, L] → features; or one that starts with TextVectorization
            (then ``vocab`` is None: the layer is the tokenizer).
        fusion_model: Keras model, (image features, text features) → class probabilities or features.
        vocab: the tokenizer, padding included.
        labels: one per class; None: ``mismatch``/``match`` for two classes, ``class_<i>`` otherwise.
        repository: where the new versions go.
        preprocessing: how images become the image model's input, or its declaration (a mode or a JSON
            file, see :func:`~fusionserve.user_preprocessing.image_preprocessing`); default: the seed's.
        positive_label: the class Rank scores (default: the last).
        fusion_outputs: ``probabilities`` or ``features``; None: ``probabilities`` when labels are given or
            the output layer is a softmax.
        opset: the ONNX opset.
        max_batch_size: written into every config.
        samples: parity samples.
        source: recorded in the configs.

    Raises:
        ExportError: naming the model and what failed; the repository is left as it was.
    """
    lifted, text_model = text_vectorization.lift(text_model)
    if lifted is not None and vocab is not None:
        raise ExportError("the text model tokenises itself (TextVectorization): give no tokenizer or vocabulary")
    vocab = vocab or lifted
    if vocab is None:
        raise ExportError("give the text model's tokenizer (a Keras Tokenizer's to_json() or a vocabulary JSON)")
    order = check_models(image_model, text_model, fusion_model, vocab)
    width = int(fusion_model.outputs[0].shape[-1])
    kind = fusion_outputs or (CLASSES if labels else fusion_outputs_of(fusion_model))
    labels = class_labels(kind, width, labels, positive_label)
    height, width_px = int(image_model.inputs[0].shape[1]), int(image_model.inputs[0].shape[2])
    if not isinstance(preprocessing, ImagePreprocessing):
        try:
            preprocessing = image_preprocessing(preprocessing, height, width_px)
        except ValueError as e:
            raise ExportError(str(e)) from e
    if (preprocessing.height, preprocessing.width) != (height, width_px):
        raise ExportError(f"image preprocessing resizes to {preprocessing.height}x{preprocessing.width}, "
                          f"the image model takes {height}x{width_px}")  # fmt: skip
    with staging(Path(repository)) as stage:
        return _export_into(stage, (image_model, text_model, fusion_model), vocab, preprocessing, labels,
                            positive_label, order, kind, opset, max_batch_size, samples, source or {})  # fmt: skip


def _export_into(stage: Staging, models: tuple, vocab: Vocabulary, preprocessing: ImagePreprocessing,
                 labels: list[str], positive_label: str | None, order: tuple[int, int], kind: str, opset: int,
                 max_batch_size: int, samples: int, source: dict[str, Any]) -> ExportResult:  # fmt: skip
    image_model, text_model, fusion_model = models
    versions = tool_versions()
    created = created_now()
    images, tokens = parity_inputs(preprocessing, vocab, samples)
    tokens = tokens.astype(np.dtype(text_model.inputs[0].dtype), copy=False)
    image_features = np.asarray(image_model(images))
    text_features = np.asarray(text_model(tokens))
    feat_i, feat_t = image_features.shape[1], text_features.shape[1]
    fused_width = int(fusion_model.outputs[0].shape[-1])
    token_datatype = {"int32": "INT32", "int64": "INT64"}.get(str(tokens.dtype))
    if token_datatype is None:
        raise ExportError(f"text model input must take int32 or int64 token ids, takes {tokens.dtype}")

    fusion_names = ["image_features", "text_features"] if order == (0, 1) else ["text_features", "image_features"]
    fusion_inputs = {"image_features": image_features, "text_features": text_features}
    plans = [
        ("image_encoder", image_model, {"image": images}, [TensorSpec("image", "FP32", (-1, *images.shape[1:3], 3))],
         [TensorSpec("image_features", "FP32", (-1, feat_i))], image_step_preprocessing(preprocessing)),
        ("text_encoder", text_model, {"tokens": tokens},
         [TensorSpec("tokens", token_datatype, (-1, vocab.max_length), token_range(text_model, vocab))],
         [TensorSpec("text_features", "FP32", (-1, feat_t))], text_step_preprocessing(vocab)),
        ("fusion", fusion_model, {n: fusion_inputs[n] for n in fusion_names},
         [TensorSpec(n, "FP32", (-1, fusion_inputs[n].shape[1])) for n in fusion_names],
         [TensorSpec(kind, "FP32", (-1, fused_width))], {}),
    ]  # fmt: skip
    exported, written = [], []
    for name, model, inputs, in_specs, out_specs, step_preprocessing in plans:
        started = time.perf_counter()
        length_parity: dict[str, Any] = {}
        if name == "text_encoder":
            proto, in_specs, step_preprocessing, length_parity = text_encoder_onnx(model, vocab, in_specs, out_specs,
                                                                                   opset)
        else:
            proto = to_onnx(model, name, [t.name for t in in_specs], [t.name for t in out_specs], opset)
        ops = gate(proto, name, layer_names(model))
        onnx_bytes = proto.SerializeToString()
        diff = parity(model, onnx_bytes, inputs, name)
        seconds = time.perf_counter() - started
        config = stage.add_model(ModelConfig(
            name=name, version=1, platform="", inputs=tuple(in_specs), outputs=tuple(out_specs),
            max_batch_size=max_batch_size, opset=opset, preprocessing=step_preprocessing,
            labels=tuple(labels) if name == "fusion" else (), versions=versions,
            parity={"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "samples": samples,
                    "inputs": "held-out generated samples, preprocessed as the server does", **length_parity},
            extra={"created": created, "source": source, "export_seconds": round(seconds, 2), "ops": list(ops)},
        ), onnx_bytes, vocab if name == "text_encoder" else None)  # fmt: skip
        written.append(config)
        exported.append(ExportedModel(name, config.version, diff, len(onnx_bytes), seconds, ops))
        logger.info("%s v%d: max abs diff %.3g, %d bytes, %.1fs", name, config.version, diff, len(onnx_bytes), seconds)
    roles = Roles(*written, fusion_inputs=("image_features", "text_features"))
    pipeline_version = stage.add_pipeline(roles, preprocessing, vocab, labels, positive_label,
                                          max_batch_size=max_batch_size, versions=versions,
                                          extra={"created": created, "source": source})  # fmt: skip
    return ExportResult(stage.repository, tuple(exported), pipeline_version)


def text_encoder_onnx(model, vocab: Vocabulary, in_specs: list[TensorSpec], out_specs: list[TensorSpec],
                  opset: int) -> tuple[Any, list[TensorSpec], dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The text encoder's graph, input specs, preprocessing entry and length check (for its parity record).

    Cut to each batch's longest caption when the model's answers do not depend on the padding and the
    graph can skip it (export/variable_length.py), else at full length, as every export before.
    """
    tokens, features = in_specs[0], out_specs[0]
    decision = variable_length.decide(model, vocab, token_range(model, vocab), tokens.name, features.name, opset,
                                      to_onnx)  # fmt: skip
    logger.info("text_encoder: %s: %s", "cut to each batch's longest caption" if decision.dynamic else "full length",
                decision.reason)  # fmt: skip
    if decision.proto is not None:
        proto, in_specs = decision.proto, [replace(tokens, shape=(-1, -1))]
    else:
        proto = to_onnx(model, "text_encoder", [tokens.name], [features.name], opset)
        try:
            gate(proto, "text_encoder", layer_names(model))
        except ExportError as e:
            raise ExportError(f"{e} (nor can it be exported to skip its padding: {decision.reason})") from e
    preprocessing = text_step_preprocessing(vocab, dynamic=decision.dynamic)
    return proto, in_specs, preprocessing, {"sequence_length": decision.parity()}


def export_from_dir(trained: Path, repository: Path, *, opset: int = DEFAULT_OPSET) -> ExportResult:
    """Export what ``fusionserve train`` wrote into ``trained``."""
    trained = Path(trained)
    if not trained.is_dir():
        raise ExportError(f"--from {str(trained)!r} is not a folder written by 'fusionserve train'")
    return export_files(
        trained / "image_encoder.keras",
        trained / "text_encoder.keras",
        trained / "fusion.keras",
        trained / "vocab.json",
        repository,
        labels_file=trained / "labels.json",
        opset=opset,
    )


def export_files(
    image: Path,
    text: Path,
    fusion: Path,
    vocab_file: Path | None,
    repository: Path,
    *,
    labels_file: Path | None = None,
    image_preprocessing_declared: str | None = None,
    pad_sequences: dict[str, Any] | None = None,
    positive_label: str | None = None,
    fusion_outputs: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Export three ``.keras`` files (users' own models) with their tokenizer and image preprocessing.

    Args:
        image: the image model.
        text: the text model.
        fusion: the fusion model.
        vocab_file: a Keras ``Tokenizer.to_json()`` or a fusionserve vocabulary; None when the text model
            starts with TextVectorization.
        repository: where the new versions go.
        labels_file: a JSON list of class labels.
        image_preprocessing_declared: a mode (``seed``, ``caffe``, ``tf``, ``torch``) or a JSON file.
        pad_sequences: ``maxlen``, ``padding``, ``truncating``, ``value`` (None: Keras' defaults; maxlen:
            the text model's input length).
        positive_label: the class Rank scores.
        fusion_outputs: ``probabilities`` or ``features`` (see :func:`export`).
        opset: the ONNX opset.
    """
    models = [load_keras_model(p, role) for p, role in ((image, "image"), (text, "text"), (fusion, "fusion"))]
    pad = {k: v for k, v in (pad_sequences or {}).items() if v is not None}
    vocab = None
    if vocab_file is not None:
        length = _dims(models[1].inputs[0].shape)[1:2]
        try:
            vocab = read_tokenizer(Path(vocab_file), pad.get("maxlen") or (length[0] if length else None))
            vocab = with_pad_sequences(vocab, pad)
        except ValueError as e:
            raise ExportError(str(e)) from e
    elif pad:
        raise ExportError("pad_sequences settings are for a tokenizer file; TextVectorization pads by itself")
    labels = None
    if labels_file is not None and Path(labels_file).is_file():
        labels = [str(x) for x in json.loads(Path(labels_file).read_text(encoding="utf-8"))]
    source = {"image_model": str(image), "text_model": str(text), "fusion_model": str(fusion)}
    return export(*models, vocab, labels, repository, preprocessing=image_preprocessing_declared,
                  positive_label=positive_label,
                  fusion_outputs=fusion_outputs, opset=opset, source=source)  # fmt: skip
