"""The serving core every front-end shares: lifecycle and the inference calls.

The registry says which model versions exist, the loader builds them from the repository; the
core starts and stops them and runs calls through batchers and pipelines. NumPy and Python types
in and out; no protobuf and no gRPC in here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from fusionserve.errors import InvalidInputError, RepositoryError
from fusionserve.repository import ModelConfig
from fusionserve.server.admission import Admission
from fusionserve.server.calls import current as current_call
from fusionserve.server.embedding_cache import EmbeddingCache
from fusionserve.server.lifecycle import ModelControl
from fusionserve.server.limits import Limits
from fusionserve.server.metrics import Metrics
from fusionserve.server.pipeline import Embeddings, MultimodalPipeline, PipelineResult, Ranking
from fusionserve.server.registry import READY, ModelEntry, ModelRegistry
from fusionserve.server.settings import ServerSettings
from fusionserve.server.tracking import serving

logger = logging.getLogger(__name__)

# At most this many onnxruntime runs at once, across every model version (one per batcher at a time;
# a rollout holds two versions of each model). Threads start on demand.
ORT_POOL_THREADS = 16


class ServingCore:
    """Owns the registry, the thread pools and the model lifecycle; answers inference calls."""

    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.limits = Limits.from_settings(settings)
        self.registry = ModelRegistry()
        self._ort_pool = ThreadPoolExecutor(ORT_POOL_THREADS, thread_name_prefix="onnxruntime")
        self._pre_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self.on_change: Callable[[], Awaitable[None]] | None = None
        """Called after models were loaded or unloaded (the app republishes health)."""
        self.admission = Admission(settings.queue_delay_target_ms / 1000, on_change=self._admission_measured)
        """Overload control: every inference call passes it before any work."""
        mb = settings.embedding_cache_mb
        self.cache = EmbeddingCache(int(mb * 1024 * 1024), self.metrics) if mb > 0 else None
        self.control = ModelControl(settings, self.registry, self.metrics, self._ort_pool, self._pre_pool,
                                    self.limits, self.cache, on_change=self._changed)  # fmt: skip
        # Bad images are answered with INVALID_ARGUMENT; OpenCV's own error lines would only be noise.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

    def _admission_measured(self, admission: Admission) -> None:
        self.metrics.admission_capacity.set(admission.capacity or 0.0)
        self.metrics.admission_limit.set(admission.limit or 0.0)

    async def _changed(self) -> None:
        if self.on_change is not None:
            await self.on_change()

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model the version policy selects, warm each up, start the batchers (and the poller).

        A model that fails to load is marked FAILED (with the reason) and the others still serve.

        Raises:
            RepositoryError: the repository is missing or no model at all could be loaded.
            DeviceUnavailableError: ``device=cuda`` and CUDA does not load.
        """
        repo = Path(self.settings.repository)
        await self.control.start()
        self.metrics.reset_totals()  # the statistics count served requests, not the warm-up runs
        entries = self.registry.entries()
        if not any(e.state == READY for e in entries):
            await self.control.stop()
            raise RepositoryError(
                f"no model in repository {str(repo)!r} could be loaded: " + "; ".join(e.reason for e in entries)
                if entries
                else f"repository {str(repo)!r} holds no models (run 'fusionserve export' first)"
            )

    def begin_drain(self) -> None:
        """Refuse new work from now on (in-flight work goes on)."""
        self.registry.begin_drain()

    async def aclose(self) -> None:
        """Stop the poller, every batcher, and release the thread pools."""
        self.begin_drain()
        await self.control.stop()
        self._ort_pool.shutdown(wait=True)
        self._pre_pool.shutdown(wait=True)

    def entry_for(self, name: str, version: int) -> ModelEntry:
        """The entry that serves a request for ``name`` (``version`` 0: the latest), as ``registry.get`` finds it.

        The request's metrics count under that version from here on, its errors included (server/tracking.py).
        """
        entry = self.registry.get(name, version)
        serving(entry.version)
        return entry

    def refuse_if_late(self, items: int, deadline: float | None) -> None:
        """Raise at once if the door's deadline rule would refuse a call of ``items`` items now.

        Front-ends call it before they decode a request: under a flood every refused call is cheaper.
        """
        if deadline is not None:
            self.admission.check_deadline(max(items, 1), deadline - asyncio.get_running_loop().time())

    def _admit(self, items: int, deadline: float | None) -> contextlib.AbstractContextManager[None]:
        """Pass the door (server/admission.py) with ``items`` items and a ``loop.time()`` deadline."""
        timeout_s = None if deadline is None else deadline - asyncio.get_running_loop().time()
        return self.admission.admit(items, timeout_s)

    @contextlib.contextmanager
    def _pipeline(
        self, name: str, version: int, items: int, deadline: float | None
    ) -> Iterator[tuple[ModelEntry, MultimodalPipeline]]:
        """A ready pipeline model, held for one call of ``items`` items, past the door (overload control).

        Raises InvalidInputError if ``name`` is a tensor model. The hold is taken with the lookup: the
        version cannot go before the answer.
        """
        entry = self.entry_for(name, version)
        if entry.pipeline is None:
            raise InvalidInputError(
                f"model {name!r} is a tensor model; classify, embed and rank need a pipeline such as 'multimodal'"
            )
        with self._admit(items, deadline), entry.in_use():
            if (call := current_call()) is not None:
                call.admitted(entry.name, entry.version, items)
            yield entry, entry.pipeline

    # ---- inference -------------------------------------------------------------------------
    async def classify(
        self,
        name: str,
        version: int,
        images: Sequence[bytes],
        texts: Sequence[str],
        *,
        deadline: float | None = None,
        per_item_errors: bool = False,
    ) -> tuple[ModelEntry, PipelineResult]:
        """Run a pipeline on (image bytes, text) items (see MultimodalPipeline.run), counted as one execution."""
        with self._pipeline(name, version, len(images), deadline) as (entry, pipeline):
            started = time.perf_counter()
            result = await pipeline.run(images, texts, deadline=deadline, per_item_errors=per_item_errors)
            self.metrics.pipeline_run(entry.name, len(images), time.perf_counter() - started)
        return entry, result

    async def embed(
        self, name: str, version: int, images: Sequence[bytes], texts: Sequence[str], *, deadline: float | None = None
    ) -> tuple[ModelEntry, Embeddings]:
        """Image and/or text embeddings from a pipeline's encoders (see MultimodalPipeline.embed)."""
        with self._pipeline(name, version, max(len(images), len(texts)), deadline) as (entry, pipeline):
            embeddings = await pipeline.embed(images, texts, deadline=deadline)
        return entry, embeddings

    async def rank(
        self,
        name: str,
        version: int,
        *,
        image: bytes | None = None,
        text: str | None = None,
        images: Sequence[bytes] = (),
        texts: Sequence[str] = (),
        deadline: float | None = None,
    ) -> tuple[ModelEntry, Ranking]:
        """One query against candidates of the other modality (see MultimodalPipeline.rank)."""
        with self._pipeline(name, version, len(images) + len(texts) + 1, deadline) as (entry, pipeline):
            ranking = await pipeline.rank(image=image, text=text, images=images, texts=texts, deadline=deadline)
        return entry, ranking

    async def infer(
        self, name: str, version: int, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None
    ) -> tuple[ModelEntry, dict[str, np.ndarray]]:
        """Tensors in, tensors out, for a tensor model (pipelines take images and texts: ``classify``).

        Raises:
            InvalidInputError: naming the tensor that is missing, unknown, or of the wrong type, shape or range.
        """
        entry = self.entry_for(name, version)
        assert entry.config is not None
        if entry.batcher is None:
            raise InvalidInputError(f"model {name!r} is a pipeline: it takes images and texts, not tensors")
        first = next(iter(inputs.values()), None)
        rows = first.shape[0] if first is not None and first.ndim else 1  # a scalar is refused just below
        with self._admit(rows, deadline):
            if (call := current_call()) is not None:
                call.admitted(entry.name, entry.version, rows)
            validate_inputs(entry.config, inputs, entry.max_batch_size)
            with entry.in_use():
                return entry, await entry.batcher.submit(inputs, deadline=deadline)


def validate_inputs(config: ModelConfig, inputs: Mapping[str, np.ndarray], max_batch_size: int) -> None:
    """Check inputs against a model's config; errors name the tensor and what to fix."""
    declared = {t.name: t for t in config.inputs}
    for name in inputs:
        if name not in declared:
            raise InvalidInputError(f"model {config.name!r} has no input {name!r}; its inputs are {sorted(declared)}")
    batch = None
    for spec in config.inputs:
        if spec.name not in inputs:
            raise InvalidInputError(f"model {config.name!r}: missing input {spec.name!r}")
        value = inputs[spec.name]
        if value.dtype != spec.dtype and not (spec.datatype == "BYTES" and value.dtype.kind in "OSU"):
            raise InvalidInputError(
                f"input {spec.name!r}: datatype must be {spec.datatype}, got {value.dtype}"
            )
        shape = value.shape
        if len(shape) != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, shape, strict=False)):
            raise InvalidInputError(f"input {spec.name!r}: shape {list(shape)} does not match {list(spec.shape)}")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise InvalidInputError(f"input {spec.name!r}: batch size {shape[0]} differs from the others' {batch}")
        if spec.range is not None and value.size:
            low, high = spec.range
            smallest, largest = int(value.min()), int(value.max())
            if smallest < low or largest >= high:
                bad = smallest if smallest < low else largest
                raise InvalidInputError(
                    f"input {spec.name!r}: values must lie in [{low}, {high}) (model {config.name!r}), "
                    f"got {bad} at flat index {int(np.argmax(value.reshape(-1) == bad))}"
                )
    if batch == 0:
        raise InvalidInputError(f"model {config.name!r}: empty batch")
    if batch is not None and batch > max_batch_size:
        raise InvalidInputError(f"model {config.name!r}: batch of {batch} is over the maximum of {max_batch_size}")


def deadline_from(timeout_s: float | None) -> float | None:
    """A ``loop.time()`` deadline from a remaining-time figure (None stays None)."""
    if timeout_s is None:
        return None
    return asyncio.get_running_loop().time() + timeout_s
