"""The ``multimodal`` pipeline: encoded image + text → probabilities and label.

Images are decoded and preprocessed off the event loop; texts are tokenised; the image and text
encoders run concurrently (each through its own batcher), then the fusion model (batched too).
Tensor names, image size and preprocessing, token length and padding come from the pipeline's
:class:`~fusionserve.server.pipeline_config.PipelinePlan`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from fusionserve.errors import FusionServeError, InvalidInputError, QueueFullError
from fusionserve.preprocess import ImagePreprocessing, decode_image
from fusionserve.server.batcher import DynamicBatcher
from fusionserve.server.limits import Limits, check_image_header
from fusionserve.server.pipeline_config import PipelinePlan

INLINE_DECODE_BYTES = 32 * 1024


@dataclass
class PipelineResult:
    """Per-item outcome: rows of the arrays line up with ``ok`` (indices of items that worked)."""

    size: int
    ok: list[int]
    errors: dict[int, FusionServeError]
    probabilities: np.ndarray
    image_features: np.ndarray
    text_features: np.ndarray
    labels: tuple[str, ...]

    def label_of(self, row: int) -> tuple[int, str]:
        """(index, name) of the most probable label for a row."""
        index = int(np.argmax(self.probabilities[row]))
        return index, self.labels[index]


def _decode_all(
    images: Sequence[bytes], preprocessing: ImagePreprocessing, limits: Limits
) -> list[np.ndarray | Exception]:
    out: list[np.ndarray | Exception] = []
    for i, data in enumerate(images):
        try:
            check_image_header(data, limits)
            out.append(preprocessing.apply(decode_image(data)))
        except FusionServeError as e:
            out.append(InvalidInputError(f"item {i}: {e}"))
    return out


class MultimodalPipeline:
    """Runs image encoder ∥ text encoder → fusion for a batch of (image bytes, text) items."""

    def __init__(
        self,
        *,
        plan: PipelinePlan,
        image: DynamicBatcher,
        text: DynamicBatcher,
        fusion: DynamicBatcher,
        executor: Executor,
        limits: Limits,
        max_batch_size: int,
        max_inflight_items: int,
    ) -> None:
        self.plan = plan
        self.image, self.text, self.fusion = image, text, fusion
        self.preprocessing = plan.image_preprocessing
        self.vocabulary = plan.vocabulary
        self.labels = plan.labels
        self.executor = executor
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.max_inflight_items = max_inflight_items
        self.inflight_items = 0
        self._room = asyncio.Condition()

    def _check_texts(self, texts: Sequence[str]) -> dict[int, FusionServeError]:
        errors: dict[int, FusionServeError] = {}
        for i, text in enumerate(texts):
            if not text or not text.strip():
                errors[i] = InvalidInputError(f"item {i}: text is empty")
            elif len(text) > self.limits.max_text_chars:
                errors[i] = InvalidInputError(
                    f"item {i}: text has {len(text)} characters, over the limit of {self.limits.max_text_chars}"
                )
        return errors

    def _check_batch(self, n: int) -> None:
        if n == 0:
            raise InvalidInputError("empty batch: send at least one item")
        if n > self.max_batch_size:
            raise InvalidInputError(f"batch of {n} items is over the maximum of {self.max_batch_size}")

    async def images(self, images: Sequence[bytes]) -> list[np.ndarray | Exception]:
        """Decode and resize images off the event loop."""
        if not images:
            return []
        if len(images) == 1 and len(images[0]) <= INLINE_DECODE_BYTES:
            # One small image decodes faster than a thread hop takes (about 0.1 ms).
            return _decode_all(images, self.preprocessing, self.limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, _decode_all, images, self.preprocessing, self.limits)

    async def run(
        self,
        images: Sequence[bytes],
        texts: Sequence[str],
        *,
        deadline: float | None = None,
        per_item_errors: bool = False,
        wait_for_room: bool = False,
    ) -> PipelineResult:
        """Classify a batch.

        Args:
            images: encoded image bytes, one per item.
            texts: one text per item.
            deadline: ``loop.time()`` by which the answer is needed.
            per_item_errors: report bad items in the result instead of failing the whole batch.
            wait_for_room: wait while the pipeline is at capacity (streams) instead of raising
                QueueFullError (unary calls).

        Raises:
            InvalidInputError: a bad batch, or (unless ``per_item_errors``) any bad item.
        """
        n = len(images)
        if len(texts) != n:
            raise InvalidInputError(f"{n} images but {len(texts)} texts: send one of each per item")
        self._check_batch(n)
        async with self._admit(n, wait_for_room):
            return await self._run(images, texts, deadline, per_item_errors)

    @contextlib.asynccontextmanager
    async def _admit(self, n: int, wait: bool = False) -> AsyncIterator[None]:
        """Admission control before any work (decoding included): bounded memory under overload."""
        n = min(n, self.max_inflight_items)
        if self.inflight_items + n > self.max_inflight_items:
            if not wait:
                raise QueueFullError(
                    f"pipeline is at capacity ({self.inflight_items} of {self.max_inflight_items} items in flight); "
                    "retry later or on another replica"
                )
            async with self._room:
                await self._room.wait_for(lambda: self.inflight_items + n <= self.max_inflight_items)
        self.inflight_items += n
        try:
            yield
        finally:
            self.inflight_items -= n
            async with self._room:
                self._room.notify_all()

    async def _run(
        self, images: Sequence[bytes], texts: Sequence[str], deadline: float | None, per_item_errors: bool
    ) -> PipelineResult:
        n = len(images)
        errors = self._check_texts(texts)
        decoded = await self.images(images)
        for i, value in enumerate(decoded):
            if isinstance(value, FusionServeError) and i not in errors:
                errors[i] = value
        if errors and not per_item_errors:
            first = min(errors)
            more = f" (and {len(errors) - 1} more bad items)" if len(errors) > 1 else ""
            raise InvalidInputError(f"{errors[first]}{more}")
        ok = [i for i in range(n) if i not in errors]
        if not ok:
            empty = np.zeros((0, 0), np.float32)
            return PipelineResult(n, ok, errors, empty, empty, empty, self.labels)
        batch = np.stack([decoded[i] for i in ok])  # type: ignore[misc]
        tokens = self.vocabulary.encode([texts[i] for i in ok])
        lone = self.inflight_items == n
        image_features, text_features = await asyncio.gather(
            self._encode_images(batch, deadline, lone), self._encode_texts(tokens, deadline, lone)
        )
        fusion = self.plan.fusion
        fused = await self.fusion.submit(
            {fusion.inputs[0]: image_features, fusion.inputs[1]: text_features}, deadline=deadline, lone=lone
        )
        return PipelineResult(n, ok, errors, fused[fusion.output], image_features, text_features, self.labels)

    async def _encode_images(self, batch: np.ndarray, deadline: float | None, lone: bool = False) -> np.ndarray:
        step = self.plan.image
        return (await self.image.submit({step.inputs[0]: batch}, deadline=deadline, lone=lone))[step.output]

    async def _encode_texts(self, tokens: np.ndarray, deadline: float | None, lone: bool = False) -> np.ndarray:
        step = self.plan.text
        return (await self.text.submit({step.inputs[0]: tokens}, deadline=deadline, lone=lone))[step.output]

    async def embed(
        self, images: Sequence[bytes], texts: Sequence[str], *, deadline: float | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Image and/or text embeddings; any bad item fails the call with InvalidInputError."""
        if not images and not texts:
            raise InvalidInputError("empty request: send images and/or texts")
        for count in (len(images), len(texts)):
            if count:
                self._check_batch(count)
        async with self._admit(max(len(images), len(texts))):
            return await self._embed(images, texts, deadline)

    async def _embed(
        self, images: Sequence[bytes], texts: Sequence[str], deadline: float | None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        errors = self._check_texts(texts)
        if errors:
            raise errors[min(errors)]
        decoded = await self.images(images)
        bad = [d for d in decoded if isinstance(d, Exception)]
        if bad:
            raise bad[0]
        jobs = []
        if images:
            jobs.append(self._encode_images(np.stack(decoded), deadline))  # type: ignore[arg-type]
        if texts:
            jobs.append(self._encode_texts(self.vocabulary.encode(texts), deadline))
        results = list(await asyncio.gather(*jobs))
        image_features = results.pop(0) if images else None
        text_features = results.pop(0) if texts else None
        return image_features, text_features
