"""The official tritonclient (gRPC, sync and asyncio) against a fusionserve server, unchanged.

tritonclient and ``fusionserve.v2`` both define the ``inference.*`` protobuf symbols, so neither is
imported here: the server runs as a ``fusionserve serve`` subprocess and each scenario of
``tests/tritonclient_scenarios.py`` runs in its own Python process.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS_SCRIPT = Path(__file__).resolve().parent / "tritonclient_scenarios.py"
SCENARIOS = [
    "health",
    "metadata",
    "infer_tensor_models",
    "infer_multimodal",
    "requested_outputs",
    "stream",
    "errors",
    "asyncio_client",
]
LISTENING = re.compile(r"listening on \S+ \(port (\d+)\)")


class ServerProcess:
    """``python -m fusionserve serve`` on a free port (port 0, read back from its log)."""

    def __init__(self, repository: Path, timeout_s: float = 120) -> None:
        command = [
            sys.executable, "-m", "fusionserve", "serve",
            "--repository", str(repository), "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "-1", "--device", "cpu", "--shutdown-grace-s", "2",
        ]  # fmt: skip
        self.log: list[str] = []
        self._port: list[int] = []
        self._bound = threading.Event()
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
        )
        threading.Thread(target=self._read_log, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not self._bound.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("fusionserve serve did not start:\n" + "".join(self.log))
        self.target = f"127.0.0.1:{self._port[0]}"
        self._wait_serving(deadline)

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:  # drained continuously so the server never blocks on a full pipe
            self.log.append(line)
            match = LISTENING.search(line)
            if match and not self._bound.is_set():
                self._port.append(int(match.group(1)))
                self._bound.set()

    def _wait_serving(self, deadline: float) -> None:
        with grpc.insecure_channel(self.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))
            health = health_pb2_grpc.HealthStub(channel)
            while (
                health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                != health_pb2.HealthCheckResponse.SERVING
            ):
                if time.monotonic() > deadline:
                    pytest.fail("fusionserve serve never became SERVING:\n" + "".join(self.log))
                time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM (graceful drain), then SIGKILL if it lingers; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@pytest.fixture(scope="module")
def server_process(repository: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(repository)
    yield running
    assert running.stop() == 0, "".join(running.log)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tritonclient_scenario(server_process, repository, scenario):
    result = subprocess.run(
        [sys.executable, str(SCENARIOS_SCRIPT), scenario, server_process.target, str(repository)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        print(result.stdout)
        print(result.stderr)
        print("---- server log (tail) ----")
        print("".join(server_process.log[-40:]))
    assert result.returncode == 0, f"scenario {scenario} failed:\n{result.stderr[-4000:]}"
    assert f"scenario {scenario}: ok" in result.stdout


def test_scenario_list_is_complete():
    """Every scenario the script defines is run above (a new one cannot be forgotten)."""
    text = SCENARIOS_SCRIPT.read_text()
    defined = re.findall(r"@scenario\ndef (\w+)\(", text)
    assert sorted(defined) == sorted(SCENARIOS)
