"""Overload: open-loop load at multiples of the measured capacity; goodput, admitted and shed latency, codes.

1. Start ``fusionserve serve`` with its defaults, except ``--embedding-cache-mb 0``: every item is
   decoded and encoded, as new inputs would be (the load generator cycles over a few hundred).
2. Capacity, per API: closed loop, one-item unary calls, 32 callers.
3. For each API (typed unary ``Classify``, V2 ``ModelInfer``), each caller deadline (``--deadlines-ms``,
   default 100 ms and none: 0 stands for a 60 s deadline, which no call comes near) and each multiple
   of the capacity (default 0.5, 1, 2, 4): open loop for ``--duration-s``, then a pause for the queues
   to empty. Reports goodput (OK answers per second) and its share of the capacity, admitted p50/p99
   (OK answers, from the intended send time), the p99 of refused calls, the status codes, the
   client's send lag (above a few ms the load generator, which shares the cores, is the limit),
   the server's shed counts by reason, its resident memory, its CPU (cores, of which gRPC core's
   own threads) and the load generator's, and the latency of a health check and of ``ListModels``
   (every 50 ms) and of a metrics scrape (every 0.5 s), probed from another process while the load
   runs.
4. Through the client library with its retry policy on (``AsyncFusionClient``, open loop at 4×):
   the calls offered, the attempts gRPC received (those it shed included: gRPC core's own count), and
   how the calls ended: retries wait for the server's pushback, or back off, and stop under the
   retry throttling, so attempts stay near 1× the offered calls.

    python bench/overload.py [--multiples 0.5,1,2,4] [--deadlines-ms 100,0] [--duration-s 5] [--apis typed,v2]
                             [--repository REPO] [--image-side 64] [--server-arg=--workers=2 ...]
                             [--pin SERVER_CPUS:CLIENT_CPUS] [--smoke]

``--image-side 600`` makes decoding (in threads, off the event loop) the limit instead of the loop.
Writes
``bench/results/overload[-smoke].json`` and a plot beside it (docs/img/overload.png is a copy of a
full run's). The server and the load generator share the machine's cores: at high multiples the
load generator takes CPU the server needs, and past what it can send, its send lag says so
(docs/RELIABILITY.md#overload-control).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ServerProcess, machine, pyplot, repository, result_name, samples, save_figure, write

from fusionserve.client import AsyncFusionClient, FusionClientError
from fusionserve.client.loadgen import LoadSettings, run

SHED = "fusionserve_shed_requests_total"
REASONS = ("deadline", "queue_delay", "calls", "streams")
NO_DEADLINE_S = 60.0
"""The deadline of a run "without one" (``--deadlines-ms 0``): far beyond any wait in a few seconds' run."""
PROBE = """
import json, sys, time, urllib.request
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from fusionserve.v1 import fusion_pb2, fusion_pb2_grpc
target, seconds, metrics_url = sys.argv[1], float(sys.argv[2]), sys.argv[3]
channel = grpc.insecure_channel(target)
health, models = health_pb2_grpc.HealthStub(channel), fusion_pb2_grpc.FusionServiceStub(channel)
health.Check(health_pb2.HealthCheckRequest(), timeout=10)
probes = {  # name: (call, every N rounds of 50 ms)
    "health": (lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1, 1),
    "list_models": (lambda: bool(models.ListModels(fusion_pb2.ListModelsRequest(), timeout=5).models), 1),
    # A scrape costs the server milliseconds of Python: every 50 ms it would take a tenth of a core
    # (Prometheus scrapes every 15 to 60 s). Every 0.5 s it still samples ten times in 5 s.
    "metrics": (lambda: b"fusionserve_requests_total" in urllib.request.urlopen(metrics_url, timeout=5).read(), 10),
}
out = {name: [] for name in probes}
end = time.monotonic() + seconds
rounds = 0
while time.monotonic() < end:
    for name, (probe, every) in probes.items():
        if rounds % every:
            continue
        t = time.perf_counter()
        try:
            ok = probe()
        except Exception:
            ok = False
        out[name].append([(time.perf_counter() - t) * 1000, ok])
    rounds += 1
    time.sleep(0.05)
print(json.dumps(out))
"""


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpus(spec: str) -> set[int]:
    """``0-1,3`` → {0, 1, 3}."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _pin(cpus: set[int]) -> None:
    """Run every thread of this process (and the processes it starts from now on) on ``cpus``."""
    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), cpus)


def _pct(values: np.ndarray, p: float) -> float:
    return float(np.percentile(values, p)) if len(values) else float("nan")


def _shed(server: ServerProcess) -> dict[str, float]:
    return {r: server.metric(f'{SHED}{{reason="{r}"}}') for r in REASONS}


def _received(server: ServerProcess) -> float:
    """Calls gRPC received, those it shed included."""
    return server.metric("fusionserve_grpc_calls_received")


def _grpc_threads_cpu_s(server: ServerProcess) -> float:
    """CPU time so far of gRPC core's own threads (``event_engine``, ``grpc_*``) in the server's processes.

    They receive, parse and reset calls (the shed ones included) off the event loop.
    """
    total = 0.0
    for pid in _pids(server):
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue  # the thread ended
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            if name.startswith(("event_engine", "grpc")):
                fields = stat.rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _server_cpu_s(server: ServerProcess) -> float:
    """CPU time the server's processes have used so far."""
    return sum(map(server.cpu_seconds, _pids(server)))


def _pids(server: ServerProcess) -> list[int]:
    """The server's processes: one, or the supervisor and its workers."""
    return [server.pid, *server.workers.values()]


def open_loop(server: ServerProcess, items: list[tuple[bytes, str]], api: str, rate: float, duration_s: float,
              probe: bool, deadline_s: float = NO_DEADLINE_S) -> dict[str, Any]:  # fmt: skip
    """One open-loop run at ``rate``, each call with ``deadline_s``; its figures."""
    prober = None
    if probe:
        command = [sys.executable, "-c", PROBE, server.target, str(duration_s), str(server.metrics_url)]
        prober = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    shed_before = _shed(server)
    server_cpu, client_cpu, wall = _server_cpu_s(server), _own_cpu_s(), time.monotonic()
    grpc_cpu = _grpc_threads_cpu_s(server)
    s = LoadSettings(target=[server.target], api=api, rate=rate, duration_s=duration_s, warmup_s=0.5,
                     timeout_s=deadline_s, connections=4, progress=False)  # fmt: skip
    report = run(s, items)
    wall = time.monotonic() - wall
    server_cores = (_server_cpu_s(server) - server_cpu) / wall
    client_cores = (_own_cpu_s() - client_cpu) / wall
    grpc_cores = (_grpc_threads_cpu_s(server) - grpc_cpu) / wall
    r = report.results
    latency_ms = report.samples["latency_s"] * 1000
    ok = report.samples["ok"]
    row: dict[str, Any] = {
        "api": api,
        "deadline_ms": deadline_s * 1000 if deadline_s != NO_DEADLINE_S else None,
        "offered_per_s": rate,
        "goodput_per_s": r["requests_per_s"],
        "admitted_p50_ms": _pct(latency_ms[ok], 50),
        "admitted_p99_ms": _pct(latency_ms[ok], 99),
        "admitted_max_ms": float(latency_ms[ok].max()) if ok.any() else float("nan"),
        "service_p99_ms": r.get("service_latency_ms", {}).get("p99", float("nan")),
        "refused_p99_ms": _pct(latency_ms[~ok], 99),
        "codes": {"OK": int(ok.sum()), **r["errors"]},
        "send_lag_p99_ms": r.get("send_lag_ms", {}).get("p99", float("nan")),
        "shed": {k: v - shed_before[k] for k, v in _shed(server).items() if v - shed_before[k]},
        "rss_mb": sum(map(server.rss_mb, _pids(server))),
        "server_cores": server_cores,
        "server_grpc_thread_cores": grpc_cores,
        "client_cores": client_cores,
    }
    if prober is not None:
        out, _ = prober.communicate(timeout=duration_s + 60)
        for name, probes in json.loads(out or "{}").items():  # health, list_models, metrics
            times = np.array([p[0] for p in probes])
            row[f"{name}_p99_ms"] = _pct(times, 99)
            row[f"{name}_max_ms"] = float(times.max()) if len(times) else float("nan")
            row[f"{name}_failed"] = sum(1 for p in probes if not p[1])
    return row


async def _with_retries(target: str, items: list[tuple[bytes, str]], rate: float, duration_s: float) -> dict[str, Any]:
    """Open loop through AsyncFusionClient (its retry policy on): how the calls ended."""
    ends: dict[str, int] = {}
    latencies: list[float] = []
    async with AsyncFusionClient(target, timeout_s=10.0) as client:
        await client.classify(*items[0])
        tasks = []

        async def one(k: int, intended: float) -> None:
            try:
                await client.classify(*items[k % len(items)])
                end = "OK"
                latencies.append(time.perf_counter() - intended)
            except FusionClientError as e:
                end = e.code.name
            ends[end] = ends.get(end, 0) + 1

        start = time.perf_counter()
        n = int(rate * duration_s)
        for k in range(n):
            intended = start + k / rate
            if (delay := intended - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(k, intended)))
        await asyncio.gather(*tasks)
    lat = np.array(latencies) * 1000
    return {"offered_calls": n, "ends": ends, "ok_p50_ms": _pct(lat, 50), "ok_p99_ms": _pct(lat, 99)}


def with_retries(server: ServerProcess, items: list[tuple[bytes, str]], rate: float, duration_s: float) -> dict:
    """The client library at ``rate``: calls offered, attempts the server saw, how the calls ended."""
    before = _received(server)
    row = asyncio.run(_with_retries(server.target, items, rate, duration_s))
    time.sleep(1.0)
    # Every attempt reached gRPC (those it shed included); less the first, unmeasured call and the
    # client's health watch.
    row["server_attempts"] = _received(server) - before - 2
    row["attempts_per_call"] = row["server_attempts"] / row["offered_calls"]
    row["offered_per_s"] = rate
    return row


def plot(rows: list[dict[str, Any]], capacities: dict[str, float], name: str) -> None:
    """Goodput and admitted p99 against the offered load, one line per API."""
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for api, deadline in sorted({(r["api"], r["deadline_ms"] or 0) for r in rows}):
        mine = [r for r in rows if r["api"] == api and (r["deadline_ms"] or 0) == deadline]
        x = [r["multiple"] for r in mine]
        label = f"{api}, deadline {deadline:.0f} ms" if deadline else f"{api}, no deadline"
        left.plot(x, [r["goodput_share"] for r in mine], marker="o", label=label)
        right.plot(x, [r["admitted_p99_ms"] for r in mine], marker="o", label=label)
    left.set(xlabel="offered load (× capacity)", ylabel="goodput (× capacity)", xscale="log", ylim=(0, 1.3))
    right.set(xlabel="offered load (× capacity)", ylabel="admitted p99 (ms)", xscale="log", yscale="log")
    left.axhline(0.9, color="grey", linestyle=":")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("overload: " + ", ".join(f"{api} capacity {c:.0f} req/s" for api, c in capacities.items()))
    fig.tight_layout()
    save_figure(fig, name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--multiples", default="0.5,1,2,4", help="offered loads, as multiples of the capacity")
    p.add_argument("--deadlines-ms", default="100,0", help="each call's deadline; 0: none (a 60 s deadline)")
    p.add_argument("--duration-s", type=float, default=5.0, help="seconds per load")
    p.add_argument("--apis", default="typed,v2", help="typed and/or v2")
    p.add_argument("--repository", help="model repository (default: the bench's small one)")
    p.add_argument("--image-side", type=int, default=64,
                   help="side of the generated images, in pixels (larger: decoding, off the event loop, limits)")
    p.add_argument("--server-arg", action="append", default=[], help="extra 'fusionserve serve' argument")
    p.add_argument("--pin", metavar="SERVER:CLIENT",
                   help="CPU lists for the server and this load generator, e.g. 0:1 (taskset's syntax): "
                        "the load generator then takes no CPU from the server")
    p.add_argument("--smoke", action="store_true", help="seconds-long run for CI (1× and 4×, typed only)")
    args = p.parse_args()
    multiples = [1.0, 4.0] if args.smoke else [float(m) for m in args.multiples.split(",")]
    deadlines_s = [float(d) / 1000 or NO_DEADLINE_S for d in args.deadlines_ms.split(",")]
    apis = ["typed"] if args.smoke else args.apis.split(",")
    duration_s = 1.0 if args.smoke else args.duration_s
    repo = repository(args.repository, smoke=args.smoke)
    items = samples(256 if args.image_side <= 128 else 32, size=args.image_side)
    server_args = ["--embedding-cache-mb", "0", *args.server_arg]
    rows: list[dict[str, Any]] = []
    server_cpus, client_cpus = (_cpus(part) for part in args.pin.split(":")) if args.pin else (None, None)
    if server_cpus is not None:
        _pin(server_cpus)  # the server's processes inherit it
    with ServerProcess(repo, *server_args, metrics_port=0) as server:
        if client_cpus is not None:
            _pin(client_cpus)
            print(f"pinned: server on CPUs {sorted(server_cpus)}, load generator on CPUs {sorted(client_cpus)}")
        capacities, capacity_cores = {}, {}
        for api in apis:
            capacity_s = LoadSettings(target=[server.target], api=api, concurrency=32, warmup_s=0.5, connections=4,
                                      duration_s=1.0 if args.smoke else 5.0, progress=False)  # fmt: skip
            server_cpu, wall = _server_cpu_s(server), time.monotonic()
            capacities[api] = run(capacity_s, items).results["requests_per_s"]
            cores = (_server_cpu_s(server) - server_cpu) / (time.monotonic() - wall)
            capacity_cores[api] = cores
            print(f"capacity, {api}: {capacities[api]:.0f} req/s (closed loop, 32 callers, unary, 1 item; "
                  f"server {cores:.2f} cores)")  # fmt: skip
        print(f"{'api':6} {'deadline':>8} {'offered':>8} {'×':>5} {'goodput':>8} {'share':>6} {'/core':>6} "
              f"{'adm p50':>8} {'adm p99':>8} "
              f"{'shed p99':>8} {'lag p99':>8} {'health/list/metrics p99':>23} {'RSS MB':>7} {'cores s (grpc)/c':>16}  "
              "codes")  # fmt: skip
        for api in apis:
            capacity = capacities[api]
            for deadline_s, m in ((d, m) for d in deadlines_s for m in multiples):
                row = open_loop(server, items, api, m * capacity, duration_s, probe=True, deadline_s=deadline_s)
                row["multiple"] = m
                row["goodput_share"] = row["goodput_per_s"] / capacity
                # The same per core-second the server got: on a shared machine its CPU varies from
                # run to run, and this compares what it did with the CPU it had.
                row["goodput_share_per_core"] = row["goodput_share"] * capacity_cores[api] / row["server_cores"]
                rows.append(row)
                deadline = f"{row['deadline_ms']:.0f} ms" if row["deadline_ms"] else "none"
                print(f"{api:6} {deadline:>8} {row['offered_per_s']:8.0f} {m:5.1f} {row['goodput_per_s']:8.0f} "
                      f"{row['goodput_share']:6.2f} {row['goodput_share_per_core']:6.2f} "
                      f"{row['admitted_p50_ms']:8.1f} {row['admitted_p99_ms']:8.1f} "
                      f"{row['refused_p99_ms']:8.1f} {row['send_lag_p99_ms']:8.1f} "
                      f"{row['health_p99_ms']:7.1f}/{row['list_models_p99_ms']:6.1f}/"
                      f"{row['metrics_p99_ms']:6.1f}     "
                      f"{row['rss_mb']:7.0f} {row['server_cores']:4.2f} "
                      f"({row['server_grpc_thread_cores']:4.2f})/{row['client_cores']:4.2f}  "
                      f"{row['codes']} "
                      f"shed={row['shed']}", flush=True)  # fmt: skip
                time.sleep(1.0)  # let queues empty between loads
        retry = with_retries(server, items, (4.0 if not args.smoke else 2.0) * capacities[apis[0]], duration_s)
        print(f"client library, retries on, {retry['offered_per_s']:.0f} calls/s: {retry['offered_calls']} calls, "
              f"{retry['server_attempts']:.0f} attempts at the server ({retry['attempts_per_call']:.2f} per call); "
              f"ends {retry['ends']}; OK p50/p99 {retry['ok_p50_ms']:.1f}/{retry['ok_p99_ms']:.1f} ms")  # fmt: skip
    tags = [f"side{args.image_side}"] if args.image_side != 64 else []
    tags += [f"pin{args.pin.replace(':', '_').replace(',', '.')}"] if args.pin else []
    name = result_name("overload", smoke=args.smoke, tags=tags)
    write(name, {"machine": machine(), "server_args": server_args, "pin": args.pin, "capacity_per_s": capacities,
                 "capacity_server_cores": capacity_cores, "rows": rows, "client_library": retry})  # fmt: skip
    plot(rows, capacities, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
