"""The Open Inference Protocol (KServe V2) front-end, ``inference.GRPCInferenceService``, over the core.

Protobuf becomes NumPy here, at the edge, and the core does the rest, exactly as for the typed API.

Tensors in. Each input's data comes either from its typed ``contents`` (the ``*_contents`` field that
belongs to its datatype; FP16 has none and must be raw) or from ``raw_input_contents``: one entry per
input, in input order, little-endian, and for BYTES each element a 4-byte little-endian length
followed by its bytes. A request uses one form or the other, never both.

Tensors out. Outputs are the ones the request names, in its order (all of them, in the model's order,
when it names none). The answer is raw (``raw_output_contents``, one entry per output, as tritonclient
expects) when the request sent raw inputs, and typed ``contents`` when it sent typed ones; the
request parameter ``binary_data_output`` (bool) overrides that choice. An FP16 output can only travel
raw, so a response holding one is raw throughout (the protocol forbids mixing the two forms).

Request parameters. ``timeout`` (int64 microseconds, as Triton defines it) tightens the gRPC
deadline; ``priority`` is accepted and ignored; anything that would silently change the meaning of
a request and is not supported is refused with INVALID_ARGUMENT: ``sequence_id`` (sequence batching),
``classification`` on an output, and ``shared_memory_region`` on an input or output. Other
parameters are ignored.

Streams. ``ModelStreamInfer`` (Triton's extension) processes the requests of one stream
concurrently, at most ``max_stream_inflight`` at a time (the stream reads no further until one is
done), and answers each as soon as it is done, so answers may come out of order: match them by
``id``. A failed request is answered in-band with ``error_message`` ("CODE: message") and an
``infer_response`` carrying its ``id``; the stream lives on.

Errors are raised as :mod:`fusionserve.errors` exceptions and mapped to status codes by the error
interceptor: bad requests are INVALID_ARGUMENT naming the tensor, unknown models or versions NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from fusionserve import __version__
from fusionserve.errors import FusionServeError, InvalidInputError, ModelNotFoundError
from fusionserve.repository import DATATYPES, ModelConfig
from fusionserve.server.core import READY, ModelEntry, ServingCore, deadline_from
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.streams import answer_concurrently
from fusionserve.server.tracking import track
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2 import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "fusionserve"
# Triton names no extension for gRPC streaming, and we implement none of the named ones
# (classification, sequence, shared memory, model repository, statistics, ...): advertise none.
EXTENSIONS: tuple[str, ...] = ()

# The typed contents field of each datatype, as the protocol assigns them. FP16 has none: raw only.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ALL_CONTENTS_FIELDS = tuple(f.name for f in pb.InferTensorContents.DESCRIPTOR.fields)
_LENGTH = struct.Struct("<I")
_MAX_NAME_CHARS = 200  # names echoed in error messages are cut to this length



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
            f"model_version must be '' (latest) or a positive integer, got {version[:_MAX_NAME_CHARS]!r}"
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


def _check_request_parameters(request: pb.ModelInferRequest) -> None:
    sequence_id = parameter(request.parameters, "sequence_id")
    if sequence_id not in (None, 0, ""):
        raise InvalidInputError("parameter 'sequence_id': sequence batching is not supported by this server")


def _deadline(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> float | None:
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


# ---- tensors in ------------------------------------------------------------------------------
def deserialize_bytes(data: bytes, name: str) -> list[bytes]:
    """Split a raw BYTES tensor (4-byte little-endian length + bytes, repeated) into its elements.

    Raises:
        InvalidInputError: a length prefix is cut short or points past the end, naming ``name``.
    """
    items: list[bytes] = []
    view = memoryview(data)
    offset, end = 0, len(data)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInputError(
                f"input {name!r}: BYTES element {len(items)} has a truncated length prefix "
                f"({end - offset} of 4 bytes at offset {offset})"
            )
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if length > end - offset:
            raise InvalidInputError(
                f"input {name!r}: BYTES element {len(items)} claims {length} bytes, but only {end - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def serialize_bytes(values: np.ndarray) -> bytes:
    """Serialize a BYTES tensor as raw contents: each element a 4-byte little-endian length + its bytes."""
    parts = []
    for value in values.reshape(-1):
        data = _element_bytes(value)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _element_bytes(value: object) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def _object_array(items: Sequence[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = list(items)  # element-wise: equal-length bytes must not become a 2-D array
    return array


def _element_count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def _from_raw(name: str, datatype: str, shape: Sequence[int], count: int, data: bytes) -> np.ndarray:
    if datatype == "BYTES":
        items = deserialize_bytes(data, name)
        if len(items) != count:
            raise InvalidInputError(
                f"input {name!r}: raw contents hold {len(items)} BYTES elements, shape {list(shape)} needs {count}"
            )
        return _object_array(items)
    dtype = DATATYPES[datatype]
    if len(data) != count * dtype.itemsize:
        raise InvalidInputError(
            f"input {name!r}: raw contents hold {len(data)} bytes, "
            f"shape {list(shape)} of {datatype} needs {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(data, dtype=np.uint8)
        if octets.size and octets.max() > 1:
            raise InvalidInputError(f"input {name!r}: BOOL elements must be bytes 0 or 1")
        return octets.astype(np.bool_)
    # astype copies: a writable array in native byte order, whatever the host.
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)


def _from_contents(
    name: str, datatype: str, shape: Sequence[int], count: int, contents: pb.InferTensorContents
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInputError(f"input {name!r}: {datatype} has no typed contents field; send it raw")
    for other in _ALL_CONTENTS_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidInputError(
                f"input {name!r}: a {datatype} tensor goes in contents.{field}, not contents.{other}"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInputError(
            f"input {name!r}: contents.{field} holds {len(values)} elements, shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        return _object_array(values)
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 4:  # carried in a 32-bit field: check the range
        wide = np.fromiter(values, dtype=np.int64, count=count)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInputError(f"input {name!r}: values out of the {datatype} range [{info.min}, {info.max}]")
        return wide.astype(dtype)
    return np.fromiter(values, dtype=dtype, count=count)


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
        name = tensor.name[:_MAX_NAME_CHARS]
        if tensor.name in arrays:
            raise InvalidInputError(f"input {name!r} is given twice")
        if "shared_memory_region" in tensor.parameters:
            raise InvalidInputError(f"input {name!r}: shared memory is not supported; send the data in the request")
        spec = config.input(tensor.name)
        if spec is not None and tensor.datatype != spec.datatype:
            raise InvalidInputError(
                f"input {name!r}: datatype must be {spec.datatype}, got {tensor.datatype[:_MAX_NAME_CHARS]!r}"
            )
        if tensor.datatype not in DATATYPES:
            raise InvalidInputError(
                f"input {name!r}: unknown datatype {tensor.datatype[:_MAX_NAME_CHARS]!r}; known: {', '.join(DATATYPES)}"
            )
        shape = list(tensor.shape)
        count = _element_count(name, shape)
        if raw:
            if tensor.contents.ByteSize():
                raise InvalidInputError(
                    f"input {name!r}: typed contents given as well as raw_input_contents; use one or the other"
                )
            array = _from_raw(name, tensor.datatype, shape, count, raw[index])
        else:
            array = _from_contents(name, tensor.datatype, shape, count, tensor.contents)
        arrays[tensor.name] = array.reshape(shape)
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
        name = output.name[:_MAX_NAME_CHARS]
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


# ---- tensors out -----------------------------------------------------------------------------
def _to_raw(value: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(value)
    dtype = DATATYPES[datatype]
    return np.ascontiguousarray(value, dtype=dtype.newbyteorder("<")).tobytes()


def _fill_contents(contents: pb.InferTensorContents, value: np.ndarray, datatype: str) -> None:
    target = getattr(contents, CONTENTS_FIELD[datatype])
    flat = value.reshape(-1)
    if datatype == "BYTES":
        target.extend(_element_bytes(v) for v in flat)
    else:
        target.extend(flat.astype(DATATYPES[datatype], copy=False).tolist())


def encode_response(
    request: pb.ModelInferRequest,
    entry: ModelEntry,
    outputs: Mapping[str, np.ndarray],
    names: Sequence[str],
    raw: bool,
) -> pb.ModelInferResponse:
    """Build the response: the named outputs in order, raw or typed, with the request's ``id``."""
    assert entry.config is not None
    specs = [entry.config.output(name) for name in names]
    raw = raw or any(spec is not None and spec.datatype not in CONTENTS_FIELD for spec in specs)
    response = pb.ModelInferResponse(model_name=entry.name, model_version=str(entry.version), id=request.id)
    for name, spec in zip(names, specs, strict=True):
        assert spec is not None
        value = np.asarray(outputs[name])
        tensor = response.outputs.add(name=name, datatype=spec.datatype, shape=value.shape)
        if raw:
            response.raw_output_contents.append(_to_raw(value, spec.datatype))
        else:
            _fill_contents(tensor.contents, value, spec.datatype)
    return response


def tensor_metadata(specs: Sequence[Any]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Describe a model's TensorSpecs as TensorMetadata messages."""
    return [pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape) for t in specs]


# ---- the servicer ------------------------------------------------------------------------------
class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin Open Inference Protocol layer over :class:`ServingCore`."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Answer true while the process answers at all (draining included)."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Answer true while the server takes work and at least one model is ready."""
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Say whether a model version can serve now; an unknown model is simply not ready."""
        version = parse_version(request.version)
        try:
            entry = self.core.find(request.name, version)
        except ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=entry.state == READY and not self.core.draining)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Describe the server: name, version and the protocol extensions it supports."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """Describe a model version (latest when version is ''): name, versions, platform, tensors."""
        entry = self.core.find(request.name, parse_version(request.version))
        response = pb.ModelMetadataResponse(name=entry.name, versions=[str(v) for v in self.core.versions(entry.name)])
        if entry.config is not None:
            response.platform = entry.config.platform
            response.inputs.extend(tensor_metadata(entry.config.inputs))
            response.outputs.extend(tensor_metadata(entry.config.outputs))
        return response

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        entry = self.core.get(request.model_name, parse_version(request.model_version))
        assert entry.config is not None
        _check_request_parameters(request)
        raw = wants_raw_output(request)
        deadline = _deadline(request, context)
        inputs = decode_inputs(request, entry.config)
        names = requested_outputs(request, entry.config)
        # Pinned to the version resolved above, so a reload in between cannot mix versions.
        entry, outputs = await self.core.infer(entry.name, entry.version, inputs, deadline=deadline)
        return encode_response(request, entry, outputs, names, raw)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Run one inference on any model (tensor models and the ``multimodal`` pipeline alike)."""
        with track(self.core.metrics, self.core.metric_label(request.model_name), "v2"):
            return await self._infer(request, context)

    async def _stream_one(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStreamInferResponse:
        try:
            with track(self.core.metrics, self.core.metric_label(request.model_name), "v2_stream"):
                return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
        except Exception as e:  # answered in-band; the stream goes on
            if not isinstance(e, FusionServeError):
                logger.exception("bug while handling a V2 stream request")
            code, message = status_of(e)
            return pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: concurrent, answers as each request finishes, errors in-band."""
        with self.core.streams.slot():
            async for response in answer_concurrently(
                request_iterator, lambda r: self._stream_one(r, context), self.core.settings.max_stream_inflight
            ):
                yield response


def add_to_server(core: ServingCore, server: grpc.aio.Server) -> str:
    """Register the V2 servicer on ``server``; returns its full service name (for reflection)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core), server)
    return SERVICE_NAME
