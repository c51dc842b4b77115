"""``fusionserve serve`` as real child processes on loopback, for fault and replica tests.

One process is :class:`fusionserve.server.process.ServerProcess`; this adds free fixed ports (a replica
restarted on its port), config files, starting several servers at once, and polling.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusionserve.server.process import ServerProcess

__all__ = ["OK_STREAM", "OK_TYPED", "ServerProcess", "classify_lanes", "free_ports", "start_all", "wait_until",
           "write_config"]

OK_TYPED = 'fusionserve_requests_total{api="typed",code="OK",model="multimodal",version="1"}'
OK_STREAM = 'fusionserve_requests_total{api="typed_stream",code="OK",model="multimodal",version="1"}'


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports, free now and outside the kernel's ephemeral range.

    A replica restarted on its port must find it free: a port from the ephemeral range could be
    taken meanwhile by any outgoing connection (the client's own reconnects included).
    """
    low = 32768
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    candidates = list(range(max(1024, low - 12000), low))
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports below {low}")


def write_config(path: Path, **settings: Any) -> Path:
    """A JSON ``--config`` file holding ``settings``."""
    path.write_text(json.dumps(settings), encoding="utf-8")
    return path


def start_all(repository: Path, count: int, **kwargs: Any) -> list[ServerProcess]:
    """Start ``count`` servers at once (they load their models in parallel); all or none.

    ``ports``/``metrics_ports`` lists in ``kwargs`` give each its own ports.
    """
    ports = kwargs.pop("ports", [0] * count)
    metrics_ports = kwargs.pop("metrics_ports", [-1] * count)
    servers = [
        ServerProcess(repository, port=p, metrics_port=m, start=False, **kwargs)
        for p, m in zip(ports, metrics_ports, strict=True)
    ]
    try:
        for s in servers:
            s.wait_started()
    except BaseException:
        for s in servers:
            s.kill()
        raise
    return servers


def wait_until(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or the time is up; its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval_s)


def classify_lanes(client: Any, samples: Sequence[tuple[bytes, str]], lanes: int, stop: threading.Event,
                   answered: list[float], failures: list[BaseException]) -> list[threading.Thread]:  # fmt: skip
    """Start ``lanes`` closed-loop callers of ``client.classify`` until ``stop`` is set.

    Each answer's time goes into ``answered``; a lane's first failure (a wrong answer included) goes
    into ``failures`` and ends that lane.
    """

    def lane(n: int) -> None:
        while not stop.is_set():
            try:
                assert client.classify(*samples[n % len(samples)]).label in ("match", "mismatch")
                answered.append(time.monotonic())
            except BaseException as e:  # noqa: BLE001 - every failure is a test failure
                failures.append(e)
                return
            n += lanes

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(lanes)]
    for thread in threads:
        thread.start()
    return threads
