"""Overload control: the door every inference call passes before any work (decoding included).

The rule is queue-time admission: a call whose work could not start within the target delay is
refused at once with RESOURCE_EXHAUSTED (:class:`OverloadedError`) and told when to come back,
instead of joining a standing queue. Its wait is estimated by Little's law: the items admitted and
not yet answered (``inflight``) over the items per second the server completes while busy (``capacity``,
measured over windows of ``SAMPLE_S`` of busy time and smoothed: a lone caller measures the
unbatched rate, a crowd the batched one, an overloaded server its true capacity; idle time never
lowers it; until the first sample nothing is refused).

Calls are refused only once the wait has stayed over the target for ``INTERVAL_S`` (CoDel's rule: a
burst that drains sooner is served; a standing queue is not), and then, for ``RECENT_S`` after the
last refusal, as soon as it is over the target again. The call's own size does not count
against it (its items add service time, not queueing), so a big call is never starved, and a call
is always admitted when nothing else is in flight.

This is where shedding pays: when the work is what limits (big batches, big models, a busy GPU),
refusing costs a sliver of serving. When the event loop limits instead (small one-item calls), calls
queue in gRPC's accept queue before any code of ours sees them, and refusing them there would cost
the loop nearly what serving them does (tried, from gRPC's channelz counts: with the same 256-call
queue, goodput at 4× fell from 0.63 to 0.41 of capacity).
That queue is kept short instead (``max_pending_rpcs``), and gRPC sheds beyond it for free.
docs/RELIABILITY.md#overload-control has the figures. One door per server process (each worker of
``--workers N`` has its own, like its own batchers).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterator

from fusionserve.errors import QueueFullError

SAMPLE_S = 0.1
"""Busy time one capacity sample spans."""
SMOOTHING = 0.3
"""Weight of a new capacity sample (exponential moving average)."""
INTERVAL_S = 0.1
"""How long the wait must stay over the target before calls are refused (CoDel's interval): a burst
that drains sooner is served, a standing queue is not."""
RECENT_S = 10 * INTERVAL_S
"""Within this long of its last refusal, the door refuses as soon as the wait is over the target
again (CoDel likewise resumes dropping at once when the queue comes back soon)."""
MAX_PUSHBACK_S = 1.0
"""Longest time a refused caller is told to wait before trying again."""


class OverloadedError(QueueFullError):
    """Refused by overload control: the call could not start within the target delay."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, reason="queue_delay", retry_after_s=retry_after_s)


class Admission:
    """The door of one server process (see the module docstring); ``target_s`` 0 admits everything."""

    def __init__(
        self,
        target_s: float,
        *,
        on_change: Callable[[Admission], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_s = target_s
        self.inflight = 0
        """Items admitted and not yet answered."""
        self.capacity: float | None = None
        """Items per second completed while busy (None until measured)."""
        self._on_change = on_change
        self._clock = clock
        self._busy_since: float | None = None  # when inflight last went from 0 to more
        self._busy_s = 0.0  # busy time in the current sample, up to _busy_since
        self._done = 0  # items completed in the current sample
        self._over_since: float | None = None  # since when the estimated wait has been over the target
        self._refused_at = -math.inf  # when the door last refused a call

    def estimated_wait_s(self) -> float:
        """How long a call arriving now would wait before its work starts."""
        return self.inflight / self.capacity if self.capacity else 0.0

    @property
    def limit(self) -> float | None:
        """Items in flight beyond which new calls are refused (None: no limit now)."""
        if self.target_s <= 0 or self.capacity is None:
            return None
        return self.capacity * self.target_s

    @contextlib.contextmanager
    def admit(self, items: int) -> Iterator[None]:
        """Hold ``items`` while the call runs, or raise OverloadedError at once.

        A call is refused when the wait it would have before its work starts has been over the
        target for ``INTERVAL_S``, unless nothing is admitted at all.
        """
        items = max(items, 1)  # an empty call (refused later, as a bad request) still holds its place
        if self.target_s > 0:
            wait_s = self.estimated_wait_s()
            if wait_s < self.target_s or self.inflight == 0:
                self._over_since = None
            else:
                now = self._clock()
                if self._over_since is None:
                    self._over_since = now
                # A standing queue, or one back soon after the last refusals: refuse at once.
                if now - self._over_since >= INTERVAL_S or now - self._refused_at < RECENT_S:
                    self._refused_at = now
                    raise self._refusal(wait_s)
        if self.inflight == 0:
            self._busy_since = self._clock()
        self.inflight += items
        try:
            yield
        finally:
            self._release(items)

    def _release(self, items: int) -> None:
        self.inflight -= items
        self._done += items
        now = self._clock()
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

    def _refusal(self, wait_s: float) -> OverloadedError:
        # Come back once the excess has drained, spread out so refused callers do not return together.
        retry_after_s = min(MAX_PUSHBACK_S, max(self.target_s, wait_s - self.target_s) * random.uniform(0.5, 1.5))
        return OverloadedError(
            f"server overloaded: the call would wait about {wait_s * 1000:.0f} ms to start, over the "
            f"{self.target_s * 1000:.0f} ms target; retry in {retry_after_s * 1000:.0f} ms or on another replica",
            retry_after_s,
        )
