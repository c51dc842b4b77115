"""New versions of a model repository's models, written all or nothing (no TensorFlow).

``fusionserve export`` (from Keras) and ``fusionserve import`` (from ONNX files) both write here:
every model and the ``multimodal`` pipeline over them are written into a hidden staging folder
inside the repository, and only when all of them passed their checks does each version folder move
into place (a rename, the steps before the pipeline that pins them), so a server polling the
repository never reads half an export, and a failed one leaves the repository as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fusionserve import data as gen
from fusionserve.errors import ExportError
from fusionserve.preprocess import ImagePreprocessing, Vocabulary
from fusionserve.repository import (
    CONFIG_FILE,
    FUSION_CLASSES,
    FUSION_FEATURES,
    MODEL_FILE,
    PIPELINE_NAME,
    PLATFORM_ONNX,
    PLATFORM_PIPELINE,
    SEQUENCE_LENGTH_DYNAMIC,
    ModelConfig,
    TensorSpec,
    list_versions,
    sha256_file,
    write_json,
)

logger = logging.getLogger(__name__)

VOCABULARY_FILE = "vocab.json"
LABELS_FILE = "labels.json"
CLASSES, FEATURES = FUSION_CLASSES, FUSION_FEATURES


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


@dataclass(frozen=True)
class Roles:
    """Which tensors of the three models the pipeline feeds and reads, by name."""

    image: ModelConfig
    text: ModelConfig
    fusion: ModelConfig
    fusion_inputs: tuple[str, str]  # (image features, text features)


IMAGE_HINTS = ("image", "img", "vision", "visual", "pixel", "photo")
TEXT_HINTS = ("text", "txt", "token", "caption", "language", "word", "sentence")


def fusion_order(names: Sequence[str], widths: Sequence[tuple[int, ...]], image: tuple[int, ...],
                 text: tuple[int, ...], declared: Sequence[str] | None = None) -> tuple[int, int]:  # fmt: skip
    """Which of a fusion model's two inputs takes the image features and which the text's, as positions.

    As ``declared`` (the image input's name, then the text input's) when given; else by name when one
    input's name holds an image word (:data:`IMAGE_HINTS`) and the other's a text word; else by shape
    when only one assignment fits the encoders' outputs (``image``, ``text``: their shapes without the
    batch axis); else by position, image first.

    Raises:
        ExportError: ``declared`` does not name the two inputs.
    """
    if declared is not None:
        if sorted(declared) != sorted(names):
            raise ExportError(f"fusion inputs {list(declared)} given, but the fusion model's are {list(names)}")
        return names.index(declared[0]), names.index(declared[1])
    lowered = [n.lower() for n in names]
    for order in ((0, 1), (1, 0)):
        if any(h in lowered[order[0]] for h in IMAGE_HINTS) and any(h in lowered[order[1]] for h in TEXT_HINTS):
            return order
    fits = [o for o in ((0, 1), (1, 0)) if tuple(widths[o[0]]) == tuple(image) and tuple(widths[o[1]]) == tuple(text)]
    return fits[0] if len(fits) == 1 else (0, 1)


def class_labels(kind: str, width: int, labels: Sequence[str] | None, positive_label: str | None) -> list[str]:
    """The labels of a fusion model that outputs ``kind`` (``width`` wide): given, made up, or none.

    Without labels, a classifier's are ``mismatch``/``match`` for two classes, ``class_<i>`` otherwise; a
    fusion model that outputs features has none.

    Raises:
        ExportError: labels for features, labels that do not fit the classes, or a positive label among none.
    """
    if kind not in (CLASSES, FEATURES):
        raise ExportError(f"fusion outputs must be {CLASSES!r} or {FEATURES!r}, not {kind!r}")
    if kind == FEATURES:
        if labels:
            raise ExportError("a fusion model that outputs features has no classes: give no labels")
        labels = []
    elif labels is None:
        labels = list(gen.LABELS) if width == len(gen.LABELS) else [f"class_{i}" for i in range(width)]
    if kind == CLASSES and len(labels) != width:
        raise ExportError(f"{len(labels)} labels given but the fusion model has {width} outputs")
    if positive_label is not None and positive_label not in labels:
        raise ExportError(f"positive label {positive_label!r} is not among the labels {list(labels)}")
    return list(labels)


def created_now() -> str:
    """The time stamp every config of one export carries."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def image_step_preprocessing(preprocessing: ImagePreprocessing) -> dict[str, Any]:
    """An image encoder's ``preprocessing`` entry."""
    return {"type": "image", "decoder": "cv2.imdecode(IMREAD_COLOR)", **preprocessing.to_json()}


def text_step_preprocessing(vocabulary: Vocabulary, *, dynamic: bool = False) -> dict[str, Any]:
    """A text encoder's ``preprocessing`` entry (the vocabulary file holds the rest).

    ``dynamic``: the text encoder takes each batch cut to its longest caption (``sequence_length``
    ``"dynamic"``, see :class:`~fusionserve.repository.VariableLength`), else rows of ``max_length``.
    """
    return {"type": "text", "max_length": vocabulary.max_length, "padding": vocabulary.padding,
            "truncating": vocabulary.truncating, "pad_value": vocabulary.pad_value,
            "sequence_length": SEQUENCE_LENGTH_DYNAMIC if dynamic else vocabulary.max_length,
            "vocabulary_file": VOCABULARY_FILE}  # fmt: skip


class Staging:
    """The hidden folder one export writes its new versions into."""

    def __init__(self, repository: Path, folder: Path) -> None:
        self.repository, self.folder = repository, folder
        self.steps: dict[str, int] = {}

    def new_version(self, name: str) -> tuple[int, Path]:
        """The next version of model ``name`` and its (staged) folder."""
        version = max(list_versions(self.repository, name), default=0) + 1
        vdir = self.folder / name / str(version)
        vdir.mkdir(parents=True)
        return version, vdir

    def add_model(self, config: ModelConfig, onnx_bytes: bytes, vocabulary: Vocabulary | None = None) -> ModelConfig:
        """Write one ONNX model (its version and hash filled in) and its config; return the config written."""
        version, vdir = self.new_version(config.name)
        path = vdir / MODEL_FILE
        path.write_bytes(onnx_bytes)
        if vocabulary is not None:
            vocabulary.save(vdir / VOCABULARY_FILE)
        config = ModelConfig(**{**config.__dict__, "version": version, "sha256": sha256_file(path),
                                "model_file": MODEL_FILE, "platform": PLATFORM_ONNX,
                                "vocabulary_file": VOCABULARY_FILE if vocabulary is not None else None})  # fmt: skip
        write_json(vdir / CONFIG_FILE, config.to_json())
        self.steps[config.name] = version
        return config

    def add_pipeline(self, roles: Roles, preprocessing: ImagePreprocessing, vocabulary: Vocabulary,
                     labels: Sequence[str], positive_label: str | None, *, max_batch_size: int,
                     versions: dict[str, str], extra: dict[str, Any]) -> int:  # fmt: skip
        """Write the ``multimodal`` pipeline over the models added so far; return its version.

        With ``labels`` the fusion model outputs class probabilities and ``positive_label`` (default:
        the last label) is the class Rank scores; without, it outputs features, served as embeddings.
        """
        version, pdir = self.new_version(PIPELINE_NAME)
        vocabulary.save(pdir / VOCABULARY_FILE)
        fused = roles.fusion.outputs[0]
        if labels:
            write_json(pdir / LABELS_FILE, list(labels))
            outputs = (TensorSpec("PROBABILITIES", "FP32", fused.shape), TensorSpec("LABEL", "BYTES", (-1,)))
            own = {"probabilities": "PROBABILITIES", "label": "LABEL"}
            fusion_role = {"outputs": CLASSES, "positive_label": positive_label or labels[-1]}
        else:
            outputs, own = (TensorSpec("FEATURES", "FP32", fused.shape),), {"features": "FEATURES"}
            fusion_role = {"outputs": FEATURES}
        image, text, fusion = roles.image, roles.text, roles.fusion
        pipeline = ModelConfig(
            name=PIPELINE_NAME,
            version=version,
            platform=PLATFORM_PIPELINE,
            inputs=(TensorSpec("IMAGE", "BYTES", (-1,)), TensorSpec("TEXT", "BYTES", (-1,))),
            outputs=outputs,
            max_batch_size=max_batch_size,
            steps=dict(self.steps),
            roles={
                "image_encoder": {"model": image.name, "input": image.inputs[0].name, "output": image.outputs[0].name},
                "text_encoder": {"model": text.name, "input": text.inputs[0].name, "output": text.outputs[0].name},
                "fusion": {"model": fusion.name, "image_input": roles.fusion_inputs[0],
                           "text_input": roles.fusion_inputs[1], "output": fused.name, **fusion_role},
                "pipeline": {"image": "IMAGE", "text": "TEXT", **own},
            },  # fmt: skip
            preprocessing={
                "image": image_step_preprocessing(preprocessing),
                "text": dict(text.preprocessing),  # the text encoder's, how long its rows are included
                "description": "IMAGE (encoded PNG/JPEG/BMP/WebP bytes) → image_encoder; TEXT (UTF-8) → tokens → "
                + ("text_encoder; both features → fusion → PROBABILITIES, LABEL = labels[argmax]" if labels else
                   "text_encoder; both features → fusion → FEATURES"),
            },  # fmt: skip
            labels=tuple(labels),
            vocabulary_file=VOCABULARY_FILE,
            versions=versions,
            extra=extra,
        )
        write_json(pdir / CONFIG_FILE, pipeline.to_json())
        return version


@contextlib.contextmanager
def staging(repository: Path) -> Iterator[Staging]:
    """A :class:`Staging` inside ``repository``; its versions move into place when the block ends without error.

    Raises:
        ExportError: the repository cannot be written (the block's own ExportErrors pass through).
    """
    repository = Path(repository)
    if repository.exists() and not repository.is_dir():
        raise ExportError(f"repository {str(repository)!r} is a file, not a folder")
    try:
        repository.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".staging-", dir=repository))
    except OSError as e:
        raise ExportError(f"cannot write to repository {str(repository)!r}: {e.strerror or e}") from e
    try:
        yield Staging(repository, folder)
        for model_dir in sorted(folder.iterdir(), key=lambda d: d.name == PIPELINE_NAME):
            for version in model_dir.iterdir():
                target = repository / model_dir.name / version.name
                target.parent.mkdir(exist_ok=True)
                os.rename(version, target)  # fails rather than overwrite an existing version
    except OSError as e:
        raise ExportError(f"cannot write to repository {str(repository)!r}: {e}") from e
    finally:
        shutil.rmtree(folder, ignore_errors=True)
