"""The ``multimodal`` pipeline: encoded image + text → probabilities and label (or fused features).

Both encoders (server/encoders.py: decode or tokenise, the embedding cache, the batchers) run
concurrently, then the fusion model (batched too). ``rank`` scores one query against candidates of
the other modality, encoding the query once, by the probability of the plan's positive label. Tensor
names, image size and preprocessing, token length and padding, labels and whether the fusion model
outputs classes or features come from the pipeline's :class:`~fusionserve.server.pipeline_config.PipelinePlan`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from fusionserve.errors import FusionServeError, InvalidInputError
from fusionserve.server.batcher import DynamicBatcher
from fusionserve.server.encoders import ImageEncoder, TextEncoder
from fusionserve.server.limits import Limits
from fusionserve.server.pipeline_config import PipelinePlan
from fusionserve.server.room import Room

A = TypeVar("A")
B = TypeVar("B")


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await two coroutines concurrently, as ``asyncio.gather`` does with one task fewer (a call's hot path).

    ``first`` runs as a task while ``second`` runs in the caller; if ``second`` fails, ``first`` is
    cancelled and awaited, so nothing is left running or unretrieved.
    """
    task = asyncio.ensure_future(first)
    try:
        b = await second
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return await task, b


def no_classes_error() -> InvalidInputError:
    """The answer to a class question (Classify, Rank) put to a pipeline whose fusion model outputs features."""
    return InvalidInputError("this pipeline has no classes: its fusion model outputs fused features; "
                             "call Embed with images and texts (V2: ModelInfer, output FEATURES)")  # fmt: skip


@dataclass
class PipelineResult:
    """Per-item outcome: rows of the arrays line up with ``ok`` (indices of items that worked).

    ``fused`` is the fusion model's output: class probabilities when there are ``labels``, fused features otherwise.
    """

    size: int
    ok: list[int]
    errors: dict[int, FusionServeError]
    fused: np.ndarray
    image_features: np.ndarray
    text_features: np.ndarray
    labels: tuple[str, ...]

    @property
    def probabilities(self) -> np.ndarray:
        """The class probabilities; InvalidInputError when the pipeline has no classes."""
        if not self.labels:
            raise no_classes_error()
        return self.fused

    def label_of(self, row: int) -> tuple[int, str]:
        """(index, name) of the most probable label for a row."""
        index = int(np.argmax(self.probabilities[row]))
        return index, self.labels[index]


@dataclass
class Embeddings:
    """Embed's answer: each encoder's features, and maybe the fused features of (image, text) pairs.

    ``fused`` is there when the fusion model outputs features and as many images as texts were sent.
    """

    image: np.ndarray | None
    text: np.ndarray | None
    fused: np.ndarray | None = None


@dataclass
class Ranking:
    """Every candidate's score (the positive label's probability) and the candidates best first."""

    scores: np.ndarray
    order: list[int]
    positive_label: str


class MultimodalPipeline:
    """Runs image encoder ∥ text encoder → fusion for a batch of (image bytes, text) items."""

    def __init__(
        self,
        *,
        plan: PipelinePlan,
        images: ImageEncoder,
        texts: TextEncoder,
        fusion: DynamicBatcher,
        limits: Limits,
        max_batch_size: int,
        max_inflight_items: int,
    ) -> None:
        self.plan = plan
        self.image_encoder, self.text_encoder, self.fusion = images, texts, fusion
        self.labels = plan.labels
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.room = Room(max_inflight_items, "the pipeline (max_pipeline_items)")
        """Items admitted at once, decoding included (``max_pipeline_items``); more wait for room."""

    def _check_texts(self, texts: Sequence[str], noun: str = "item") -> dict[int, FusionServeError]:
        errors: dict[int, FusionServeError] = {}
        for i, text in enumerate(texts):
            if not text or not text.strip():
                errors[i] = InvalidInputError(f"{noun} {i}: text is empty")
            elif len(text) > self.limits.max_text_chars:
                errors[i] = InvalidInputError(
                    f"{noun} {i}: text has {len(text)} characters, over the limit of {self.limits.max_text_chars}"
                )
        return errors

    @staticmethod
    def _raise_first(*errors: Mapping[int, Exception]) -> None:
        """Raise the error of the lowest index, of the first map that has any."""
        for found in errors:
            if found:
                raise found[min(found)]

    def _check_batch(self, n: int, noun: str = "items") -> None:
        if n == 0:
            raise InvalidInputError(f"empty batch: send at least one of the {noun}")
        if n > self.max_batch_size:
            raise InvalidInputError(f"{n} {noun} is over the maximum of {self.max_batch_size}")

    async def run(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        *,
        deadline: float | None = None,
        per_item_errors: bool = False,
    ) -> PipelineResult:
        """Classify a batch.

        Args:
            images: encoded image bytes, one per item.
            texts: one text per item.
            deadline: ``loop.time()`` by which the answer is needed.
            per_item_errors: report bad items in the result instead of failing the whole batch.

        Raises:
            InvalidInputError: a bad batch, or (unless ``per_item_errors``) any bad item.
            DeadlineExceededError: the deadline passed while waiting for room.
        """
        n = len(images)
        if len(texts) != n:
            raise InvalidInputError(f"{n} images but {len(texts)} texts: send one of each per item")
        self._check_batch(n)
        async with self._admit(n, deadline):
            return await self._run(images, texts, deadline, per_item_errors)

    @contextlib.asynccontextmanager
    async def _admit(self, n: int, deadline: float | None) -> AsyncIterator[None]:
        """Room for ``n`` items before any work (decoding included): bounded memory, callers wait their turn."""
        n = self.room.fit(n)
        await self.room.enter(n, deadline)
        try:
            yield
        finally:
            self.room.leave(n)

    async def _run(
        self, images: Sequence[bytes], texts: Sequence[str], deadline: float | None, per_item_errors: bool
    ) -> PipelineResult:
        n = len(images)
        errors: dict[int, Exception] = dict(self._check_texts(texts))
        good_texts = [i for i in range(n) if i not in errors]
        lone = self.room.held == n
        (image_rows, image_errors), (text_rows, _) = await both(
            self.image_encoder.features(images, deadline=deadline, lone=lone),
            self.text_encoder.features([texts[i] for i in good_texts], deadline=deadline, lone=lone),
        )
        text_rows = {good_texts[k]: row for k, row in text_rows.items()}
        errors.update({i: e for i, e in image_errors.items() if i not in errors})
        if errors and not per_item_errors:
            first = min(errors)
            more = f" (and {len(errors) - 1} more bad items)" if len(errors) > 1 else ""
            raise InvalidInputError(f"{errors[first]}{more}")
        ok = [i for i in range(n) if i not in errors]
        if not ok:
            empty = np.zeros((0, 0), np.float32)
            return PipelineResult(n, ok, errors, empty, empty, empty, self.labels)  # type: ignore[arg-type]
        image_features = np.stack([image_rows[i] for i in ok])
        text_features = np.stack([text_rows[i] for i in ok])
        fused = await self._fuse(image_features, text_features, deadline, lone)
        return PipelineResult(n, ok, errors, fused, image_features, text_features,  # type: ignore[arg-type]
                              self.labels)  # fmt: skip

    async def _fuse(self, image_features: np.ndarray, text_features: np.ndarray, deadline: float | None,
                    lone: bool = False) -> np.ndarray:  # fmt: skip
        fusion = self.plan.fusion
        fused = await self.fusion.submit(
            {fusion.inputs[0]: image_features, fusion.inputs[1]: text_features}, deadline=deadline, lone=lone
        )
        return fused[fusion.output]

    async def embed(
        self, images: Sequence[bytes], texts: Sequence[str], *, deadline: float | None = None
    ) -> Embeddings:
        """Image and/or text embeddings (and fused ones, see :class:`Embeddings`); any bad item fails the call."""
        if not images and not texts:
            raise InvalidInputError("empty request: send images and/or texts")
        for count in (len(images), len(texts)):
            if count:
                self._check_batch(count)
        async with self._admit(max(len(images), len(texts)), deadline):
            self._raise_first(self._check_texts(texts))
            (image_rows, image_errors), (text_rows, _) = await asyncio.gather(
                self.image_encoder.features(images, deadline=deadline),
                self.text_encoder.features(texts, deadline=deadline),
            )
            self._raise_first(image_errors)
            image_features = np.stack([image_rows[i] for i in range(len(images))]) if images else None
            text_features = np.stack([text_rows[i] for i in range(len(texts))]) if texts else None
            fused = None
            if not self.plan.classifies and image_features is not None and len(images) == len(texts):
                fused = await self._fuse(image_features, text_features, deadline)  # type: ignore[arg-type]
            return Embeddings(image_features, text_features, fused)

    async def rank(
        self,
        *,
        image: bytes | None = None,
        text: str | None = None,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        deadline: float | None = None,
    ) -> Ranking:
        """Score one query (an image or a text) against candidates of the other modality.

        Raises:
            InvalidInputError: no query or both, candidates of the query's own modality, none or too
                many, or a bad candidate or query (named).
        """
        if self.plan.positive is None:
            raise no_classes_error()
        if (image is None) == (text is None):
            raise InvalidInputError("rank needs one query: an image or a text")
        candidates = texts if image is not None else images
        other = "texts" if image is not None else "images"
        if (images if image is not None else texts):
            raise InvalidInputError(f"the query is {'an image' if image is not None else 'a text'}: send {other} "
                                    "as candidates")  # fmt: skip
        self._check_batch(len(candidates), f"candidate {other}")
        async with self._admit(len(candidates) + 1, deadline):
            if image is not None:
                self._raise_first(self._check_texts(texts, "candidate"))
                (query, query_errors), (rows, row_errors) = await asyncio.gather(
                    self.image_encoder.features([image], deadline=deadline, noun="query"),
                    self.text_encoder.features(texts, deadline=deadline),
                )
            else:
                query_text = text or ""
                self._raise_first(self._check_texts([query_text], "query"))
                (query, query_errors), (rows, row_errors) = await asyncio.gather(
                    self.text_encoder.features([query_text], deadline=deadline),
                    self.image_encoder.features(images, deadline=deadline, noun="candidate"),
                )
            self._raise_first(query_errors, row_errors)
            n = len(candidates)
            repeated = np.repeat(query[0][None, :], n, axis=0)
            stacked = np.stack([rows[i] for i in range(n)])
            pair = (repeated, stacked) if image is not None else (stacked, repeated)
            scores = (await self._fuse(*pair, deadline))[:, self.plan.positive]
        order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        return Ranking(scores, order, self.labels[self.plan.positive])
