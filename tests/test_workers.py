"""``fusionserve serve --workers N``: real supervisor and worker processes on one loopback port.

The kernel spreads connections (not calls) over the workers, so every client here opens several
connections. Per-worker figures come from each worker's own prometheus_client files (in the folder
the supervisor gave it, read from its environment), the totals from the supervisor's one endpoint.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from fusionserve.client import AsyncFusionClient, FusionClient
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v2 import grpc_service_pb2 as v2
from fusionserve.v2 import grpc_service_pb2_grpc as v2_grpc
from tests.processes import OK_TYPED, ServerProcess, classify_lanes, wait_until

CLASSIFY = "/fusionserve.v1.FusionService/Classify"
CONNECTIONS = 16  # all on one worker of two: 2 * 2**-16, never in practice
SEPARATE = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own per channel


def _worker_folder(pid: int) -> Path:
    """The folder a worker writes its metrics to (the supervisor sets it in the worker's environment)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (value,) = [v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return Path(value.decode())


def _worker_count(pid: int, sample: str) -> float:
    """One counter of one worker alone, from its own file, e.g. ``fusionserve_requests_total`` OK typed."""
    name, labels = sample.split("{")
    wanted = dict(kv.split("=") for kv in labels.rstrip("}").split(","))
    wanted = {k: v.strip('"') for k, v in wanted.items()}
    for metric in MultiProcessCollector.merge([str(_worker_folder(pid) / f"counter_{pid}.db")]):
        for s in metric.samples:
            if s.name == name and s.labels == wanted:
                return s.value
    return 0.0


def _request(image: bytes, text: str) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest()
    request.items.add(image=image, text=text)
    return request


def _classify_on_connections(target: str, samples, calls: int) -> None:
    """``calls`` Classify calls through the client library with CONNECTIONS connections, one lane each."""

    async def run() -> None:
        async with AsyncFusionClient(target, connections=CONNECTIONS, timeout_s=30) as client:

            async def lane(n: int) -> None:  # one call at a time per lane
                for i in range(n, calls, CONNECTIONS):
                    await client.classify(*samples[i % len(samples)])

            await asyncio.gather(*(lane(n) for n in range(CONNECTIONS)))

    asyncio.run(run())


@pytest.fixture(scope="module")
def workers(repository):
    """Two workers behind one port, with the supervisor's metrics endpoint.

    Overload control is off: the counts compared here are of calls that all succeed, on 2 shared cores.
    """
    with ServerProcess(repository, "--workers", "2", metrics_port=0,
                       env={"FUSIONSERVE_QUEUE_DELAY_TARGET_MS": "0"}) as server:  # fmt: skip
        yield server


def test_health_and_reflection_answer_the_same_on_every_connection(workers):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    for _ in range(CONNECTIONS):
        with grpc.insecure_channel(workers.target, options=SEPARATE) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "multimodal", "fusionserve.v1.FusionService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
                assert status == health_pb2.HealthCheckResponse.SERVING, service
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert {"fusionserve.v1.FusionService", "inference.GRPCInferenceService"} <= services


def test_two_workers_serve_one_port_and_their_metrics_add_up(workers, samples):
    assert sorted(workers.workers) == [1, 2] and len(set(workers.workers.values())) == 2
    before = {pid: _worker_count(pid, OK_TYPED) for pid in workers.workers.values()}
    total_before = workers.metric(OK_TYPED)
    calls = 96
    _classify_on_connections(workers.target, samples, calls)

    per_worker = {pid: _worker_count(pid, OK_TYPED) - before[pid] for pid in workers.workers.values()}
    assert all(n > 0 for n in per_worker.values()), per_worker  # both workers answered
    assert sum(per_worker.values()) == calls  # each call counted once, by the worker that served it
    assert workers.metric(OK_TYPED) - total_before == calls  # the one endpoint: the sum
    # Every gauge says how workers' values add up (one without a mode would come out per pid: new labels).
    assert not [s for s in workers.samples() if "pid" in s.labels]
    # Gauges add up as their meaning asks: the serving version is the newest any worker serves (not 2 × 1).
    assert workers.metric('fusionserve_model_serving_version{model="multimodal"}') == 1
    # A gauge one process reads at scrape time (cache bytes) reaches the sum through the workers' refresh.
    assert wait_until(lambda: workers.metric('fusionserve_embedding_cache_bytes{model="image_encoder"}') > 0, 5)
    # Resident memory is the workers' sum, within a few MB of what /proc says each holds now.
    rss = sum(workers.rss_mb(pid) for pid in workers.workers.values()) * 2**20
    assert wait_until(lambda: abs(workers.metric("fusionserve_resident_memory_bytes") - rss) < 0.1 * rss, 5)
    assert [workers.metric(f'fusionserve_worker_restarts_total{{worker="{n}"}}') for n in (1, 2)] == [0, 0]
    _, count = workers.histogram("fusionserve_request_latency_seconds")["multimodal"]
    assert count >= calls
    print(f"\nworkers: {calls} calls over {CONNECTIONS} connections: per worker {sorted(per_worker.values())}")


@pytest.mark.parametrize("connections", [0, -1, 1.5, True])
def test_client_connections_must_be_a_whole_number(connections):
    with pytest.raises(ValueError, match="connections must be a whole number >= 1"):
        FusionClient("127.0.0.1:1", connections=connections)


def test_model_statistics_report_the_sum_over_workers(workers, samples):
    def success_counts() -> list[int]:
        """ModelStatistics of multimodal asked on every connection (so of both workers): its success count."""
        counts = []
        for _ in range(CONNECTIONS):
            with grpc.insecure_channel(workers.target, options=SEPARATE) as channel:
                stats = v2_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
                    v2.ModelStatisticsRequest(name="multimodal"), timeout=10
                )
                counts.append(stats.model_stats[0].inference_stats.success.count)
        return counts

    (before,) = set(success_counts())
    per_worker_before = {pid: _worker_count(pid, OK_TYPED) for pid in workers.workers.values()}
    calls = 64
    _classify_on_connections(workers.target, samples, calls)
    per_worker = [_worker_count(pid, OK_TYPED) - per_worker_before[pid] for pid in workers.workers.values()]
    assert all(0 < n < calls for n in per_worker), per_worker  # neither worker served them all...
    assert set(success_counts()) == {before + calls}  # ...yet whichever answers reports them all


def test_kill_9_of_a_worker_under_load_loses_no_call_and_it_is_restarted(repository, samples):
    with ServerProcess(repository, "--workers", "2", metrics_port=0) as server:
        victim_number, victim = 1, server.workers[1]
        stop = threading.Event()
        answered: list[float] = []
        failures: list[BaseException] = []
        with FusionClient(server.target, timeout_s=20, connections=4) as client:

            threads = classify_lanes(client, samples[:64], 4, stop, answered, failures)
            assert wait_until(lambda: len(answered) >= 50, 20)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            restarted = wait_until(lambda: server.workers[victim_number] != victim, 20)
            wait_until(lambda: sum(t > killed_at for t in answered) >= 50, 10)
            stop.set()
            for t in threads:
                t.join(30)
        assert not failures, failures[:3]
        assert restarted, "".join(server.log)
        assert sum(t > killed_at for t in answered) >= 50  # calls went on after the kill
        assert server.proc.poll() is None  # the supervisor lives on
        # The dead worker's counts stay in the sums (a call it answered just before dying, whose answer
        # was lost and retried, counts twice); its in-flight gauge went with it, so nothing is stuck.
        assert server.metric(OK_TYPED) >= len(answered)
        assert wait_until(lambda: server.metric('fusionserve_inflight_requests{model="multimodal"}') == 0, 5)
        log = "".join(server.log)
        assert f"worker {victim_number} (pid {victim}) killed by SIGKILL" in log and "starting it again" in log
        restarts = [server.metric(f'fusionserve_worker_restarts_total{{worker="{n}"}}') for n in (1, 2)]
        assert restarts == [1, 0]
        assert server.close() == 0
    print(f"\nworkers: kill -9 of worker {victim_number}: {len(answered)} calls OK, none failed; restarted")


@pytest.mark.parametrize(
    ("files", "cap"),
    [({"cpu.max": "200000 100000\n"}, 2), ({"cpu.max": "150000 100000\n"}, 2), ({"cpu.max": "50000 100000\n"}, 1),
     ({"cpu.max": "max 100000\n"}, None),
     ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
     ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
     ({}, None)],
)  # fmt: skip
def test_auto_workers_follow_the_containers_cpu_quota(tmp_path, files, cap):
    from fusionserve.server.supervisor import usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == (affinity if cap is None else min(affinity, cap))


def test_a_killed_supervisors_workers_stop_and_the_next_one_removes_its_files(repository, tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    with ServerProcess(repository, "--workers", "2", env=env) as first:
        workers = list(first.workers.values())
        (left,) = tmp_path.glob(f"fusionserve-workers-{first.pid}-*")
        first.kill()  # SIGKILL: no clean-up of its own
        assert first.wait(10) == -signal.SIGKILL
        assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 30), workers
        assert (left / "settings.json").exists()  # left behind
        with ServerProcess(repository, "--workers", "2", env=env) as second:
            assert not left.exists()
            assert f"removed {left}, left by a supervisor that was killed" in "".join(second.log)
            assert [p.name.split("-")[2] for p in tmp_path.glob("fusionserve-workers-*")] == [str(second.pid)]
            assert second.close() == 0
    assert not list(tmp_path.glob("fusionserve-workers-*"))  # a clean stop removes its own


def test_stale_folder_clean_up_spares_live_supervisors_and_other_files(tmp_path):
    from fusionserve.server.supervisor import FOLDER_PREFIX, remove_stale_folders

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            alive = tmp_path / f"{FOLDER_PREFIX}{live.pid}-abc"
            mine = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-abc"  # a restarted container's pid 1
            unrelated = [tmp_path / f"{FOLDER_PREFIX}x-abc", tmp_path / "other-1-abc"]
            for folder in (alive, mine, *unrelated):
                folder.mkdir()
            (tmp_path / f"{FOLDER_PREFIX}1-file").write_text("not a folder")
            assert remove_stale_folders(tmp_path) == [mine]
            assert alive.exists() and all(f.exists() for f in unrelated)
            assert (tmp_path / f"{FOLDER_PREFIX}1-file").exists()
        finally:
            live.kill()


def test_sigterm_drains_every_worker_and_exits_zero(repository, samples):
    lanes = 8

    async def scenario(server: ServerProcess) -> list[list[str]]:
        channels = [grpc.aio.insecure_channel(server.target, options=SEPARATE) for _ in range(lanes)]
        call = [ch.unary_unary(CLASSIFY, pb.ClassifyRequest.SerializeToString, pb.ClassifyResponse.FromString)
                for ch in channels]  # fmt: skip
        codes: list[list[str]] = [[] for _ in range(lanes)]

        async def lane(n: int) -> None:
            """Calls one after another until the first refusal (as a client that moves away)."""
            i = n
            while True:
                image, text = samples[i % 64]
                try:
                    await call[n](_request(image, text), timeout=20)
                    codes[n].append("OK")
                except grpc.aio.AioRpcError as e:
                    codes[n].append(e.code().name)
                    return
                i += lanes

        tasks = [asyncio.create_task(lane(n)) for n in range(lanes)]
        await asyncio.sleep(1.0)
        server.terminate()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for ch in channels:
            await ch.close()
        return codes

    with ServerProcess(repository, "--workers", "2", "--shutdown-grace-s", "5") as server:
        pids = dict(server.workers)
        codes = asyncio.run(scenario(server))
        assert server.wait(20) == 0
    for lane_codes in codes:  # every call in flight finished; then a clean refusal
        assert lane_codes[-1] == "UNAVAILABLE" and set(lane_codes[:-1]) == {"OK"}, lane_codes
    log = "".join(server.log)
    for number, pid in pids.items():
        assert f"worker {number} (pid {pid}) exited with status 0" in log
        assert not Path(f"/proc/{pid}").exists()
    ok = sum(c.count("OK") for c in codes)
    print(f"\nworkers: SIGTERM under load: {ok} calls OK then UNAVAILABLE on each of {lanes} connections; exit 0")


def _serve(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """``fusionserve serve`` run to its end (later flags win over the port and metrics port given here)."""
    return subprocess.run([sys.executable, "-m", "fusionserve", "serve", "--port", "0", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=timeout_s)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "workers must be a whole number >= 1 or 'auto', not 0"),
        (["--workers", "two"], "workers must be a whole number >= 1 or 'auto', not 'two'"),
        (["--workers", "2", "--model-control-mode", "explicit"],
         "workers 2 needs model_control_mode poll or none: explicit load/unload calls would reach one worker only"),
    ],
)  # fmt: skip
def test_bad_workers_settings_are_one_clear_line(repository, args, message):
    done = _serve("--repository", str(repository), *args)
    assert done.returncode == 2
    assert done.stderr == f"fusionserve serve: error: {message}\n"


def test_a_port_taken_by_another_server_is_one_clear_line(repository):
    with socket.socket() as taken:  # a listener without SO_REUSEPORT: no one may share its port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve("--repository", str(repository), "--workers", "2", "--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 2
    expected = f"fusionserve serve: error: cannot bind gRPC to 127.0.0.1:{port}: Address already in use"
    assert done.stderr.splitlines()[-1] == expected
    assert "Traceback" not in done.stderr


def test_workers_that_cannot_start_stop_the_server_with_their_error(tmp_path):
    done = _serve("--repository", str(tmp_path / "missing"), "--workers", "2")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "fusionserve serve: error: " in done.stderr and "while starting; stopping" in done.stderr


def test_workers_setting_takes_a_count_or_auto_from_any_source(tmp_path):
    from fusionserve.server.settings import ServerSettings
    from fusionserve.server.supervisor import usable_cores, worker_count

    assert ServerSettings.load(None, env={"FUSIONSERVE_WORKERS": "3"}).workers == 3
    config = tmp_path / "settings.json"
    config.write_text('{"workers": "auto"}')
    assert ServerSettings.load(config, env={}).workers == "auto"
    assert worker_count(ServerSettings.load(None, env={}, overrides={"workers": "4"})) == (4, "as configured")
    cpu = ServerSettings.load(None, env={}, overrides={"workers": "auto", "device": "cpu"})
    assert 1 <= worker_count(cpu)[0] == usable_cores() <= len(os.sched_getaffinity(0))  # a CPU quota may cap it
    for overrides in ({"device": "cuda"}, {"device": "cpu", "model_control_mode": "explicit"}):
        assert worker_count(ServerSettings.load(None, env={}, overrides={"workers": "auto", **overrides}))[0] == 1
    assert ServerSettings().workers == 1  # one plain process unless asked
