"""The typed API (``fusionserve.v1.FusionService``): protobuf ↔ NumPy at the edge, the core does the rest."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from fusionserve.errors import FusionServeError, InvalidInputError
from fusionserve.repository import PIPELINE_NAME
from fusionserve.server.core import ServingCore, deadline_from
from fusionserve.server.grpc_errors import status_of
from fusionserve.server.pipeline import PipelineResult
from fusionserve.server.registry import ModelEntry
from fusionserve.server.streams import Streams
from fusionserve.server.tracking import track
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    return deadline_from(context.time_remaining())


def _error(error: BaseException) -> pb.Error:
    code, message = status_of(error)
    return pb.Error(code=code.name, message=message)


def model_info(core: ServingCore, entry: ModelEntry) -> pb.ModelInfo:
    """A ModelInfo message for one model version."""
    config = entry.config
    info = pb.ModelInfo(
        name=entry.name,
        version=entry.version,
        versions=core.registry.versions(entry.name),
        state=entry.state,
        execution_providers=entry.providers,
        max_batch_size=entry.max_batch_size,
        reason=entry.reason,
    )
    if config is not None:
        info.platform = config.platform
        info.labels.extend(config.labels)
        info.steps.extend(f"{k}:{v}" for k, v in sorted(config.steps.items()))
        for spec, target in ((config.inputs, info.inputs), (config.outputs, info.outputs)):
            target.extend(pb.TensorInfo(name=t.name, datatype=t.datatype, shape=t.shape) for t in spec)
    return info


def classify_response(
    request: pb.ClassifyRequest, entry: ModelEntry, result: PipelineResult
) -> pb.ClassifyResponse:
    """Build the response: one Result per request item, in order, errors in-band."""
    response = pb.ClassifyResponse(
        request_id=request.request_id, model=entry.name, model_version=entry.version, labels=result.labels
    )
    rows = {item: row for row, item in enumerate(result.ok)}
    probabilities = result.probabilities
    for i in range(result.size):
        row = rows.get(i)
        if row is None:
            response.results.add(error=_error(result.errors[i]))
            continue
        index = int(np.argmax(probabilities[row]))
        r = response.results.add(label=result.labels[index], label_index=index)
        r.probabilities.extend(probabilities[row].tolist())
        if request.return_embeddings:
            r.image_embedding.extend(result.image_features[row].tolist())
            r.text_embedding.extend(result.text_features[row].tolist())
    return response


class FusionServicer(pb_grpc.FusionServiceServicer):
    """Thin gRPC layer over :class:`ServingCore`."""

    def __init__(self, core: ServingCore, streams: Streams) -> None:
        self.core = core
        self.streams = streams

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None, per_item: bool):
        name = request.model or PIPELINE_NAME
        return await self.core.classify(
            name,
            request.model_version,
            [item.image for item in request.items],
            [item.text for item in request.items],
            deadline=deadline,
            per_item_errors=per_item,
        )

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        """Unary classify: any bad item fails the call with INVALID_ARGUMENT naming the item."""
        with track(self.core.metrics, self.core.registry.metric_label(request.model or PIPELINE_NAME), "typed"):
            deadline = _deadline(context)
            self.core.refuse_if_late(len(request.items), deadline)
            entry, result = await self._classify(request, deadline, per_item=False)
            return classify_response(request, entry, result)

    async def _stream_one(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        name = request.model or PIPELINE_NAME
        try:
            with track(self.core.metrics, self.core.registry.metric_label(name), "typed_stream"):
                entry, result = await self._classify(request, _deadline(context), per_item=True)
                return classify_response(request, entry, result)
        except Exception as e:  # answered in-band; the stream goes on
            if not isinstance(e, FusionServeError):
                logger.exception("bug while handling a stream request")
            return pb.ClassifyResponse(request_id=request.request_id, error=_error(e))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Bidirectional stream: responses go out as soon as each request is done (match by request_id)."""
        async for response in self.streams.answer(request_iterator, lambda r: self._stream_one(r, context)):
            yield response

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        """Image and/or text embeddings."""
        name = request.model or PIPELINE_NAME
        with track(self.core.metrics, self.core.registry.metric_label(name), "typed_embed"):
            entry, embeddings = await self.core.embed(
                name, request.model_version, list(request.images), list(request.texts), deadline=_deadline(context)
            )
            response = pb.EmbedResponse(model=entry.name, model_version=entry.version)
            for features, target in ((embeddings.image, response.image_embeddings),
                                     (embeddings.text, response.text_embeddings),
                                     (embeddings.fused, response.fused_embeddings)):  # fmt: skip
                if features is not None:
                    target.extend(pb.Embedding(values=row.tolist()) for row in features)
            return response

    async def Rank(self, request: pb.RankRequest, context: grpc.aio.ServicerContext) -> pb.RankResponse:
        """One query against candidates of the other modality: scores, and the candidates best first."""
        name = request.model or PIPELINE_NAME
        with track(self.core.metrics, self.core.registry.metric_label(name), "typed_rank"):
            query = request.WhichOneof("query")
            if request.top_k < 0:
                raise InvalidInputError(f"top_k must be >= 0 (0: every candidate), not {request.top_k}")
            entry, ranking = await self.core.rank(
                name, request.model_version,
                image=request.image if query == "image" else None, text=request.text if query == "text" else None,
                images=list(request.images), texts=list(request.texts), deadline=_deadline(context),
            )  # fmt: skip
            order = ranking.order[: request.top_k] if request.top_k else ranking.order
            return pb.RankResponse(scores=ranking.scores.tolist(), ranking=order, model=entry.name,
                                   model_version=entry.version, positive_label=ranking.positive_label)  # fmt: skip

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Every model version with its state and providers."""
        return pb.ListModelsResponse(models=[model_info(self.core, e) for e in self.core.registry.entries()])

    async def LoadModel(self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        """Load a model from the repository (explicit model control); its versions after the load."""
        entries = await self.core.control.load(request.name)
        return pb.ListModelsResponse(models=[model_info(self.core, e) for e in entries])

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        """Unload every version of a model once its calls are done (explicit model control); what remains."""
        await self.core.control.unload(request.name)
        return pb.ListModelsResponse(models=[model_info(self.core, e) for e in self.core.registry.entries()])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        """One model version (latest when version is 0)."""
        if not request.name:
            raise InvalidInputError("GetModel needs a model name")
        return model_info(self.core, self.core.registry.find(request.name, request.version))
