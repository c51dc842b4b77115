"""The dynamic batcher on its own: batching, ordering, limits, deadlines, cancellation, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from fusionserve.errors import DeadlineExceededError, InvalidInputError, ModelNotReadyError
from fusionserve.server.batcher import DynamicBatcher, Ragged
from fusionserve.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(60)  # a caller left waiting by a broken batcher fails, not hangs


class Recorder:
    """A real run function (doubles its input) that records every batch it was given.

    ``held``: each run waits until :meth:`release` (so a test knows a run is in progress and what is
    queued behind it, with no sleeps); ``started`` is set when the first run begins.
    """

    def __init__(self, delay_s: float = 0.0, fail: bool = False, held: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.delay_s = delay_s
        self.fail = fail
        self.started = threading.Event()
        self._gate = threading.Event()
        if not held:
            self._gate.set()

    def release(self) -> None:
        """Let the held run, and every later one, go on."""
        self._gate.set()

    def hold(self) -> None:
        """Hold the next run (and every later one) until :meth:`release`; ``started`` is set when it begins."""
        self.started.clear()
        self._gate.clear()

    def __call__(self, inputs):
        self.started.set()
        x = inputs["x"]
        self.batches.append(x.copy())
        assert self._gate.wait(10), "the test never released the run"
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return {"y": x * 2}


async def until(predicate, timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` on the loop until it holds (fails after ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out waiting"
        await asyncio.sleep(0.001)


async def running(rec: Recorder, b: DynamicBatcher, x: float) -> asyncio.Future:
    """Submit one row and return once its run has started (held by ``rec``) in the executor."""
    b.inline_below_s = b.inline_idle_below_s = 0.0  # a held run must leave the loop
    call = asyncio.ensure_future(b.submit({"x": np.array([[x]])}))
    await until(rec.started.is_set)
    return call


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


async def test_a_ragged_inputs_calls_are_padded_at_the_back_to_the_longest_they_meet():
    rec = Recorder(held=True)
    b = await make(rec, ragged={"x": Ragged(pad_value=-1, max_length=5)})
    first = await running(rec, b, 0.0)
    calls = [np.array([[1, 2]]), np.array([[3, 4, 5, 6], [7, 0, 0, 0]]), np.array([[8]])]
    rest = [asyncio.ensure_future(b.submit({"x": c})) for c in calls]
    await until(lambda: b.queued_items == 4)
    rec.release()
    outs = await asyncio.gather(*rest)
    await first
    padded = np.array([[1, 2, -1, -1], [3, 4, 5, 6], [7, 0, 0, 0], [8, -1, -1, -1]])
    assert np.array_equal(rec.batches[1], padded)  # one run, 4 wide: the longest call's width
    assert [out["y"].tolist() for out in outs] == [(2 * padded[:1]).tolist(), (2 * padded[1:3]).tolist(),
                                                   (2 * padded[3:]).tolist()]  # fmt: skip
    await b.aclose()


async def test_a_ragged_input_takes_rows_of_1_to_max_length_values():
    b = await make(Recorder(), ragged={"x": Ragged(pad_value=0, max_length=3)})
    for shape in ((2, 4), (2, 0), (2,)):
        with pytest.raises(InvalidInputError, match=r"input 'x' takes rows of 1 to 3 values"):
            await b.submit({"x": np.ones(shape)})
    out = await b.submit({"x": np.ones((2, 3))})
    assert out["y"].tolist() == [[2.0] * 3] * 2
    await b.aclose()


async def test_a_full_queue_holds_callers_back_in_order_and_answers_them_all():
    rec = Recorder(held=True)
    b = await make(rec, max_batch_size=1, max_queue_size=2)
    first = await running(rec, b, 0.0)
    rest = [asyncio.ensure_future(b.submit({"x": np.array([[float(i)]])})) for i in range(1, 6)]
    await until(lambda: b.queued_items == 2)
    for _ in range(20):  # however long the callers wait, the queue never holds more than its size
        await asyncio.sleep(0)
        assert b.queued_items == 2 and not any(f.done() for f in rest)
    rec.release()
    outs = await asyncio.gather(first, *rest)
    assert [float(o["y"][0, 0]) for o in outs] == [2.0 * i for i in range(6)]
    assert [float(batch[0, 0]) for batch in rec.batches] == [float(i) for i in range(6)]  # first come, first run
    await b.aclose()


async def test_a_caller_waiting_for_room_gives_up_at_its_deadline_and_never_runs():
    rec = Recorder(held=True)
    b = await make(rec, max_batch_size=1, max_queue_size=1)
    loop = asyncio.get_running_loop()
    first = await running(rec, b, 1.0)
    queued = asyncio.ensure_future(b.submit({"x": np.array([[2.0]])}))
    await until(lambda: b.queued_items == 1)
    with pytest.raises(DeadlineExceededError, match=r"waiting for room in model 'm''s queue \(max_queue_size\)"):
        await b.submit({"x": np.array([[7.0]])}, deadline=loop.time() + 0.05)
    rec.release()
    await asyncio.gather(first, queued)
    await b.submit({"x": np.array([[3.0]])})  # the room it gave up is free again
    assert [float(batch[0, 0]) for batch in rec.batches] == [1.0, 2.0, 3.0]
    await b.aclose()


async def test_expired_work_is_dropped_before_compute():
    rec = Recorder(held=True)
    b = await make(rec, max_batch_size=1)
    loop = asyncio.get_running_loop()
    first = await running(rec, b, 1.0)
    deadline = loop.time() + 0.05
    doomed = asyncio.ensure_future(b.submit({"x": np.array([[7.0]])}, deadline=deadline))
    await until(lambda: loop.time() > deadline)  # queued behind the held run until past its deadline
    rec.release()
    with pytest.raises(DeadlineExceededError, match="deadline passed while queued"):
        await doomed
    await first
    await b.submit({"x": np.array([[3.0]])})
    assert [float(batch[0, 0]) for batch in rec.batches] == [1.0, 3.0]
    await b.aclose()


async def test_cancelled_work_is_dropped_before_compute():
    rec = Recorder(held=True)
    b = await make(rec, max_batch_size=1)
    first = await running(rec, b, 1.0)
    doomed = asyncio.ensure_future(b.submit({"x": np.array([[9.0]])}))
    await until(lambda: b.queued_items == 1)
    doomed.cancel()
    rec.release()
    await first
    await b.submit({"x": np.array([[3.0]])})
    assert [float(batch[0, 0]) for batch in rec.batches] == [1.0, 3.0]
    await b.aclose()


async def test_a_failing_batch_is_retried_caller_by_caller_and_fails_each():
    rec = Recorder(fail=True, held=True)
    b = await make(rec, max_batch_size=8)
    first = await running(rec, b, 0.0)
    rest = [asyncio.ensure_future(b.submit({"x": np.array([[float(i)]])})) for i in (1, 2, 3)]
    await until(lambda: b.queued_items == 3)
    rec.release()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    # The three queued calls ran merged, then each alone: the model's failure reached each of them.
    assert [batch[:, 0].tolist() for batch in rec.batches] == [[0.0], [1.0, 2.0, 3.0], [1.0], [2.0], [3.0]]
    await b.aclose()


async def test_one_callers_bad_values_fail_only_that_caller_not_the_batch_it_shared():
    rec = Recorder(held=True)

    def run(inputs):  # a real model would refuse such values (an index out of range, say)
        x = inputs["x"]
        if (x < 0).any():
            rec.batches.append(x.copy())
            raise InvalidInputError("negative values")
        return rec(inputs)

    b = await make(run, max_batch_size=8)
    first = await running(rec, b, 100.0)
    values = [np.full((1, 1), float(i)) for i in range(6)] + [np.full((1, 1), -1.0)]
    rest = [asyncio.ensure_future(b.submit({"x": v})) for v in values]
    await until(lambda: b.queued_items == 7)
    rec.release()
    results = await asyncio.gather(*rest, return_exceptions=True)
    await first
    assert isinstance(results[-1], InvalidInputError)
    for v, out in zip(values[:-1], results[:-1], strict=True):
        assert np.array_equal(out["y"], v * 2)
    # The seven ran merged and failed; then each ran alone, and only the bad one failed.
    assert [batch[:, 0].tolist() for batch in rec.batches[1:]] == [
        [v[0, 0] for v in values], *[[v[0, 0]] for v in values]]
    await b.aclose()


async def test_closed_batcher_refuses_and_fails_queued_and_waiting_work():
    rec = Recorder(held=True)
    b = await make(rec, max_batch_size=1, max_queue_size=1)
    first = await running(rec, b, 1.0)
    queued = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}))
    waiting = asyncio.ensure_future(b.submit({"x": np.zeros((1, 1))}))  # no room: waits for it
    await until(lambda: b.queued_items == 1)
    await b.aclose()
    for call in (queued, waiting):
        with pytest.raises(ModelNotReadyError):
            await call
    with pytest.raises(ModelNotReadyError):
        await b.submit({"x": np.zeros((1, 1))})
    rec.release()
    first.cancel()


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


def answered_without_the_loop_turning(coro):
    """Drive ``coro`` one step: its result if it finished without suspending once, else None (then closed)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    return None


async def test_a_lone_callers_short_run_on_an_idle_batcher_is_answered_at_once_and_counted():
    rec = Recorder()
    b = await make(rec)
    seen: list[tuple[int, float]] = []
    b.stats.on_batch = lambda items, seconds: seen.append((items, seconds))
    await b.submit({"x": np.array([[1.0]])}, lone=True)  # the first run measures the model
    out = answered_without_the_loop_turning(b.submit({"x": np.array([[3.0]])}, lone=True))
    assert out is not None and out["y"].tolist() == [[6.0]]  # no queue, no consumer task, no future
    assert answered_without_the_loop_turning(b.submit({"x": np.array([[3.0]])})) is None  # not lone: queued
    assert [items for items, _ in seen] == [1, 1] and b.batches_run == 2
    await b.aclose()


async def test_a_lone_caller_queues_behind_a_batch_in_hand_and_hears_a_failure_of_its_own():
    rec = Recorder()
    b = await make(rec)
    await b.submit({"x": np.array([[0.0]])})  # the first run measures the model
    rec.hold()
    first = await running(rec, b, 1.0)  # a batch in hand: in the executor
    b.inline_idle_below_s = 1.0  # the model counts as short for a lone caller
    behind = asyncio.ensure_future(b.submit({"x": np.array([[2.0]])}, lone=True))
    await asyncio.sleep(0.01)
    assert not behind.done() and len(rec.batches) == 2  # it did not overtake the batch in hand
    rec.release()
    assert (await first)["y"].tolist() == [[2.0]] and (await behind)["y"].tolist() == [[4.0]]
    rec.fail = True
    with pytest.raises(RuntimeError, match="exploded"):
        answered_without_the_loop_turning(b.submit({"x": np.array([[2.0]])}, lone=True))
    await b.aclose()
