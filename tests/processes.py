"""``fusionserve serve`` as real child processes on loopback, for fault and replica tests.

Each process logs to a pipe that a thread keeps reading (a full pipe would block the server); its
gRPC port comes from the "listening on ... (port N)" line, its metrics port from the "metrics on"
line. Ports are 0 (the kernel picks) unless given, so a replica can be restarted on the same port.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.request import urlopen

OK_TYPED = 'fusionserve_requests_total{api="typed",code="OK",model="multimodal"}'
OK_STREAM = 'fusionserve_requests_total{api="typed_stream",code="OK",model="multimodal"}'


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


class ServerProcess:
    """One ``python -m fusionserve serve`` child; ``target`` is ``127.0.0.1:PORT`` once started."""

    def __init__(
        self,
        repository: Path,
        *args: str,
        port: int = 0,
        metrics_port: int = -1,
        config: Path | None = None,
        start: bool = True,
    ) -> None:
        self.command = [
            sys.executable, "-m", "fusionserve", "serve", "--repository", str(repository), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), *args,
        ]  # fmt: skip
        if config is not None:
            self.command += ["--config", str(config)]
        env = {**os.environ, "FUSIONSERVE_METRICS_HOST": "127.0.0.1"}
        self.proc = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True, env=env)
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.port: int | None = None
        self.metrics_url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if start:
            self.wait_started()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := re.search(r"metrics on http://[^:]+:(\d+)/metrics", line):
                self.metrics_url = f"http://127.0.0.1:{m.group(1)}/metrics"
            if m := re.search(r"listening on .* \(port (\d+)\)", line):
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # the process ended: wake a waiter up

    def wait_started(self, timeout_s: float = 120) -> ServerProcess:
        """Wait for the "listening" line (models loaded and warmed up, health SERVING)."""
        self._ready.wait(timeout_s)
        if self.port is None:
            self.kill()
            raise AssertionError("server did not start:\n" + "".join(self.log))
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        """Resident memory (VmRSS) of the process, in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {self.pid}")

    def metric(self, sample: str = OK_TYPED) -> float:
        """One sample of the process's Prometheus metrics (0 when absent), e.g. :data:`OK_TYPED`."""
        assert self.metrics_url is not None, "start the server with a metrics port"
        with urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit; its exit status."""
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        """Stop it if it still runs: SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
