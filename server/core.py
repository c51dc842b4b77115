"""The serving core every front-end shares: model registry, batchers, pipeline, lifecycle.

NumPy in, NumPy out; no protobuf and no gRPC in here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from fusionserve.errors import (
    DeviceUnavailableError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RepositoryError,
)
from fusionserve.preprocess import Vocabulary, encode_png
from fusionserve.repository import (
    PLATFORM_ONNX,
    PLATFORM_PIPELINE,
    ModelConfig,
    is_valid_model_name,
    list_models,
    list_versions,
    load_config,
    select_versions,
    version_dir,
)
from fusionserve.server.batcher import DynamicBatcher
from fusionserve.server.limits import Limits
from fusionserve.server.metrics import Metrics
from fusionserve.server.pipeline import MultimodalPipeline, PipelineResult
from fusionserve.server.runtime import OnnxModel
from fusionserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

READY, LOADING, FAILED, UNAVAILABLE = "READY", "LOADING", "FAILED", "UNAVAILABLE"


@dataclass
class ModelEntry:
    """One loaded (or failed) model version."""

    name: str
    version: int
    config: ModelConfig | None
    state: str = LOADING
    reason: str = ""
    model: OnnxModel | None = None
    batcher: DynamicBatcher | None = None
    pipeline: MultimodalPipeline | None = None
    providers: list[str] = field(default_factory=list)

    @property
    def max_batch_size(self) -> int:
        """Largest batch one call may send."""
        if self.batcher is not None:
            return self.batcher.max_batch_size
        if self.pipeline is not None:
            return self.pipeline.max_batch_size
        return self.config.max_batch_size if self.config else 0


class ServingCore:
    """Loads the repository, owns every model's session and batcher, and answers inference calls."""

    def __init__(self, settings: ServerSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.limits = Limits(settings.max_image_bytes, settings.max_image_pixels, settings.max_text_chars)
        self._entries: dict[tuple[str, int], ModelEntry] = {}
        self._ort_pool: ThreadPoolExecutor | None = None
        self._pre_pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        self.draining = False
        # Bad images are answered with INVALID_ARGUMENT; OpenCV's own error lines would only be noise.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model the version policy selects, warm each up, start the batchers.

        A model that fails to load is marked FAILED (with the reason) and the others still serve.

        Raises:
            RepositoryError: the repository is missing or no model at all could be loaded.
            DeviceUnavailableError: ``device=cuda`` and CUDA does not load.
        """
        repo = Path(self.settings.repository)
        wanted: dict[str, list[int]] = {}
        for name in list_models(repo):
            policy = self.settings.model_version_policy.get(name, self.settings.version_policy)
            wanted[name] = select_versions(list_versions(repo, name), policy)
        configs: dict[tuple[str, int], ModelConfig] = {}
        for name, versions in wanted.items():
            for version in versions:
                self._load_config(repo, name, version, configs)
        # Pipelines pull in the exact step versions they were exported with.
        for config in list(configs.values()):
            if config.platform == PLATFORM_PIPELINE:
                for step, step_version in config.steps.items():
                    if (step, step_version) not in configs and (step, step_version) not in self._entries:
                        self._load_config(repo, step, step_version, configs)
        onnx_configs = [c for c in configs.values() if c.platform == PLATFORM_ONNX]
        self._ort_pool = ThreadPoolExecutor(max(2, len(onnx_configs)), thread_name_prefix="onnxruntime")
        for config in onnx_configs:
            await self._load_onnx(repo, config)
        for config in configs.values():
            if config.platform == PLATFORM_PIPELINE:
                await self._load_pipeline(repo, config)
        self.metrics.reset_totals()  # the statistics count served requests, not the warm-up runs
        ready = [e for e in self._entries.values() if e.state == READY]
        for entry in self._entries.values():
            if entry.state == FAILED:
                logger.error("model %s v%d FAILED: %s", entry.name, entry.version, entry.reason)
        if not ready:
            raise RepositoryError(
                f"no model in repository {str(repo)!r} could be loaded: "
                + "; ".join(e.reason for e in self._entries.values())
                if self._entries
                else f"repository {str(repo)!r} holds no models (run 'fusionserve export' first)"
            )

    def _load_config(self, repo: Path, name: str, version: int, out: dict) -> None:
        try:
            out[(name, version)] = load_config(repo, name, version)
        except RepositoryError as e:
            self._entries[(name, version)] = ModelEntry(name, version, None, FAILED, str(e))

    async def _load_onnx(self, repo: Path, config: ModelConfig) -> None:
        entry = ModelEntry(config.name, config.version, config)
        self._entries[(config.name, config.version)] = entry
        s = self.settings
        try:
            assert config.model_file is not None
            model = OnnxModel(
                config,
                version_dir(repo, config.name, config.version) / config.model_file,
                device=s.device,
                cuda_options=s.cuda_provider_options(),
                intra_op_threads=s.intra_op_threads,
                inter_op_threads=s.inter_op_threads,
                graph_optimization_level=s.graph_optimization_level,
                io_binding=s.io_binding,
            )
            entry.model, entry.providers = model, model.providers
            batcher = DynamicBatcher(
                config.name,
                model.run,
                self._ort_pool,
                max_batch_size=s.max_batch_size or config.max_batch_size,
                max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
                max_queue_size=s.max_queue_size,
                stats=self.metrics.batch_stats(config.name),
            )
            await batcher.start()
            entry.batcher = batcher
            self.metrics.queued.labels(config.name).set_function(lambda: batcher.queued_items)
            if s.warmup:
                await batcher.submit(_warmup_inputs(config, 1))
                if model.on_cuda and batcher.max_batch_size > 1:
                    await batcher.submit(_warmup_inputs(config, batcher.max_batch_size))
            entry.state = READY
            logger.info("model %s v%d READY on %s", config.name, config.version, model.providers)
        except DeviceUnavailableError:
            raise
        except Exception as e:  # any failure to load marks this model FAILED, others go on
            entry.state, entry.reason = FAILED, str(e)
            if entry.batcher is not None:
                await entry.batcher.aclose()

    async def _load_pipeline(self, repo: Path, config: ModelConfig) -> None:
        entry = ModelEntry(config.name, config.version, config)
        self._entries[(config.name, config.version)] = entry
        try:
            steps = {}
            for role in ("image_encoder", "text_encoder", "fusion"):
                if role not in config.steps:
                    raise RepositoryError(f"pipeline {config.name} v{config.version} has no {role} step")
                step = self._entries.get((role, config.steps[role]))
                if step is None or step.state != READY or step.batcher is None:
                    why = step.reason if step is not None else "not in the repository"
                    raise RepositoryError(f"step {role} v{config.steps[role]} is not ready: {why}")
                steps[role] = step
            vdir = version_dir(repo, config.name, config.version)
            vocab = Vocabulary.load(vdir / (config.vocabulary_file or "vocab.json"))
            image_spec = steps["image_encoder"].config.inputs[0]  # type: ignore[union-attr]
            assert steps["image_encoder"].batcher and steps["text_encoder"].batcher and steps["fusion"].batcher
            entry.pipeline = MultimodalPipeline(
                image=steps["image_encoder"].batcher,
                text=steps["text_encoder"].batcher,
                fusion=steps["fusion"].batcher,
                image_size=(image_spec.shape[1], image_spec.shape[2]),
                vocabulary=vocab,
                labels=config.labels,
                executor=self._pre_pool,
                limits=self.limits,
                max_batch_size=self.settings.max_batch_size or config.max_batch_size,
                max_inflight_items=self.settings.max_pipeline_items,
            )
            entry.providers = sorted({p for s in steps.values() for p in s.providers})
            if self.settings.warmup:
                image = encode_png(np.full((image_spec.shape[1], image_spec.shape[2], 3), 127, np.uint8))
                await entry.pipeline.run([image], ["warm up"])
            entry.state = READY
            logger.info("pipeline %s v%d READY (steps %s)", config.name, config.version, config.steps)
        except Exception as e:  # a broken pipeline must not take the tensor models down with it
            entry.state, entry.reason = FAILED, str(e)

    def begin_drain(self) -> None:
        """Refuse new work from now on (in-flight work goes on)."""
        self.draining = True
        for entry in self._entries.values():
            if entry.state == READY:
                entry.state = UNAVAILABLE

    async def aclose(self) -> None:
        """Stop every batcher and release the thread pools."""
        self.begin_drain()
        for entry in self._entries.values():
            if entry.batcher is not None:
                await entry.batcher.aclose()
        if self._ort_pool is not None:
            self._ort_pool.shutdown(wait=True)
        self._pre_pool.shutdown(wait=True)

    # ---- lookup ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while the server takes work and at least one model is ready."""
        return not self.draining and any(e.state == READY for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        """Every model version, sorted by name then version."""
        return sorted(self._entries.values(), key=lambda e: (e.name, e.version))

    def versions(self, name: str) -> list[int]:
        """Loaded versions of a model (any state)."""
        return sorted(v for (n, v) in self._entries if n == name)

    def find(self, name: str, version: int = 0) -> ModelEntry:
        """The entry for ``name`` (latest loaded version when ``version`` is 0), in any state.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        if not is_valid_model_name(name):
            raise ModelNotFoundError(f"unknown model {name[:200]!r}")
        versions = self.versions(name)
        if not versions:
            known = sorted({n for (n, _) in self._entries})
            raise ModelNotFoundError(f"unknown model {name!r}; this server has {known}")
        if version == 0:
            ready = [v for v in versions if self._entries[(name, v)].state == READY]
            version = max(ready or versions)
        entry = self._entries.get((name, version))
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version}; loaded versions are {versions}")
        return entry

    def metric_label(self, name: str) -> str:
        """``name`` if this server has such a model, else ``_unknown`` (bounded label cardinality)."""
        return name if any(n == name for (n, _) in self._entries) else "_unknown"

    def get(self, name: str, version: int = 0) -> ModelEntry:
        """Like :meth:`find`, but the model must be ready.

        Raises:
            ModelNotFoundError: no such model or version.
            ModelNotReadyError: the model failed to load or the server is draining.
        """
        entry = self.find(name, version)
        if self.draining:
            raise ModelNotReadyError("server is shutting down; retry on another replica")
        if entry.state != READY:
            raise ModelNotReadyError(f"model {name!r} v{entry.version} is {entry.state}: {entry.reason}")
        return entry

    def pipeline(self, name: str, version: int = 0) -> tuple[ModelEntry, MultimodalPipeline]:
        """A ready pipeline model, or InvalidInputError if ``name`` is a tensor model."""
        entry = self.get(name, version)
        if entry.pipeline is None:
            raise InvalidInputError(
                f"model {name!r} is a tensor model; classify/embed need a pipeline such as 'multimodal'"
            )
        return entry, entry.pipeline

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
        wait_for_room: bool = False,
    ) -> tuple[ModelEntry, PipelineResult]:
        """Run a pipeline on (image bytes, text) items (see MultimodalPipeline.run)."""
        entry, pipeline = self.pipeline(name, version)
        result = await self._run_pipeline(
            entry, pipeline, images, texts,
            deadline=deadline, per_item_errors=per_item_errors, wait_for_room=wait_for_room,
        )  # fmt: skip
        return entry, result

    async def _run_pipeline(
        self,
        entry: ModelEntry,
        pipeline: MultimodalPipeline,
        images: Sequence[bytes],
        texts: Sequence[str],
        *,
        deadline: float | None,
        per_item_errors: bool = False,
        wait_for_room: bool = False,
    ) -> PipelineResult:
        """``pipeline.run``, counted as one execution in the pipeline's statistics."""
        started = time.perf_counter()
        result = await pipeline.run(
            images, texts, deadline=deadline, per_item_errors=per_item_errors, wait_for_room=wait_for_room
        )
        self.metrics.pipeline_run(entry.name, len(images), time.perf_counter() - started)
        return result

    async def embed(
        self, name: str, version: int, images: Sequence[bytes], texts: Sequence[str], *, deadline: float | None = None
    ) -> tuple[ModelEntry, np.ndarray | None, np.ndarray | None]:
        """Image and/or text embeddings from a pipeline's encoders."""
        entry, pipeline = self.pipeline(name, version)
        image_features, text_features = await pipeline.embed(images, texts, deadline=deadline)
        return entry, image_features, text_features

    async def infer(
        self, name: str, version: int, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None
    ) -> tuple[ModelEntry, dict[str, np.ndarray]]:
        """Tensors in, tensors out, for a tensor model (pipelines take images and texts: ``classify``).

        Raises:
            InvalidInputError: naming the tensor that is missing, unknown, or of the wrong type, shape or range.
        """
        entry = self.get(name, version)
        assert entry.config is not None
        if entry.batcher is None:
            raise InvalidInputError(f"model {name!r} is a pipeline: it takes images and texts, not tensors")
        validate_inputs(entry.config, inputs, entry.max_batch_size)
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


def _warmup_inputs(config: ModelConfig, rows: int) -> dict[str, np.ndarray]:
    return {t.name: np.zeros([rows, *(max(d, 1) for d in t.shape[1:])], t.dtype) for t in config.inputs}


def deadline_from(timeout_s: float | None) -> float | None:
    """A ``loop.time()`` deadline from a remaining-time figure (None stays None)."""
    if timeout_s is None:
        return None
    return asyncio.get_running_loop().time() + timeout_s
