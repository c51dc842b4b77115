"""The official tritonclient (gRPC, sync and asyncio) against a fusionserve server, unchanged.

tritonclient and ``fusionserve.v2`` both define the ``inference.*`` protobuf symbols, so neither is
imported here: the server runs as a ``fusionserve serve`` subprocess and each scenario of
``tests/tritonclient_scenarios.py`` runs in its own Python process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusionserve.server.process import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS_SCRIPT = Path(__file__).resolve().parent / "tritonclient_scenarios.py"
SCENARIOS = [
    "health",
    "metadata",
    "config_and_statistics",
    "infer_tensor_models",
    "infer_multimodal",
    "requested_outputs",
    "stream",
    "errors",
    "asyncio_client",
]


@pytest.fixture(scope="module")
def server_process(repository: Path) -> Iterator[ServerProcess]:
    running = ServerProcess(repository, "--device", "cpu", "--shutdown-grace-s", "2")
    yield running
    assert running.close() == 0, "".join(running.log)


def run_scenario(server: ServerProcess, repository: Path, scenario: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCENARIOS_SCRIPT), scenario, server.target, str(repository)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        print(result.stdout)
        print(result.stderr)
        print("---- server log (tail) ----")
        print("".join(list(server.log)[-40:]))
    assert result.returncode == 0, f"scenario {scenario} failed:\n{result.stderr[-4000:]}"
    assert f"scenario {scenario}: ok" in result.stdout


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tritonclient_scenario(server_process, repository, scenario):
    run_scenario(server_process, repository, scenario)


def test_tritonclient_drives_explicit_model_control(repository):
    with ServerProcess(repository, "--device", "cpu", "--model-control-mode", "explicit") as server:
        run_scenario(server, repository, "repository_control")


def test_scenario_list_is_complete():
    """Every scenario the script defines is run above (a new one cannot be forgotten)."""
    text = SCENARIOS_SCRIPT.read_text()
    defined = re.findall(r"@scenario\ndef (\w+)\(", text)
    assert sorted(defined) == sorted([*SCENARIOS, "repository_control", "traceparent"])  # the last: test_tracing
