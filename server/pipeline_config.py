"""A pipeline's plan, read from its ``config.json`` and checked against its steps' configs.

A pipeline config names three roles and the tensors each is reached through, and its own tensors::

    "steps": {"image_encoder": 1, "text_encoder": 1, "fusion": 1},
    "roles": {
      "image_encoder": {"model": "image_encoder", "input": "image", "output": "image_features"},
      "text_encoder": {"model": "text_encoder", "input": "tokens", "output": "text_features"},
      "fusion": {"model": "fusion", "image_input": "image_features", "text_input": "text_features",
                 "output": "probabilities", "outputs": "probabilities", "positive_label": "match"},
      "pipeline": {"image": "IMAGE", "text": "TEXT", "probabilities": "PROBABILITIES", "label": "LABEL"}},
    "preprocessing": {"image": {"height": 64, "width": 64, "color_order": "BGR", "scale": "1/255", ...},
                      "text": {"max_length": 100, "padding": "pre", "truncating": "pre"}}

The fusion model outputs class ``probabilities`` (one per label; ``positive_label`` is the class
``Rank`` scores, by default the last) or fused ``features`` (no labels: the pipeline embeds, and its
own outputs are ``{"features": "FEATURES"}``). What a config leaves out is taken from the steps (a
role's model is the step of the role's name; a tensor is the step's only input or output; the fusion
model's first input is the image's; the pipeline's own tensors in the order image, text, then
probabilities and label); what it says must agree with them: image size with the image encoder's
input, token length and padding with the vocabulary and the text encoder's input (or, for one that takes
each batch cut to its longest caption, its ``sequence_length: "dynamic"`` settings), feature widths
between encoders and fusion, classes with the labels. A contradiction is a RepositoryError that
names the file and both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fusionserve.errors import RepositoryError
from fusionserve.preprocess import ImagePreprocessing, Vocabulary
from fusionserve.repository import (
    FUSION_CLASSES,
    FUSION_FEATURES,
    INTEGER_DATATYPES,
    SEQUENCE_LENGTH_DYNAMIC,
    ModelConfig,
    TensorSpec,
    variable_length,
)

ROLES = ("image_encoder", "text_encoder", "fusion")
PIPELINE_ROLE = "pipeline"  # the pipeline's own tensors, by name
CLASSES, FEATURES = FUSION_CLASSES, FUSION_FEATURES


@dataclass(frozen=True)
class Step:
    """One role of a pipeline: which model version, fed through which tensors."""

    model: str
    version: int
    inputs: tuple[str, ...]  # fusion: (image features, text features)
    output: str


@dataclass(frozen=True)
class PipelinePlan:
    """Everything the multimodal pipeline needs to run, resolved and checked."""

    image: Step
    text: Step
    fusion: Step
    image_preprocessing: ImagePreprocessing
    vocabulary: Vocabulary
    labels: tuple[str, ...]  # empty when the fusion model outputs features
    positive: int | None  # the index of the label Rank scores; None without labels
    tensors: dict[str, str]  # the pipeline's own tensors: image, text, then probabilities and label, or features
    token_datatype: str  # what the text encoder takes its ids as
    cut_text: bool  # the text encoder takes each batch cut to its longest caption (a VariableLength one)

    @property
    def classifies(self) -> bool:
        """True when the fusion model outputs class probabilities, False when it outputs fused features."""
        return self.positive is not None

    @property
    def steps(self) -> tuple[Step, Step, Step]:
        """The image encoder, text encoder and fusion steps."""
        return self.image, self.text, self.fusion


def _only(specs: tuple[TensorSpec, ...], what: str, where: str) -> str:
    if len(specs) != 1:
        raise RepositoryError(f"{where}: {what} has {len(specs)} tensors; name the one to use in roles")
    return specs[0].name


def _spec(config: ModelConfig, name: str, inputs: bool, where: str) -> TensorSpec:
    spec = config.input(name) if inputs else config.output(name)
    if spec is None:
        kind = "input" if inputs else "output"
        names = [t.name for t in (config.inputs if inputs else config.outputs)]
        raise RepositoryError(f"{where}: model {config.name!r} has no {kind} {name!r} (its {kind}s: {names})")
    return spec


def _step(pipeline: ModelConfig, role: str, steps: Mapping[str, ModelConfig], where: str) -> tuple[Step, ModelConfig]:
    declared = pipeline.roles.get(role, {})
    model = declared.get("model", role)
    if model not in pipeline.steps:
        raise RepositoryError(f"{where}: role {role} is model {model!r}, which is not among the steps {pipeline.steps}")
    config = steps[model]
    inputs: tuple[str, ...]
    if role == "fusion":
        if "image_input" in declared or "text_input" in declared:
            inputs = (declared.get("image_input", ""), declared.get("text_input", ""))
        elif {t.name for t in config.inputs} == {"image_features", "text_features"}:
            inputs = ("image_features", "text_features")
        elif len(config.inputs) == 2:
            inputs = (config.inputs[0].name, config.inputs[1].name)
        else:
            raise RepositoryError(f"{where}: the fusion model needs 2 inputs (image features, text features)")
    else:
        inputs = (declared.get("input") or _only(config.inputs, f"role {role}'s model {model!r}", where),)
    output = declared.get("output") or _only(config.outputs, f"role {role}'s model {model!r}", where)
    for name in inputs:
        _spec(config, name, True, where)
    _spec(config, output, False, where)
    return Step(model, pipeline.steps[model], inputs, output), config


def resolve(pipeline: ModelConfig, steps: Mapping[str, ModelConfig], version_dir: Path) -> PipelinePlan:
    """The plan of ``pipeline`` (whose step configs are ``steps``, by model name) or RepositoryError."""
    where = str(version_dir / "config.json")
    unknown = sorted(set(pipeline.roles) - {*ROLES, PIPELINE_ROLE})
    if unknown:
        raise RepositoryError(f"{where}: unknown roles {unknown}; the roles are {[*ROLES, PIPELINE_ROLE]}")
    (image, image_cfg), (text, text_cfg), (fusion, fusion_cfg) = (_step(pipeline, r, steps, where) for r in ROLES)

    image_in = _spec(image_cfg, image.inputs[0], True, where)
    shape = image_in.shape
    if len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1 or image_in.datatype != "FP32":
        raise RepositoryError(f"{where}: the image encoder's input {image_in.name!r} must be FP32 [-1, H, W, 3] "
                              f"with fixed H and W, is {image_in.datatype} {list(image_in.shape)}")  # fmt: skip
    try:
        image_json = {"height": image_in.shape[1], "width": image_in.shape[2],
                      **pipeline.preprocessing.get("image", {})}  # fmt: skip
        preprocessing = ImagePreprocessing.from_json(image_json)
    except ValueError as e:
        raise RepositoryError(f"{where}: preprocessing.image: {e}") from e
    if (preprocessing.height, preprocessing.width) != image_in.shape[1:3]:
        raise RepositoryError(
            f"{where}: preprocessing.image resizes to {preprocessing.height}x{preprocessing.width}, but the image "
            f"encoder's input {image_in.name!r} is {image_in.shape[1]}x{image_in.shape[2]}"
        )

    vocabulary = _vocabulary(pipeline, version_dir, where)
    tokens = _spec(text_cfg, text.inputs[0], True, where)
    if len(tokens.shape) != 2 or tokens.datatype not in INTEGER_DATATYPES:
        raise RepositoryError(f"{where}: the text encoder's input {tokens.name!r} must be integer [-1, L], "
                              f"is {tokens.datatype} {list(tokens.shape)}")  # fmt: skip
    cut = variable_length(text_cfg, where)
    length = cut.max_length if cut else tokens.shape[1]
    text_pre = pipeline.preprocessing.get("text", {})
    for key, ours in (("max_length", length), ("padding", vocabulary.padding), ("truncating", vocabulary.truncating),
                      ("sequence_length", SEQUENCE_LENGTH_DYNAMIC if cut else length)):  # fmt: skip
        if key in text_pre and text_pre[key] != ours:
            raise RepositoryError(f"{where}: preprocessing.text {key} is {text_pre[key]!r}, but the text encoder "
                                  f"and vocabulary say {ours!r}")  # fmt: skip
    if vocabulary.max_length != length:
        raise RepositoryError(f"{where}: the vocabulary pads to {vocabulary.max_length} tokens, but the text "
                              f"encoder's input {tokens.name!r} takes {length}")  # fmt: skip
    if cut and (vocabulary.padding, vocabulary.pad_value) != ("post", cut.pad_value):
        raise RepositoryError(f"{where}: the text encoder takes rows cut to their longest, padded at the back with "
                              f"{cut.pad_value}, but the vocabulary pads {vocabulary.padding!r} with "
                              f"{vocabulary.pad_value}")  # fmt: skip
    if tokens.range is not None and tokens.range[1] < vocabulary.max_words:
        raise RepositoryError(f"{where}: the vocabulary has {vocabulary.max_words} token ids, but the text encoder's "
                              f"input {tokens.name!r} takes [{tokens.range[0]}, {tokens.range[1]})")  # fmt: skip

    pairs = ((image, image_cfg, fusion.inputs[0]), (text, text_cfg, fusion.inputs[1]))
    for encoder, encoder_cfg, fusion_input in pairs:
        produced = _spec(encoder_cfg, encoder.output, False, where).shape
        taken = _spec(fusion_cfg, fusion_input, True, where).shape
        if produced[1:] != taken[1:]:
            raise RepositoryError(f"{where}: {encoder.model} gives {encoder.output!r} {list(produced)}, but fusion "
                                  f"takes {fusion_input!r} {list(taken)}")  # fmt: skip
    fused = _spec(fusion_cfg, fusion.output, False, where).shape
    declared = pipeline.roles.get("fusion", {})
    kind = declared.get("outputs", CLASSES)
    if kind not in (CLASSES, FEATURES):
        raise RepositoryError(f"{where}: roles.fusion.outputs is {kind!r}; it is {CLASSES!r} or {FEATURES!r}")
    if len(fused) != 2:
        raise RepositoryError(f"{where}: fusion output {fusion.output!r} is {list(fused)}; it must be [-1, width]")
    positive = None
    if kind == CLASSES:
        if fused[1] != len(pipeline.labels):
            raise RepositoryError(f"{where}: fusion output {fusion.output!r} is {list(fused)}, "
                                  f"for {len(pipeline.labels)} labels {list(pipeline.labels)}")  # fmt: skip
        label = declared.get("positive_label", pipeline.labels[-1] if pipeline.labels else "")
        if label not in pipeline.labels:
            raise RepositoryError(f"{where}: positive_label {label!r} is not among the labels {list(pipeline.labels)}")
        positive = pipeline.labels.index(label)
    elif pipeline.labels:
        raise RepositoryError(f"{where}: the fusion model outputs features, but the config has labels "
                              f"{list(pipeline.labels)}")  # fmt: skip
    tensors = _own_tensors(pipeline, kind, fused[1], where)
    return PipelinePlan(image, text, fusion, preprocessing, vocabulary, pipeline.labels, positive, tensors,
                        tokens.datatype, cut is not None)  # fmt: skip


def _own_tensors(pipeline: ModelConfig, kind: str, width: int, where: str) -> dict[str, str]:
    """The pipeline's own tensors by role, checked: image and text BYTES [-1]; probabilities and label, or features."""
    wanted: dict[str, tuple[str, tuple[int, ...]]] = {"image": ("BYTES", (-1,)), "text": ("BYTES", (-1,))}
    if kind == CLASSES:
        wanted.update(probabilities=("FP32", (-1, width)), label=("BYTES", (-1,)))
    else:
        wanted.update(features=("FP32", (-1, width)))
    declared = pipeline.roles.get(PIPELINE_ROLE)
    if declared is None:  # older configs: by position, inputs then outputs
        specs = [*pipeline.inputs, *pipeline.outputs]
        if len(specs) != len(wanted):
            raise RepositoryError(f"{where}: a pipeline's tensors are {list(wanted)}; the config has "
                                  f"{[t.name for t in specs]}")  # fmt: skip
        declared = {role: spec.name for role, spec in zip(wanted, specs, strict=True)}
    if set(declared) != set(wanted):
        raise RepositoryError(f"{where}: roles.pipeline names {sorted(declared)}; this pipeline's are {list(wanted)}")
    for role, (datatype, shape) in wanted.items():
        spec = pipeline.input(declared[role]) if role in ("image", "text") else pipeline.output(declared[role])
        if spec is None or (spec.datatype, spec.shape) != (datatype, shape):
            given = [(t.name, t.datatype, list(t.shape)) for t in (*pipeline.inputs, *pipeline.outputs)]
            raise RepositoryError(f"{where}: the pipeline's {role} must be {datatype} {list(shape)} (named "
                                  f"{declared[role]!r}); the config has {given}")  # fmt: skip
    return dict(declared)


def _vocabulary(pipeline: ModelConfig, version_dir: Path, where: str) -> Vocabulary:
    path = version_dir / (pipeline.vocabulary_file or "vocab.json")
    try:
        return Vocabulary.load(path)
    except FileNotFoundError as e:
        raise RepositoryError(f"{where}: vocabulary {path.name} is missing") from e
    except (OSError, ValueError) as e:
        raise RepositoryError(f"{path}: {e}") from e
