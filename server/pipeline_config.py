"""A pipeline's plan, read from its ``config.json`` and checked against its steps' configs.

A pipeline config names three roles and the tensors each is reached through::

    "steps": {"image_encoder": 1, "text_encoder": 1, "fusion": 1},
    "roles": {
      "image_encoder": {"model": "image_encoder", "input": "image", "output": "image_features"},
      "text_encoder": {"model": "text_encoder", "input": "tokens", "output": "text_features"},
      "fusion": {"model": "fusion", "image_input": "image_features", "text_input": "text_features",
                 "output": "probabilities"}},
    "preprocessing": {"image": {"height": 64, "width": 64, "color_order": "BGR", "scale": "1/255", ...},
                      "text": {"max_length": 100, "padding": "pre", "truncating": "pre"}}

What a config leaves out is taken from the steps (a role's model is the step of the role's name; a
tensor is the step's only input or output; the fusion model's first input is the image's); what it
says must agree with them: image size with the image encoder's input, token length and padding with
the vocabulary and the text encoder's input, feature widths between encoders and fusion, classes
with the labels. A contradiction is a RepositoryError that names the file and both sides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fusionserve.errors import RepositoryError
from fusionserve.preprocess import ImagePreprocessing, Vocabulary
from fusionserve.repository import INTEGER_DATATYPES, ModelConfig, TensorSpec

ROLES = ("image_encoder", "text_encoder", "fusion")


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
    labels: tuple[str, ...]

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
    unknown = sorted(set(pipeline.roles) - set(ROLES))
    if unknown:
        raise RepositoryError(f"{where}: unknown roles {unknown}; the roles are {list(ROLES)}")
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
    text_pre = pipeline.preprocessing.get("text", {})
    for key, ours in (("max_length", tokens.shape[1]), ("padding", vocabulary.padding),
                      ("truncating", vocabulary.truncating)):  # fmt: skip
        if key in text_pre and text_pre[key] != ours:
            raise RepositoryError(f"{where}: preprocessing.text {key} is {text_pre[key]!r}, but the text encoder "
                                  f"and vocabulary say {ours!r}")  # fmt: skip
    if vocabulary.max_length != tokens.shape[1]:
        raise RepositoryError(f"{where}: the vocabulary pads to {vocabulary.max_length} tokens, but the text "
                              f"encoder's input {tokens.name!r} takes {tokens.shape[1]}")  # fmt: skip
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
    classes = _spec(fusion_cfg, fusion.output, False, where).shape
    if len(classes) != 2 or classes[1] != len(pipeline.labels):
        raise RepositoryError(f"{where}: fusion output {fusion.output!r} is {list(classes)}, "
                              f"for {len(pipeline.labels)} labels {list(pipeline.labels)}")  # fmt: skip
    _check_own_tensors(pipeline, len(pipeline.labels), where)
    return PipelinePlan(image, text, fusion, preprocessing, vocabulary, pipeline.labels)


def _check_own_tensors(pipeline: ModelConfig, classes: int, where: str) -> None:
    """What the pipeline itself takes and gives: image and text as BYTES, probabilities and a label."""
    kinds = [(t.datatype, t.shape) for t in pipeline.inputs]
    if kinds != [("BYTES", (-1,)), ("BYTES", (-1,))]:
        given = [(t.name, t.datatype, list(t.shape)) for t in pipeline.inputs]
        raise RepositoryError(f"{where}: a pipeline's inputs are the encoded image and the text, each BYTES [-1]; "
                              f"the config has {given}")  # fmt: skip
    kinds = [(t.datatype, t.shape) for t in pipeline.outputs]
    if kinds != [("FP32", (-1, classes)), ("BYTES", (-1,))]:
        raise RepositoryError(f"{where}: a pipeline's outputs are the probabilities, FP32 [-1, {classes}], and the "
                              f"label, BYTES [-1]; the config has "
                              f"{[(t.name, t.datatype, list(t.shape)) for t in pipeline.outputs]}")  # fmt: skip


def _vocabulary(pipeline: ModelConfig, version_dir: Path, where: str) -> Vocabulary:
    path = version_dir / (pipeline.vocabulary_file or "vocab.json")
    try:
        return Vocabulary.load(path)
    except FileNotFoundError as e:
        raise RepositoryError(f"{where}: vocabulary {path.name} is missing") from e
    except (OSError, ValueError) as e:
        raise RepositoryError(f"{path}: {e}") from e
