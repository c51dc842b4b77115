"""The load loops over any caller, and the record of every request.

The closed loop runs C workers, each sending when answered; the open loop intends requests at a
constant rate and charges latency from the intended time; ``progress`` prints a line a second.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusionserve.client.loadgen.settings import LoadSettings

clock = time.perf_counter


class Recorder:
    """Every request's intended and actual send time, completion time and status code."""

    def __init__(self) -> None:
        self.intended = array("d")
        self.sent = array("d")
        self.done = array("d")
        self.code = array("H")
        self.codes: dict[str, int] = {"OK": 0}
        self.inflight = 0
        self.errors = 0
        self.tick: list[float] = []  # latencies since the last progress line

    def add(self, intended: float, sent: float, done: float, code: str) -> None:
        """Record one request."""
        self.intended.append(intended)
        self.sent.append(sent)
        self.done.append(done)
        index = self.codes.get(code)
        if index is None:
            index = self.codes[code] = len(self.codes)
        self.code.append(index)
        if index:
            self.errors += 1
        self.tick.append(done - intended)


async def closed_loop(caller: Any, s: LoadSettings, rec: Recorder, t_end: float) -> None:
    """``s.concurrency`` workers, each sending its next request when the last is answered, until ``t_end``."""
    numbers = itertools.count()

    async def worker(lane: int) -> None:
        while (start := clock()) < t_end:
            rec.inflight += 1
            code = await caller(next(numbers), lane)
            rec.inflight -= 1
            rec.add(start, start, clock(), code)

    await asyncio.gather(*(worker(w) for w in range(s.concurrency)))


async def open_loop(caller: Any, s: LoadSettings, rec: Recorder, t0: float, t_end: float) -> None:
    """Requests intended every ``1 / s.rate`` seconds from ``t0`` to ``t_end``, whatever the server does."""
    assert s.rate is not None
    interval = 1.0 / s.rate
    slots = asyncio.Semaphore(s.max_inflight)
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def fire(n: int, intended: float) -> None:
        sent = clock()
        rec.inflight += 1
        try:
            code = await caller(n, n)
        finally:
            rec.inflight -= 1
            slots.release()
        rec.add(intended, sent, clock(), code)

    for n in itertools.count():
        intended = t0 + n * interval
        if intended >= t_end:
            break
        delay = intended - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()  # at max_inflight, wait: the wait is charged to the request
        task = loop.create_task(fire(n, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def progress(rec: Recorder, t0: float, measure_from: float, t_end: float) -> None:
    """Print a line a second to stderr: phase, rate, p50/p99, requests in flight, errors."""
    tty = sys.stderr.isatty()
    last = clock()
    while True:
        await asyncio.sleep(1.0)
        now = clock()
        tick, rec.tick = rec.tick, []
        middle = (last + now) / 2  # the second this line describes
        phase = "warm-up" if middle < measure_from else ("measuring" if middle < t_end else "draining")
        line = f"[{now - t0:6.1f}s] {phase:<9} {len(tick) / (now - last):9.1f} req/s"
        if tick:
            tick.sort()
            line += f"  p50 {nearest_rank(tick, 50) * 1e3:8.2f} ms  p99 {nearest_rank(tick, 99) * 1e3:8.2f} ms"
        line += f"  in flight {rec.inflight:5d}  errors {rec.errors}"
        print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        last = now


def nearest_rank(sorted_values: Sequence[float] | np.ndarray, p: float) -> float:
    """The ``p``-th percentile of sorted values (nearest-rank method, as ghz and wrk2 report)."""
    n = len(sorted_values)
    return float(sorted_values[min(n - 1, max(0, math.ceil(p / 100.0 * n) - 1))])
