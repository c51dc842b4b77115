"""A pipeline's two encoders, each from raw input to features, behind the embedding cache.

``ImageEncoder``: encoded image bytes → header check, decode and preprocess → the image encoder's
batcher. Small images are decoded in batches too: calls' images meet in a decode batcher whose runs
take one thread hop each (a lone call's one image decodes on the event loop, quicker than a hop); a
call with a large image decodes its images in a thread hop of its own. ``TextEncoder``: texts → token ids → the text
encoder's batcher. Both look each input up in the cache first (see server/embedding_cache.py) and
answer per item: features, or an INVALID_ARGUMENT naming the item.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from fusionserve.errors import FusionServeError, InvalidInputError
from fusionserve.preprocess import ImagePreprocessing, Vocabulary, decode_image
from fusionserve.server.batcher import DynamicBatcher, RunFn
from fusionserve.server.calls import current as current_call
from fusionserve.server.embedding_cache import CachedEncoder, EmbeddingCache
from fusionserve.server.limits import Limits, check_image_header
from fusionserve.server.metrics import Metrics
from fusionserve.server.pipeline_config import Step

INLINE_DECODE_BYTES = 32 * 1024
TOKEN_DTYPE = np.dtype(np.int32)  # what the vocabulary encodes to, and most exported text encoders take
Features = tuple[dict[int, np.ndarray], dict[int, Exception]]


def _decode_one(data: bytes, preprocessing: ImagePreprocessing, limits: Limits) -> np.ndarray:
    """One encoded image as the model's input; FusionServeError says what is wrong with it."""
    check_image_header(data, limits)
    return preprocessing.apply(decode_image(data))


def decoder(preprocessing: ImagePreprocessing, limits: Limits) -> RunFn:
    """A decode batcher's run function (and a large image's thread hop).

    ``image`` (encoded bytes per row) → ``pixels`` (zeros where a row failed) and ``error`` (the row's
    error, else None), row for row.
    """

    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = inputs["image"]
        pixels = np.zeros((len(images), preprocessing.height, preprocessing.width, 3), np.float32)
        errors = np.full(len(images), None, dtype=object)
        for row, data in enumerate(images):
            try:
                pixels[row] = _decode_one(data, preprocessing, limits)
            except FusionServeError as e:
                errors[row] = e
        return {"pixels": pixels, "error": errors}

    return run


class ImageEncoder:
    """Encoded images → image features, through the cache and the image encoder's batcher."""

    def __init__(self, step: Step, batcher: DynamicBatcher, preprocessing: ImagePreprocessing, limits: Limits,
                 executor: Executor, cache: EmbeddingCache | None, metrics: Metrics, *,
                 max_batch_size: int = 64, max_queue_size: int = 512) -> None:  # fmt: skip
        self.step, self.batcher = step, batcher
        self.preprocessing, self.limits, self.executor = preprocessing, limits, executor
        self.cached = CachedEncoder(step.model, step.version, preprocessing, cache, metrics)
        self._decode = decoder(preprocessing, limits)
        self.decoder = DynamicBatcher(f"{step.model} decoding", self._decode, executor,
                                      max_batch_size=max_batch_size, max_queue_delay_s=0.0,
                                      max_queue_size=max_queue_size, version=step.version)  # fmt: skip
        """Small images of concurrent calls, decoded together (no model: no statistics of its own)."""

    async def start(self) -> None:
        """Start the decode batcher."""
        await self.decoder.start()

    async def aclose(self) -> None:
        """Stop the decode batcher."""
        await self.decoder.aclose()

    async def decode(self, images: Sequence[bytes], *, deadline: float | None = None,
                     lone: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Decode and preprocess images: small ones in the decode batcher, large ones in a thread hop of their own.

        Returns the pixels, row for row (zeros where an image failed), and each row's error or None.
        """
        batch = np.empty(len(images), dtype=object)
        batch[:] = images
        if all(len(image) <= INLINE_DECODE_BYTES for image in images):
            out = await self.decoder.submit({"image": batch}, deadline=deadline, lone=lone)
        else:
            out = await asyncio.get_running_loop().run_in_executor(self.executor, self._decode, {"image": batch})
        return out["pixels"], out["error"]

    async def features(self, images: Sequence[bytes], *, deadline: float | None, lone: bool = False,
                       noun: str = "item") -> Features:  # fmt: skip
        """Per index, the image's features or its error (``noun`` names items in error messages)."""
        call = current_call()
        if call is not None:
            call.saw(images=images)

        async def compute(indices: list[int]) -> Features:
            started = time.perf_counter()
            pixels, failed = await self.decode([images[i] for i in indices], deadline=deadline, lone=lone)
            if call is not None:
                call.step("decode", started, **{"fusionserve.images": len(indices)})
            errors: dict[int, Exception] = {
                i: InvalidInputError(f"{noun} {i}: {e}") for i, e in zip(indices, failed, strict=True) if e is not None
            }
            good = [k for k, e in enumerate(failed) if e is None]
            if not good:
                return {}, errors
            batch = pixels if len(good) == len(indices) else pixels[good]  # no copy when all decoded
            out = await self.batcher.submit({self.step.inputs[0]: batch}, deadline=deadline, lone=lone)
            rows = out[self.step.output]
            return {indices[k]: rows[j] for j, k in enumerate(good)}, errors

        return await self.cached.features(images, compute)


class TextEncoder:
    """Texts → text features, through the tokeniser, the cache and the text encoder's batcher.

    With ``cut``, the text encoder takes each batch cut to its longest caption: a call's token rows are
    cut to its own longest (the cache still keys each caption on its full-length row, whoever its
    neighbours), and the batcher pads calls' rows to the longest of those it merges.
    """

    def __init__(self, step: Step, batcher: DynamicBatcher, vocabulary: Vocabulary, cache: EmbeddingCache | None,
                 metrics: Metrics, dtype: np.dtype = TOKEN_DTYPE, *, cut: bool = False) -> None:  # fmt: skip
        self.step, self.batcher, self.vocabulary = step, batcher, vocabulary
        self.dtype = dtype  # the text encoder's id type (int64 for most PyTorch exports)
        self.cut = cut  # the text encoder takes rows cut to their longest caption (its batcher pads across calls)
        settings = (vocabulary.max_length, vocabulary.padding, vocabulary.truncating)
        self.cached = CachedEncoder(step.model, step.version, settings, cache, metrics)

    async def features(self, texts: Sequence[str], *, deadline: float | None, lone: bool = False) -> Features:
        """Per index, the text's features (keyed in the cache by its token ids at full length)."""
        started = time.perf_counter()
        tokens = self.vocabulary.encode(texts).astype(self.dtype, copy=False)
        if (call := current_call()) is not None:
            call.saw(texts=texts)
            call.step("tokenise", started, **{"fusionserve.texts": len(texts)})

        async def compute(indices: list[int]) -> Features:
            ids = self.vocabulary.cut(tokens[indices]) if self.cut else tokens[indices]
            out = await self.batcher.submit({self.step.inputs[0]: ids}, deadline=deadline, lone=lone)
            rows = out[self.step.output]
            return {i: rows[k] for k, i in enumerate(indices)}, {}

        return await self.cached.features([row.tobytes() for row in tokens], compute)
