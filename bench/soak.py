"""Soak: open-loop load at a fraction of the measured capacity for minutes; errors, latency over time, memory.

1. Start ``fusionserve serve`` (default settings) and measure its capacity: closed loop, one-item
   unary ``Classify``, 16 callers.
2. Fill the server once to its admission limits (``--fill-s`` of closed-loop load from more callers
   than it admits): its memory then stands at the peak its bounded queues allow, so the memory
   check below measures growth (a leak), not the first time a queue filled up.
3. Offer ``--load`` (default 0.7) of the capacity, open loop, for ``--minutes`` (default 10), and
   sample the server's resident memory (VmRSS) and who used the CPU every second.
4. Report errors (must be 0), p50/p99 per window of ``--window-s`` over time, and memory after the
   warm-up (the fill, then the first 10% of the run, at most 60 s) against the end: growth must
   stay under 10%. Each side is the median of the per-second RSS samples over one window (the
   first window after the warm-up, the last window of the run), so a leak (a level that keeps
   rising) fails the check and a transient does not: a burst of queued calls, when a neighbour
   takes a core for a few seconds, lifts RSS for about as long as the backlog lasts. The single
   samples at those two instants, the maximum, and the RSS a few seconds after the load stopped
   are reported beside it.
5. Name the neighbours: in every second where processes other than the server and the load
   generator took more than a quarter of a core, the busiest of them (command, cores).

    python bench/soak.py [--minutes 10] [--load 0.7] [--window-s 30] [--fill-s 3] [--repository REPO] [--smoke]

``--minutes 0.2`` is a short run; ``--smoke`` is that with shorter measurements, for CI: it reports
the checks but never fails on them (CI machines are shared and noisy). A full run exits with
status 1 when a check fails. Writes ``bench/results/soak[-smoke].json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ServerProcess, machine, repository, result_name, samples, write

from fusionserve.client.loadgen import LoadSettings, run_load

MAX_RSS_GROWTH = 0.10
REST_S = 5.0  # after the load stops, wait this long and read the server's RSS once more
TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system, every thread) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _other_processes(skip: set[int]) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every process on the machine but ``skip``: pid → (command, seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:  # it ended meanwhile
            continue
        fields = tail.split()
        out[int(entry.name)] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; idle and iowait excluded)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / TICKS


class Monitor:
    """The server's memory and who used the CPU, sampled every ``interval_s`` from a thread.

    CPU is split between the server, this load generator and everything else on the machine
    (neighbours, and kernel time spent on the loopback traffic), so that a latency spike can be
    told apart from a busy neighbour.
    """

    NEIGHBOUR_CORES = 0.25  # name the other processes in a second where they took more than this

    def __init__(self, server: ServerProcess, interval_s: float = 1.0) -> None:
        self.samples: list[tuple[float, float, float, float, float]] = []  # t, RSS MiB, server, self, machine
        self.neighbours: list[dict[str, Any]] = []  # {t_s, other_cores, top: [[command, cores], ...]}
        self._server = server
        self._skip = {server.proc.pid, os.getpid()}
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        before = _other_processes(self._skip)
        while True:
            self.samples.append((time.monotonic() - self._t0, self._server.rss_mb(), _proc_cpu_s(self._server.proc.pid),
                                 _proc_cpu_s("self"), _machine_busy_s()))  # fmt: skip
            now = _other_processes(self._skip)
            if len(self.samples) >= 2:
                self._name_neighbours(before, now)
            before = now
            if self._stop.wait(self._interval_s):
                return

    def _name_neighbours(self, before: dict[int, tuple[str, float]], now: dict[int, tuple[str, float]]) -> None:
        (t0, _, server0, self0, busy0), (t1, _, server1, self1, busy1) = self.samples[-2:]
        span = max(t1 - t0, 1e-9)
        other = max(0.0, (busy1 - busy0) - (server1 - server0) - (self1 - self0)) / span
        if other <= self.NEIGHBOUR_CORES:
            return
        # A process that started within the second used all its CPU time in it.
        used = sorted(((cmd, (cpu - before.get(pid, (cmd, 0.0))[1]) / span) for pid, (cmd, cpu) in now.items()),
                      key=lambda c: -c[1])  # fmt: skip
        top = [[cmd, round(cores, 2)] for cmd, cores in used[:3] if cores >= 0.01]
        # The rest of `other`: processes that ended within the second, and kernel time.
        self.neighbours.append({"t_s": round(t1, 1), "other_cores": round(other, 2), "top": top})

    def _nearest(self, t_s: float) -> tuple[float, float, float, float, float]:
        return min(self.samples, key=lambda s: abs(s[0] - t_s))

    def rss_at(self, t_s: float) -> float:
        """The server's RSS (MiB) nearest to ``t_s``."""
        return self._nearest(t_s)[1]

    def rss_median(self, start_s: float, end_s: float) -> float:
        """The median of the server's RSS samples (MiB) from ``start_s`` to ``end_s``."""
        inside = [s[1] for s in self.samples if start_s <= s[0] <= end_s]
        return float(np.median(inside)) if inside else self.rss_at((start_s + end_s) / 2)

    def cpu_between(self, start_s: float, end_s: float) -> dict[str, float]:
        """Cores used on average by the server, the load generator and everything else."""
        a, b = self._nearest(start_s), self._nearest(end_s)
        span = max(b[0] - a[0], 1e-9)
        server, loadgen, machine_ = (b[i] - a[i] for i in (2, 3, 4))
        return {"server_cores": server / span, "loadgen_cores": loadgen / span,
                "other_cores": max(0.0, machine_ - server - loadgen) / span}  # fmt: skip

    def stop(self) -> None:
        """Take one last sample and stop."""
        self._stop.set()
        self._thread.join(10)


def windows(report: Any, monitor: Monitor, window_s: float) -> list[dict[str, Any]]:
    """Per window of the run: requests, errors, p50/p99 (ms, from the intended send time), RSS, CPU."""
    t, latency, ok = report.samples["t_s"], report.samples["latency_s"], report.samples["ok"]
    out = []
    duration = report.settings.duration_s
    for start in np.arange(0.0, duration, window_s):
        end = min(start + window_s, duration)
        sel = (t >= start) & (t < end)
        good = np.sort(latency[sel & ok]) * 1e3
        row: dict[str, Any] = {"t_s": float(start), "requests": int(sel.sum()), "errors": int((sel & ~ok).sum()),
                               "req_per_s": float(sel.sum() / (end - start)), "rss_mb": monitor.rss_at(end),
                               **monitor.cpu_between(start, end)}  # fmt: skip
        if len(good):
            row.update(p50_ms=float(np.percentile(good, 50)), p99_ms=float(np.percentile(good, 99)))
        out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument("--load", type=float, default=0.7, help="offered rate as a fraction of the capacity")
    parser.add_argument("--window-s", type=float, help="report window (default: 30 s, or a tenth of the run)")
    parser.add_argument("--capacity-s", type=float, default=5.0, help="closed-loop capacity measurement")
    parser.add_argument("--fill-s", type=float, default=3.0, help="fill the server to its limits first (0: no)")
    parser.add_argument("--fill-callers", type=int, default=2000,
                        help="callers of the fill (default: over max_pending_rpcs + max_pipeline_items)")
    parser.add_argument("--progress", action="store_true", help="the load generator's per-second lines")
    parser.add_argument("--smoke", action="store_true", help="--minutes 0.2 for CI; checks reported, never fatal")
    args = parser.parse_args()
    minutes, capacity_s = (0.2, 1.0) if args.smoke else (args.minutes, args.capacity_s)
    fill_s = min(args.fill_s, 1.0) if args.smoke else args.fill_s
    duration_s = minutes * 60
    window_s = args.window_s or min(30.0, max(1.0, duration_s / 10))
    warmup_s = min(60.0, 0.1 * duration_s)
    repo = repository(args.repository, smoke=args.smoke)
    inputs = samples(64)

    with ServerProcess(repo) as server:
        closed = LoadSettings([server.target], concurrency=16, duration_s=capacity_s, warmup_s=1.0, progress=False)
        capacity = asyncio.run(run_load(closed, inputs)).results["requests_per_s"]
        rate = args.load * capacity
        print(f"capacity {capacity:.0f} req/s (closed loop, 16 callers, {capacity_s:g} s); "
              f"soak at {rate:.0f} req/s ({args.load:.0%}) for {minutes:g} min", file=sys.stderr)  # fmt: skip
        if fill_s > 0:
            fill = LoadSettings([server.target], concurrency=args.fill_callers, duration_s=fill_s, warmup_s=0,
                                timeout_s=30, progress=False)  # fmt: skip
            filled = asyncio.run(run_load(fill, inputs)).results
            print(f"fill: {args.fill_callers} callers for {fill_s:g} s: {filled['ok']} OK, shed {filled['errors']}; "
                  f"server RSS {server.rss_mb():.1f} MiB", file=sys.stderr)  # fmt: skip
        monitor = Monitor(server)
        soak = LoadSettings([server.target], rate=rate, duration_s=duration_s, warmup_s=0, timeout_s=10,
                            progress=args.progress)  # fmt: skip
        try:
            report = asyncio.run(run_load(soak, inputs))
        finally:
            monitor.stop()
        alive = server.proc.poll() is None
        time.sleep(REST_S)
        at_rest = server.rss_mb() if alive else float("nan")

    r = report.results
    # Medians over one window at each end (see the module docstring), and the single samples for reference.
    after_warmup = monitor.rss_median(warmup_s, warmup_s + window_s)
    end = monitor.rss_median(duration_s - window_s, duration_s)
    growth = (end - after_warmup) / after_warmup
    point_start, point_end = monitor.rss_at(warmup_s), monitor.rss_at(duration_s)
    checks = {"errors_zero": r["error_count"] == 0, "rss_growth_under_10pct": growth < MAX_RSS_GROWTH,
              "server_alive": alive}  # fmt: skip
    rows = windows(report, monitor, window_s)
    result = {
        "machine": machine(),
        "settings": {"minutes": minutes, "load": args.load, "capacity_req_per_s": capacity, "rate_req_per_s": rate,
                     "capacity_measurement": "closed loop, 16 callers, one-item unary Classify",
                     "window_s": window_s, "warmup_s": warmup_s, "repository": str(repo),
                     "fill_s": fill_s, "fill_callers": args.fill_callers,
                     "server": "fusionserve serve, default settings", "smoke": args.smoke},
        "results": {"requests": r["requests"], "ok": r["ok"], "errors": r["errors"], "error_count": r["error_count"],
                    "requests_per_s": r["requests_per_s"], "latency_ms": r["latency_ms"],
                    "send_lag_ms": r["send_lag_ms"]},
        "memory": {"rss_after_warmup_mb": after_warmup, "rss_end_mb": end, "growth": growth,
                   "measured_as": f"median of the per-second samples over {window_s:g} s at each end",
                   "rss_at_warmup_end_sample_mb": point_start, "rss_at_end_sample_mb": point_end,
                   "rss_max_mb": max(s[1] for s in monitor.samples), f"rss_{REST_S:g}s_after_load_mb": at_rest},
        "monitor": {"columns": ["t_s", "rss_mb", "server_cpu_s", "loadgen_cpu_s", "machine_busy_s"],
                    "samples": monitor.samples},
        "neighbours": monitor.neighbours,
        "windows": rows,
        "checks": checks,
        "load_average_at_end": os.getloadavg(),  # the machine() figures are from the start
    }  # fmt: skip

    print(f"{'t (s)':>7}{'req/s':>8}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'RSS MiB':>9}"
          f"{'server':>8}{'loadgen':>8}{'other':>7}  (CPU: cores)")  # fmt: skip
    for row in rows:
        print(f"{row['t_s']:>7.1f}{row['req_per_s']:>8.0f}{row['errors']:>8}{row.get('p50_ms', float('nan')):>9.2f}"
              f"{row.get('p99_ms', float('nan')):>9.2f}{row['rss_mb']:>9.1f}{row['server_cores']:>8.2f}"
              f"{row['loadgen_cores']:>8.2f}{row['other_cores']:>7.2f}")  # fmt: skip
    lat = r["latency_ms"]
    by_code = f" {r['errors']}" if r["errors"] else ""
    print(f"\n{r['requests']} requests at {rate:.0f} req/s offered ({args.load:.0%} of {capacity:.0f}): "
          f"{r['error_count']} errors{by_code}; p50 {lat.get('p50', float('nan')):.2f} ms, "
          f"p99 {lat.get('p99', float('nan')):.2f} ms")  # fmt: skip
    print(f"RSS (median of {window_s:g} s) after the warm-up ({warmup_s:g} s) {after_warmup:.1f} MiB, "
          f"at the end {end:.1f} MiB: {growth:+.1%} (limit {MAX_RSS_GROWTH:.0%}); single samples at those "
          f"instants {point_start:.1f} → {point_end:.1f} MiB, max {result['memory']['rss_max_mb']:.1f} MiB, "
          f"{at_rest:.1f} MiB {REST_S:g} s after the load stopped")  # fmt: skip
    for n in monitor.neighbours:
        top = ", ".join(f"{cmd} {cores:.2f}" for cmd, cores in n["top"]) or "no process named"
        print(f"  neighbours at {n['t_s']:.0f} s: {n['other_cores']:.2f} cores ({top})")
    failed = [name for name, passed in checks.items() if not passed]
    print("checks:", "all passed" if not failed else "FAILED " + ", ".join(failed))
    print("wrote", write(result_name("soak", smoke=args.smoke), result))
    return 1 if failed and not args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())
