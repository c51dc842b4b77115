"""``fusionserve loadtest`` against real servers on loopback: reports, errors, open-loop accounting."""

from __future__ import annotations

import asyncio
import json

import grpc
import numpy as np
import pytest

from fusionserve.cli.main import main as cli_main
from fusionserve.client.inputs import directory_inputs
from fusionserve.client.loadgen import LoadSettings, run
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.serving import ServicerServer

PERCENTILE_KEYS = ["min", "p50", "p90", "p99", "p99.9", "max"]


def _loadtest(target: str, *args: str) -> int:
    return cli_main(["loadtest", "--target", target, "--quiet", *args])


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_closed_loop_run_writes_a_valid_report_and_plot(server, tmp_path, capsys, mode):
    out, plot = tmp_path / "report.json", tmp_path / "report.png"
    extra = ["--plot", str(plot)] if mode == "unary" else []
    rc = _loadtest(server.target, "--mode", mode, "--concurrency", "4", "--duration", "1.5", "--warmup", "0.5",
                   "--batch-size", "2", "--json", str(out), *extra)  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Summary:" in printed and "Requests/s:" in printed and "[OK]" in printed
    report = json.loads(out.read_text())
    settings, results, machine = report["settings"], report["results"], report["machine"]
    assert settings["mode"] == mode and settings["api"] == "typed" and settings["loop"] == "closed"
    assert "token" not in settings
    assert machine["cpu_count"] >= 1 and machine["grpcio"] == grpc.__version__
    assert results["error_count"] == 0 and results["errors"] == {}
    assert results["ok"] == results["requests"] > 0
    assert results["requests_per_s"] > 0
    assert results["items_per_s"] == pytest.approx(2 * results["requests_per_s"])
    figures = [results["latency_ms"][k] for k in PERCENTILE_KEYS]
    assert figures == sorted(figures) and figures[0] > 0
    assert sum(b["count"] for b in results["histogram"]) == results["ok"]
    assert len(report["timeline"]) == 2
    if extra:
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_the_v2_api_is_driven_with_our_own_stubs(server, tmp_path, mode):
    out = tmp_path / "report.json"
    assert _loadtest(server.target, "--api", "v2", "--mode", mode, "--concurrency", "4", "--duration", "0.7",
                     "--warmup", "0.3", "--json", str(out)) == 0  # fmt: skip
    results = json.loads(out.read_text())["results"]
    assert results["error_count"] == 0 and results["requests_per_s"] > 0


@pytest.mark.parametrize("api", ["typed", "v2"])
def test_errors_are_counted_by_status_code(server, tmp_path, api):
    out = tmp_path / "report.json"
    args = ["--api", api, "--mode", "stream", "--model", "nope", "--duration", "0.5", "--warmup", "0"]
    assert _loadtest(server.target, *args, "--json", str(out)) == 1  # nothing succeeded
    results = json.loads(out.read_text())["results"]
    assert results["ok"] == 0 and set(results["errors"]) == {"NOT_FOUND"}
    assert results["errors"]["NOT_FOUND"] == results["requests"] > 0


def test_a_folder_of_images_with_captions(server, samples, tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"red_circle-{i}.png").write_bytes(samples[i][0])
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "captions.txt").write_text("# file<TAB>caption\nred_circle-0.png\ta blue star\n")
    inputs = directory_inputs(tmp_path)
    assert [text for _, text in inputs] == ["a blue star", "red circle 1", "red circle 2"]
    assert inputs[1][0] == samples[1][0]
    assert _loadtest(server.target, "--inputs", str(tmp_path), "--duration", "0.5", "--warmup", "0") == 0
    assert "[OK]" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _loadtest(server.target, "--inputs", str(empty), "--duration", "0.5") == 2


class StallingServicer(pb_grpc.FusionServiceServicer):
    """Answers at once, except that request number ``stall_at`` holds everyone up for ``stall_s``."""

    def __init__(self, stall_at: int, stall_s: float) -> None:
        self.stall_at, self.stall_s = stall_at, stall_s
        self.count = 0
        self.lock: asyncio.Lock | None = None

    async def Classify(self, request, context):
        self.lock = self.lock or asyncio.Lock()
        self.count += 1
        async with self.lock:  # while it is held (the stall), every request waits
            if self.count == self.stall_at:
                await asyncio.sleep(self.stall_s)
        return pb.ClassifyResponse()


@pytest.fixture
def stalling_server():
    servicer = StallingServicer(stall_at=100, stall_s=0.5)
    server = ServicerServer(servicer)
    yield server.target, servicer
    server.stop()


def test_open_loop_charges_a_stall_to_every_request_intended_during_it(stalling_server):
    target, servicer = stalling_server
    stall_s = servicer.stall_s
    # At most 2 requests in flight: while the server stalls, the others cannot even be sent. Timed
    # from their actual send they look fast (coordinated omission); from their intended send, not.
    settings = LoadSettings(target=[target], rate=200, duration_s=2.0, warmup_s=0, max_inflight=2, progress=False)
    report = run(settings, inputs=[(b"image", "text")])
    r = report.results
    assert r["error_count"] == 0
    assert r["requests"] == 400  # the schedule is kept: rate x duration requests intended
    assert servicer.count == 400
    assert r["latency_ms"]["p99"] >= 0.9 * stall_s * 1e3
    assert r["latency_ms"]["max"] >= stall_s * 1e3
    assert r["service_latency_ms"]["p99"] < 0.5 * stall_s * 1e3  # the naive figure hides the stall
    assert r["send_lag_ms"]["max"] >= 0.8 * stall_s * 1e3
    # Every request intended during the stall (200/s x 0.5 s) waited for a share of it.
    assert np.count_nonzero(report.samples["latency_s"] >= 0.5 * stall_s) >= 40
    assert "intended send time" in report.summary()
