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
from collections.abc import Mapping, Sequence

import numpy as np

from fusionserve.server.calls import current as current_call
from fusionserve.server.metrics import Metrics

ENTRY_OVERHEAD_BYTES = 256  # key tuple, digest, array header and dictionary slot, per entry (measured: ~230)
Key = tuple[str, int, bytes, bytes]  # model, version, settings digest, input digest


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
    """One encoder of one model version behind the cache: :meth:`lookup` sorts a call's inputs."""

    def __init__(self, model: str, version: int, preprocessing: object, cache: EmbeddingCache | None,
                 metrics: Metrics) -> None:  # fmt: skip
        """``preprocessing``: the settings that turn an input into the encoder's input (its repr is keyed)."""
        self.model, self.version = model, version
        # A digest of the settings' repr: hashed once here, not each time a key is (a dataclass hashes in Python).
        self.settings = hashlib.blake2b(repr(preprocessing).encode(), digest_size=8).digest()
        self.cache = cache
        self.metrics = metrics
        self.inflight: dict[Key, asyncio.Future[np.ndarray]] = {}
        """Inputs some call is computing now: later calls wait for them instead of computing them again."""

    def key(self, material: bytes | np.ndarray) -> Key:
        """The cache key of one input, given as the bytes that identify it (or a contiguous array of them)."""
        data = material.data if isinstance(material, np.ndarray) else material  # an array's bytes, in place
        return (self.model, self.version, self.settings, hashlib.blake2b(data, digest_size=16).digest())

    def lookup(self, materials: Sequence[bytes] | np.ndarray) -> Lookup:
        """One call's inputs (per item, the bytes its key is made of) sorted: found, to compute, or in flight.

        Arrays' rows are read in place (no copy to bytes), and not at all when the cache is off.
        """
        lookup = Lookup(self)
        if self.cache is None or len(materials) == 0:
            lookup.todo = {i: [i] for i in range(len(materials))}
            return lookup
        started = time.perf_counter()
        for i, material in enumerate(materials):
            key = self.key(material)
            value = self.cache.get(key)
            if value is not None:
                lookup.found[i] = value
            elif key in lookup.todo:
                lookup.todo[key].append(i)
            elif key in self.inflight:
                lookup.theirs[i] = (key, self.inflight[key])
            else:
                lookup.todo[key] = [i]
                lookup.owned.add(key)
                self.inflight[key] = asyncio.get_running_loop().create_future()
        hits = len(lookup.found)
        self.metrics.cache_lookup(self.model, hits=hits, misses=len(materials) - hits,
                                  seconds=time.perf_counter() - started)  # fmt: skip
        if (call := current_call()) is not None:
            call.step(f"cache {self.model}", started, **{"fusionserve.model": self.model,
                      "fusionserve.cache.hits": hits, "fusionserve.cache.misses": len(materials) - hits})
        return lookup


class Lookup:
    """One call's inputs to one encoder, by index: ``found``, ``todo`` (to compute), or ``theirs`` (in flight).

    ``todo`` holds each distinct input once; ``theirs`` are being computed by another call (:meth:`wait`).
    The call computes :meth:`compute`'s indices and hands the outputs to :meth:`store`; :meth:`close`
    (always, at the end) tells calls waiting on inputs this call did not compute to compute them themselves.
    """

    def __init__(self, encoder: CachedEncoder) -> None:
        self.encoder = encoder
        self.found: dict[int, np.ndarray] = {}
        self.errors: dict[int, Exception] = {}
        self.todo: dict[Key | int, list[int]] = {}  # an input (its key) → the indices that hold it
        self.theirs: dict[int, tuple[Key, asyncio.Future[np.ndarray]]] = {}
        self.owned: set[Key] = set()  # inputs this call announced it computes (other calls may wait on them)

    def compute(self) -> list[int]:
        """The indices to compute: one of each distinct input nobody had."""
        return [indices[0] for indices in self.todo.values()]

    def computed_as(self) -> dict[int, int]:
        """For each index of ``todo`` that repeats an earlier one's input, the index computed for both."""
        return {i: indices[0] for indices in self.todo.values() for i in indices[1:]}

    def store(self, values: dict[int, np.ndarray], errors: Mapping[int, Exception]) -> None:
        """The outputs (or errors) of :meth:`compute`'s indices, given to each index with the same input.

        Outputs go into the cache too; calls waiting for these inputs get them (or the error).
        """
        cache, inflight = self.encoder.cache, self.encoder.inflight
        for key, indices in self.todo.items():
            value = values.get(indices[0])
            if value is not None:
                self.found.update(dict.fromkeys(indices, value))
                if cache is not None and not isinstance(key, int):
                    cache.put(key, value)
            else:
                self.errors.update(dict.fromkeys(indices, errors[indices[0]]))
            if key in self.owned:
                self.owned.discard(key)  # type: ignore[arg-type]
                future = inflight.pop(key)  # type: ignore[arg-type]
                if value is not None:
                    future.set_result(value)
                else:
                    future.set_exception(errors[indices[0]])
                    future.exception()  # retrieved: a waiter may or may not come
        self.todo = {}

    async def wait(self) -> None:
        """The inputs other calls were computing, when they are done; one whose call gave up joins ``todo``."""
        for i, (key, future) in self.theirs.items():
            try:
                self.found[i] = await asyncio.shield(future)
            except _Abandoned:
                self.todo.setdefault(key, []).append(i)
            except Exception as e:  # the same input failed for the call that computed it
                self.errors[i] = e
        self.theirs = {}

    def close(self) -> None:
        """Give up the inputs this call announced and did not compute: their waiters compute them themselves.

        (The call was cancelled, ran out of time, or a model failed.)
        """
        for key in self.owned:
            pending = self.encoder.inflight.pop(key, None)
            if pending is not None and not pending.done():
                pending.set_exception(_Abandoned())
                pending.exception()  # mark retrieved: nobody may be waiting
        self.owned = set()
