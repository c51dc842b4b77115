"""The model repository on disk: the only contract between export and serving.

Layout::

    REPO/<model>/<version>/config.json   what the server needs to know (see ModelConfig)
    REPO/<model>/<version>/model.onnx    for onnxruntime models
    REPO/multimodal/<version>/...        the pipeline: config.json, vocab.json, labels.json

Versions are positive integers; exporting again adds the next version and never touches an
existing one. Every config is validated on load so the server never guesses.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fusionserve.errors import RepositoryError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
PLATFORM_ONNX = "onnxruntime_onnx"
PLATFORM_PIPELINE = "pipeline"
PIPELINE_NAME = "multimodal"
DEFAULT_MAX_BATCH_SIZE = 64  # a config that names none
# A text encoder's preprocessing.sequence_length when each batch is cut to its longest caption (see VariableLength);
# otherwise it is the fixed length, or absent (older exports: the token input's fixed length).
SEQUENCE_LENGTH_DYNAMIC = "dynamic"
# What a pipeline's fusion model outputs (its config's roles.fusion.outputs): class probabilities, the
# default, or fused features (no labels: the pipeline embeds).
FUSION_CLASSES, FUSION_FEATURES = "probabilities", "features"

# Model names double as folder names: allow no path separators, dots or other surprises.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,127}$")

# Open Inference Protocol datatype names ↔ NumPy dtypes.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
ONNX_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def is_valid_model_name(name: str) -> bool:
    """True when ``name`` can name a model (and so a folder) without reaching anywhere else."""
    return bool(MODEL_NAME_RE.match(name))


INTEGER_DATATYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: Open Inference Protocol datatype and shape (-1 = any size, first = batch).

    ``range`` (integer tensors only) is the half-open interval ``[low, high)`` every value must lie
    in, e.g. token ids ``[0, vocabulary size)``: the server refuses other values before onnxruntime
    sees them (onnxruntime's CUDA ``Gather`` would answer zeros for them instead of failing).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    range: tuple[int, int] | None = None

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype of this tensor."""
        return DATATYPES[self.datatype]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}
        if self.range is not None:
            data["range"] = list(self.range)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> TensorSpec:
        """Parse and validate one tensor entry; ``where`` names it in error messages."""
        try:
            name, datatype, shape = str(data["name"]), str(data["datatype"]), data["shape"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise RepositoryError(f"{where}: tensor needs name, datatype and shape ({e!r})") from e
        if datatype not in DATATYPES:
            raise RepositoryError(f"{where}: tensor {name!r} has unknown datatype {datatype!r}")
        if not shape or any(d < -1 or d == 0 for d in shape):
            raise RepositoryError(f"{where}: tensor {name!r} has invalid shape {list(shape)}")
        value_range = data.get("range")
        if value_range is None:
            return cls(name, datatype, shape)
        if datatype not in INTEGER_DATATYPES:
            raise RepositoryError(f"{where}: tensor {name!r}: range is for integer tensors, not {datatype}")
        if (not isinstance(value_range, (list, tuple)) or len(value_range) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value_range)
                or value_range[0] >= value_range[1]):  # fmt: skip
            raise RepositoryError(
                f"{where}: tensor {name!r}: range must be [low, high) with integers low < high, not {value_range!r}"
            )
        return cls(name, datatype, shape, (value_range[0], value_range[1]))


@dataclass(frozen=True)
class ModelConfig:
    """Everything the server needs about one version of one model."""

    name: str
    version: int
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    model_file: str | None = None
    sha256: str | None = None
    opset: int | None = None
    # pipeline only: model name → version used for each step, and which step plays which role
    # (``image_encoder``, ``text_encoder``, ``fusion``) through which tensors (see server/pipeline_config.py)
    steps: dict[str, int] = field(default_factory=dict)
    roles: dict[str, dict[str, str]] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    vocabulary_file: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        """The input called ``name``, or None."""
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        """The output called ``name``, or None."""
        return next((t for t in self.outputs if t.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, the content of ``config.json``."""
        data = asdict(self)
        data["inputs"] = [t.to_json() for t in self.inputs]
        data["outputs"] = [t.to_json() for t in self.outputs]
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> ModelConfig:
        """Parse and validate a config; errors name ``where`` (usually the file path)."""
        if not isinstance(data, Mapping):
            raise RepositoryError(f"{where}: config must be a JSON object")
        try:
            name = str(data["name"])
            version = int(data["version"])
            platform = str(data["platform"])
            inputs = tuple(TensorSpec.from_json(t, where) for t in data["inputs"])
            outputs = tuple(TensorSpec.from_json(t, where) for t in data["outputs"])
            max_batch_size = int(data.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))
        except (KeyError, TypeError, ValueError) as e:
            raise RepositoryError(f"{where}: missing or malformed field ({e!r})") from e
        if not is_valid_model_name(name):
            raise RepositoryError(f"{where}: invalid model name {name!r}")
        if version < 1:
            raise RepositoryError(f"{where}: version must be a positive integer, got {version}")
        if platform not in (PLATFORM_ONNX, PLATFORM_PIPELINE):
            raise RepositoryError(f"{where}: unknown platform {platform!r}")
        if not inputs or not outputs:
            raise RepositoryError(f"{where}: a model needs at least one input and one output")
        if max_batch_size < 1:
            raise RepositoryError(f"{where}: max_batch_size must be >= 1")
        for specs in (inputs, outputs):
            names = [t.name for t in specs]
            if len(set(names)) != len(names):
                raise RepositoryError(f"{where}: duplicate tensor names {names}")
        model_file = data.get("model_file")
        if platform == PLATFORM_ONNX and not model_file:
            raise RepositoryError(f"{where}: an onnxruntime model needs model_file")
        if model_file is not None and Path(str(model_file)).name != model_file:
            raise RepositoryError(f"{where}: model_file must be a plain file name, got {model_file!r}")
        try:
            steps = {str(k): int(v) for k, v in dict(data.get("steps", {})).items()}
            roles = {str(role): {str(k): str(v) for k, v in dict(spec).items()}
                     for role, spec in dict(data.get("roles", {})).items()}  # fmt: skip
            preprocessing = dict(data.get("preprocessing", {}))
            labels = tuple(str(x) for x in data.get("labels", ()))
            versions = dict(data.get("versions", {}))
            parity = dict(data.get("parity", {}))
        except (TypeError, ValueError) as e:
            raise RepositoryError(
                f"{where}: malformed steps, roles, preprocessing, labels, versions or parity ({e!r})"
            ) from e
        if platform == PLATFORM_PIPELINE and not steps:
            raise RepositoryError(f"{where}: a pipeline needs steps")
        # to_json() nests ``extra`` under its own key; unknown top-level keys are kept there too.
        extra = data.get("extra", {})
        if not isinstance(extra, Mapping):
            raise RepositoryError(f"{where}: extra must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        return cls(
            name=name,
            version=version,
            platform=platform,
            inputs=inputs,
            outputs=outputs,
            max_batch_size=max_batch_size,
            model_file=model_file,
            sha256=data.get("sha256"),
            opset=data.get("opset"),
            steps=steps,
            roles=roles,
            preprocessing=preprocessing,
            labels=labels,
            vocabulary_file=data.get("vocabulary_file"),
            versions=versions,
            parity=parity,
            extra={**extra, **{k: v for k, v in data.items() if k not in known}},
        )


@dataclass(frozen=True)
class VariableLength:
    """A text encoder that takes each batch of token rows cut to its longest caption (the server pads and cuts).

    Its config says ``"sequence_length": "dynamic"`` in ``preprocessing``, beside ``max_length``,
    ``padding`` (``post``: the words first) and ``pad_value``; its one token input is ``[-1, -1]``.
    """

    input: str  # the token input
    max_length: int  # the most tokens a row may hold
    pad_value: int  # what follows a caption's last token


def variable_length(config: ModelConfig, where: str = "") -> VariableLength | None:
    """How ``config``'s model takes token rows of any length, or None when it takes them at full length.

    A config without ``preprocessing.sequence_length`` (any export before it) is full length.

    Raises:
        RepositoryError: the config contradicts itself (a fixed length its input does not have, a
            dynamic length with another input shape, padding at the front, ...).
    """
    pre = config.preprocessing
    length = pre.get("sequence_length")
    where = where or f"model {config.name!r}"
    if length is None:
        return None
    tokens = [t for t in config.inputs if t.datatype in INTEGER_DATATYPES and len(t.shape) == 2]
    if length != SEQUENCE_LENGTH_DYNAMIC:
        if isinstance(length, bool) or not isinstance(length, int) or len(tokens) != 1 or tokens[0].shape[1] != length:
            raise RepositoryError(f"{where}: preprocessing.sequence_length is {length!r}: it must be "
                                  f"{SEQUENCE_LENGTH_DYNAMIC!r} or the token input's length "
                                  f"{[list(t.shape) for t in tokens]}")  # fmt: skip
        return None
    max_length, pad_value = pre.get("max_length"), pre.get("pad_value")
    problems = []
    if len(config.inputs) != 1 or len(tokens) != 1 or tokens[0].shape != (-1, -1):
        problems.append(f"one integer input [-1, -1] (has {[(t.name, list(t.shape)) for t in config.inputs]})")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        problems.append(f"a max_length of at least 1 (has {max_length!r})")
    if pre.get("padding") != "post":
        problems.append(f"padding 'post', the words first (has {pre.get('padding')!r})")
    if isinstance(pad_value, bool) or not isinstance(pad_value, int):
        problems.append(f"an integer pad_value (has {pad_value!r})")
    if problems:
        raise RepositoryError(f"{where}: a {SEQUENCE_LENGTH_DYNAMIC} sequence_length needs " + "; ".join(problems))
    assert isinstance(max_length, int) and isinstance(pad_value, int)
    return VariableLength(tokens[0].name, max_length, pad_value)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_models(repository: Path) -> list[str]:
    """Model folders in the repository (sorted), skipping hidden and temporary entries."""
    repository = Path(repository)
    if not repository.is_dir():
        raise RepositoryError(f"model repository {str(repository)!r} is not a directory")
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and is_valid_model_name(p.name))


def list_versions(repository: Path, name: str) -> list[int]:
    """Version numbers present for a model, ascending."""
    model_dir = Path(repository) / name
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def version_dir(repository: Path, name: str, version: int) -> Path:
    """The folder of one model version."""
    return Path(repository) / name / str(version)


def load_config(repository: Path, name: str, version: int, *, verify_hash: bool = True) -> ModelConfig:
    """Read and validate ``REPO/name/version/config.json`` (and the model file's hash).

    Raises:
        RepositoryError: naming the file and what is wrong with it.
    """
    vdir = version_dir(repository, name, version)
    path = vdir / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RepositoryError(f"{path}: config file is missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RepositoryError(f"{path}: not readable JSON ({e})") from e
    config = ModelConfig.from_json(data, str(path))
    if config.name != name or config.version != version:
        raise RepositoryError(
            f"{path}: says model {config.name!r} version {config.version}, "
            f"but lives at {name}/{version}"
        )
    if config.model_file:
        model_path = vdir / config.model_file
        if not model_path.is_file():
            raise RepositoryError(f"{model_path}: model file is missing")
        if verify_hash and config.sha256 and sha256_file(model_path) != config.sha256:
            raise RepositoryError(f"{model_path}: sha256 does not match config (file corrupted or replaced)")
    if config.platform == PLATFORM_ONNX and config.vocabulary_file:
        config = _with_vocabulary_range(config, vdir / config.vocabulary_file)
    variable_length(config, str(path))  # refuses a config that contradicts itself
    return config


def _with_vocabulary_range(config: ModelConfig, vocabulary: Path) -> ModelConfig:
    """A text model whose config predates ``range``: its integer inputs take ids in [0, max_words)."""
    if all(t.range is not None or t.datatype not in INTEGER_DATATYPES for t in config.inputs):
        return config
    try:
        max_words = int(json.loads(vocabulary.read_text(encoding="utf-8"))["max_words"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RepositoryError(f"{vocabulary}: vocabulary missing or malformed ({e!r})") from e
    inputs = tuple(
        replace(t, range=(0, max_words)) if t.range is None and t.datatype in INTEGER_DATATYPES else t
        for t in config.inputs
    )
    return replace(config, inputs=inputs)


def select_versions(available: Sequence[int], policy: str | Sequence[int]) -> list[int]:
    """Apply a version policy: ``"latest"``, ``"all"`` or an explicit list of versions."""
    if not available:
        return []
    if policy == "latest":
        return [max(available)]
    if policy == "all":
        return list(available)
    if isinstance(policy, str):
        raise RepositoryError(f"unknown version policy {policy!r}: use 'latest', 'all' or a list of versions")
    wanted = [int(v) for v in policy]
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise RepositoryError(f"version policy asks for versions {missing}, repository has {list(available)}")
    return sorted(wanted)


def write_json(path: Path, data: Any) -> None:
    """Write pretty JSON (UTF-8) to ``path``."""
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
