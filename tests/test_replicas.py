"""Three replicas behind one round_robin client: SIGTERM one, kill -9 another, restart both on their ports.

Every call must succeed (the client retries UNAVAILABLE/CANCELLED on a live replica), and each
replica's own Prometheus counters must show that it carried a fair share of the load while it was up.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fusionserve.client import FusionClient
from tests.processes import OK_TYPED, ServerProcess, free_ports, start_all, wait_until

THREADS = 4
PHASE_S = 2.0
MIN_SHARE = 0.15
"""Of the calls made while all three replicas were up; a fair share is 1/3."""


class Load:
    """``THREADS`` closed-loop callers of one client; every failure is kept."""

    def __init__(self, client: FusionClient, samples) -> None:
        self.ok = 0
        self.failures: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(client, samples, n)) for n in range(THREADS)]
        for t in self._threads:
            t.start()

    def _run(self, client: FusionClient, samples, lane: int) -> None:
        n = lane
        while not self._stop.is_set():
            try:
                assert client.classify(*samples[n % 64]).label in ("match", "mismatch")
            except BaseException as e:  # noqa: BLE001 - any failure fails the test
                self.failures.append(e)
                return
            with self._lock:
                self.ok += 1
            n += THREADS

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _served(replicas: list[ServerProcess]) -> list[float]:
    """Each replica's own count of Classify calls answered OK, scraped at (nearly) the same moment."""
    with ThreadPoolExecutor(len(replicas)) as pool:
        return list(pool.map(lambda r: r.metric(OK_TYPED), replicas))


def _snapshot(replicas: list[ServerProcess], load: Load) -> tuple[list[float], int, int]:
    """The replicas' counts, and the client's count just before and just after the scrapes.

    A scrape of a busy server can take a good part of a second on a loaded machine; the client's count
    before and after brackets the moment each replica was read.
    """
    before = load.ok
    counts = _served(replicas)
    return counts, before, load.ok


@pytest.mark.slow
def test_three_replicas_survive_sigterm_kill_and_restart_with_the_load_spread(repository, samples):
    ports, metrics_ports = free_ports(3), free_ports(3)
    replicas = start_all(repository, 3, ports=ports, metrics_ports=metrics_ports)
    restarted: list[ServerProcess] = []
    load = None
    try:
        with FusionClient([r.target for r in replicas], timeout_s=30) as client:
            load = Load(client, samples)
            # Phase 1: all three up.
            assert wait_until(lambda: min(_served(replicas)) >= 5, 20), "a replica was never in the rotation"
            start = _snapshot(replicas, load)
            time.sleep(PHASE_S)
            end = _snapshot(replicas, load)
            phase1 = [b - a for a, b in zip(start[0], end[0], strict=True)]

            # Phase 2: SIGTERM replica 1 (it drains), kill -9 replica 2; replica 0 carries everything.
            replicas[1].terminate()
            replicas[2].kill()
            assert replicas[1].wait(30) == 0 and replicas[2].proc.returncode == -9
            alone_start = _snapshot(replicas[:1], load)
            time.sleep(1.0)
            alone_end = _snapshot(replicas[:1], load)

            # Phase 3: both come back on their old ports; the client finds them again by itself.
            restarted = start_all(repository, 2, ports=ports[1:], metrics_ports=metrics_ports[1:])
            live = [replicas[0], *restarted]
            called = wait_until(lambda: min(r.metric(OK_TYPED) for r in restarted) >= 5, 20)
            assert called, "restarted replicas got no calls"
            start3 = _snapshot(live, load)
            time.sleep(PHASE_S)
            end3 = _snapshot(live, load)
            phase3 = [b - a for a, b in zip(start3[0], end3[0], strict=True)]
            load.stop()
    finally:
        if load is not None:
            load.stop()
        for r in [*replicas, *restarted]:
            r.close()

    assert not load.failures, load.failures[:3]  # every call succeeded
    assert load.ok > 0
    # The replicas answered between the client's counts bracketing the two scrapes: at least the calls
    # it counted from just after the first scrape to just before the second, at most those from just
    # before the first to just after the second, give or take the calls in flight (one per caller).
    def served_all(shares: list[float], start: tuple, end: tuple) -> bool:
        return end[1] - start[2] - THREADS <= sum(shares) <= end[2] - start[1] + THREADS

    for name, shares, start_, end_ in (("all up", phase1, start, end), ("restarted", phase3, start3, end3)):
        assert served_all(shares, start_, end_), (name, shares, start_[1:], end_[1:])
        assert min(shares) >= MIN_SHARE * sum(shares), (name, shares)
    alone = alone_end[0][0] - alone_start[0][0]
    assert alone > 0 and served_all([alone], alone_start, alone_end)  # replica 0 served every call alone
    alone_calls = alone_end[1] - alone_start[1]
    fmt = lambda shares: "/".join(f"{100 * s / sum(shares):.0f}%" for s in shares)  # noqa: E731
    print(
        f"\nreplicas: {load.ok} calls, 0 failed; shares with all three up {fmt(phase1)} of {sum(phase1):.0f}; "
        f"replica 0 alone {alone:.0f} of {alone_calls}; after the restart {fmt(phase3)} of {sum(phase3):.0f}"
    )
