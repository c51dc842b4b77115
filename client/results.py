"""What the client returns: small dataclasses built from the protobuf replies at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusionserve.client.errors import FusionClientError
from fusionserve.v1 import fusion_pb2 as pb


@dataclass(frozen=True)
class Classification:
    """One classified (image, text) item."""

    label: str
    """The most probable label."""
    label_index: int
    """Index of ``label`` in ``labels`` and ``probabilities``."""
    probabilities: tuple[float, ...]
    """One probability per label, in the order of ``labels``."""
    labels: tuple[str, ...]
    """The model's label names."""
    model: str = ""
    """The pipeline that answered."""
    model_version: int = 0
    """Its version."""
    image_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    """float32 image embedding, when asked for with ``return_embeddings``."""
    text_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    """float32 text embedding, when asked for with ``return_embeddings``."""

    @property
    def probability(self) -> float:
        """Probability of the predicted label."""
        return self.probabilities[self.label_index]

    @property
    def scores(self) -> dict[str, float]:
        """Label name → probability."""
        return dict(zip(self.labels, self.probabilities, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (embeddings as lists when present)."""
        out: dict[str, Any] = {
            "label": self.label,
            "label_index": self.label_index,
            "probability": self.probability,
            "scores": self.scores,
            "model": self.model,
            "model_version": self.model_version,
        }
        if self.image_embedding is not None:
            out["image_embedding"] = self.image_embedding.tolist()
        if self.text_embedding is not None:
            out["text_embedding"] = self.text_embedding.tolist()
        return out


@dataclass(frozen=True)
class StreamResult:
    """The outcome of one item of :meth:`AsyncFusionClient.classify_stream`."""

    index: int
    """Position of the item in the caller's iterable (results arrive in completion order)."""
    result: Classification | None = None
    """The classification, unless the item failed."""
    error: FusionClientError | None = field(default=None, compare=False)
    """Why the item failed (an in-band error: the stream went on)."""

    @property
    def ok(self) -> bool:
        """True when the item was classified."""
        return self.error is None


@dataclass(frozen=True)
class Embeddings:
    """Image and/or text embeddings, one row per input."""

    image: np.ndarray | None = field(default=None, compare=False)
    """float32 ``[n_images, dim]``, or None when no images were sent."""
    text: np.ndarray | None = field(default=None, compare=False)
    """float32 ``[n_texts, dim]``, or None when no texts were sent."""
    fused: np.ndarray | None = field(default=None, compare=False)
    """float32 ``[n_pairs, dim]``: the fused features of each (image, text) pair, from a pipeline whose
    fusion model outputs features when as many images as texts were sent; None otherwise."""
    model: str = ""
    model_version: int = 0


@dataclass(frozen=True)
class RankedCandidate:
    """One candidate of a ``rank`` call."""

    index: int
    """Its position among the candidates sent."""
    score: float
    """Its match probability (the probability of the model's positive label, ``match``)."""


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelInfo:
    """One loaded model version."""

    name: str
    version: int
    versions: tuple[int, ...]
    platform: str
    state: str
    """``READY``, ``LOADING``, ``UNAVAILABLE`` or ``FAILED``."""
    max_batch_size: int
    labels: tuple[str, ...] = ()
    execution_providers: tuple[str, ...] = ()
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    steps: tuple[str, ...] = ()
    reason: str = ""
    """Why the model is not ready, if it is not."""

    @property
    def ready(self) -> bool:
        """True when the model serves."""
        return self.state == "READY"


def classifications(response: pb.ClassifyResponse) -> list[Classification]:
    """One Classification per result of a (successful, unary) ClassifyResponse."""
    return [classification(response, r) for r in response.results]


def classification(response: pb.ClassifyResponse, r: pb.Result) -> Classification:
    """A Classification from one Result (which must carry no error)."""
    return Classification(
        label=r.label,
        label_index=r.label_index,
        probabilities=tuple(r.probabilities),
        labels=tuple(response.labels),
        model=response.model,
        model_version=response.model_version,
        image_embedding=np.asarray(r.image_embedding, np.float32) if len(r.image_embedding) else None,
        text_embedding=np.asarray(r.text_embedding, np.float32) if len(r.text_embedding) else None,
    )


def stream_result(index: int, response: pb.ClassifyResponse) -> StreamResult:
    """The StreamResult of a one-item stream response (request- or item-level errors in-band)."""
    if response.HasField("error") and response.error.code:
        return StreamResult(index, error=FusionClientError.from_code_name(response.error.code, response.error.message))
    if len(response.results) != 1:
        return StreamResult(
            index,
            error=FusionClientError.from_code_name("INTERNAL", f"expected 1 result, got {len(response.results)}"),
        )
    r = response.results[0]
    if r.HasField("error") and r.error.code:
        return StreamResult(index, error=FusionClientError.from_code_name(r.error.code, r.error.message))
    return StreamResult(index, result=classification(response, r))


def ranked(response: pb.RankResponse) -> list[RankedCandidate]:
    """The candidates of a RankResponse, best first (as many as the server ranked)."""
    return [RankedCandidate(index, float(response.scores[index])) for index in response.ranking]


def embeddings(response: pb.EmbedResponse, images: int, texts: int) -> Embeddings:
    """Embeddings as float32 matrices (None for a modality that was not sent)."""

    def matrix(rows: Any, n: int) -> np.ndarray | None:
        if not n:
            return None
        return np.asarray([list(e.values) for e in rows], np.float32)

    return Embeddings(
        image=matrix(response.image_embeddings, images),
        text=matrix(response.text_embeddings, texts),
        fused=matrix(response.fused_embeddings, len(response.fused_embeddings)),
        model=response.model,
        model_version=response.model_version,
    )


def model_info(m: pb.ModelInfo) -> ModelInfo:
    """A ModelInfo dataclass from its message."""

    def tensors(ts: Any) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in ts)

    return ModelInfo(
        name=m.name,
        version=m.version,
        versions=tuple(m.versions),
        platform=m.platform,
        state=m.state,
        max_batch_size=m.max_batch_size,
        labels=tuple(m.labels),
        execution_providers=tuple(m.execution_providers),
        inputs=tensors(m.inputs),
        outputs=tensors(m.outputs),
        steps=tuple(m.steps),
        reason=m.reason,
    )
