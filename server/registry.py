"""Which model versions this server has, in which state, and which one a call gets.

A ``(name, version)`` entry is LOADING, READY, FAILED (with the reason), UNLOADING (finishing its
in-flight calls before it goes) or UNAVAILABLE (the server is draining). Version 0 in a lookup means
the newest READY version (the newest of any state when none is ready, so the caller learns why).
A call holds its entry (``in_use``) from lookup to answer: an entry is unloaded only once idle, so a
call always finishes on the version it started on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fusionserve.errors import ModelNotFoundError, ModelNotReadyError
from fusionserve.repository import ModelConfig, is_valid_model_name

if TYPE_CHECKING:
    from fusionserve.server.batcher import DynamicBatcher
    from fusionserve.server.pipeline import MultimodalPipeline
    from fusionserve.server.runtime import OnnxModel

READY, LOADING, FAILED, UNLOADING, UNAVAILABLE = "READY", "LOADING", "FAILED", "UNLOADING", "UNAVAILABLE"


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
    fingerprint: tuple = ()  # the version folder's files when it was read (a FAILED one is retried on change)
    inflight: int = 0  # calls holding this entry
    _idle: asyncio.Event | None = field(default=None, repr=False)

    def in_use(self) -> InUse:
        """``with entry.in_use():`` holds this entry for one call (take it right after the lookup, no await between)."""
        return InUse(self)

    def _release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no call holds this entry."""
        while self.inflight:
            self._idle = self._idle or asyncio.Event()
            self._idle.clear()
            await self._idle.wait()

    @property
    def max_batch_size(self) -> int:
        """Largest batch one call may send."""
        if self.batcher is not None:
            return self.batcher.max_batch_size
        if self.pipeline is not None:
            return self.pipeline.max_batch_size
        return self.config.max_batch_size if self.config else 0


class InUse:
    """A :class:`ModelEntry` held for the length of a ``with`` block (a class: every call takes one)."""

    __slots__ = ("entry",)

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry

    def __enter__(self) -> ModelEntry:
        self.entry.inflight += 1
        return self.entry

    def __exit__(self, *exc: object) -> None:
        self.entry._release()


class ModelRegistry:
    """Every model version of this server, looked up by name and version."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, int], ModelEntry] = {}
        self.draining = False

    def add(self, entry: ModelEntry) -> None:
        """Register (or replace) the entry of ``entry.name`` version ``entry.version``."""
        self._entries[(entry.name, entry.version)] = entry

    def has(self, name: str, version: int) -> bool:
        """Whether that exact version is registered, in any state."""
        return (name, version) in self._entries

    def lookup(self, name: str, version: int) -> ModelEntry | None:
        """That exact version's entry, in any state, or None."""
        return self._entries.get((name, version))

    def remove(self, name: str, version: int) -> None:
        """Forget that version (the caller has drained and closed it)."""
        self._entries.pop((name, version), None)

    def names(self) -> list[str]:
        """Every model name with at least one registered version."""
        return sorted({n for (n, _) in self._entries})

    def begin_drain(self) -> None:
        """Every ready model becomes UNAVAILABLE: new work is refused from now on."""
        self.draining = True
        for entry in self._entries.values():
            if entry.state == READY:
                entry.state = UNAVAILABLE

    @property
    def ready(self) -> bool:
        """True while the server takes work and at least one model is ready."""
        return not self.draining and any(e.state == READY for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        """Every model version, sorted by name then version."""
        return sorted(self._entries.values(), key=lambda e: (e.name, e.version))

    def versions(self, name: str) -> list[int]:
        """Registered versions of a model (any state)."""
        return sorted(v for (n, v) in self._entries if n == name)

    def find(self, name: str, version: int = 0) -> ModelEntry:
        """The entry for ``name`` (see the module docstring for version 0), in any state.

        Raises:
            ModelNotFoundError: no such model or version.
        """
        if not is_valid_model_name(name):
            raise ModelNotFoundError(f"unknown model {name[:200]!r}")
        versions = self.versions(name)
        if not versions:
            raise ModelNotFoundError(f"unknown model {name!r}; this server has {self.names()}")
        if version == 0:
            ready = [v for v in versions if self._entries[(name, v)].state == READY]
            version = max(ready or versions)
        entry = self._entries.get((name, version))
        if entry is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version}; loaded versions are {versions}")
        return entry

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
            why = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReadyError(f"model {name!r} v{entry.version} is {entry.state}{why}")
        return entry

    def metric_label(self, name: str) -> str:
        """``name`` if this server has such a model, else ``_unknown`` (bounded label cardinality)."""
        return name if any(n == name for (n, _) in self._entries) else "_unknown"
