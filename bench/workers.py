"""Workers: throughput and latency of ``serve --workers N`` against one process, and what each worker costs in memory.

The real job: the ``multimodal`` pipeline, a PNG image and a caption per call, unary. Two clients:
Triton's perf_analyzer (C++, light on CPU; V2 ModelInfer) and ``fusionserve loadtest`` (the
project's load generator, Python; typed Classify). Both share the machine with the server.

The kernel spreads *connections* over the workers (``SO_REUSEPORT``), not calls, so a client must
open several. perf_analyzer shares one gRPC channel between up to
``TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT`` (default 6) of its concurrent requests, so it opens
ceil(concurrency / 6) connections: one at concurrency 1; ``perf_analyzer-separate`` is the same run
with that variable at 1 (a connection per concurrent request). The load generator opens
``--connections`` (here min(concurrency, ``--max-connections``), the same for every worker count).
Overload control is off (``queue_delay_target_ms`` 0): this measures capacity, and perf_analyzer
stops at the first refused call.
Per run: throughput, p50/p99, each worker's share of the calls (from its own metrics file), the
resident memory of the supervisor and of each worker after the load. Ratios compare N workers to
1 worker in the same run.

    python bench/workers.py [--repository REPO] [--workers 1 2] [--concurrency 1 8 32 64]
                            [--duration 5] [--clients perf_analyzer perf_analyzer-separate loadtest]
                            [--max-connections 8]
                            [--smoke]

Writes ``bench/results/workers[-smoke].json``. ``--smoke``: 1 and 2 workers, 1 s windows, for CI:
the load generator at concurrency 1 and 8, perf_analyzer (default sharing) at 1 only (it gives up on
1 s windows that are not stable, which busy shared machines make likely beyond one caller); without
perf_analyzer (not installable, libb64 missing) it says so and runs the load generator only.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from _common import ServerProcess, load, machine, repository, result_name, samples, write

SHARE_COUNT = "TRITON_CLIENT_GRPC_CHANNEL_MAX_SHARE_COUNT"  # perf_analyzer's requests per channel (default 6)
REQUESTS_OK = ("fusionserve_requests_total", {"code": "OK", "model": "multimodal"})


SERVER_ENV = {"FUSIONSERVE_QUEUE_DELAY_TARGET_MS": "0"}  # capacity, not the overload policy


def worker_calls(pid: int) -> float:
    """Calls one worker answered OK (any API), from its own prometheus_client file."""
    from prometheus_client.multiprocess import MultiProcessCollector

    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    folder = next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    name, labels = REQUESTS_OK
    return sum(
        s.value
        for metric in MultiProcessCollector.merge([str(Path(folder) / f"counter_{pid}.db")])
        for s in metric.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def memory(server: ServerProcess) -> dict[str, Any]:
    """Resident MiB: the process itself, each worker, and the total."""
    own = server.rss_mb()
    workers = {str(n): server.rss_mb(pid) for n, pid in sorted(server.workers.items())}
    return {"process_mib": own, "workers_mib": workers, "total_mib": own + sum(workers.values())}


def shares(server: ServerProcess, before: dict[int, float]) -> list[float]:
    """Each worker's share of the calls since ``before`` (empty for one process)."""
    if not server.workers:
        return []
    done = {pid: worker_calls(pid) - before.get(pid, 0.0) for pid in server.workers.values()}
    total = sum(done.values()) or 1.0
    return [round(n / total, 3) for n in done.values()]


def counts(server: ServerProcess) -> dict[int, float]:
    return {pid: worker_calls(pid) for pid in server.workers.values()}


def perf_analyzer_setup(smoke: bool) -> tuple[Any, dict[str, str], Path] | str:
    """(run_one, env, input data) for bench/perf_analyzer.py's runner, or why it cannot run here."""
    import perf_analyzer as pa

    found = pa.ready()
    if isinstance(found, str):
        return found
    binary, env, data = found

    def run(target: str, concurrency: int, window_ms: int, separate: bool) -> dict[str, Any]:
        # perf_analyzer's default stability, except in a smoke run (no claims; CI machines are noisy).
        args = argparse.Namespace(window_ms=window_ms, stability_percentage=100 if smoke else 10)
        share = {SHARE_COUNT: "1"} if separate else {}
        row = pa.run_one(binary, {**env, **share}, target, "multimodal", concurrency, args, data)
        if "error" in row:
            return {"error": row["error"][-500:]}
        return {"items_per_s": row["Inferences/Second"], "p50_ms": row["p50 latency"] / 1e3,
                "p99_ms": row["p99 latency"] / 1e3,
                "connections": concurrency if separate else math.ceil(concurrency / 6)}  # fmt: skip

    return run, env, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    clients = ["perf_analyzer", "perf_analyzer-separate", "loadtest"]
    parser.add_argument("--clients", nargs="+", choices=clients, default=clients)
    parser.add_argument("--max-connections", type=int, default=8, help="load generator: connections at most")
    parser.add_argument("--smoke", action="store_true", help="1 s windows, concurrency 1 and 8 (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.concurrency, args.duration = [1, 8], 1.0
        args.clients = [c for c in args.clients if c != "perf_analyzer-separate"]
    notes: list[str] = []
    runner = None
    if any(c.startswith("perf_analyzer") for c in args.clients):
        setup = perf_analyzer_setup(args.smoke)
        if isinstance(setup, str):
            notes.append(setup)
            print(f"note: {setup}; the load generator only")
        else:
            runner = setup[0]
    repo = repository(args.repository, smoke=args.smoke)
    items = samples(256)
    rows: list[dict[str, Any]] = []
    memories: dict[str, Any] = {}
    for n in args.workers:
        with ServerProcess(repo, "--workers", str(n), "--device", "cpu", env=SERVER_ENV, start_timeout_s=300) as server:
            for c in args.concurrency:
                analyzers = [k for k in args.clients if k.startswith("perf_analyzer")] if runner else []
                for client in analyzers if not (args.smoke and c > 1) else []:
                    before = counts(server)
                    row = runner(server.target, c, int(args.duration * 1000), client.endswith("separate"))
                    rows.append({"workers": n, "client": client, "concurrency": c, **row,
                                 "shares": shares(server, before)})  # fmt: skip
                if "loadtest" in args.clients:
                    connections = min(c, args.max_connections)
                    before = counts(server)
                    row = load(server.target, items, duration_s=args.duration, concurrency=c,
                               connections=connections)  # fmt: skip
                    rows.append({"workers": n, "client": "loadtest", "concurrency": c, "connections": connections,
                                 **row, "shares": shares(server, before)})  # fmt: skip
            memories[str(n)] = memory(server)

    result = {"machine": machine(), "settings": {**vars(args), "repository": str(repo), "server_env": SERVER_ENV,
                                                 "notes": notes},
              "rows": rows, "memory": memories}  # fmt: skip
    base = {(r["client"], r["concurrency"]): r for r in rows if r["workers"] == args.workers[0]}
    print(f"\nmultimodal, PNG + caption per call, unary; × = items/s against {args.workers[0]} worker(s) in this run; "
          "share = each worker's part of the calls")  # fmt: skip
    print(f"{'client':<24}{'workers':>8}{'conc':>6}{'conns':>6}{'items/s':>9}{'×':>6}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'p99 ×':>7}  share")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['client']:<24}{r['workers']:>8}{r['concurrency']:>6}  FAILED: {r['error'][-200:]}")
            continue
        b = base.get((r["client"], r["concurrency"]))
        gain = r["items_per_s"] / b["items_per_s"] if b and "error" not in b else float("nan")
        p99 = r["p99_ms"] / b["p99_ms"] if b and "error" not in b else float("nan")
        print(f"{r['client']:<24}{r['workers']:>8}{r['concurrency']:>6}{r['connections']:>6}{r['items_per_s']:>9.0f}"
              f"{gain:>6.2f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}{p99:>7.2f}  {r['shares']}")  # fmt: skip
    print("\nresident memory after the load, MiB")
    for n, m in memories.items():
        per = ", ".join(f"{v:.0f}" for v in m["workers_mib"].values())
        print(f"  {n} worker(s): {'supervisor' if m['workers_mib'] else 'process'} {m['process_mib']:.0f}"
              + (f", workers {per}" if per else "") + f"; total {m['total_mib']:.0f}")  # fmt: skip
    print("wrote", write(result_name("workers", smoke=args.smoke), result))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
