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
from fusionserve.errors import FusionServeError, InvalidInputError, ModelNotFoundError, ModelNotReadyError
from fusionserve.repository import DATATYPES, ModelConfig
from fusionserve.server.core import READY, ModelEntry, ServingCore, deadline_from
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.metrics import ModelTotals
from fusionserve.server.streams import answer_concurrently
from fusionserve.server.tracking import track
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2 import grpc_service_pb2_grpc as pb_grpc
from fusionserve.v2 import model_config_pb2 as mc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "fusionserve"
# Triton names no extension for gRPC streaming. Of the named ones we implement the model
# configuration and statistics RPCs (what perf_analyzer asks for); not classification, sequence,
# shared memory, model repository, trace or logging.
EXTENSIONS: tuple[str, ...] = ("model_configuration", "statistics")

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
    # A read-only view of the request's bytes in native byte order: no copy on little-endian hosts
    # (a 64-image batch at 224×224 is 38 MB), a converted copy elsewhere.
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


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
        if spec is not None and len(spec.shape) == 1 and len(shape) == 2 and shape[1] == 1:
            shape = shape[:1]  # [n, 1] for a one-value-per-row tensor: Triton's dims [1] + reshape [] (ModelConfig)
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


def input_shape(shape: Sequence[int]) -> list[int]:
    """The shape an input is described with: one value per batch row (``[-1]``) is ``[-1, 1]``.

    That is Triton's form for such a tensor (``dims: [1]`` in its model configuration, where dims may
    not be empty), and perf_analyzer builds its requests from it. :func:`decode_inputs` takes both
    ``[n, 1]`` and ``[n]``, so clients written against either form work.
    """
    return [*shape, 1] if len(shape) == 1 else list(shape)


def tensor_metadata(specs: Sequence[Any], *, inputs: bool = False) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Describe a model's TensorSpecs as TensorMetadata messages (``inputs``: see :func:`input_shape`)."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=t.datatype, shape=input_shape(t.shape) if inputs else t.shape
        )
        for t in specs
    ]


# ---- the servicer ------------------------------------------------------------------------------
def _config_datatype(datatype: str) -> int:
    """A V2 datatype as Triton's model configuration names it (BYTES is TYPE_STRING there)."""
    return int(mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"))


def _set_dims(tensor: mc.ModelInput | mc.ModelOutput, shape: Sequence[int], max_batch: int) -> None:
    """Triton's dims: the shape without its batch dimension when the model batches.

    A tensor of one value per batch row (shape ``[-1]``) is ``dims: [1]`` with ``reshape: []``, as in
    Triton, where dims may not be empty: clients send ``[n, 1]``, which :func:`decode_inputs` takes as ``[n]``.
    """
    if max_batch <= 0:
        tensor.dims.extend(shape)
    elif len(shape) == 1:
        tensor.dims.append(1)
        tensor.reshape.SetInParent()
    else:
        tensor.dims.extend(shape[1:])


def model_config(entry: ModelEntry) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` for a loaded model: tensors without the batch dimension, batching settings."""
    if entry.config is None:
        raise ModelNotReadyError(f"model {entry.name!r} v{entry.version} is {entry.state}: {entry.reason}")
    config = entry.config
    max_batch = entry.max_batch_size
    out = mc.ModelConfig(
        name=entry.name,
        platform=config.platform,
        backend="onnxruntime" if entry.model is not None else "fusionserve",
        max_batch_size=max_batch,
        default_model_filename=config.model_file or "",
    )
    for spec in config.inputs:
        tensor = out.input.add(name=spec.name, data_type=_config_datatype(spec.datatype))
        _set_dims(tensor, spec.shape, max_batch)
    for spec in config.outputs:
        tensor = out.output.add(name=spec.name, data_type=_config_datatype(spec.datatype))
        _set_dims(tensor, spec.shape, max_batch)
    if entry.batcher is not None:
        out.dynamic_batching.max_queue_delay_microseconds = round(entry.batcher.max_queue_delay_s * 1e6)
    return out


def model_statistics(entry: ModelEntry, totals: ModelTotals | None) -> pb.ModelStatistics:
    """Triton's ``ModelStatistics`` from the running totals of ``entry``'s model (zeros when unused)."""
    t = totals or ModelTotals()
    stats = pb.ModelStatistics(
        name=entry.name,
        version=str(entry.version),
        last_inference=t.last_inference_ms,
        inference_count=t.inference_count,
        execution_count=t.execution_count,
    )
    s = stats.inference_stats
    s.success.count, s.success.ns = t.success_count, t.success_ns
    s.fail.count, s.fail.ns = t.fail_count, t.fail_ns
    s.queue.count, s.queue.ns = t.queue_count, t.queue_ns
    # One onnxruntime run covers input, inference and output: its time is all in compute_infer, and
    # compute_input/compute_output carry the same count with 0 ns (clients check the counts agree).
    for part in (s.compute_input, s.compute_infer, s.compute_output):
        part.count = t.execution_count
    s.compute_infer.ns = t.compute_ns
    for rows, (count, ns) in sorted(t.by_batch_size.items()):
        batch = stats.batch_stats.add(batch_size=rows)
        for part in (batch.compute_input, batch.compute_infer, batch.compute_output):
            part.count = count
        batch.compute_infer.ns = ns
    return stats


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
            response.inputs.extend(tensor_metadata(entry.config.inputs, inputs=True))
            response.outputs.extend(tensor_metadata(entry.config.outputs))
        return response

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """A model version's configuration in Triton's form (latest version when version is '')."""
        entry = self.core.find(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=model_config(entry))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Counts and cumulative times since the server started: one model, or every model when name is ''.

        Totals are kept per model name; they are reported under the version asked for (the latest
        ready one when none is).
        """
        if request.name:
            entries = [self.core.find(request.name, parse_version(request.version))]
        else:
            if request.version:
                raise InvalidInputError("ModelStatistics: a version needs a model name")
            entries = [self.core.find(name) for name in sorted({e.name for e in self.core.entries()})]
        totals = self.core.metrics.totals
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(e, totals.get(e.name)) for e in entries])

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
