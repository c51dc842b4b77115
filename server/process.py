"""``fusionserve serve`` as a child process on loopback: for the demo, the benchmarks and the tests.

The child logs to a pipe that a thread reads all the time (a full pipe would block the server).
Its gRPC port comes from the "listening on ... (port N)" line, which the server logs once every
model is loaded and warmed up and health says SERVING; its metrics port from the "metrics on" line.
Ports are 0 (the kernel picks) unless given, so a replica can be restarted on the port it had.
With ``--workers N`` the child is the supervisor; :attr:`ServerProcess.workers` holds the process ids
of its serving workers, from its "worker K (pid P) serving" lines.

    with ServerProcess(repository, "--max-batch-size", "8") as server:
        client = FusionClient(server.target)
        ...
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

LISTENING = re.compile(r"listening on \S+ \(port (\d+)\)")
METRICS = re.compile(r"metrics on http://[^:]+:(\d+)/metrics")
WORKER_SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving")


class ServerNotStarted(RuntimeError):
    """The server exited, or did not say it was listening in time; the message holds its log."""


class ServerProcess:
    """One ``python -m fusionserve serve`` child on 127.0.0.1; ``target`` is ``127.0.0.1:PORT`` once started.

    Extra ``args`` go to ``fusionserve serve``; ``config`` is a ``--config`` file; ``env`` adds
    environment variables (``FUSIONSERVE_*`` settings without a flag). ``metrics_port`` -1 disables
    Prometheus metrics, 0 serves them on a free port (read back with :meth:`metric`, :meth:`histogram`).
    With ``start=False`` the constructor returns at once: call :meth:`wait_started` (several servers
    then load their models in parallel).
    """

    def __init__(
        self,
        repository: Path | str,
        *args: str,
        port: int = 0,
        metrics_port: int = -1,
        config: Path | None = None,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        start_timeout_s: float = 120,
    ) -> None:
        self.command = [
            sys.executable, "-m", "fusionserve", "serve", "--repository", str(repository), "--host", "127.0.0.1",
            "--port", str(port), "--metrics-port", str(metrics_port), *args,
        ]  # fmt: skip
        if config is not None:
            self.command += ["--config", str(config)]
        environment = {**os.environ, "FUSIONSERVE_METRICS_HOST": "127.0.0.1", **(env or {})}
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment
        )
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self.port: int | None = None
        self.metrics_url: str | None = None
        self.workers: dict[int, int] = {}  # worker number → pid of its latest serving process
        self._start_timeout_s = start_timeout_s
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        if start:
            self.wait_started()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if m := WORKER_SERVING.search(line):
                self.workers[int(m.group(1))] = int(m.group(2))
            if m := METRICS.search(line):
                self.metrics_url = f"http://127.0.0.1:{m.group(1)}/metrics"
            if self.port is None and (m := LISTENING.search(line)):
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()  # the process ended: wake a waiter up

    def wait_started(self, timeout_s: float | None = None) -> ServerProcess:
        """Wait for the "listening" line; on failure kill the child and raise :class:`ServerNotStarted`."""
        self._ready.wait(self._start_timeout_s if timeout_s is None else timeout_s)
        if self.port is None:
            self.kill()
            self._reader.join(5)
            raise ServerNotStarted(f"fusionserve serve did not start ({' '.join(self.command)}):\n" + "".join(self.log))
        return self

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``."""
        if self.port is None:
            raise ServerNotStarted("the server has not said it is listening yet: call wait_started()")
        return f"127.0.0.1:{self.port}"

    def rss_mb(self, pid: int | None = None) -> float:
        """Resident memory (VmRSS) of the process (or of its worker ``pid``), in MiB."""
        pid = self.pid if pid is None else pid
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for process {pid}")

    def cpu_seconds(self, pid: int | None = None) -> float:
        """CPU time the process (or its worker ``pid``) has used so far (user + system, all threads), in seconds."""
        fields = Path(f"/proc/{self.pid if pid is None else pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def metrics_text(self) -> str:
        """The Prometheus exposition text of the server."""
        if self.metrics_url is None:
            raise RuntimeError("start the server with a metrics port (metrics_port=0)")
        with urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())

    def samples(self) -> list[Sample]:
        """Every sample the server exports now, parsed by prometheus_client."""
        return [s for family in text_string_to_metric_families(self.metrics_text()) for s in family.samples]

    def metric(self, sample: str) -> float:
        """The value of one sample, written as exported (labels in any order), 0 when absent.

        E.g. ``'fusionserve_requests_total{api="typed",code="OK",model="multimodal"}'``.
        """
        wanted = next(s for family in text_string_to_metric_families(f"{sample} 0\n") for s in family.samples)
        return next((s.value for s in self.samples() if s.name == wanted.name and s.labels == wanted.labels), 0.0)

    def histogram(self, name: str) -> dict[str, tuple[float, float]]:
        """A histogram's (sum, count) per ``model`` label, e.g. ``fusionserve_batch_size``."""
        out: dict[str, list[float]] = {}
        for s in self.samples():
            if s.name in (f"{name}_sum", f"{name}_count") and "model" in s.labels:
                out.setdefault(s.labels["model"], [0.0, 0.0])[0 if s.name.endswith("_sum") else 1] = s.value
        return {model: (v[0], v[1]) for model, v in out.items()}

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

    def close(self, grace_s: float = 30) -> int:
        """Stop it if it still runs (SIGTERM, SIGKILL after ``grace_s``), read its log to the end; its exit status."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)
        return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
