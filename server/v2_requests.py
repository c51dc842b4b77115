"""What a V2 inference request asks for, and the response built back: the V2 front-end's grammar.

Request parameters. ``timeout`` (int64 microseconds, as Triton defines it) tightens the gRPC
deadline; ``priority`` is accepted and ignored; anything that would silently change the meaning of
a request and is not supported is refused with INVALID_ARGUMENT: ``sequence_id`` (sequence batching),
``classification`` on an output, and ``shared_memory_region`` on an input or output. Other
parameters are ignored.

Tensors. Inputs decode to NumPy (see :mod:`fusionserve.v2_codec`) and are checked against the
model's declared datatypes. Outputs are the ones the request names, in its order (all of them, in
the model's order, when it names none). The answer is raw (``raw_output_contents``, as tritonclient
expects) when the request sent raw inputs, and typed ``contents`` when it sent typed ones; the
request parameter ``binary_data_output`` (bool) overrides that choice. An FP16 output can only travel
raw, so a response holding one is raw throughout (the protocol forbids mixing the two forms).

Pipelines. A pipeline model (``multimodal``) takes its image and text inputs as BYTES tensors
(encoded images, UTF-8 texts) and answers its probabilities and label outputs (or its fused features);
its plan names them (roles.pipeline in its config).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from fusionserve.errors import InvalidInputError
from fusionserve.repository import ModelConfig
from fusionserve.server.core import deadline_from, validate_inputs
from fusionserve.server.pipeline import PipelineResult
from fusionserve.server.pipeline_config import PipelinePlan
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2_codec import (
    CONTENTS_FIELD,
    MAX_NAME_CHARS,
    decode_tensor,
    deserialize_bytes,
    fill_contents,
    object_array,
    to_raw,
)


# ---- parameters and versions ---------------------------------------------------------------
def parse_version(version: str) -> int:
    """Parse a V2 ``model_version`` string into the core's version number (0 = latest).

    Raises:
        InvalidInputError: the string is neither empty nor a positive integer.
    """
    if version == "":
        return 0
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise InvalidInputError(
            f"model_version must be '' (latest) or a positive integer, got {version[:MAX_NAME_CHARS]!r}"
        )
    return int(version)


def parameter(parameters: Mapping[str, pb.InferParameter], key: str) -> Any:
    """Return the value of one ``InferParameter`` (bool, int, str or float), or None when absent or unset."""
    if key not in parameters:
        return None
    value = parameters[key]
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def wants_raw_output(request: pb.ModelInferRequest) -> bool:
    """Whether to answer in ``raw_output_contents`` (see the module docstring for the rule)."""
    flag = parameter(request.parameters, "binary_data_output")
    if flag is None:
        return bool(request.raw_input_contents)
    if not isinstance(flag, bool):
        raise InvalidInputError("parameter 'binary_data_output' must be a bool")
    return flag


def check_request_parameters(request: pb.ModelInferRequest) -> None:
    """Refuse parameters that would change the request's meaning and are not supported."""
    sequence_id = parameter(request.parameters, "sequence_id")
    if sequence_id not in (None, 0, ""):
        raise InvalidInputError("parameter 'sequence_id': sequence batching is not supported by this server")


def request_deadline(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
    """Return the earlier of the gRPC deadline and the request's ``timeout`` parameter (microseconds)."""
    deadline = deadline_from(context.time_remaining())
    timeout_us = parameter(request.parameters, "timeout")
    if timeout_us is None:
        return deadline
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int) or timeout_us < 0:
        raise InvalidInputError("parameter 'timeout' must be a non-negative integer (microseconds)")
    if timeout_us == 0:  # Triton's convention: 0 means no timeout
        return deadline
    own = asyncio.get_running_loop().time() + timeout_us / 1e6
    return own if deadline is None else min(deadline, own)


ONE_PER_ROW = ((-1,), (-1, 1))  # a config's shapes of a tensor with one element per row


# ---- tensors in ------------------------------------------------------------------------------
def decode_inputs(request: pb.ModelInferRequest, config: ModelConfig) -> dict[str, np.ndarray]:
    """Convert the request's input tensors to NumPy arrays of their declared shapes.

    Names, shapes against the model and batch sizes are the core's to check; this checks what only
    the wire form can get wrong: datatypes, element counts, raw vs typed contents, BYTES framing.

    Raises:
        InvalidInputError: naming the tensor and what is wrong with it.
    """
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "send one per input, in input order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name[:MAX_NAME_CHARS]
        if tensor.name in arrays:
            raise InvalidInputError(f"input {name!r} is given twice")
        if "shared_memory_region" in tensor.parameters:
            raise InvalidInputError(f"input {name!r}: shared memory is not supported; send the data in the request")
        spec = config.input(tensor.name)
        if spec is not None and tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"input {name!r}: datatype must be {spec.datatype}, got {tensor.datatype[:MAX_NAME_CHARS]!r}"
            )
        if raw and tensor.contents.ByteSize():
            raise InvalidInputError(
                f"input {name!r}: typed contents given as well as raw_input_contents; use one or the other"
            )
        array = decode_tensor(tensor, raw[index] if raw else None)
        if spec is not None and len(spec.shape) == 1 and array.ndim == 2 and array.shape[1] == 1:
            array = array.reshape(-1)  # [n, 1] for a one-value-per-row tensor: Triton's dims [1] + reshape []
        arrays[tensor.name] = array
    return arrays


def requested_outputs(request: pb.ModelInferRequest, config: ModelConfig) -> list[str]:
    """List the outputs to return, in the order asked for (all, in model order, when none is).

    Raises:
        InvalidInputError: an unknown or repeated output, or one asking for an unsupported feature.
    """
    if not request.outputs:
        return [t.name for t in config.outputs]
    names: list[str] = []
    for output in request.outputs:
        name = output.name[:MAX_NAME_CHARS]
        if config.output(output.name) is None:
            raise InvalidInputError(
                f"model {config.name!r} has no output {name!r}; its outputs are {[t.name for t in config.outputs]}"
            )
        if output.name in names:
            raise InvalidInputError(f"output {name!r} is requested twice")
        if parameter(output.parameters, "classification") not in (None, 0):
            raise InvalidInputError(f"output {name!r}: the classification extension is not supported")
        if "shared_memory_region" in output.parameters:
            raise InvalidInputError(f"output {name!r}: shared memory is not supported")
        names.append(output.name)
    return names


def pipeline_items(
    request: pb.ModelInferRequest, config: ModelConfig, plan: PipelinePlan, max_batch_size: int
) -> tuple[list[bytes], list[str]]:
    """A pipeline's (encoded images, texts) from its two BYTES inputs, named by its plan.

    Most requests send both raw, one element per row: those are read directly (:func:`_raw_items`,
    a fifth of the cost). Any other request goes through the general decoding and checks, which also
    say what is wrong with a bad one.

    Raises:
        InvalidInputError: naming the tensor and what is wrong with it.
    """
    items = _raw_items(request, config, plan, max_batch_size)
    return items if items is not None else _decoded_items(request, config, plan, max_batch_size)


def _decoded_items(
    request: pb.ModelInferRequest, config: ModelConfig, plan: PipelinePlan, max_batch_size: int
) -> tuple[list[bytes], list[str]]:
    """The general path: every input decoded (:func:`decode_inputs`) and checked against the config."""
    inputs = decode_inputs(request, config)
    validate_inputs(config, inputs, max_batch_size)
    image, text = plan.tensors["image"], plan.tensors["text"]
    images = [_as_bytes(x, image) for x in inputs[image].reshape(-1)]
    texts = [_as_text(x, text, i) for i, x in enumerate(inputs[text].reshape(-1))]
    return images, texts


def _raw_items(
    request: pb.ModelInferRequest, config: ModelConfig, plan: PipelinePlan, max_batch_size: int
) -> tuple[list[bytes], list[str]] | None:
    """The common form of a pipeline request, read directly; None for anything else (the general path).

    The common form: just the plan's image and text inputs, each raw BYTES with no parameters, one
    element per row ([N], or [N, 1], as :func:`decode_inputs` and ``validate_inputs`` read them against
    the config's shape), the same N for both, 1 to ``max_batch_size``; every text valid UTF-8. What it
    returns is what the general path would. Each field read from a request costs (protobuf builds a
    Python object for it), so each is read once.
    """
    raw = request.raw_input_contents
    if len(raw) != 2 or len(request.inputs) != 2:
        return None
    found: dict[str, list[bytes]] = {}
    rows = 0
    for tensor, data in zip(request.inputs, raw, strict=True):  # as many of each (above)
        name = tensor.name
        spec = config.input(name)
        if spec is None or spec.datatype != "BYTES" or tensor.datatype != "BYTES" or tensor.parameters:
            return None
        shape = tensor.shape
        if not (len(shape) == 2 and shape[1] == 1 and spec.shape in ONE_PER_ROW or len(shape) == 1 and
                spec.shape == ONE_PER_ROW[0]):  # fmt: skip
            return None
        n = shape[0]
        if not 1 <= n <= max_batch_size or rows not in (0, n) or tensor.contents.ByteSize():
            return None
        try:
            elements = deserialize_bytes(data, name)
        except InvalidInputError:
            return None
        if len(elements) != n:
            return None
        found[name], rows = elements, n
    images, texts = found.get(plan.tensors["image"]), found.get(plan.tensors["text"])
    if images is None or texts is None:
        return None
    try:
        return images, [text.decode("utf-8") for text in texts]
    except UnicodeDecodeError:
        return None


def _as_bytes(value: object, tensor: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise InvalidInputError(f"input {tensor!r}: elements must be bytes")


def _as_text(value: object, tensor: str, index: int) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")  # type: ignore[call-overload]
    except (UnicodeDecodeError, TypeError) as e:
        raise InvalidInputError(f"input {tensor!r}: element {index} is not valid UTF-8") from e


# ---- tensors out -----------------------------------------------------------------------------
def pipeline_outputs(plan: PipelinePlan, result: PipelineResult) -> dict[str, np.ndarray]:
    """A pipeline's outputs, named by its plan.

    Probabilities per item and the most probable label as UTF-8 bytes, or the fused features when the
    fusion model outputs features.
    """
    if not plan.classifies:
        return {plan.tensors["features"]: result.fused}
    best = result.probabilities.argmax(axis=1) if result.ok else ()  # an empty result has no classes' column
    labels = object_array([result.labels[index].encode() for index in best])
    return {plan.tensors["probabilities"]: result.probabilities, plan.tensors["label"]: labels}


def encode_response(
    request: pb.ModelInferRequest,
    config: ModelConfig,
    outputs: Mapping[str, np.ndarray],
    names: Sequence[str],
    raw: bool,
) -> pb.ModelInferResponse:
    """Build the response: the named outputs in order, raw or typed, with the request's ``id``."""
    specs = [config.output(name) for name in names]
    raw = raw or any(spec is not None and spec.datatype not in CONTENTS_FIELD for spec in specs)
    response = pb.ModelInferResponse(model_name=config.name, model_version=str(config.version), id=request.id)
    for name, spec in zip(names, specs, strict=True):
        assert spec is not None
        value = np.asarray(outputs[name])
        tensor = response.outputs.add(name=name, datatype=spec.datatype, shape=value.shape)
        if raw:
            response.raw_output_contents.append(to_raw(value, spec.datatype))
        else:
            fill_contents(tensor.contents, value, spec.datatype)
    return response
