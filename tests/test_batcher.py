"""The dynamic batcher on its own: batching, ordering, limits, deadlines, cancellation, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fusionserve.errors import DeadlineExceededError, InvalidInputError, ModelNotReadyError, QueueFullError
from fusionserve.server.batcher import DynamicBatcher
from fusionserve.server.settings import ServerSettings


class Recorder:
    """A real run function (doubles its input) that records every batch it was given."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.delay_s = delay_s
        self.fail = fail
        self.started = threading.Event()

    def __call__(self, inputs):
        self.started.set()
        x = inputs["x"]
        self.batches.append(x.copy())
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return {"y": x * 2}


DEFAULTS = ServerSettings()


async def make(run, **kw) -> DynamicBatcher:
    """A started batcher with the server's default queue settings, unless ``kw`` says otherwise."""
    kw = {"max_batch_size": 8, "max_queue_delay_s": DEFAULTS.max_queue_delay_ms / 1000,
          "max_queue_size": DEFAULTS.max_queue_size, **kw}  # fmt: skip
    b = DynamicBatcher("m", run, None, **kw)
    await b.start()
    return b


async def test_lone_caller_runs_at_once_without_waiting_for_the_delay():
    rec = Recorder()
    b = await make(rec, max_queue_delay_s=0.5)
    started = time.perf_counter()
    out = await b.submit({"x": np.array([[1.0]])})
    assert time.perf_counter() - started < 0.25  # never waits the 0.5 s for a batch that won't fill
    assert out["y"].tolist() == [[2.0]]
    await b.aclose()


async def test_concurrent_callers_are_batched_and_each_gets_its_own_rows():
    rec = Recorder(delay_s=0.02)
    b = await make(rec, max_batch_size=16, max_queue_delay_s=0.005)
    values = [np.array([[float(i)], [float(i) + 0.5]]) for i in range(40)]
    outs = await asyncio.gather(*(b.submit({"x": v}) for v in values))
    for v, out in zip(values, outs, strict=True):
        assert np.array_equal(out["y"], v * 2)
    assert max(len(batch) for batch in rec.batches) > 2
    assert all(len(batch) <= 16 for batch in rec.batches)
    assert sum(len(batch) for batch in rec.batches) == 80
    await b.aclose()


async def test_batch_over_maximum_and_empty_batch_are_invalid():
    b = await make(Recorder(), max_batch_size=4)
    with pytest.raises(InvalidInputError, match="over the maximum of 4"):
        await b.submit({"x": np.zeros((5, 1))})
    with pytest.raises(InvalidInputError, match="empty batch"):
        await b.submit({"x": np.zeros((0, 1))})
    await b.aclose()


async def test_full_queue_is_refused_at_once():
    rec = Recorder(delay_s=0.3)
    b = await make(rec, max_batch_size=1, max_queue_size=2)
    first = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}))
    await asyncio.sleep(0.05)  # first is running now; the queue is empty
    queued = [asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))})) for _ in range(2)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    with pytest.raises(QueueFullError, match="queue is full"):
        await b.submit({"x": np.zeros((1, 1))})
    assert time.perf_counter() - started < 0.05
    await asyncio.gather(first, *queued)
    await b.aclose()


async def test_expired_work_is_dropped_before_compute():
    rec = Recorder(delay_s=0.2)
    b = await make(rec, max_batch_size=1)
    loop = asyncio.get_running_loop()
    first = asyncio.ensure_future(b.submit({"x": np.array([[1.0]])}))
    await asyncio.sleep(0.02)
    with pytest.raises(DeadlineExceededError):
        await b.submit({"x": np.array([[7.0]])}, deadline=loop.time() + 0.05)
    await first
    await asyncio.sleep(0.05)
    assert all(7.0 not in batch for batch in rec.batches)
    await b.aclose()


async def test_cancelled_work_is_dropped_before_compute():
    rec = Recorder(delay_s=0.2)
    b = await make(rec, max_batch_size=1)
    first = asyncio.ensure_future(b.submit({"x": np.array([[1.0]])}))
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(b.submit({"x": np.array([[9.0]])}))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await first
    await b.submit({"x": np.array([[3.0]])})
    assert all(9.0 not in batch for batch in rec.batches)
    await b.aclose()


async def test_a_failing_batch_fails_every_caller_in_it():
    b = await make(Recorder(fail=True), max_batch_size=8)
    results = await asyncio.gather(*(b.submit({"x": np.zeros((1, 1))}) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    await b.aclose()


async def test_one_callers_bad_values_fail_only_that_caller_not_the_batch_it_shared():
    def run(inputs):  # a real model would refuse such values (an index out of range, say)
        x = inputs["x"]
        if (x < 0).any():
            raise InvalidInputError("negative values")
        return {"y": x * 2}

    b = await make(run, max_batch_size=8)
    values = [np.full((1, 1), float(i)) for i in range(6)] + [np.full((1, 1), -1.0)]
    results = await asyncio.gather(*(b.submit({"x": v}) for v in values), return_exceptions=True)
    assert isinstance(results[-1], InvalidInputError)
    for v, out in zip(values[:-1], results[:-1], strict=True):
        assert np.array_equal(out["y"], v * 2)
    assert b.batches_run == 6  # the merged batch failed, then each good request ran alone
    await b.aclose()


async def test_closed_batcher_refuses_and_fails_queued_work():
    rec = Recorder(delay_s=0.2)
    b = await make(rec, max_batch_size=1)
    running = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}))
    await asyncio.sleep(0.02)
    queued = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}))
    await asyncio.sleep(0)
    await b.aclose()
    with pytest.raises(ModelNotReadyError):
        await queued
    with pytest.raises(ModelNotReadyError):
        await b.submit({"x": np.zeros((1, 1))})
    running.cancel()


async def test_tiny_models_run_on_the_loop_and_slow_ones_in_the_executor():
    import concurrent.futures

    threads: list[str] = []

    def tiny(inputs):
        threads.append(threading.current_thread().name)
        return {"y": inputs["x"]}

    def slow(inputs):
        threads.append(threading.current_thread().name)
        time.sleep(0.002)
        return {"y": inputs["x"]}

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pool") as pool:
        for run, expected in ((tiny, threading.current_thread().name), (slow, "pool_0")):
            threads.clear()
            b = DynamicBatcher("m", run, pool, max_batch_size=4, max_queue_delay_s=0.002, max_queue_size=64)
            await b.start()
            for _ in range(3):
                await b.submit({"x": np.zeros((1, 1))})
            assert threads[0] == "pool_0"  # the first run is measured in the executor
            assert threads[-1] == expected
            await b.aclose()
