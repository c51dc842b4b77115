"""Admission: the door every inference call passes before any work (decoding included).

Two rules, each answering a refused call with RESOURCE_EXHAUSTED (:class:`OverloadedError`) and a time
to come back, before the call has cost anything but its arrival:

1. **The caller's deadline** (always on). The door predicts when a call arriving now would be answered:
   the items admitted and not yet answered (``inflight``) drained at the rate the server completes
   items while busy (``capacity``), plus how far behind the event loop is in taking calls up from
   gRPC's accept queue (``lag_s``), then the call's own service (at least one lone call's time, or its
   own items at the busy rate). A call whose deadline comes before that is refused at once, instead of
   being served late or waiting in a queue to expire; a call whose deadline allows the wait is served.
   A call without a deadline is never refused by this rule (Triton and TF Serving likewise queue
   without a bound unless a per-request timeout says otherwise). gRPC's deadline counts from the
   call's arrival at the server, so time spent in gRPC's own accept queue is already off it.

   Why the loop's lag counts, though the calls it has yet to take up came after this one: gRPC hands
   calls to the loop first come, first served, and the loop pays for every call it takes up, those it
   refuses included (a sixth to a quarter of serving one: bench/shed_cost.py). Under a flood of calls
   with short deadlines, a loop that serves whatever still has time falls behind, every call it then
   takes up has waited out most of its deadline in that queue, and almost nothing is answered in
   time. Counting the lag, the door refuses short-deadline calls while the loop is behind, which is
   cheap, until the queue has drained and calls arrive with time left again; calls with deadlines
   long enough to ride out the lag (and calls without one) are not affected.
2. **Queue delay** (opt-in, ``queue_delay_target_ms`` > 0). A call whose work could not start within
   the target is refused once the estimated wait has stayed over the target for ``INTERVAL_S`` (CoDel's
   rule: a burst that drains sooner is served; a standing queue is not), and then, for ``RECENT_S``
   after the last refusal, as soon as it is over the target again. Off by default because it cannot
   tell an open loop's standing queue from a closed loop's: 128 callers at 1,100 answers/s wait about
   115 ms each, a bounded load every peer serves, which a 50 ms target refused.
   docs/RELIABILITY.md#overload-control has the figures for both.

``capacity`` is measured over windows of ``SAMPLE_S`` of busy time and smoothed: a lone caller
measures the unbatched rate, a crowd the batched one, an overloaded server its true capacity; idle time
never lowers it; until the first sample neither rule refuses on a prediction. A call's own size does not
count against the queue-delay rule (its items add service time, not queueing), so a big call is never
starved, and a call is always admitted when nothing else is in flight (unless its deadline has already
passed). One door per server process (each worker of ``--workers N`` has its own, like its own
batchers).
"""

from __future__ import annotations

import collections
import math
import random
import time
from collections.abc import Callable

from fusionserve.errors import DeadlineExceededError, QueueFullError

SAMPLE_S = 0.1
"""Busy time one capacity sample spans."""
SMOOTHING = 0.3
"""Weight of a new capacity or service-time sample (exponential moving average)."""
INTERVAL_S = 0.1
"""How long the wait must stay over the target before calls are refused (CoDel's interval): a burst
that drains sooner is served, a standing queue is not."""
RECENT_S = 10 * INTERVAL_S
"""Within this long of its last refusal, the door refuses as soon as the wait is over the target
again (CoDel likewise resumes dropping at once when the queue comes back soon)."""
MIN_PUSHBACK_S = 0.005
"""Shortest time a refused caller is told to wait before trying again."""
MAX_PUSHBACK_S = 1.0
"""Longest time a refused caller is told to wait before trying again."""


LAG_TARGET_S = 0.01
"""A lag in taking calls up under this is no lag (a burst being taken up)."""
LAG_INTERVAL_S = 0.1
"""How long the lag must stand over the target before the door counts it."""
PACE_SMOOTHING = 0.3
"""Weight of a new sample of the pace at which the loop takes calls up (exponential moving average)."""
HISTORY = 512
"""Readings kept to date the call at the head of the queue: 10 s of them while behind, 51 s otherwise."""
LAG_READ_S = 0.02
"""How often the calls waiting for the loop are counted while the lag is over the target (to see it stand).
Otherwise they are counted every ``LAG_INTERVAL_S``: one count (a channelz read) takes the loop about 0.8 ms."""


class OverloadedError(QueueFullError):
    """Refused at the door: the call could not be answered in time (its deadline, or the target delay)."""

    def __init__(self, message: str, retry_after_s: float, reason: str) -> None:
        super().__init__(message, reason=reason, retry_after_s=retry_after_s)


def pushback_s(excess_s: float) -> float:
    """How long to tell a refused caller to wait: ``excess_s``, jittered ±50%, within the bounds.

    The jitter keeps refused callers from all coming back together.
    """
    return min(MAX_PUSHBACK_S, max(MIN_PUSHBACK_S, excess_s * random.uniform(0.5, 1.5)))


class Admission:
    """The door of one server process (see the module docstring); ``target_s`` 0 turns rule 2 off."""

    def __init__(
        self,
        target_s: float = 0.0,
        *,
        on_change: Callable[[Admission], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_s = target_s
        self.inflight = 0
        """Items admitted and not yet answered."""
        self.lag_s = 0.0
        """How long the calls waiting in gRPC's accept queue will take the event loop to take up (kept
        current by the app from gRPC's own count; 0 when unknown)."""
        self.capacity: float | None = None
        """Items per second completed while busy (None until measured)."""
        self.service_s: float | None = None
        """How long a call admitted into an idle server takes (None until measured)."""
        self._on_change = on_change
        self._clock = clock
        self._busy_since: float | None = None  # when inflight last went from 0 to more
        self._busy_s = 0.0  # busy time in the current sample, up to _busy_since
        self._done = 0  # items completed in the current sample
        self._over_since: float | None = None  # since when the estimated wait has been over the target
        self._refused_at = -math.inf  # when the queue-delay rule last refused a call

    def estimated_wait_s(self) -> float:
        """How long a call arriving now would wait before its work starts."""
        return self.inflight / self.capacity if self.capacity else 0.0

    def predicted_s(self, items: int) -> float:
        """How long a call of ``items`` items arriving now would take to be answered (0 until measured)."""
        if not self.capacity:
            return self.service_s or 0.0
        own = max(self.service_s or 0.0, items / self.capacity)
        return self.inflight / self.capacity + own + self.lag_s

    @property
    def limit(self) -> float | None:
        """Items in flight beyond which the queue-delay rule refuses new calls (None: no limit now)."""
        if self.target_s <= 0 or self.capacity is None:
            return None
        return self.capacity * self.target_s

    def admit(self, items: int, timeout_s: float | None = None) -> Admitted:
        """``with door.admit(items, timeout_s):`` holds ``items`` while the call runs, or raises at once.

        Args:
            items: the call's items (an empty call, refused later as a bad request, counts as one).
            timeout_s: the time its caller's deadline leaves, or None for no deadline.

        Raises (on entering):
            OverloadedError: the deadline cannot be met (reason ``deadline``), or the wait has stood
                over the target delay (reason ``queue_delay``).
            DeadlineExceededError: the deadline has already passed.
        """
        return Admitted(self, max(items, 1), timeout_s)

    def _enter(self, items: int, timeout_s: float | None) -> float | None:
        """Check and count a call of ``items``; returns when it found the door idle (else None)."""
        if timeout_s is not None:
            self.check_deadline(items, timeout_s)
        if self.target_s > 0:
            self._check_queue_delay()
        started = self._clock()
        lone = self.inflight == 0
        if lone:
            self._busy_since = started
        self.inflight += items
        return started if lone else None

    def check_deadline(self, items: int, timeout_s: float) -> None:
        """Raise what :meth:`admit` would for a deadline that cannot be met now (the deadline rule alone).

        Front-ends call it before reading a request, so a call the door will refuse costs no decoding.
        """
        if timeout_s <= 0:
            raise DeadlineExceededError("the call's deadline passed before it could start")
        if self.inflight == 0 and self.lag_s == 0:
            return  # nothing else to do: whatever its deadline, this call is its best chance
        predicted_s = self.predicted_s(items)
        if predicted_s > timeout_s:
            raise OverloadedError(
                f"server busy: the call would be answered in about {predicted_s * 1000:.0f} ms, after its "
                f"deadline ({timeout_s * 1000:.0f} ms from now); retry later or on another replica",
                pushback_s(predicted_s - timeout_s),
                reason="deadline",
            )

    def _check_queue_delay(self) -> None:
        wait_s = self.estimated_wait_s()
        if wait_s < self.target_s or self.inflight == 0:
            self._over_since = None
            return
        now = self._clock()
        if self._over_since is None:
            self._over_since = now
        # A standing queue, or one back soon after the last refusals: refuse at once.
        if now - self._over_since >= INTERVAL_S or now - self._refused_at < RECENT_S:
            self._refused_at = now
            raise OverloadedError(
                f"server overloaded: the call would wait about {wait_s * 1000:.0f} ms to start, over the "
                f"{self.target_s * 1000:.0f} ms target; retry later or on another replica",
                pushback_s(max(self.target_s, wait_s - self.target_s)),
                reason="queue_delay",
            )

    def _release(self, items: int, lone_since: float | None) -> None:
        self.inflight -= items
        self._done += items
        now = self._clock()
        if lone_since is not None:
            took = now - lone_since
            self.service_s = took if self.service_s is None else (1 - SMOOTHING) * self.service_s + SMOOTHING * took
        assert self._busy_since is not None
        busy = self._busy_s + (now - self._busy_since)
        if self.inflight == 0:
            self._busy_s, self._busy_since = busy, None
        if busy >= SAMPLE_S:
            sample = self._done / busy
            self.capacity = sample if self.capacity is None else (1 - SMOOTHING) * self.capacity + SMOOTHING * sample
            self._done, self._busy_s = 0, 0.0
            if self._busy_since is not None:
                self._busy_since = now
            if self._on_change is not None:
                self._on_change(self)


class Backlog:
    """The event loop's lag in taking calls up from gRPC's accept queue, for the door's ``lag_s``.

    Read periodically with two running counts: the calls gRPC received (channelz) and the calls the
    loop took up. The calls waiting are the difference; the lag is that many over the pace the loop
    took calls up at while some waited (smoothed), but never more than the call at the head of the
    queue has waited. A loop held up for a moment (another process taking the CPU, an export in the
    same process) takes calls up at a pace near zero meanwhile, and waiting ÷ that pace would predict
    many seconds; yet once the loop runs again it takes calls up at its own pace, and the head call's
    wait is what a call just taken up really waited. gRPC's queue is first come, first served, so
    the head call arrived after the last reading whose count of calls received was no more than the
    calls taken up (:meth:`_head_waited_s`). While a flood grows, this trails a new call's wait (by
    as much as calls arrive faster than they are taken up); once the queue stands, the two agree.
    Only a lag that has stood over ``LAG_TARGET_S`` for ``LAG_INTERVAL_S`` counts (CoDel's
    interval): a burst the loop takes up soon is no flood.

    A reading costs the loop about as much as half a call, so it reads every ``LAG_INTERVAL_S`` while
    the lag is under the target and every ``LAG_READ_S`` once it is over (:attr:`next_read_s`): a
    flood's lag counts at most two intervals after it began.

    Calls gRPC received but never handed over (shed from a full accept queue, ``max_pending_rpcs``)
    would count as waiting forever. The loop runs these readings, so it would take up any call really
    waiting: when a reading finds the same count over, and none taken up since the last, those calls
    are not waiting and are left out from then on (as many as are still over later readings).
    """

    def __init__(self, taken: int, now: float) -> None:
        self.pace: float | None = None
        """Calls a second the loop took up while some waited (None until calls have waited)."""
        self._taken = taken  # at the last reading
        self._lost = 0  # calls gRPC received and never handed over (see above): not waiting
        self._history: collections.deque[tuple[float, int]] = collections.deque([(now, taken)], maxlen=HISTORY)
        """(time, calls received) of recent readings, oldest first; the last is the last reading's."""
        self._behind_since: float | None = None  # since when the lag has been over the target

    def read(self, received: int, taken: int, now: float) -> float:
        """One more reading of the two counts at ``now``; the lag the door should count (0: none that stands)."""
        since, received_before = self._history[-1]
        over = max(0, received - taken)
        self._lost = min(self._lost, over)  # never more than are over now
        if over == max(0, received_before - self._taken) and taken == self._taken:
            self._lost = over  # the loop took nothing up, yet as many are over
        waiting = over - self._lost
        lag_s = 0.0
        if waiting:  # the loop had calls to take up all along: how fast it took them is its pace
            sample = (taken - self._taken) / (now - since)
            self.pace = sample if self.pace is None else (1 - PACE_SMOOTHING) * self.pace + PACE_SMOOTHING * sample
            lag_s = min(waiting / max(self.pace, 1.0), self._head_waited_s(taken + self._lost, now))
        if lag_s <= LAG_TARGET_S:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = now
        self._taken = taken
        self._history.append((now, received))
        standing = self._behind_since is not None and now - self._behind_since >= LAG_INTERVAL_S
        return lag_s if standing else 0.0

    def _head_waited_s(self, handled: int, now: float) -> float:
        """How long the first call not yet handled (taken up or lost) has waited, at most.

        It arrived after the last reading that counted no more calls received than ``handled``; when
        every recent reading counted more, it has waited at least since the oldest of them.
        """
        since = self._history[0][0]
        for at, received in reversed(self._history):
            if received <= handled:
                since = at
                break
        return now - since

    @property
    def next_read_s(self) -> float:
        """How long to wait before the next reading: short while the lag is over the target, else long."""
        return LAG_READ_S if self._behind_since is not None else LAG_INTERVAL_S


class Admitted:
    """A call held past the door for the length of a ``with`` block (see :meth:`Admission.admit`).

    A class rather than ``contextlib.contextmanager``: every call passes one, and a generator-based
    context manager costs several times as much.
    """

    __slots__ = ("door", "items", "timeout_s", "_lone_since")

    def __init__(self, door: Admission, items: int, timeout_s: float | None) -> None:
        self.door, self.items, self.timeout_s = door, items, timeout_s
        self._lone_since: float | None = None

    def __enter__(self) -> None:
        self._lone_since = self.door._enter(self.items, self.timeout_s)

    def __exit__(self, *exc: object) -> None:
        self.door._release(self.items, self._lone_since)
