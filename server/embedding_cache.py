"""The per-modality embedding cache: an encoder's output, looked up before the encoder runs.

A multimodal workload repeats one side of its pairs (one product photo against many captions, one
query against many images). Each encoder's output is a pure function of one input, so it is cached
under a key of: model name, model version, the preprocessing settings, and a digest of the input as
that step takes it: the *encoded image bytes* for the decode + image-encoder step (two encodings
that decode to the same pixels are simply two entries), the *token ids* for the text encoder. A hit
skips decoding and the encoder; identical inputs within a request, or in flight in concurrent
requests, are computed once (the later ones wait for the first).

Bounded in bytes (``embedding_cache_mb``), least recently used out first. A version's entries go
when it is unloaded; two versions never share an entry (the version is in the key).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from fusionserve.server.calls import current as current_call
from fusionserve.server.metrics import Metrics

ENTRY_OVERHEAD_BYTES = 256  # key tuple, digest, array header and dictionary slot, per entry (measured: ~230)
Key = tuple[str, int, bytes, bytes]  # model, version, settings digest, input digest
Compute = Callable[[list[int]], Awaitable[tuple[dict[int, np.ndarray], dict[int, Exception]]]]


class EmbeddingCache:
    """Encoder outputs by (model, version, preprocessing, input digest); least recently used out first."""

    def __init__(self, max_bytes: int, metrics: Metrics) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: OrderedDict[Key, np.ndarray] = OrderedDict()
        self._bytes: dict[str, int] = {}  # per model name (the bytes gauge reads it when scraped)
        self.bytes = 0

    def get(self, key: Key) -> np.ndarray | None:
        """The cached output for ``key`` (now the most recently used), or None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Key, value: np.ndarray) -> None:
        """Store a copy of ``value`` (read-only), evicting the least recently used entries to fit."""
        size = value.nbytes + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes or key in self._entries:
            return
        stored = np.array(value, copy=True)  # never a view that keeps a whole batch's output alive
        stored.flags.writeable = False
        self._entries[key] = stored
        self._account(key[0], size)
        while self.bytes > self.max_bytes:
            old_key, old = self._entries.popitem(last=False)
            self._account(old_key[0], -(old.nbytes + ENTRY_OVERHEAD_BYTES))
            self.metrics.cache_evicted(old_key[0])

    def drop(self, model: str, version: int) -> None:
        """Forget every entry of one model version (it was unloaded)."""
        for key in [k for k in self._entries if k[0] == model and k[1] == version]:
            value = self._entries.pop(key)
            self._account(model, -(value.nbytes + ENTRY_OVERHEAD_BYTES))

    def _account(self, model: str, size: int) -> None:
        self.bytes += size
        if model not in self._bytes:
            self.metrics.watch_cache_bytes(model, lambda: self._bytes.get(model, 0))
        self._bytes[model] = self._bytes.get(model, 0) + size

    def __len__(self) -> int:
        return len(self._entries)


class _Abandoned(Exception):
    """The call computing an entry went away first: a waiter computes it itself."""


class CachedEncoder:
    """One encoder of one model version behind the cache.

    ``features`` answers per item, computing only the inputs nobody has (and each of those once).
    """

    def __init__(self, model: str, version: int, preprocessing: object, cache: EmbeddingCache | None,
                 metrics: Metrics) -> None:  # fmt: skip
        """``preprocessing``: the settings that turn an input into the encoder's input (its repr is keyed)."""
        self.model, self.version = model, version
        # A digest of the settings' repr: hashed once here, not each time a key is (a dataclass hashes in Python).
        self.settings = hashlib.blake2b(repr(preprocessing).encode(), digest_size=8).digest()
        self.cache = cache
        self.metrics = metrics
        self._inflight: dict[Key, asyncio.Future[np.ndarray]] = {}

    def key(self, material: bytes) -> Key:
        """The cache key of one input, given as the bytes that identify it."""
        return (self.model, self.version, self.settings, hashlib.blake2b(material, digest_size=16).digest())

    async def features(
        self, materials: Sequence[bytes], compute: Compute
    ) -> tuple[dict[int, np.ndarray], dict[int, Exception]]:
        """Each item's output (or its error), by index.

        Args:
            materials: per item, the bytes its key is made of.
            compute: run the encoder on the items at these indices (one of each distinct input);
                returns their outputs and their per-item errors.
        """
        if not materials:  # a call of the other modality only: nothing to compute (an empty batch is refused)
            return {}, {}
        if self.cache is None:
            return await compute(list(range(len(materials))))
        started = time.perf_counter()
        keys = [self.key(m) for m in materials]
        found: dict[int, np.ndarray] = {}
        mine: dict[Key, list[int]] = {}  # inputs this call computes: their positions
        theirs: dict[int, asyncio.Future[np.ndarray]] = {}  # inputs another call is computing
        for i, key in enumerate(keys):
            value = self.cache.get(key)
            if value is not None:
                found[i] = value
            elif key in mine:
                mine[key].append(i)
            elif key in self._inflight:
                theirs[i] = self._inflight[key]
            else:
                mine[key] = [i]
                self._inflight[key] = asyncio.get_running_loop().create_future()
        self.metrics.cache_lookup(self.model, hits=len(found), misses=len(keys) - len(found),
                                  seconds=time.perf_counter() - started)  # fmt: skip
        if (call := current_call()) is not None:
            call.step(f"cache {self.model}", started, **{"fusionserve.model": self.model,
                      "fusionserve.cache.hits": len(found), "fusionserve.cache.misses": len(keys) - len(found)})
        errors: dict[int, Exception] = {}
        if mine:
            await self._compute(mine, compute, found, errors)
        for i, future in theirs.items():
            try:
                found[i] = await asyncio.shield(future)
            except _Abandoned:
                values, errs = await compute([i])
                found.update(values)
                errors.update(errs)
            except Exception as e:  # the same input failed for the call that computed it
                errors[i] = e
        return found, errors

    async def _compute(self, mine: dict[Key, list[int]], compute: Compute, found: dict[int, np.ndarray],
                       errors: dict[int, Exception]) -> None:  # fmt: skip
        done = False
        try:
            values, errs = await compute([positions[0] for positions in mine.values()])
            for key, positions in mine.items():
                future = self._inflight.pop(key)
                if positions[0] in values:
                    value = values[positions[0]]
                    assert self.cache is not None
                    self.cache.put(key, value)
                    future.set_result(value)
                    found.update(dict.fromkeys(positions, value))
                else:
                    error = errs[positions[0]]
                    future.set_exception(error)
                    future.exception()  # retrieved: a waiter may or may not come
                    errors.update(dict.fromkeys(positions, error))
            done = True
        finally:
            if not done:  # cancelled, or the model failed: waiters must not hang on it
                for key in mine:
                    pending = self._inflight.pop(key) if key in self._inflight else None
                    if pending is not None and not pending.done():
                        pending.set_exception(_Abandoned())
                        pending.exception()  # mark retrieved: nobody may be waiting
