"""``fusionserve serve --workers N``: one supervisor, N serving processes behind one port.

The supervisor owns the configuration and the port and serves no gRPC itself (it never imports
grpc). Each worker (server/worker.py) is a whole server: its own event loop, models, batchers and
caches. They bind the same port with ``SO_REUSEPORT`` (as gRPC's own multiprocessing example does)
and the kernel spreads *connections* over them, not calls: one client channel reaches one worker.

- Port: the supervisor binds a ``SO_REUSEPORT`` socket and never listens on it; it holds the port
  (port 0: the kernel's pick) for the workers and for a worker restarted later.
- Readiness: a worker prints ``ready`` once it serves; the supervisor logs "listening on … (port N)"
  once every worker has.
- Deaths: a worker that dies is started again after a backoff (0.5 s, doubling to 30 s while it
  keeps dying, back to 0.5 s once one has served for a minute); the others serve meanwhile. A
  worker that cannot start at all (bad repository, bad TLS files) stops the whole server.
- SIGTERM/SIGINT: every worker drains as one process does (health NOT_SERVING, UNAVAILABLE for
  new calls, in-flight calls finish); the supervisor exits 0 once they all have.
- Metrics: workers write prometheus_client's multiprocess files; the supervisor's one endpoint
  serves their sum, with the names and labels of one process (server/metrics.py).
- Files: settings and metric files live in a temporary folder named after the supervisor's pid,
  removed when it exits. A supervisor killed by SIGKILL cannot remove its own: the next one started
  (a restarted container, whose /tmp volume outlives it) removes those of supervisors that are gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fusionserve.server.settings import ServerSettings
from fusionserve.server.worker import READY

logger = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0  # a worker that served this long before dying restarts after FIRST_BACKOFF_S again
KILL_MARGIN_S = 15.0  # beyond shutdown_grace_s, before a worker still draining is killed
FOLDER_PREFIX = "fusionserve-workers-"  # then the supervisor's pid, "-", and tempfile's random part


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its CPU affinity, capped by a container's CPU quota.

    The quota is cgroup v2's ``cpu.max`` ("200000 100000": 2 cores; "max": none) or, on older
    nodes, cgroup v1's ``cpu/cpu.cfs_quota_us`` over ``cpu/cpu.cfs_period_us`` (-1: none).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = period = None
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            pass
    try:
        if quota is not None and period is not None and quota not in ("max", "-1"):
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except ValueError:
        pass
    return max(1, cores)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_folders(parent: Path) -> list[Path]:
    """Remove the folders under ``parent`` left by supervisors that are gone (SIGKILL, OOM kill).

    A folder whose pid is this process's own is stale too: this supervisor has not made its folder
    yet, and a restarted container's first process gets the pid its predecessor had. Folders of
    other users and of live processes are left alone. Returns the folders removed.
    """
    removed = []
    for folder in sorted(parent.glob(f"{FOLDER_PREFIX}*-*")):
        try:
            pid = int(folder.name[len(FOLDER_PREFIX) :].split("-", 1)[0])
            if not folder.is_dir() or folder.stat().st_uid != os.geteuid():
                continue
        except (ValueError, OSError):
            continue
        if pid == os.getpid() or not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _cuda_provider_installed() -> bool:
    """Whether the installed onnxruntime has the CUDA provider (without importing onnxruntime here)."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(any(Path(p, "capi").glob("libonnxruntime_providers_cuda*")) for p in spec.submodule_search_locations)


def worker_count(settings: ServerSettings) -> tuple[int, str]:
    """How many workers ``settings.workers`` stands for, and why (``auto`` decides here)."""
    if settings.workers != "auto":
        return int(settings.workers), "as configured"
    if settings.model_control_mode == "explicit":
        return 1, "auto: explicit load/unload calls would reach one worker only"
    if settings.device == "cuda" or (settings.device == "auto" and _cuda_provider_installed()):
        return 1, "auto: on CUDA each worker holds its own CUDA context and copy of the models"
    cores = usable_cores()
    return cores, f"auto: one per usable core ({cores})"


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening: the workers' port, held.

    Raises:
        ValueError: the host does not resolve, or the port cannot be bound (in use, not allowed).
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve host {host!r}: {e}") from e
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # "[::]": dual-stack, as gRPC binds it
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot bind gRPC to {host}:{port}: {e.strerror or e}") from e
    return sock


def _settings_json(settings: ServerSettings) -> str:
    return json.dumps(dataclasses.asdict(settings), default=str, indent=1)


def _death(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclasses.dataclass
class _Worker:
    number: int
    proc: asyncio.subprocess.Process | None = None
    ready_at: float | None = None  # monotonic time it said it serves
    deaths_in_a_row: int = 0
    restarts: int = 0  # started again after it died (fusionserve_worker_restarts_total)


class Supervisor:
    """Start ``count`` workers serving ``settings``, keep them running, stop them on SIGTERM/SIGINT."""

    def __init__(self, settings: ServerSettings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._workers = [_Worker(n) for n in range(1, count + 1)]
        self._folder = Path()  # made by run(), removed when it returns
        self._metrics_folder = Path()
        self._stopping = asyncio.Event()
        self._all_ready = asyncio.Event()
        self._failed: int | None = None  # a worker's exit status when it could not start at all
        self._http: Any = None

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; 0 once every worker has drained (non-zero if they could not start)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        reserved: socket.socket | None = None
        for stale in remove_stale_folders(Path(tempfile.gettempdir())):
            logger.info("removed %s, left by a supervisor that was killed", stale)
        self._folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))
        try:
            reserved = reserve_port(self.settings.host, self.settings.port)
            self.port = reserved.getsockname()[1]
            self._metrics_folder = self._folder / "metrics"
            self._metrics_folder.mkdir()
            settings_file = self._folder / "settings.json"
            worker_settings = dataclasses.replace(self.settings, port=self.port, metrics_port=-1, workers=1)
            settings_file.write_text(_settings_json(worker_settings), encoding="utf-8")
            self._serve_metrics()
            tasks = [loop.create_task(self._keep_running(w, settings_file)) for w in self._workers]
            started = loop.create_task(self._all_ready.wait())
            stopped = loop.create_task(self._stopping.wait())
            await asyncio.wait([started, stopped], return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if self._all_ready.is_set() and not self._stopping.is_set():
                logger.info("fusionserve listening on %s (port %d), %d workers", self.settings.host, self.port,
                            self.count)  # fmt: skip
            await self._stopping.wait()
            await self._stop_all(tasks)
            stopped.cancel()
        finally:
            if reserved is not None:
                reserved.close()
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._failed is not None:
            return self._failed or 1
        logger.info("shut down")
        return 0

    def _on_signal(self, signum: int) -> None:
        logger.info("received %s: draining %d workers", signal.Signals(signum).name, self.count)
        self._stopping.set()

    def _serve_metrics(self) -> None:
        if self.settings.metrics_port < 0:
            return
        from prometheus_client import start_http_server

        from fusionserve.server.metrics import multiprocess_registry

        host, port = self.settings.metrics_host, self.settings.metrics_port
        try:
            registry = multiprocess_registry(self._metrics_folder, self._restarts)
            self._http, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise ValueError(f"cannot serve metrics on {host}:{port}: {e.strerror or e}") from e
        self.metrics_port = int(self._http.server_port)
        logger.info("metrics on http://%s:%d/metrics (the sum over %d workers)", host, self.metrics_port, self.count)

    def _restarts(self) -> dict[int, int]:
        """How often each worker was started again after it died (read at each scrape)."""
        return {w.number: w.restarts for w in self._workers}

    async def _start(self, worker: _Worker, settings_file: Path) -> asyncio.subprocess.Process:
        command = [sys.executable, "-m", "fusionserve.server.worker", "--settings", str(settings_file),
                   "--worker", str(worker.number), "--supervisor", str(os.getpid())]  # fmt: skip
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            command.append("--verbose")
        from fusionserve.server.metrics import MULTIPROC_ENV

        env = {**os.environ, MULTIPROC_ENV: str(self._metrics_folder)}
        # stdout carries READY; stderr (the logs) is ours.
        proc = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
        logger.info("worker %d started (pid %d)", worker.number, proc.pid)
        return proc

    async def _keep_running(self, worker: _Worker, settings_file: Path) -> None:
        """Run one worker; start it again each time it dies, until the server stops."""
        while not self._stopping.is_set():
            proc = worker.proc = await self._start(worker, settings_file)
            if self._stopping.is_set():  # stopped while it was being started: _stop_all did not see it
                proc.send_signal(signal.SIGTERM)
            assert proc.stdout is not None
            while line := await proc.stdout.readline():  # until it exits (or closes stdout)
                if line.strip() == READY.encode() and worker.ready_at is None:
                    worker.ready_at = time.monotonic()
                    logger.info("worker %d (pid %d) serving", worker.number, proc.pid)
                    if all(w.ready_at is not None for w in self._workers):
                        self._all_ready.set()
            returncode = await proc.wait()
            served_s = time.monotonic() - worker.ready_at if worker.ready_at is not None else None
            worker.ready_at = None
            if self._stopping.is_set():
                logger.info("worker %d (pid %d) %s", worker.number, proc.pid, _death(returncode))
                return
            if not self._all_ready.is_set():
                # It could not start (its own log says why); the server cannot serve as configured.
                logger.error("worker %d (pid %d) %s while starting; stopping", worker.number, proc.pid,
                             _death(returncode))  # fmt: skip
                self._failed = returncode if returncode > 0 else 1
                self._stopping.set()
                return
            self._buried(proc.pid)
            if served_s is not None and served_s >= HEALTHY_AFTER_S:
                worker.deaths_in_a_row = 0
            worker.deaths_in_a_row += 1
            delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (worker.deaths_in_a_row - 1))
            logger.warning("worker %d (pid %d) %s after serving %s; starting it again in %.1f s (%d in a row)",
                           worker.number, proc.pid, _death(returncode),
                           "never" if served_s is None else f"{served_s:.1f} s", delay,
                           worker.deaths_in_a_row)  # fmt: skip
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except asyncio.TimeoutError:
                worker.restarts += 1

    def _buried(self, pid: int) -> None:
        """A dead worker's files: its live gauges go; its counts stay in the sums, under a name no new pid takes."""
        from prometheus_client.multiprocess import mark_process_dead

        from fusionserve.server.model_totals import TOTALS_FOLDER

        mark_process_dead(pid, str(self._metrics_folder))
        totals = self._metrics_folder / TOTALS_FOLDER / f"totals_{pid}.db"
        if totals.exists():
            totals.rename(totals.with_name(f"dead_{pid}_{time.time_ns()}.db"))

    async def _stop_all(self, tasks: list[asyncio.Task]) -> None:
        """SIGTERM every worker (each drains), wait for all, kill any still there after the grace."""
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(signal.SIGTERM)
        done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_s + KILL_MARGIN_S)
        for w in self._workers:
            if w.proc is not None and w.proc.returncode is None:
                logger.warning("worker %d (pid %d) still running after the grace: killing it", w.number, w.proc.pid)
                w.proc.kill()
        if pending:
            await asyncio.wait(pending, timeout=5)
        for task in done:
            task.result()  # a supervisor bug surfaces here, not silently


async def supervise(settings: ServerSettings, count: int, why: str) -> int:
    """Run ``count`` workers (``why``: how the count was chosen, logged) until SIGTERM; the exit status."""
    logger.info("starting %d workers (%s) on one port", count, why)
    return await Supervisor(settings, count).run()
