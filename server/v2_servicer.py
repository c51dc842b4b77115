"""The Open Inference Protocol (KServe V2) front-end, ``inference.GRPCInferenceService``, over the core.

A thin edge: :mod:`fusionserve.server.v2_requests` reads each request (parameters, tensors,
outputs wanted) and builds the response, :mod:`fusionserve.server.v2_model_config` describes models
the Triton way; the core does the work, exactly as for the typed API.

Streams. ``ModelStreamInfer`` (Triton's extension) processes the requests of one stream
concurrently, at most ``max_stream_inflight`` at a time (the stream reads no further until one is
done), and answers each as soon as it is done, so answers may come out of order: match them by
``id``. A failed request is answered in-band with ``error_message`` ("CODE: message") and an
``infer_response`` carrying its ``id``; the stream lives on.

Errors are raised as :mod:`fusionserve.errors` exceptions and mapped to status codes by the error
interceptor: bad requests are INVALID_ARGUMENT naming the tensor, unknown models or versions NOT_FOUND.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from fusionserve import __version__
from fusionserve.errors import (
    FusionServeError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    UnsupportedError,
)
from fusionserve.server.core import ServingCore
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.registry import READY
from fusionserve.server.streams import Streams
from fusionserve.server.tracking import track
from fusionserve.server.v2_model_config import model_config, model_statistics, tensor_metadata
from fusionserve.server.v2_requests import (
    check_request_parameters,
    decode_inputs,
    encode_response,
    parse_version,
    pipeline_items,
    pipeline_outputs,
    request_deadline,
    requested_outputs,
    wants_raw_output,
)
from fusionserve.v2 import grpc_service_pb2 as pb
from fusionserve.v2 import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "fusionserve"
# Triton names no extension for gRPC streaming. Of the named ones we implement the model
# configuration, model repository and statistics RPCs; not classification, sequence, shared memory,
# trace or logging.
EXTENSIONS: tuple[str, ...] = ("model_configuration", "model_repository", "statistics")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin Open Inference Protocol layer over :class:`ServingCore`."""

    def __init__(self, core: ServingCore, streams: Streams) -> None:
        self.core = core
        self.streams = streams

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """Answer true while the process answers at all (draining included)."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """Answer true while the server takes work and at least one model is ready."""
        return pb.ServerReadyResponse(ready=self.core.registry.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """Say whether a model version can serve now; an unknown model is simply not ready."""
        version = parse_version(request.version)
        try:
            entry = self.core.registry.find(request.name, version)
        except ModelNotFoundError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=entry.state == READY and not self.core.registry.draining)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """Describe the server: name, version and the protocol extensions it supports."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """Describe a model version (latest when version is ''): name, versions, platform, tensors."""
        entry = self.core.registry.find(request.name, parse_version(request.version))
        versions = [str(v) for v in self.core.registry.versions(entry.name)]
        response = pb.ModelMetadataResponse(name=entry.name, versions=versions)
        if entry.config is not None:
            response.platform = entry.config.platform
            response.inputs.extend(tensor_metadata(entry.config.inputs, inputs=True))
            response.outputs.extend(tensor_metadata(entry.config.outputs))
        return response

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        """A model version's configuration in Triton's form (latest version when version is '')."""
        entry = self.core.registry.find(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=model_config(entry))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """Counts and cumulative times since the server started: one model, or every model when name is ''.

        Totals are kept per model name; they are reported under the version asked for (the latest
        ready one when none is).
        """
        if request.name:
            entries = [self.core.registry.find(request.name, parse_version(request.version))]
        else:
            if request.version:
                raise InvalidInputError("ModelStatistics: a version needs a model name")
            entries = [self.core.registry.find(name) for name in sorted({e.name for e in self.core.registry.entries()})]
        totals = self.core.metrics.all_totals()  # a worker's: the sum over every worker
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(e, totals.get(e.name)) for e in entries])

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        """Every model in the repository: each loaded version with its state, and the models not loaded."""
        rows = self.core.control.index()
        if request.ready:
            rows = [row for row in rows if row[2] == READY]
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r) for n, v, s, r in rows]
        )

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        """Load a model from the repository (``--model-control-mode explicit`` only)."""
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:
            raise UnsupportedError(
                f"RepositoryModelLoad: parameters {overrides} (a config or files sent with the call) are not "
                "supported; put the version in the repository and load it from there"
            )
        entries = await self.core.control.load(request.model_name)
        failed = [e for e in entries if e.state != READY]
        if failed and not any(e.state == READY for e in entries):
            raise ModelNotReadyError(f"model {request.model_name!r} failed to load: {failed[-1].reason}")
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version of a model once its calls are done (``--model-control-mode explicit`` only)."""
        await self.core.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        deadline = request_deadline(request, context)
        self.core.refuse_if_late(1, deadline)  # one item, before the tensors are read; admission counts them all
        entry = self.core.entry_for(request.model_name, parse_version(request.model_version))
        config = entry.config
        assert config is not None
        check_request_parameters(request)
        raw = wants_raw_output(request)
        # Pinned to the version resolved above, so a reload in between cannot mix versions.
        if entry.pipeline is None:
            inputs = decode_inputs(request, config)
            names = requested_outputs(request, config)
            entry, outputs = await self.core.infer(entry.name, entry.version, inputs, deadline=deadline)
        else:
            plan = entry.pipeline.plan
            images, texts = pipeline_items(request, config, plan, entry.max_batch_size)
            names = requested_outputs(request, config)
            entry, result = await self.core.classify(entry.name, entry.version, images, texts, deadline=deadline)
            outputs = pipeline_outputs(plan, result)
        return encode_response(request, config, outputs, names, raw)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """Run one inference on any model (tensor models and the ``multimodal`` pipeline alike)."""
        with track(self.core.metrics, self.core.registry.metric_label(request.model_name), "v2"):
            return await self._infer(request, context)

    async def _stream_one(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStreamInferResponse:
        try:
            with track(self.core.metrics, self.core.registry.metric_label(request.model_name), "v2_stream"):
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
        async for response in self.streams.answer(request_iterator, lambda r: self._stream_one(r, context)):
            yield response


def add_to_server(core: ServingCore, streams: Streams, server: grpc.aio.Server) -> str:
    """Register the V2 servicer on ``server``; returns its full service name (for reflection)."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core, streams), server)
    return SERVICE_NAME
