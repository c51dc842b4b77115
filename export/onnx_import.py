"""``fusionserve import``: a model repository from three ONNX files made elsewhere (no TensorFlow).

PyTorch exports, tf2onnx run by hand: the image encoder (float32 [N, H, W, 3] → features), the text
encoder (integer ids [N, L] → features) and the fusion model (both features → class probabilities or
features), with the tokenizer they were trained with and the image preprocessing they expect. The
same checks as an export from Keras, less the Keras reference: shapes that fit together, the op gate,
and a trial run of the whole chain on generated images and captions preprocessed as the server will;
then the same atomic versioning (export/staging.py). Tensors keep their names; the configs bind them.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from fusionserve.errors import ExportError
from fusionserve.export.convert import parity_inputs
from fusionserve.export.gate import gate
from fusionserve.export.staging import (
    CLASSES,
    FEATURES,
    ExportedModel,
    ExportResult,
    Roles,
    class_labels,
    created_now,
    fusion_order,
    image_step_preprocessing,
    staging,
    text_step_preprocessing,
)
from fusionserve.preprocess import ImagePreprocessing, Vocabulary
from fusionserve.repository import DEFAULT_MAX_BATCH_SIZE, ONNX_TYPES, ModelConfig, TensorSpec
from fusionserve.user_preprocessing import image_preprocessing, read_json, read_tokenizer, with_pad_sequences

logger = logging.getLogger(__name__)

TRIAL_SAMPLES = 16
TRIAL_SEED = 1_000_003
ROLES = ("image_encoder", "text_encoder", "fusion")


class _Graph:
    """One ONNX file: its bytes, graph, onnxruntime session and tensors as specs."""

    def __init__(self, path: Path, role: str) -> None:
        import onnx
        import onnxruntime as ort

        self.role, self.path = role, Path(path)
        try:
            self.data = self.path.read_bytes()
            self.proto = onnx.load_from_string(self.data)
            self.session = ort.InferenceSession(self.data, providers=["CPUExecutionProvider"])
        except FileNotFoundError as e:
            raise ExportError(f"{role} model {str(path)!r} does not exist") from e
        except Exception as e:  # onnx and onnxruntime raise many types for "this is not a model"
            raise ExportError(f"{role} model {str(path)!r} is not an ONNX model onnxruntime loads: {e}") from e
        self.inputs = [self._spec(a) for a in self.session.get_inputs()]
        self.outputs = [self._spec(a) for a in self.session.get_outputs()]

    def _spec(self, arg) -> TensorSpec:
        datatype = ONNX_TYPES.get(arg.type)
        if datatype is None:
            raise ExportError(f"{self.role}: tensor {arg.name!r} is {arg.type}, which the server does not feed")
        shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
        if not shape or shape[0] != -1:
            raise ExportError(f"{self.role}: tensor {arg.name!r} has shape {list(arg.shape)}: its first axis must be "
                              "a dynamic batch axis (torch.onnx.export's dynamic_axes)")  # fmt: skip
        return TensorSpec(arg.name, datatype, shape)

    def expect(self, inputs: int) -> None:
        if len(self.inputs) != inputs or len(self.outputs) != 1:
            raise ExportError(f"{self.role} model must have {inputs} input(s) and 1 output, "
                              f"has {len(self.inputs)} and {len(self.outputs)}")  # fmt: skip

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            out = self.session.run(None, feeds)[0]
        except Exception as e:
            raise ExportError(f"{self.role}: the trial run failed: {e}") from e
        if not np.all(np.isfinite(out)):
            raise ExportError(f"{self.role}: the trial run gave values that are not finite")
        return out


def _shapes(image: _Graph, text: _Graph, fusion: _Graph) -> tuple[int, int]:
    """Check that the three graphs fit together; return the fusion inputs' (image, text) positions."""
    for graph, inputs in ((image, 1), (text, 1), (fusion, 2)):
        graph.expect(inputs)
    pixels, tokens = image.inputs[0], text.inputs[0]
    if pixels.datatype != "FP32" or len(pixels.shape) != 4 or pixels.shape[3] != 3 or min(pixels.shape[1:3]) < 1:
        hint = " (channels first: make the graph take channels last)" if pixels.shape[1:2] == (3,) else ""
        raise ExportError(f"image model input {pixels.name!r} must be FP32 [N, H, W, 3] with fixed H and W, is "
                          f"{pixels.datatype} {list(pixels.shape)}{hint}")  # fmt: skip
    if tokens.datatype not in ("INT32", "INT64") or len(tokens.shape) != 2 or tokens.shape[1] < 1:
        raise ExportError(f"text model input {tokens.name!r} must be INT32 or INT64 [N, L] with a fixed L, is "
                          f"{tokens.datatype} {list(tokens.shape)}")  # fmt: skip
    features = [graph.outputs[0] for graph in (image, text)]
    for graph, spec in zip((image, text), features, strict=True):
        if spec.datatype != "FP32" or len(spec.shape) != 2:
            raise ExportError(f"{graph.role} output {spec.name!r} must be FP32 [N, width], is "
                              f"{spec.datatype} {list(spec.shape)}")  # fmt: skip
    order = fusion_order([t.name for t in fusion.inputs], [t.shape[1:] for t in fusion.inputs],
                         features[0].shape[1:], features[1].shape[1:])  # fmt: skip
    taken = [fusion.inputs[i] for i in order]
    if [t.shape[1:] for t in taken] != [f.shape[1:] for f in features]:
        raise ExportError("fusion model inputs do not match the encoders' outputs: fusion takes "
                          f"{[(t.name, list(t.shape)) for t in fusion.inputs]}, encoders give "
                          f"{[(f.name, list(f.shape)) for f in features]}")  # fmt: skip
    return order


def _outputs_classes(fusion: _Graph) -> bool:
    """True when the fusion graph's output comes out of a Softmax."""
    name = fusion.outputs[0].name
    return any(n.op_type == "Softmax" and name in n.output for n in fusion.proto.graph.node)


def import_models(
    paths: tuple[Path, Path, Path],
    vocab: Vocabulary,
    preprocessing: ImagePreprocessing,
    repository: Path,
    *,
    labels: list[str] | None = None,
    positive_label: str | None = None,
    fusion_outputs: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    samples: int = TRIAL_SAMPLES,
) -> ExportResult:
    """Check three ONNX files against each other, the tokenizer and the preprocessing; add them to ``repository``.

    Args:
        paths: the image encoder's, text encoder's and fusion model's ONNX files.
        vocab: the tokenizer, padding included.
        preprocessing: how images become the image encoder's input.
        repository: where the new versions go.
        labels: one per class; None: ``mismatch``/``match`` for two classes, ``class_<i>`` otherwise.
        positive_label: the class Rank scores (default: the last).
        fusion_outputs: ``probabilities`` or ``features``; None: ``probabilities`` when labels are given or
            the fusion graph's output comes out of a Softmax.
        max_batch_size: written into every config.
        samples: trial-run samples.

    Raises:
        ExportError: naming the model and what failed; the repository is left as it was.
    """
    graphs = tuple(_Graph(p, role) for p, role in zip(paths, ROLES, strict=True))
    return _import(graphs, vocab, preprocessing, repository, labels, positive_label, fusion_outputs,  # type: ignore[arg-type]
                   max_batch_size, samples)  # fmt: skip


def _import(graphs: tuple[_Graph, _Graph, _Graph], vocab: Vocabulary, preprocessing: ImagePreprocessing,
            repository: Path, labels: list[str] | None, positive_label: str | None, fusion_outputs: str | None,
            max_batch_size: int, samples: int) -> ExportResult:  # fmt: skip
    import onnxruntime

    started = time.perf_counter()
    image, text, fusion = graphs
    order = _shapes(image, text, fusion)
    ops = {g.role: gate(g.proto, g.role) for g in (image, text, fusion)}
    pixels, tokens = image.inputs[0], text.inputs[0]
    if (preprocessing.height, preprocessing.width) != pixels.shape[1:3]:
        raise ExportError(f"image preprocessing resizes to {preprocessing.height}x{preprocessing.width}, the image "
                          f"model takes {pixels.shape[1]}x{pixels.shape[2]}")  # fmt: skip
    if vocab.max_length != tokens.shape[1]:
        raise ExportError(f"the tokenizer pads to {vocab.max_length} tokens, the text model takes {tokens.shape[1]}")
    width = fusion.outputs[0].shape[1]
    kind = fusion_outputs or (CLASSES if labels or _outputs_classes(fusion) else FEATURES)
    labels = class_labels(kind, width, labels, positive_label)

    # The trial run: generated images and captions as the server will prepare them, and a row of the
    # highest id and the padding value, which the text encoder's embedding must take.
    images, captions = parity_inputs(preprocessing, vocab, samples, seed=TRIAL_SEED)
    ids = np.concatenate([captions,
                          np.full((1, vocab.max_length), vocab.max_words - 1), np.full((1, vocab.max_length),
                                                                                       vocab.pad_value)])  # fmt: skip
    ids = ids.astype(tokens.dtype)
    image_features = image.run({pixels.name: images})
    text_features = text.run({tokens.name: ids})[:samples]
    features = (image_features, text_features)
    fused = fusion.run({fusion.inputs[i].name: features[k] for k, i in enumerate(order)})
    if fused.shape != (samples, width):
        raise ExportError(f"fusion: the trial run gave shape {list(fused.shape)}, expected [{samples}, {width}]")
    if kind == CLASSES and not np.allclose(fused.sum(1), 1, atol=1e-3):
        raise ExportError("fusion: outputs are taken as class probabilities but do not sum to 1 "
                          "(import it with --fusion-outputs features, or end it with a softmax)")  # fmt: skip

    versions = {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    created = created_now()
    low, high = min(0, vocab.pad_value), max(vocab.max_words, vocab.pad_value + 1)
    trial = {"samples": samples, "checked": "shapes, the op gate, a finite answer from the whole chain",
             "reference": "none: imported ONNX, no source framework to compare with"}  # fmt: skip
    step_preprocessing = {"image_encoder": image_step_preprocessing(preprocessing),
                          "text_encoder": text_step_preprocessing(vocab), "fusion": {}}  # fmt: skip
    ranged = TensorSpec(tokens.name, tokens.datatype, tokens.shape, (low, high))
    inputs = {"image_encoder": [pixels], "text_encoder": [ranged], "fusion": fusion.inputs}
    exported, written = [], []
    with staging(Path(repository)) as stage:
        for graph in (image, text, fusion):
            config = stage.add_model(ModelConfig(
                name=graph.role, version=1, platform="", inputs=tuple(inputs[graph.role]),
                outputs=tuple(graph.outputs), max_batch_size=max_batch_size,
                opset=max((o.version for o in graph.proto.opset_import if o.domain in ("", "ai.onnx")), default=0),
                preprocessing=step_preprocessing[graph.role], labels=tuple(labels) if graph.role == "fusion" else (),
                versions=versions, parity={"trial_run": trial},
                extra={"created": created, "source": {"onnx": str(graph.path)}, "ops": list(ops[graph.role])},
            ), graph.data, vocab if graph.role == "text_encoder" else None)  # fmt: skip
            written.append(config)
            exported.append(ExportedModel(graph.role, config.version, float("nan"), len(graph.data),
                                          time.perf_counter() - started, ops[graph.role]))  # fmt: skip
        roles = Roles(*written, fusion_inputs=(fusion.inputs[order[0]].name, fusion.inputs[order[1]].name))
        version = stage.add_pipeline(roles, preprocessing, vocab, labels, positive_label,
                                     max_batch_size=max_batch_size, versions=versions,
                                     extra={"created": created,
                                            "source": {"imported": [str(g.path) for g in graphs]}})  # fmt: skip
    return ExportResult(Path(repository), tuple(exported), version)


def import_files(
    image: Path,
    text: Path,
    fusion: Path,
    tokenizer: Path,
    repository: Path,
    *,
    image_preprocessing_declared: str | None = None,
    pad_sequences: dict[str, Any] | None = None,
    labels_file: Path | None = None,
    positive_label: str | None = None,
    fusion_outputs: str | None = None,
) -> ExportResult:
    """``fusionserve import``: read the tokenizer, preprocessing and labels, then check and add the models.

    The tokenizer pads to ``pad_sequences``' maxlen, by default the text model's input length; the
    image preprocessing is a mode or a JSON file (see :func:`~fusionserve.user_preprocessing.image_preprocessing`).
    """
    graphs = tuple(_Graph(p, role) for p, role in zip((image, text, fusion), ROLES, strict=True))
    _shapes(*graphs)  # the sizes read below are those of well-formed graphs
    pad = {k: v for k, v in (pad_sequences or {}).items() if v is not None}
    height, width = graphs[0].inputs[0].shape[1:3]
    try:
        vocab = with_pad_sequences(read_tokenizer(Path(tokenizer), pad.get("maxlen") or graphs[1].inputs[0].shape[1]),
                                   pad)  # fmt: skip
        preprocessing = image_preprocessing(image_preprocessing_declared, height, width)
        labels = None if labels_file is None else [str(x) for x in read_json(Path(labels_file), "labels")]
    except (ValueError, TypeError) as e:
        raise ExportError(str(e)) from e
    return _import(graphs, vocab, preprocessing, repository, labels, positive_label, fusion_outputs,  # type: ignore[arg-type]
                   DEFAULT_MAX_BATCH_SIZE, TRIAL_SAMPLES)  # fmt: skip
