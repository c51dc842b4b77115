"""From a model repository on disk to serving entries: sessions, batchers, pipelines, warm-up.

``read_config`` reads one version's config; ``fingerprint`` lists its folder's files (the lifecycle
tries a FAILED version again when they change); ``load_onnx`` gives a tensor model its onnxruntime
session and batcher and warms it up; ``load_pipeline`` resolves a pipeline's plan against its steps
and builds it; ``close`` releases an entry. Blocking work (hashing,
session creation) runs in a worker thread, so a server loading a new version goes on serving. A
model that fails becomes a FAILED entry with the reason, and the others still serve.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from fusionserve.errors import DeviceUnavailableError, RepositoryError
from fusionserve.preprocess import encode_png
from fusionserve.repository import ModelConfig, load_config, variable_length, version_dir
from fusionserve.server.batcher import DynamicBatcher, Ragged
from fusionserve.server.embedding_cache import EmbeddingCache
from fusionserve.server.limits import Limits
from fusionserve.server.metrics import Metrics
from fusionserve.server.pipeline import MultimodalPipeline
from fusionserve.server.pipeline_batch import PipelineBatcher, PipelineRun, Stage
from fusionserve.server.pipeline_config import resolve
from fusionserve.server.registry import FAILED, READY, ModelEntry, ModelRegistry
from fusionserve.server.runtime import OnnxModel
from fusionserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def fingerprint(repo: Path, name: str, version: int) -> tuple:
    """Name, size and modification time of every file in a version folder (cheap: no hashing)."""
    folder = version_dir(repo, name, version)
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()))
    except OSError:
        return ()


def read_config(repo: Path, name: str, version: int) -> tuple[ModelConfig | None, ModelEntry | None]:
    """The config of one version, or a FAILED entry saying why it cannot be read (blocking: hashes)."""
    try:
        return load_config(repo, name, version), None
    except RepositoryError as e:
        return None, ModelEntry(name, version, None, FAILED, str(e))


async def load_onnx(
    repo: Path, config: ModelConfig, settings: ServerSettings, executor: Executor, metrics: Metrics
) -> ModelEntry:
    """A tensor model's entry: READY with its session and running batcher, or FAILED with the reason.

    Raises:
        DeviceUnavailableError: ``device=cuda`` and CUDA does not load (fatal for the whole server).
    """
    entry = ModelEntry(config.name, config.version, config)
    s = settings
    loop = asyncio.get_running_loop()
    try:
        assert config.model_file is not None
        model = await loop.run_in_executor(None, functools.partial(
            OnnxModel,
            config,
            version_dir(repo, config.name, config.version) / config.model_file,
            device=s.device,
            cuda_options=s.cuda_provider_options(),
            intra_op_threads=s.intra_op_threads,
            inter_op_threads=s.inter_op_threads,
            graph_optimization_level=s.graph_optimization_level,
            io_binding=s.io_binding,
        ))  # fmt: skip
        entry.model, entry.providers = model, model.providers
        batcher = DynamicBatcher(
            config.name,
            model.run,
            executor,
            max_batch_size=s.max_batch_size or config.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            version=config.version,
            provider=model.providers[0] if model.providers else "",
            ragged=_ragged(config),
        )
        await batcher.start()
        entry.batcher = batcher
        if s.warmup:
            await batcher.submit(_warmup_inputs(config, 1))
            if model.on_cuda and batcher.max_batch_size > 1:
                await batcher.submit(_warmup_inputs(config, batcher.max_batch_size))
        # The statistics count served work, not warm-ups.
        batcher.stats = metrics.batch_stats(config.name, config.version)
        entry.state = READY
        logger.info("model %s v%d READY on %s", config.name, config.version, model.providers)
    except DeviceUnavailableError:
        raise
    except Exception as e:  # any failure to load marks this model FAILED, others go on
        entry.state, entry.reason = FAILED, str(e)
        if entry.batcher is not None:
            await entry.batcher.aclose()
    return entry


async def load_pipeline(
    repo: Path, config: ModelConfig, registry: ModelRegistry, settings: ServerSettings, executor: Executor,
    limits: Limits, cache: EmbeddingCache | None, metrics: Metrics,
) -> ModelEntry:  # fmt: skip
    """A pipeline's entry over its (already loaded) steps: READY, or FAILED with the reason."""
    entry = ModelEntry(config.name, config.version, config)
    try:
        steps = {}
        for model, version in config.steps.items():
            step = registry.lookup(model, version)
            if step is None or step.state != READY or step.batcher is None or step.config is None:
                why = step.reason if step is not None else "not in the repository"
                raise RepositoryError(f"step {model} v{version} is not ready: {why}")
            steps[model] = step
        plan = resolve(config, {m: s.config for m, s in steps.items() if s.config}, version_dir(repo, config.name,
                                                                                               config.version))
        image, text, fusion = (steps[step.model] for step in plan.steps)
        assert image.model and text.model and fusion.model and image.batcher and text.batcher and fusion.batcher
        max_batch_size = settings.max_batch_size or config.max_batch_size
        run = PipelineRun(Stage("image", plan.image, image.model.run, image.batcher),
                          Stage("text", plan.text, text.model.run, text.batcher),
                          Stage("fusion", plan.fusion, fusion.model.run, fusion.batcher), plan.image_preprocessing,
                          limits, plan.vocabulary.cut if plan.cut_text else None)  # fmt: skip
        batcher = PipelineBatcher(config.name, run, executor, version=config.version, max_batch_size=max_batch_size,
                                  max_queue_delay_s=settings.max_queue_delay_ms / 1000.0,
                                  max_queue_size=settings.max_queue_size)  # fmt: skip
        await batcher.start()
        entry.pipeline = MultimodalPipeline(
            plan=plan,
            batcher=batcher,
            cache=cache,
            metrics=metrics,
            limits=limits,
            max_batch_size=max_batch_size,
            max_inflight_items=settings.max_pipeline_items,
        )
        entry.providers = sorted({p for s in steps.values() for p in s.providers})
        if settings.warmup:
            preprocessing = plan.image_preprocessing
            image_bytes = encode_png(np.full((preprocessing.height, preprocessing.width, 3), 127, np.uint8))
            await entry.pipeline.run([image_bytes], ["warm up"])
        batcher.stats = metrics.pipeline_stats(config.name, config.version)  # served work, not the warm-up
        entry.state = READY
        logger.info("pipeline %s v%d READY (steps %s)", config.name, config.version, config.steps)
    except Exception as e:  # a broken pipeline must not take the tensor models down with it
        entry.state, entry.reason = FAILED, str(e)
        await close(entry)
    return entry


async def close(entry: ModelEntry) -> None:
    """Release what an entry holds: its batcher, its onnxruntime session, its pipeline."""
    if entry.batcher is not None:
        await entry.batcher.aclose()
    if entry.pipeline is not None:
        await entry.pipeline.aclose()
    entry.batcher = entry.model = entry.pipeline = None


def _ragged(config: ModelConfig) -> dict[str, Ragged]:
    """A text encoder that takes rows cut to their longest caption: its token input, padded across calls."""
    length = variable_length(config)
    return {length.input: Ragged(length.pad_value, length.max_length)} if length else {}


def _warmup_inputs(config: ModelConfig, rows: int) -> dict[str, np.ndarray]:
    """Inputs of ``rows`` rows the model takes: zeros (the lowest value of a declared range)."""
    return {
        t.name: np.full([rows, *(max(d, 1) for d in t.shape[1:])], t.range[0] if t.range else 0, t.dtype)
        for t in config.inputs
    }
