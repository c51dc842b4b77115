"""Convert Keras models to ONNX with tf2onnx, gate and parity-check them, write a model repository.

Imports TensorFlow. Nothing is half-written: every model is converted and checked in a staging folder inside the
repository first, and only then moved into place as the next version of each model.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fusionserve import data as gen
from fusionserve.errors import ExportError
from fusionserve.export import DEFAULT_OPSET
from fusionserve.preprocess import ImagePreprocessing, Vocabulary, decode_image, encode_png, preprocess_image
from fusionserve.repository import (
    CONFIG_FILE,
    DEFAULT_MAX_BATCH_SIZE,
    MODEL_FILE,
    PIPELINE_NAME,
    PLATFORM_ONNX,
    PLATFORM_PIPELINE,
    ModelConfig,
    TensorSpec,
    list_versions,
    sha256_file,
    write_json,
)

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
PARITY_SAMPLES = 64
PARITY_SEED = 1_000_003

# Ops onnxruntime's CUDA execution provider runs (a conservative subset). Loop/Scan/If are left
# out on purpose: they fall back to host control flow and kill batching throughput.
ALLOWED_OPS = frozenset(
    {
        "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
        "ConstantOfShape", "Conv", "Div", "Dropout", "Equal", "Erf", "Exp", "Expand", "Flatten",
        "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "Identity", "LSTM", "GRU",
        "LeakyRelu", "Less", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Not", "Pad", "Pow",
        "Range", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape", "Sigmoid",
        "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose",
        "Unsqueeze", "Where",
    }
)  # fmt: skip
FORBIDDEN_OPS = frozenset({"Loop", "Scan", "If"})


@dataclass(frozen=True)
class ExportedModel:
    """One converted model and its checks."""

    name: str
    version: int
    max_abs_diff: float
    onnx_bytes: int
    seconds: float
    ops: tuple[str, ...]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote."""

    repository: Path
    models: tuple[ExportedModel, ...]
    pipeline_version: int


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


def check_models(image_model, text_model, fusion_model, vocab: Vocabulary) -> None:
    """Check that the three models fit together; raise ExportError saying what does not."""
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
            f"text model input must be [N, {vocab.max_length}] (the vocabulary's max_length), is {list(text_in)}"
        )
    image_out = _dims(image_model.outputs[0].shape)
    text_out = _dims(text_model.outputs[0].shape)
    fusion_in = [_dims(t.shape) for t in fusion_model.inputs]
    if fusion_in[0][1:] != image_out[1:] or fusion_in[1][1:] != text_out[1:]:
        raise ExportError(
            "fusion model inputs do not match the encoders' outputs: fusion takes "
            f"{[list(s) for s in fusion_in]}, encoders give image {list(image_out)} and text {list(text_out)}"
        )
    fusion_out = _dims(fusion_model.outputs[0].shape)
    if len(fusion_out) != 2 or fusion_out[1] < 2:
        raise ExportError(f"fusion model output must be [N, classes] with classes >= 2, is {list(fusion_out)}")
    rows = token_range(text_model, vocab)[1]
    if rows < vocab.max_words:
        raise ExportError(
            f"text model's embedding has {rows} rows, fewer than the vocabulary's {vocab.max_words} token ids"
        )


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


def gate(model_proto, name: str) -> tuple[str, ...]:
    """Fail when the graph holds control flow or ops outside the CUDA-provider allow-list."""
    ops = sorted({n.op_type for n in model_proto.graph.node})
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{name}: graph holds control-flow ops {bad}; export a model without loops")
    unknown = sorted(set(ops) - ALLOWED_OPS)
    if unknown:
        raise ExportError(f"{name}: graph holds ops outside the CUDA-provider allow-list: {unknown}")
    return tuple(ops)


def parity(keras_model, path: Path, inputs: dict[str, np.ndarray], name: str) -> float:
    """Max absolute difference between Keras and onnxruntime on the same inputs."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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
    image_size: tuple[int, int], vocab: Vocabulary, n: int, seed: int = PARITY_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out generated samples, preprocessed exactly as the server will (PNG bytes → tensors)."""
    ds = gen.generate(n, seed)
    images = np.stack([preprocess_image(decode_image(encode_png(img)), *image_size) for img in ds.images])
    return images, vocab.encode(ds.captions)


def export(
    image_model,
    text_model,
    fusion_model,
    vocab: Vocabulary,
    labels: Sequence[str],
    repository: Path,
    *,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    samples: int = PARITY_SAMPLES,
    source: dict[str, Any] | None = None,
) -> ExportResult:
    """Convert, gate and parity-check the three models; add them as new versions to ``repository``.

    Raises:
        ExportError: naming the model and what failed; the repository is left as it was.
    """
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"repository {str(repository)!r} is a file, not a folder")
    check_models(image_model, text_model, fusion_model, vocab)
    labels = list(labels)
    n_classes = int(fusion_model.outputs[0].shape[-1])
    if len(labels) != n_classes:
        raise ExportError(f"{len(labels)} labels given but the fusion model has {n_classes} outputs")
    try:
        repository.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repository))
    except OSError as e:
        raise ExportError(f"cannot write to repository {str(repository)!r}: {e.strerror or e}") from e
    try:
        result = _export_into(
            staging, image_model, text_model, fusion_model, vocab, labels, repository, opset,
            max_batch_size, samples, source or {},
        )  # fmt: skip
        # Each version folder appears whole (a rename), the steps before the pipeline that pins them,
        # so a server polling the repository never reads half an export.
        for model_dir in sorted(staging.iterdir(), key=lambda d: d.name == PIPELINE_NAME):
            for version in model_dir.iterdir():
                target = repository / model_dir.name / version.name
                target.parent.mkdir(exist_ok=True)
                os.rename(version, target)  # fails rather than overwrite an existing version
        return result
    except OSError as e:
        raise ExportError(f"cannot write to repository {str(repository)!r}: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_into(
    staging: Path,
    image_model,
    text_model,
    fusion_model,
    vocab: Vocabulary,
    labels: list[str],
    repository: Path,
    opset: int,
    max_batch_size: int,
    samples: int,
    source: dict[str, Any],
) -> ExportResult:
    versions = tool_versions()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    height, width = int(image_model.inputs[0].shape[1]), int(image_model.inputs[0].shape[2])
    images, tokens = parity_inputs((height, width), vocab, samples)
    image_features = np.asarray(image_model(images))
    text_features = np.asarray(text_model(tokens))
    feat_i, feat_t = image_features.shape[1], text_features.shape[1]
    n_classes = int(fusion_model.outputs[0].shape[-1])
    token_ids = token_range(text_model, vocab)

    plans = [
        ("image_encoder", image_model, {"image": images}, [TensorSpec("image", "FP32", (-1, height, width, 3))],
         [TensorSpec("image_features", "FP32", (-1, feat_i))],
         {"type": "image", "decoder": "cv2.imdecode(IMREAD_COLOR)", **ImagePreprocessing(height, width).to_json()}),
        ("text_encoder", text_model, {"tokens": tokens},
         [TensorSpec("tokens", "INT32", (-1, vocab.max_length), token_ids)],
         [TensorSpec("text_features", "FP32", (-1, feat_t))],
         {"type": "text", "max_length": vocab.max_length, "padding": vocab.padding, "truncating": vocab.truncating,
          "vocabulary_file": "vocab.json"}),
        ("fusion", fusion_model, {"image_features": image_features, "text_features": text_features},
         [TensorSpec("image_features", "FP32", (-1, feat_i)), TensorSpec("text_features", "FP32", (-1, feat_t))],
         [TensorSpec("probabilities", "FP32", (-1, n_classes))], {}),
    ]  # fmt: skip
    exported = []
    steps: dict[str, int] = {}
    for name, model, inputs, in_specs, out_specs, preprocessing in plans:
        started = time.perf_counter()
        version = max(list_versions(repository, name), default=0) + 1
        vdir = staging / name / str(version)
        vdir.mkdir(parents=True)
        proto = to_onnx(model, name, [t.name for t in in_specs], [t.name for t in out_specs], opset)
        ops = gate(proto, name)
        path = vdir / MODEL_FILE
        path.write_bytes(proto.SerializeToString())
        diff = parity(model, path, inputs, name)
        seconds = time.perf_counter() - started
        if name == "text_encoder":
            vocab.save(vdir / "vocab.json")
        config = ModelConfig(
            name=name,
            version=version,
            platform=PLATFORM_ONNX,
            inputs=tuple(in_specs),
            outputs=tuple(out_specs),
            max_batch_size=max_batch_size,
            model_file=MODEL_FILE,
            sha256=sha256_file(path),
            opset=opset,
            preprocessing=preprocessing,
            labels=tuple(labels) if name == "fusion" else (),
            vocabulary_file="vocab.json" if name == "text_encoder" else None,
            versions=versions,
            parity={"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "samples": samples,
                    "inputs": "held-out generated samples, preprocessed as the server does"},
            extra={"created": created, "source": source, "export_seconds": round(seconds, 2), "ops": list(ops)},
        )  # fmt: skip
        write_json(vdir / CONFIG_FILE, config.to_json())
        steps[name] = version
        exported.append(ExportedModel(name, version, diff, path.stat().st_size, seconds, ops))
        logger.info("%s v%d: max abs diff %.3g, %d bytes, %.1fs", name, version, diff, path.stat().st_size, seconds)

    pipeline_version = max(list_versions(repository, PIPELINE_NAME), default=0) + 1
    pdir = staging / PIPELINE_NAME / str(pipeline_version)
    pdir.mkdir(parents=True)
    vocab.save(pdir / "vocab.json")
    write_json(pdir / "labels.json", labels)
    pipeline = ModelConfig(
        name=PIPELINE_NAME,
        version=pipeline_version,
        platform=PLATFORM_PIPELINE,
        inputs=(TensorSpec("IMAGE", "BYTES", (-1,)), TensorSpec("TEXT", "BYTES", (-1,))),
        outputs=(TensorSpec("PROBABILITIES", "FP32", (-1, n_classes)), TensorSpec("LABEL", "BYTES", (-1,))),
        max_batch_size=max_batch_size,
        steps=steps,
        roles={
            "image_encoder": {"model": "image_encoder", "input": "image", "output": "image_features"},
            "text_encoder": {"model": "text_encoder", "input": "tokens", "output": "text_features"},
            "fusion": {"model": "fusion", "image_input": "image_features", "text_input": "text_features",
                       "output": "probabilities"},
        },
        preprocessing={
            "image": plans[0][5],
            "text": plans[1][5],
            "description": "IMAGE (encoded PNG/JPEG/BMP/WebP bytes) → image_encoder; TEXT (UTF-8) → "
            "tokens → text_encoder; both features → fusion → PROBABILITIES, LABEL = labels[argmax]",
        },
        labels=tuple(labels),
        vocabulary_file="vocab.json",
        versions=versions,
        extra={"created": created, "source": source},
    )
    write_json(pdir / CONFIG_FILE, pipeline.to_json())
    return ExportResult(repository, tuple(exported), pipeline_version)


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
    vocab_file: Path,
    repository: Path,
    *,
    labels_file: Path | None = None,
    opset: int = DEFAULT_OPSET,
) -> ExportResult:
    """Export three ``.keras`` files and a vocabulary JSON (users' own models)."""
    import json

    vocab_file = Path(vocab_file)
    try:
        vocab = Vocabulary.load(vocab_file)
    except FileNotFoundError as e:
        raise ExportError(f"vocabulary {str(vocab_file)!r} does not exist") from e
    except (ValueError, OSError) as e:
        raise ExportError(f"vocabulary {str(vocab_file)!r} is not a valid vocabulary JSON: {e}") from e
    models = [load_keras_model(p, role) for p, role in ((image, "image"), (text, "text"), (fusion, "fusion"))]
    if labels_file is not None and Path(labels_file).is_file():
        labels = [str(x) for x in json.loads(Path(labels_file).read_text(encoding="utf-8"))]
    else:
        classes = int(models[2].outputs[0].shape[-1])
        labels = list(gen.LABELS) if classes == len(gen.LABELS) else [f"class_{i}" for i in range(classes)]
    source = {"image_model": str(image), "text_model": str(text), "fusion_model": str(fusion)}
    return export(*models, vocab, labels, repository, opset=opset, source=source)
