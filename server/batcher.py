"""Dynamic batching: items from concurrent calls merged into one model run.

One consumer task per model takes the first queued item, adds whatever else is queued, and — only
when the model has been busy (work arrived while the last batch ran) — waits for more, up to
``max_batch_size`` items, for at most ``max_queue_delay_s`` and never longer than one run of the
model takes (a tiny model gains nothing from waiting). A lone caller therefore never waits
for a batch that will never fill, while a crowd is still batched. The queue is bounded in items (a
:class:`~fusionserve.server.room.Room`): a caller that finds it full waits for room, at most until its
deadline. Expired and cancelled work is dropped before compute.

Calls are merged on axis 0; an input named in ``ragged`` (token rows cut to each call's longest
caption, say) may also differ in length on axis 1 from call to call: the merged batch pads each
call's rows at the back to the longest (see :class:`Ragged`).

When a merged batch fails, its requests are run again one by one instead of all receiving the
error: a failure caused by one caller's values (onnxruntime refusing an out-of-range index, say)
then reaches only that caller, and a failure of the model itself still reaches everyone.

The queueing policy does not depend on what a call's work is: a subclass that batches other work
than named tensors (a pipeline's jobs, server/pipeline_batch.py) gives its own :meth:`~DynamicBatcher._merged`,
:meth:`~DynamicBatcher._answers` and :meth:`~DynamicBatcher._traced`, and queues with
:meth:`~DynamicBatcher._submit`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fusionserve.errors import DeadlineExceededError, InvalidInputError, ModelNotReadyError
from fusionserve.server.calls import Call
from fusionserve.server.calls import current as current_call
from fusionserve.server.room import Room

logger = logging.getLogger(__name__)

RunFn = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Work:
    inputs: Any  # one call's named tensors (or, in a subclass, its job)
    size: int
    future: asyncio.Future
    deadline: float | None  # loop.time() by which the caller needs the answer
    lone: bool = False  # the caller knows no other request is in flight on this server path
    room: int = 0  # the items it holds in the queue's room (its size, cut to the room's capacity)
    call: Call | None = None  # the caller's record, when tracing or the access log is on (server/calls.py)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Ragged:
    """An input whose rows' length (axis 1) differs from call to call, 1 to ``max_length``.

    Merging calls pads each one's rows at the back with ``pad_value`` up to the batch's longest.
    """

    pad_value: int | float
    max_length: int


def _merge(parts: list[np.ndarray], ragged: Ragged | None) -> np.ndarray:
    """Calls' rows of one input, concatenated on axis 0 (a ragged input's padded to the longest first)."""
    width = max(p.shape[1] for p in parts) if ragged is not None else 0
    if ragged is None or all(p.shape[1] == width for p in parts):
        return np.concatenate(parts, axis=0)
    merged = np.full((sum(len(p) for p in parts), width, *parts[0].shape[2:]), ragged.pad_value, parts[0].dtype)
    row = 0
    for part in parts:
        merged[row : row + len(part), : part.shape[1]] = part
        row += len(part)
    return merged


@dataclass
class BatchStats:
    """Observer hooks the metrics layer plugs into (all optional)."""

    on_batch: Callable[[int, float], None] | None = None  # (items, compute seconds)
    on_queue_time: Callable[[float], None] | None = None  # seconds one work item waited
    on_decode: Callable[[int, float], None] | None = None  # (images, seconds) a pipeline batch spent decoding


class DynamicBatcher:
    """Batches ``submit`` calls for one model and runs them in an executor."""

    def __init__(
        self,
        name: str,
        run: RunFn,
        executor: Executor | None,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        stats: BatchStats | None = None,
        inline_below_s: float = 100e-6,
        inline_idle_below_s: float = 500e-6,
        version: int = 0,
        provider: str = "",
        ragged: Mapping[str, Ragged] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.name = name
        self.version, self.provider = version, provider  # what traces say about this batcher's runs
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._room = Room(max_queue_size, f"model {name!r}'s queue (max_queue_size)")
        self._run = run
        self._executor = executor
        self.stats = stats or BatchStats()
        self._queue: collections.deque[_Work] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._busy = False  # work arrived while the last batch was running
        self._running = False  # the consumer has a batch in hand (gathering it, running it, answering it)
        self.batches_run = 0
        self.items_run = 0
        # Models whose runs take less than this (moving average) run on the event loop itself:
        # an executor hop would cost more than the run.
        self.inline_below_s = inline_below_s
        self.inline_idle_below_s = inline_idle_below_s
        self._avg_compute_s: float | None = None
        self.ragged = dict(ragged or {})
        """Inputs whose rows' length differs from call to call, by name."""

    @property
    def max_queue_size(self) -> int:
        """Items the queue holds; callers beyond it wait for room."""
        return self._room.capacity

    @property
    def queued_items(self) -> int:
        """Items waiting in the queue now."""
        return self._room.held

    async def start(self) -> None:
        """Start the consumer task (on the running loop)."""
        if self._task is None:
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._consume(), name=f"batcher:{self.name}")

    async def aclose(self) -> None:
        """Stop taking work, fail what is queued with ModelNotReadyError, stop the consumer."""
        self._closed = True
        while self._queue:
            work = self._queue.popleft()
            self._room.leave(work.room)
            if not work.future.done():
                work.future.set_exception(ModelNotReadyError(f"model {self.name!r} is shutting down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(
        self, inputs: Mapping[str, np.ndarray], *, deadline: float | None = None, lone: bool = False
    ) -> dict[str, np.ndarray]:
        """Queue one call's rows (all inputs share the first dimension) and await its outputs.

        ``lone`` says the caller is the only request in flight: a short run then happens on the
        event loop itself, saving a thread hop (nobody else needs the loop meanwhile), and at once when
        the batcher is idle, without passing through the queue.

        Raises:
            InvalidInputError: more rows than ``max_batch_size``; a ragged input's rows not 1 to
                ``max_length`` long.
            DeadlineExceededError: the deadline passed before the rows were run (waiting for room in
                the queue included).
            ModelNotReadyError: the batcher is closed.
        """
        if self._closed or self._task is None:
            raise ModelNotReadyError(f"model {self.name!r} is not serving")
        sizes = {len(v) for v in inputs.values()}
        if len(sizes) != 1:
            raise InvalidInputError(f"model {self.name!r}: inputs disagree on the batch size: {sorted(sizes)}")
        size = sizes.pop()
        if size < 1:
            raise InvalidInputError(f"model {self.name!r}: empty batch")
        if size > self.max_batch_size:
            raise InvalidInputError(
                f"model {self.name!r}: batch of {size} is over the maximum of {self.max_batch_size}"
            )
        for name, ragged in self.ragged.items():
            value = inputs.get(name)
            if value is not None and (value.ndim < 2 or not 1 <= value.shape[1] <= ragged.max_length):
                raise InvalidInputError(f"model {self.name!r}: input {name!r} takes rows of 1 to {ragged.max_length} "
                                        f"values, [N, 1…{ragged.max_length}], got {list(value.shape)}")  # fmt: skip
        return await self._submit(inputs, size, deadline, lone)

    async def _submit(self, inputs: Any, size: int, deadline: float | None, lone: bool) -> Any:
        """Queue one call's work of ``size`` rows (checked by the caller) and await its answer (see :meth:`submit`)."""
        if self._closed or self._task is None:
            raise ModelNotReadyError(f"model {self.name!r} is not serving")
        if lone and not self._running and not self._queue and self._short(self.inline_idle_below_s):
            self._busy = False  # a lone caller: no crowd to wait for the next time
            return self._run_alone(_Work(inputs, size, None, deadline, lone, 0, current_call()))  # type: ignore[arg-type]
        room = self._room.fit(size)
        if not self._room.try_enter(room):
            await self._room.enter(room, deadline)
            if self._closed:
                self._room.leave(room)
                raise ModelNotReadyError(f"model {self.name!r} is not serving")
        loop = asyncio.get_running_loop()
        work = _Work(inputs, size, loop.create_future(), deadline, lone, room, current_call())
        self._queue.append(work)
        if self._running:
            self._busy = True
        assert self._wakeup is not None
        self._wakeup.set()
        return await work.future  # cancelling the caller cancels the future; the consumer skips it

    def _take(self, batch: list[_Work], rows: int) -> int:
        """Move queued work into ``batch`` while it fits; returns the new row count."""
        while self._queue and rows + self._queue[0].size <= self.max_batch_size:
            work = self._queue.popleft()
            self._room.leave(work.room)
            batch.append(work)
            rows += work.size
        return rows

    def _timed_run(self, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        started = time.perf_counter()
        outputs = self._run(inputs)
        return outputs, time.perf_counter() - started

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._running = True  # a batch in hand, from here to its answers: a lone caller queues behind it
            try:
                await self._gather_and_run(loop)
            finally:
                self._running = False

    async def _gather_and_run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take queued work, wait for more when the model has been busy, and run it as one batch."""
        assert self._wakeup is not None
        batch: list[_Work] = []
        rows = self._take(batch, 0)
        # Waiting longer than one run takes cannot pay off: the items it gathers would have
        # formed the next batch anyway. So the wait is capped by the model's own run time.
        wait_s = min(self.max_queue_delay_s, self._avg_compute_s or 0.0)
        if self._busy and rows < self.max_batch_size and wait_s > 0:
            until = loop.time() + wait_s
            # A timer that sets the wakeup event, not wait_for: that would make a task per wait.
            timer = loop.call_at(until, self._wakeup.set)
            try:
                while rows < self.max_batch_size and loop.time() < until:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    rows = self._take(batch, rows)
                    if self._queue:  # the next item does not fit: run what we have
                        break
            finally:
                timer.cancel()
        self._busy = bool(self._queue) or len(batch) > 1
        await self._run_batch(batch, loop)

    async def _run_batch(self, batch: list[_Work], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        live = []
        for work in batch:
            if work.future.done():  # cancelled by its caller
                continue
            if work.deadline is not None and now >= work.deadline:
                work.future.set_exception(
                    DeadlineExceededError(f"model {self.name!r}: deadline passed while queued")
                )
                continue
            live.append(work)
        if not live:
            return
        if self.stats.on_queue_time:
            started = time.perf_counter()
            for work in live:
                self.stats.on_queue_time(started - work.enqueued)
        await self._execute(live, loop)

    async def _execute(self, live: list[_Work], loop: asyncio.AbstractEventLoop) -> None:
        """Run ``live`` as one batch and give each caller its rows.

        When a merged batch fails, each request runs again on its own (see the module docstring).
        """
        started = time.perf_counter()
        merged = self._merged(live)
        rows = sum(w.size for w in live)
        # Inline when the run is cheaper than a thread hop, or when a lone caller is waiting on a
        # short run (nothing else needs the loop then).
        lone = len(live) == 1 and live[0].lone and not self._queue
        inline = self._short(self.inline_below_s) or (lone and self._short(self.inline_idle_below_s))
        try:
            if inline:
                outputs, run_s = self._timed_run(merged)
            else:
                outputs, run_s = await loop.run_in_executor(self._executor, self._timed_run, merged)
        except Exception as failure:
            if len(live) > 1:
                for work in live:
                    if not work.future.done():
                        await self._execute([work], loop)
                return
            self._log_failure(failure, rows)
            if not live[0].future.done():
                live[0].future.set_exception(failure)
            return
        compute_s = time.perf_counter() - started
        self._account(rows, run_s, compute_s)
        self._ran(outputs, live)
        answers = self._answers(outputs, live)
        leader = None
        for work, answer in zip(live, answers, strict=True):
            if work.future.done():
                pass
            elif isinstance(answer, Exception):
                work.future.set_exception(answer)
            else:
                work.future.set_result(answer)
                if work.call is not None:
                    leader = self._traced(work, outputs, started, compute_s, rows, len(live), leader)

    # ---- what a call's work is: named tensors here, overridden for other work -----------------
    def _merged(self, live: list[_Work]) -> Any:
        """The run's input: the calls' tensors concatenated on axis 0 (ragged ones padded first)."""
        if len(live) == 1:
            return dict(live[0].inputs)
        return {n: _merge([w.inputs[n] for w in live], self.ragged.get(n)) for n in live[0].inputs}

    def _answers(self, outputs: Any, live: list[_Work]) -> list[Any]:
        """Each call's answer (or error) from the run's outputs: its rows of each output."""
        rows = sum(w.size for w in live)
        if any(len(v) != rows for v in outputs.values()):
            error = RuntimeError(
                f"model {self.name!r} returned {({k: len(v) for k, v in outputs.items()})} rows for a batch of {rows}"
            )
            logger.error("%s", error)
            return [error] * len(live)
        answers, offset = [], 0
        for work in live:
            answers.append({k: v[offset : offset + work.size] for k, v in outputs.items()})
            offset += work.size
        return answers

    def _ran(self, outputs: Any, live: list[_Work]) -> None:
        """After a run that worked, before the answers: nothing here (a pipeline's batch counts each model's part)."""

    def _traced(self, work: _Work, outputs: Any, started: float, run_s: float, rows: int, calls: int,
                leader: Any) -> Any:  # fmt: skip
        """Tell the call's record (tracing, access log) which batch its work rode in; returns the batch's leader."""
        assert work.call is not None
        return work.call.batched(self, work.enqueued, started, run_s, rows, calls, leader)

    def _run_alone(self, work: _Work) -> Any:
        """A lone caller's short run, on the loop at once: no queue, no consumer task, no future.

        Raises what the run raises, or the error of a run that returned the wrong number of rows.
        """
        if work.deadline is not None and asyncio.get_running_loop().time() >= work.deadline:
            raise DeadlineExceededError(f"model {self.name!r}: deadline passed before the run")
        started = time.perf_counter()
        if self.stats.on_queue_time:
            self.stats.on_queue_time(started - work.enqueued)
        try:
            outputs, run_s = self._timed_run(self._merged([work]))
        except Exception as failure:
            self._log_failure(failure, work.size)
            raise
        compute_s = time.perf_counter() - started
        self._account(work.size, run_s, compute_s)
        self._ran(outputs, [work])
        (answer,) = self._answers(outputs, [work])
        if isinstance(answer, Exception):
            raise answer
        if work.call is not None:
            self._traced(work, outputs, started, compute_s, work.size, 1, None)
        return answer

    def _short(self, below_s: float) -> bool:
        """The model's runs take less than ``below_s`` (moving average; unknown before its first run)."""
        return self._avg_compute_s is not None and self._avg_compute_s < below_s

    def _log_failure(self, failure: Exception, rows: int) -> None:
        if not isinstance(failure, InvalidInputError):  # a caller's bad values are the caller's to hear of
            logger.error("model %r failed on a batch of %d", self.name, rows, exc_info=failure)

    def _account(self, rows: int, run_s: float, compute_s: float) -> None:
        """After a run: its time in the moving average, the counters and statistics."""
        self._avg_compute_s = run_s if self._avg_compute_s is None else 0.8 * self._avg_compute_s + 0.2 * run_s
        self.batches_run += 1
        self.items_run += rows
        if self.stats.on_batch:
            self.stats.on_batch(rows, compute_s)

    def record(self, rows: int, run_s: float, queued_s: list[float]) -> None:
        """A run of this model made outside its queue (in a pipeline's batch), counted as its own runs are.

        ``queued_s``: how long each call's work in that batch had waited before the run.
        """
        self._account(rows, run_s, run_s)
        if self.stats.on_queue_time:
            for waited in queued_s:
                self.stats.on_queue_time(waited)
