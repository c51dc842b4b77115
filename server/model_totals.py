"""Per-model running totals, as the V2 statistics extension reports them, and their per-worker files.

One process keeps :class:`ModelTotals` in memory. Under ``serve --workers N`` each worker also
mirrors them into a memory-mapped file of its own (:class:`TotalsFile`, beside prometheus_client's
files, in ``TOTALS_FOLDER``), and ``ModelStatistics`` answers with their sum (:func:`read_totals`),
so a client sees one server's totals whichever worker it reached.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict

TOTALS_FOLDER = "totals"  # beside prometheus_client's *.db files, which its collector reads all of


@dataclass
class ModelTotals:
    """Running totals of one model since the server started, as the V2 statistics extension reports them.

    Durations are in nanoseconds. A tensor model's executions are its batches (``compute`` per
    batch, ``queue`` per request); a pipeline's are its runs (one per request, ``compute`` the
    whole run, ``queue`` counted with no time), and its steps count their own batches under their
    own names.
    """

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # rows inferred
    execution_count: int = 0  # batches (tensor models) or runs (pipelines); compute_ns is their total
    last_inference_ms: int = 0  # since the epoch
    cache_hit_count: int = 0  # items answered from the embedding cache
    cache_hit_ns: int = 0
    cache_miss_count: int = 0  # items looked up there and computed
    cache_miss_ns: int = 0
    by_batch_size: dict[int, list[int]] = field(default_factory=dict)  # rows → [executions, compute ns]
    mirror: TotalsMirror | None = field(default=None, repr=False, compare=False)  # set in a worker

    def executed(self, rows: int, seconds: float) -> None:
        """One execution of ``rows`` rows that took ``seconds``."""
        ns = int(seconds * 1e9)
        self.inference_count += rows
        self.execution_count += 1
        self.compute_ns += ns
        entry = self.by_batch_size.setdefault(rows, [0, 0])
        entry[0] += 1
        entry[1] += ns
        if self.mirror is not None:
            self.mirror.write(self, "compute", "rows", batch=rows)

    def queued(self, seconds: float) -> None:
        """One request that waited ``seconds`` in the queue."""
        self.queue_count += 1
        self.queue_ns += int(seconds * 1e9)
        if self.mirror is not None:
            self.mirror.write(self, "queue")

    def finished(self, ok: bool, seconds: float) -> None:
        """One request answered (``ok``) or failed after ``seconds``."""
        if ok:
            self.success_count += 1
            self.success_ns += int(seconds * 1e9)
        else:
            self.fail_count += 1
            self.fail_ns += int(seconds * 1e9)
        self.last_inference_ms = int(time.time() * 1000)
        if self.mirror is not None:
            self.mirror.write(self, "success" if ok else "fail", "last")

    def looked_up(self, hits: int, misses: int, seconds: float) -> None:
        """One embedding-cache lookup of ``hits + misses`` items that took ``seconds``."""
        ns, n = int(seconds * 1e9), hits + misses
        self.cache_hit_count += hits
        self.cache_miss_count += misses
        if n:
            self.cache_hit_ns += ns * hits // n
            self.cache_miss_ns += ns * misses // n
        if self.mirror is not None:
            self.mirror.write(self, "cache_hit", "cache_miss")

    def reset(self) -> None:
        """Back to zero (in place: the batchers' hooks hold this object)."""
        mirror, self.mirror = self.mirror, None
        self.__dict__.update(ModelTotals().__dict__)
        self.mirror = mirror
        if mirror is not None:
            mirror.clear()

    def add(self, other: ModelTotals) -> None:
        """Add ``other``'s counts to these (the latest inference is the later of the two)."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for rows, (count, ns) in other.by_batch_size.items():
            entry = self.by_batch_size.setdefault(rows, [0, 0])
            entry[0] += count
            entry[1] += ns


_SUMMED = tuple(
    name for name in ModelTotals.__dataclass_fields__ if name not in ("last_inference_ms", "by_batch_size", "mirror")
)


# A file entry holds two float64s (prometheus_client's value and timestamp): two fields, one write.
_ENTRIES = {
    "success": ("success_count", "success_ns"),
    "fail": ("fail_count", "fail_ns"),
    "last": ("last_inference_ms", None),
    "queue": ("queue_count", "queue_ns"),
    "compute": ("execution_count", "compute_ns"),
    "rows": ("inference_count", None),
    "cache_hit": ("cache_hit_count", "cache_hit_ns"),
    "cache_miss": ("cache_miss_count", "cache_miss_ns"),
}


class TotalsFile:
    """One worker's :class:`ModelTotals`, mirrored into ``totals_<pid>.db`` for :func:`read_totals`.

    An mmap'ed file in prometheus_client's format (key → two float64s), written in place at each
    update: a memory write, no system call; about 0.2 µs per entry, a dozen or two entries per
    multimodal request. float64 is exact for integers below 2**53 (104 days of summed nanoseconds).
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file = MmapedDict(str(folder / f"totals_{os.getpid()}.db"))

    def mirror(self, model: str) -> TotalsMirror:
        """Where ``model``'s totals are written."""
        return TotalsMirror(self._file, model)

    def close(self) -> None:
        """Unmap the file (it stays: the sum counts a dead worker's totals on)."""
        self._file.close()


class TotalsMirror:
    """One model's entries in a :class:`TotalsFile`."""

    def __init__(self, file: MmapedDict, model: str) -> None:
        self._file = file
        self._model = model
        self._keys: dict[str | int, str] = {}

    def _key(self, entry: str | int) -> str:
        key = self._keys.get(entry)
        if key is None:  # json.dumps once per entry, not per update
            key = self._keys[entry] = json.dumps([self._model, entry])
        return key

    def write(self, totals: ModelTotals, *entries: str, batch: int = 0) -> None:
        """Copy the ``entries`` (of ``_ENTRIES``) of ``totals``, and its batch size ``batch``, to the file."""
        for entry in entries:
            first, second = _ENTRIES[entry]
            value = float(getattr(totals, second)) if second else 0.0
            self._file.write_value(self._key(entry), float(getattr(totals, first)), value)
        if batch:
            count, ns = totals.by_batch_size[batch]
            self._file.write_value(self._key(batch), float(count), float(ns))

    def clear(self) -> None:
        """Zero every entry this model has written."""
        for key in self._keys.values():
            self._file.write_value(key, 0.0, 0.0)


def read_totals(folder: Path) -> dict[str, ModelTotals]:
    """Every worker's totals in ``folder``, summed per model (dead workers' included: they are counts)."""
    out: dict[str, ModelTotals] = {}
    for path in sorted(folder.glob("*.db")):
        for key, first, second, _pos in MmapedDict.read_all_values_from_file(str(path)):
            model, entry = json.loads(key)
            one = ModelTotals()
            if isinstance(entry, int):  # a batch size
                if first:
                    one.by_batch_size[entry] = [int(first), int(second)]
            else:
                first_name, second_name = _ENTRIES[entry]
                setattr(one, first_name, int(first))
                if second_name:
                    setattr(one, second_name, int(second))
            out.setdefault(model, ModelTotals()).add(one)
    return out
