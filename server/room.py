"""A bounded count of items that callers wait for, in order, each at most until its deadline.

The server's memory bounds (items a pipeline decodes at once, items a model's batch queue holds) are
rooms: a call that finds no room waits for it instead of being refused, so a bounded load (a closed loop
of callers) is never turned away; its deadline, if it has one, bounds the wait. Waiters are served first
come, first served, a big one included: a later, smaller call never overtakes a waiting one.
"""

from __future__ import annotations

import asyncio
import collections

from fusionserve.errors import DeadlineExceededError


class Room:
    """``capacity`` items; :meth:`enter` takes some (waiting when full), :meth:`leave` gives them back."""

    def __init__(self, capacity: int, what: str) -> None:
        if capacity < 1:
            raise ValueError("a room holds at least one item")
        self.capacity = capacity
        self.held = 0
        self.what = what
        """Named in the error of a caller whose deadline passed while it waited."""
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Callers waiting for room now."""
        return len(self._waiters)

    def fit(self, items: int) -> int:
        """``items``, cut to the capacity (a call bigger than the room takes all of it, alone)."""
        return min(items, self.capacity)

    def try_enter(self, items: int) -> bool:
        """Take ``items`` at once if they fit and nobody waits before them (call with :meth:`fit`'s value)."""
        if self._waiters or self.held + items > self.capacity:
            return False
        self.held += items
        return True

    async def enter(self, items: int, deadline: float | None = None) -> None:
        """Take ``items`` (call with :meth:`fit`'s value), waiting for room until ``deadline`` (``loop.time()``).

        Raises:
            DeadlineExceededError: the deadline passed while waiting.
        """
        if self.try_enter(items):
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (items, waiter)
        self._waiters.append(entry)
        try:
            if deadline is None:
                await waiter
            else:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
        except BaseException as e:
            if waiter.done() and not waiter.cancelled():  # let in just as the wait ended: hand the room on
                self.leave(items)
            else:
                self._remove(entry)
            if isinstance(e, TimeoutError):
                raise DeadlineExceededError(f"the deadline passed while waiting for room in {self.what}") from None
            raise

    def leave(self, items: int) -> None:
        """Give ``items`` back and let in the waiters that now fit, in order."""
        self.held -= items
        while self._waiters:
            items_wanted, waiter = self._waiters[0]
            if waiter.done():  # cancelled or timed out: its caller is gone
                self._waiters.popleft()
                continue
            if self.held + items_wanted > self.capacity:
                return
            self._waiters.popleft()
            self.held += items_wanted
            waiter.set_result(None)

    def hold(self, items: int, deadline: float | None = None) -> Held:
        """``async with room.hold(n, deadline):`` takes ``n`` items (cut to the capacity) and gives them back after.

        Raises as :meth:`enter` does.
        """
        return Held(self, self.fit(items), deadline)

    def _remove(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            return
        self.leave(0)  # the waiter behind it may fit now


class Held:
    """Items held in a :class:`Room` for the length of an ``async with`` block (see :meth:`Room.hold`).

    A class rather than ``contextlib.asynccontextmanager``: every pipeline call passes one, and a
    generator-based context manager costs it several times as much.
    """

    __slots__ = ("room", "items", "deadline")

    def __init__(self, room: Room, items: int, deadline: float | None) -> None:
        self.room, self.items, self.deadline = room, items, deadline

    async def __aenter__(self) -> None:
        if not self.room.try_enter(self.items):
            await self.room.enter(self.items, self.deadline)

    async def __aexit__(self, *exc: object) -> None:
        self.room.leave(self.items)
