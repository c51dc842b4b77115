"""The ``multimodal`` pipeline: encoded image + text → probabilities and label (or fused features).

A call is checked, admitted (``max_pipeline_items``), tokenised and looked up in the embedding cache
on the event loop; what is left to compute goes as one job to the pipeline's batcher
(server/pipeline_batch.py), which decodes, runs both encoders and fuses for many calls in one thread
hop. ``rank`` scores one query against candidates of the other modality, encoding the query once, by
the probability of the plan's positive label. Tensor names, image size and preprocessing, token length
and padding, labels and whether the fusion model outputs classes or features come from the pipeline's
:class:`~fusionserve.server.pipeline_config.PipelinePlan`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fusionserve.errors import FusionServeError, InvalidInputError
from fusionserve.repository import DATATYPES
from fusionserve.server.calls import current as current_call
from fusionserve.server.embedding_cache import CachedEncoder, EmbeddingCache, Lookup
from fusionserve.server.limits import Limits
from fusionserve.server.metrics import Metrics
from fusionserve.server.pipeline_batch import Job, PipelineBatcher
from fusionserve.server.pipeline_config import PipelinePlan
from fusionserve.server.room import Room


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


@dataclass
class Worked:
    """What one call's work gave, by the call's own indices: features, bad images, fused rows by pair."""

    images: dict[int, np.ndarray]
    image_errors: dict[int, InvalidInputError]
    texts: dict[int, np.ndarray]
    fused: dict[int, np.ndarray]


class MultimodalPipeline:
    """Runs (image bytes, text) items through decode and both encoders, then fusion, as jobs of one batcher."""

    def __init__(
        self,
        *,
        plan: PipelinePlan,
        batcher: PipelineBatcher,
        cache: EmbeddingCache | None,
        metrics: Metrics,
        limits: Limits,
        max_batch_size: int,
        max_inflight_items: int,
    ) -> None:
        self.plan = plan
        self.batcher = batcher
        self.labels = plan.labels
        self.limits = limits
        self.max_batch_size = max_batch_size
        self.vocabulary = plan.vocabulary
        self.token_dtype = DATATYPES[plan.token_datatype]  # the text encoder's id type (int64 for most PyTorch exports)
        self.image_cache = CachedEncoder(plan.image.model, plan.image.version, plan.image_preprocessing, cache,
                                         metrics)  # fmt: skip
        """Keyed on the encoded image bytes."""
        vocabulary = plan.vocabulary
        self.text_cache = CachedEncoder(plan.text.model, plan.text.version,
                                        (vocabulary.max_length, vocabulary.padding, vocabulary.truncating), cache,
                                        metrics)  # fmt: skip
        """Keyed on a caption's token ids at full length, whoever it shares a batch with."""
        self.room = Room(max_inflight_items, "the pipeline (max_pipeline_items)")
        """Items admitted at once, decoding included (``max_pipeline_items``); more wait for room."""

    async def aclose(self) -> None:
        """Stop the batcher: queued jobs fail with ModelNotReadyError."""
        await self.batcher.aclose()

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
        async with self.room.hold(n, deadline):
            return await self._run(images, texts, deadline, per_item_errors)

    async def _run(
        self, images: Sequence[bytes], texts: Sequence[str], deadline: float | None, per_item_errors: bool
    ) -> PipelineResult:
        n = len(images)
        errors: dict[int, Exception] = dict(self._check_texts(texts))
        good = [i for i in range(n) if i not in errors]  # items whose text can be encoded
        worked = await self._work([images[i] for i in good], [texts[i] for i in good],
                                  [(k, k) for k in range(len(good))], deadline)  # fmt: skip
        errors.update({good[k]: e for k, e in worked.image_errors.items()})
        if errors and not per_item_errors:
            first = min(errors)
            more = f" (and {len(errors) - 1} more bad items)" if len(errors) > 1 else ""
            raise InvalidInputError(f"{errors[first]}{more}")
        ok = [k for k in range(len(good)) if k in worked.fused]
        if not ok:
            empty = np.zeros((0, 0), np.float32)
            return PipelineResult(n, [], errors, empty, empty, empty, self.labels)  # type: ignore[arg-type]
        # np.array of equal rows is np.stack at a fifth of the cost, which every call pays three times.
        return PipelineResult(n, [good[k] for k in ok], errors,  # type: ignore[arg-type]
                              np.array([worked.fused[k] for k in ok]),
                              np.array([worked.images[k] for k in ok]),
                              np.array([worked.texts[k] for k in ok]), self.labels)  # fmt: skip

    async def _work(self, images: Sequence[bytes], texts: Sequence[str], pairs: Sequence[tuple[int, int]],
                    deadline: float | None, noun: str = "item") -> Worked:  # fmt: skip
        """Features of ``images`` and ``texts`` and the fused rows of ``pairs`` (image index, text index).

        What the cache has is not computed again; what another call is computing now is waited for, and
        then the pairs are fused in a second job (one job otherwise). ``noun`` names images in errors.
        """
        call = current_call()
        started = time.perf_counter()
        tokens = np.ascontiguousarray(self.vocabulary.encode(texts), self.token_dtype)  # rows are cache keys
        if call is not None:
            call.saw(texts=texts, images=images)
            if texts:
                call.step("tokenise", started, **{"fusionserve.texts": len(texts)})
        image_lookup = self.image_cache.lookup(images)
        text_lookup = self.text_cache.lookup(tokens)  # keyed on each row's bytes
        try:
            waiting = bool(image_lookup.theirs or text_lookup.theirs)
            fused = await self._job(image_lookup, text_lookup, images, tokens, () if waiting else pairs, deadline)
            if waiting:
                await image_lookup.wait()
                await text_lookup.wait()
                fused = await self._job(image_lookup, text_lookup, images, tokens, pairs, deadline)
        finally:
            image_lookup.close()
            text_lookup.close()
        image_errors = {i: InvalidInputError(f"{noun} {i}: {e}") for i, e in image_lookup.errors.items()}
        return Worked(image_lookup.found, image_errors, text_lookup.found, fused)

    async def _job(self, image_lookup: Lookup, text_lookup: Lookup, images: Sequence[bytes], tokens: np.ndarray,
                   pairs: Sequence[tuple[int, int]], deadline: float | None) -> dict[int, np.ndarray]:  # fmt: skip
        """One job for what the lookups left to compute and for ``pairs``; the features go back to the lookups."""
        image_of, text_of = image_lookup.computed_as(), text_lookup.computed_as()
        job = Job({i: images[i] for i in image_lookup.compute()}, {t: tokens[t] for t in text_lookup.compute()},
                  image_lookup.found, text_lookup.found,
                  [(image_of.get(i, i), text_of.get(t, t)) for i, t in pairs])  # fmt: skip
        if not job.size:
            return {}
        done = await self.batcher.run_job(job, deadline=deadline)
        image_lookup.store(done.image_features, done.image_errors)
        text_lookup.store(done.text_features, {})
        return done.fused

    async def embed(
        self, images: Sequence[bytes], texts: Sequence[str], *, deadline: float | None = None
    ) -> Embeddings:
        """Image and/or text embeddings (and fused ones, see :class:`Embeddings`); any bad item fails the call."""
        if not images and not texts:
            raise InvalidInputError("empty request: send images and/or texts")
        for count in (len(images), len(texts)):
            if count:
                self._check_batch(count)
        async with self.room.hold(max(len(images), len(texts)), deadline):
            self._raise_first(self._check_texts(texts))
            fuse = not self.plan.classifies and bool(images) and len(images) == len(texts)
            worked = await self._work(images, texts, [(k, k) for k in range(len(images))] if fuse else [], deadline)
            self._raise_first(worked.image_errors)
            image_features = np.stack([worked.images[i] for i in range(len(images))]) if images else None
            text_features = np.stack([worked.texts[i] for i in range(len(texts))]) if texts else None
            fused = np.stack([worked.fused[k] for k in range(len(images))]) if fuse else None
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
        n = len(candidates)
        self._check_batch(n, f"candidate {other}")
        async with self.room.hold(n + 1, deadline):
            if image is not None:
                self._raise_first(self._check_texts(texts, "candidate"))
                worked = await self._work([image], texts, [(0, k) for k in range(n)], deadline, noun="query")
            else:
                query_text = text or ""
                self._raise_first(self._check_texts([query_text], "query"))
                worked = await self._work(images, [query_text], [(k, 0) for k in range(n)], deadline,
                                          noun="candidate")  # fmt: skip
            self._raise_first(worked.image_errors)
            scores = np.stack([worked.fused[k] for k in range(n)])[:, self.plan.positive]
        order = sorted(range(n), key=lambda i: (-float(scores[i]), i))
        return Ranking(scores, order, self.labels[self.plan.positive])
