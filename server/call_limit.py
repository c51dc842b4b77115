"""The calls in flight on fusionserve's own services, bounded by ``max_concurrent_rpcs``.

grpc.aio's own ``maximum_concurrent_rpcs`` does not refuse: it stops taking calls up, so the excess
waits in gRPC's accept queue, unseen, until that overflows and gRPC resets them (``CANCELLED``, a code
that tells a caller nothing). This bound refuses instead, with ``RESOURCE_EXHAUSTED`` and a time to
come back, and it is the only bound that refuses for lack of room: everything behind it (pipeline
admission, batch queues, stream windows) makes callers wait their turn. A closed loop of up to
``max_concurrent_rpcs`` callers is therefore always answered. Health and reflection are not counted.
"""

from __future__ import annotations

from collections.abc import Callable

from fusionserve.errors import QueueFullError


class CallLimit:
    """At most ``max_calls`` calls at once; :meth:`enter` refuses beyond it, :meth:`leave` frees a place."""

    def __init__(
        self,
        max_calls: int,
        *,
        retry_after_s: Callable[[], float] = lambda: 0.1,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.max_calls = max_calls
        self.calls = 0
        """Calls in flight now."""
        self.taken = 0
        """Calls the event loop has taken up from gRPC since the start, every service's (see :meth:`took`)."""
        self._retry_after_s = retry_after_s  # when a refused caller should come back
        self._on_refusal = on_refusal  # told the reason of each refusal (the shed metric)

    def took(self) -> None:
        """The event loop took up one more call from gRPC (health and reflection included).

        Against gRPC core's own count of the calls it received, this tells how many wait in gRPC's
        accept queue for the loop (server/app.py reads it for the door's deadline rule).
        """
        self.taken += 1

    def enter(self) -> None:
        """Count one more call, or raise QueueFullError (reason ``calls``) when ``max_calls`` are in flight."""
        if self.calls >= self.max_calls:
            if self._on_refusal is not None:
                self._on_refusal("calls")
            raise QueueFullError(
                f"too many calls in flight (max_concurrent_rpcs {self.max_calls}); retry later or on another replica",
                reason="calls",
                retry_after_s=self._retry_after_s(),
            )
        self.calls += 1

    def leave(self) -> None:
        """One call is done."""
        self.calls -= 1
