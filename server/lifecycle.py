"""Model lifecycle: the registry kept in step with the repository while the server runs.

``--model-control-mode`` (Triton's names): ``none`` reads the repository once, at start; ``poll``
also reads it again every ``--repository-poll-secs``; ``explicit`` loads everything at start (as
Triton's ``--load-model=*``) and then changes only on ``load``/``unload`` calls.

Each reconcile compares what the version policy wants (on disk, and in explicit mode among the
models asked for) with what is loaded:

- **New versions** are read, validated (config, file hash, graph against config), loaded and warmed
  up *beside* the serving ones; lookups of "the latest" pick the newest READY version, so traffic
  moves only once the new one is READY. A pipeline is loaded after the exact step versions it pins,
  and becomes READY only when they are: an answer never mixes exports. (``fusionserve export`` moves
  every version folder into place whole, the steps before the pipeline.)
- **A bad version never replaces a good one**: it is FAILED with its reason, and tried again when its
  files change (for a pipeline, or its steps' files: a step missing, then arriving); while the
  version the policy wants is not READY, the newest READY one stays.
- **Removed versions** (folder gone, no longer selected, or unloaded) turn UNLOADING: no new call
  gets them, the calls holding them finish, then their batchers and sessions are released. A
  pipeline goes before the steps it pins.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path

from fusionserve.errors import FailedPreconditionError, ModelNotFoundError, RepositoryError
from fusionserve.repository import (
    PLATFORM_PIPELINE,
    ModelConfig,
    is_valid_model_name,
    list_models,
    list_versions,
    select_versions,
)
from fusionserve.server.embedding_cache import EmbeddingCache
from fusionserve.server.limits import Limits
from fusionserve.server.loader import close, fingerprint, load_onnx, load_pipeline, read_config
from fusionserve.server.metrics import Metrics
from fusionserve.server.registry import FAILED, LOADING, READY, UNLOADING, ModelEntry, ModelRegistry
from fusionserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

MODES = ("none", "poll", "explicit")


class ModelControl:
    """Loads, switches and unloads model versions; one reconcile at a time."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        metrics: Metrics,
        ort_pool: Executor,
        pre_pool: Executor,
        limits: Limits,
        cache: EmbeddingCache | None = None,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.repo = Path(settings.repository)
        self.registry = registry
        self.metrics = metrics
        self._ort_pool, self._pre_pool, self._limits = ort_pool, pre_pool, limits
        self.cache = cache
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._wanted: set[str] | None = None  # explicit mode: the models asked for (None: all of them)
        self._poller: asyncio.Task | None = None

    @property
    def mode(self) -> str:
        """``none``, ``poll`` or ``explicit``."""
        return self.settings.model_control_mode

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load what the policy selects (raising what makes the repository unusable); start polling."""
        await self.reconcile(strict=True)
        if self.mode == "explicit":
            self._wanted = set(self.registry.names())
        if self.mode == "poll":
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="repository-poller")

    async def stop(self) -> None:
        """Stop polling and release every model."""
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
        async with self._lock:
            for entry in self.registry.entries():
                await close(entry)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.reconcile()
            except Exception:  # a bad repository state is logged; the server keeps serving
                logger.exception("reading the model repository failed; serving what is loaded")

    # ---- explicit control ------------------------------------------------------------------
    async def load(self, name: str) -> list[ModelEntry]:
        """Load (or reload after its files changed) ``name``: explicit mode only. Its entries after.

        Raises:
            FailedPreconditionError: not in explicit mode.
            ModelNotFoundError: no such model in the repository.
        """
        self._explicit_only("load")
        if not is_valid_model_name(name) or name not in list_models(self.repo):
            raise ModelNotFoundError(f"model {name[:200]!r} is not in the repository {str(self.repo)!r}")
        assert self._wanted is not None
        self._wanted.add(name)
        await self.reconcile(retry=name)
        return [e for e in self.registry.entries() if e.name == name]

    async def unload(self, name: str) -> None:
        """Unload every version of ``name`` once idle: explicit mode only.

        Raises:
            FailedPreconditionError: not in explicit mode, or a loaded pipeline pins this model.
            ModelNotFoundError: no such model is loaded.
        """
        self._explicit_only("unload")
        assert self._wanted is not None
        if name not in self.registry.names():
            raise ModelNotFoundError(f"model {name[:200]!r} is not loaded")
        users = sorted({f"{e.name} v{e.version}" for e in self.registry.entries() if e.config
                        and e.config.platform == PLATFORM_PIPELINE and e.name in self._wanted
                        and name in e.config.steps})  # fmt: skip
        if users:
            raise FailedPreconditionError(f"model {name!r} is a step of {', '.join(users)}: unload that first")
        self._wanted.discard(name)
        await self.reconcile()

    def _explicit_only(self, what: str) -> None:
        if self.mode != "explicit":
            raise FailedPreconditionError(
                f"model {what} is for --model-control-mode explicit; this server runs with {self.mode!r}"
            )

    # ---- the reconcile ---------------------------------------------------------------------
    async def reconcile(self, *, strict: bool = False, retry: str | None = None) -> None:
        """Bring the registry in step with the repository (see the module docstring).

        Args:
            strict: raise on a repository or version policy that cannot be used (at start).
            retry: reload this model's FAILED versions even if their files did not change.
        """
        async with self._lock:
            if self.registry.draining:
                return
            loop = asyncio.get_running_loop()
            wanted, on_disk = await loop.run_in_executor(None, self._wanted_versions, strict)
            changed = await self._load_new(wanted, retry)
            changed |= await self._unload_unwanted(wanted, on_disk)
            self._update_gauges()
        if changed and self._on_change is not None:
            await self._on_change()

    def _wanted_versions(self, strict: bool) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Per model asked for, the versions its policy selects; and every model's versions on disk.

        Blocking: it lists folders.
        """
        on_disk = {name: list_versions(self.repo, name) for name in list_models(self.repo)}  # RepositoryError: gone
        out: dict[str, list[int]] = {}
        for name, versions in on_disk.items():
            if self._wanted is not None and name not in self._wanted:
                continue
            policy = self.settings.model_version_policy.get(name, self.settings.version_policy)
            try:
                out[name] = select_versions(versions, policy)
            except RepositoryError as e:
                if strict:
                    raise
                logger.error("model %s: %s", name, e)
        return out, on_disk

    async def _load_new(self, wanted: dict[str, list[int]], retry: str | None) -> bool:
        loop = asyncio.get_running_loop()
        configs: dict[tuple[str, int], ModelConfig] = {}
        changed = False

        async def read(name: str, version: int) -> None:
            nonlocal changed
            existing = self.registry.lookup(name, version)
            if existing is not None:
                if existing.state != FAILED:
                    return
                now = await loop.run_in_executor(None, self._fingerprint, name, version, existing.config)
                if name != retry and existing.fingerprint == now:
                    return
            config, failed = await loop.run_in_executor(None, read_config, self.repo, name, version)
            if failed is not None:
                self._failed(failed)
                changed = True
            elif config is not None:
                configs[(name, version)] = config

        for name, versions in wanted.items():
            for version in versions:
                await read(name, version)
        for config in list(configs.values()):
            if config.platform == PLATFORM_PIPELINE:
                for step, step_version in config.steps.items():
                    if (step, step_version) not in configs and step_version in list_versions(self.repo, step):
                        await read(step, step_version)
        # Tensor models first (the sort is stable): a pipeline loads after the step versions it pins.
        for config in sorted(configs.values(), key=lambda c: c.platform == PLATFORM_PIPELINE):
            started = time.perf_counter()
            self.registry.add(ModelEntry(config.name, config.version, config, LOADING))
            if config.platform == PLATFORM_PIPELINE:  # FAILED while a step is missing; tried again when it comes
                entry = await load_pipeline(self.repo, config, self.registry, self.settings, self._pre_pool,
                                            self._limits, self.cache, self.metrics)  # fmt: skip
            else:
                entry = await load_onnx(self.repo, config, self.settings, self._ort_pool, self.metrics)
            self._loaded(entry, time.perf_counter() - started)
            changed = True
        return changed

    def _fingerprint(self, name: str, version: int, config: ModelConfig | None) -> tuple:
        """A version folder's files, and for a pipeline its pinned steps' too.

        A FAILED version is tried again once this changes (its files, or a step's, were replaced).
        """
        own = fingerprint(self.repo, name, version)
        if config is None or config.platform != PLATFORM_PIPELINE:
            return own
        return (own, *(fingerprint(self.repo, s, v) for s, v in sorted(config.steps.items())))

    def _loaded(self, entry: ModelEntry, seconds: float) -> None:
        entry.fingerprint = self._fingerprint(entry.name, entry.version, entry.config)
        self.registry.add(entry)
        if entry.state == READY:
            self.metrics.model_loaded(entry.name, seconds)
            logger.info("model %s v%d loaded in %.2f s", entry.name, entry.version, seconds)
        else:
            self._failed(entry)

    def _failed(self, entry: ModelEntry) -> None:
        entry.fingerprint = self._fingerprint(entry.name, entry.version, entry.config)
        self.registry.add(entry)
        self.metrics.model_load_failed(entry.name)
        logger.error("model %s v%d FAILED: %s", entry.name, entry.version, entry.reason)

    async def _unload_unwanted(self, wanted: dict[str, list[int]], on_disk: dict[str, list[int]]) -> bool:
        keep: set[tuple[str, int]] = {(n, v) for n, versions in wanted.items() for v in versions}
        for name, versions in wanted.items():  # the wanted version is not READY: keep the newest one that is
            if versions and not any(self._ready(name, v) for v in versions):
                ready = [e.version for e in self.registry.entries()
                         if e.name == name and e.state == READY and e.version in on_disk.get(name, [])]  # fmt: skip
                keep |= {(name, max(ready))} if ready else set()
        for entry in self.registry.entries():  # the steps every kept pipeline pins
            if (entry.name, entry.version) in keep and entry.config and entry.config.platform == PLATFORM_PIPELINE:
                keep |= set(entry.config.steps.items())
        gone = [e for e in self.registry.entries() if (e.name, e.version) not in keep]
        if not gone:
            return False
        pipelines = [e for e in gone if e.pipeline is not None or (e.config and e.config.platform == PLATFORM_PIPELINE)]
        for group in (pipelines, [e for e in gone if e not in pipelines]):  # a pipeline before its steps
            for entry in group:
                if entry.state == READY:
                    entry.state = UNLOADING
            if self._on_change is not None:
                await self._on_change()
            await asyncio.gather(*(self._unload(e) for e in group))
        return True

    async def _unload(self, entry: ModelEntry) -> None:
        started = time.perf_counter()
        await entry.wait_idle()
        await close(entry)
        if self.cache is not None:
            self.cache.drop(entry.name, entry.version)
        self.registry.remove(entry.name, entry.version)
        self.metrics.model_unloaded(entry.name, time.perf_counter() - started)
        logger.info("model %s v%d unloaded", entry.name, entry.version)

    def _ready(self, name: str, version: int) -> bool:
        entry = self.registry.lookup(name, version)
        return entry is not None and entry.state == READY

    def _update_gauges(self) -> None:
        for name in {*self.registry.names(), *self.metrics.serving_names()}:
            ready = [e for e in self.registry.entries() if e.name == name and e.state == READY]
            self.metrics.serving(name, max((e.version for e in ready), default=0))
            batchers = [e.pipeline.batcher if e.pipeline is not None else e.batcher for e in self.registry.entries()
                        if e.name == name and (e.batcher or e.pipeline) is not None]  # fmt: skip
            self.metrics.watch(self.metrics.queued.labels(name), lambda b=batchers: sum(x.queued_items for x in b))

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) of every loaded version and of every model on disk not loaded."""
        rows = [(e.name, str(e.version), e.state, e.reason) for e in self.registry.entries()]
        loaded = set(self.registry.names())
        try:
            on_disk = list_models(self.repo)
        except RepositoryError:
            on_disk = []
        rows += [(name, "", "", "") for name in on_disk if name not in loaded]
        return sorted(rows)
