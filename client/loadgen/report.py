"""The figures of one load test: throughput, latency percentiles, errors, a per-second timeline."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fusionserve.client.loadgen.loops import Recorder, nearest_rank
from fusionserve.client.loadgen.settings import LoadSettings

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
LATE_SEND_WARNING_MS = 5.0
"""Open loop: the summary notes a send lag p99 above this."""


def machine_info() -> dict[str, Any]:
    """Where the load generator ran."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from fusionserve import __version__

    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "grpcio": grpc.__version__,
        "fusionserve": __version__,
    }


def stats_ms(sorted_s: np.ndarray) -> dict[str, float]:
    """min, mean, stdev, the PERCENTILES and max of sorted seconds, in milliseconds."""
    if not len(sorted_s):
        return {}
    ms = sorted_s * 1e3
    out = {"min": float(ms[0]), "mean": float(ms.mean()), "stdev": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p:g}"] = nearest_rank(ms, p)
    out["max"] = float(ms[-1])
    return out


@dataclass
class LoadReport:
    """The figures of one run; ``to_json()`` is what ``--json`` writes."""

    settings: LoadSettings
    machine: dict[str, Any]
    started_at: str
    results: dict[str, Any]
    timeline: list[dict[str, Any]]
    samples: dict[str, np.ndarray] = field(repr=False)
    """Measured requests: ``t_s`` (intended, from the window start), ``latency_s``, ``ok``."""

    @classmethod
    def build(
        cls, s: LoadSettings, rec: Recorder, t0: float, measure_from: float, t_end: float, started_at: str
    ) -> LoadReport:
        """The figures from a recorder (times from ``clock()``)."""
        intended = np.frombuffer(rec.intended, np.float64)
        sent = np.frombuffer(rec.sent, np.float64)
        done = np.frombuffer(rec.done, np.float64)
        code = np.frombuffer(rec.code, np.uint16)
        names = {i: c for c, i in rec.codes.items()}
        measured = intended >= measure_from
        ok = code == 0
        latency = done - intended
        keep = measured & ok
        answered_in_window = int(np.count_nonzero(ok & (done >= measure_from) & (done < t_end)))
        errors: dict[str, int] = {}
        for index, count in zip(*np.unique(code[measured & ~ok], return_counts=True), strict=True):
            errors[names[int(index)]] = int(count)
        lat_sorted = np.sort(latency[keep])
        results: dict[str, Any] = {
            "requests": int(np.count_nonzero(measured)),
            "requests_with_warmup": len(intended),
            "ok": int(np.count_nonzero(keep)),
            "errors": errors,
            "error_count": sum(errors.values()),
            "duration_s": s.duration_s,
            "requests_per_s": answered_in_window / s.duration_s,
            "items_per_s": answered_in_window * s.batch_size / s.duration_s,
            "latency_ms": stats_ms(lat_sorted),
        }
        if s.open_loop:
            results["offered_rate"] = s.rate
            results["service_latency_ms"] = stats_ms(np.sort((done - sent)[keep]))
            lag = np.sort((sent - intended)[measured])
            results["send_lag_ms"] = {k: v for k, v in stats_ms(lag).items() if k in ("p50", "p99", "max")}
        results["histogram"] = histogram(lat_sorted)
        t = intended[measured] - measure_from
        timeline = []
        m_lat, m_ok = latency[measured], ok[measured]
        for second in range(math.ceil(s.duration_s)):
            sel = (t >= second) & (t < second + 1)
            good = np.sort(m_lat[sel & m_ok])
            row: dict[str, Any] = {
                "t_s": second,
                "requests": int(np.count_nonzero(sel)),
                "errors": int(np.count_nonzero(sel & ~m_ok)),
            }
            if len(good):
                row.update(p50_ms=nearest_rank(good, 50) * 1e3, p99_ms=nearest_rank(good, 99) * 1e3,
                           max_ms=float(good[-1]) * 1e3)  # fmt: skip
            timeline.append(row)
        samples = {"t_s": t, "latency_s": m_lat, "ok": m_ok}
        return cls(s, machine_info(), started_at, results, timeline, samples)

    def to_json(self) -> dict[str, Any]:
        """The JSON report: settings, machine, figures and a per-second timeline."""
        return {
            "report": "fusionserve-loadtest/1",
            "started_at": self.started_at,
            "settings": self.settings.to_json(),
            "machine": self.machine,
            "results": self.results,
            "timeline": self.timeline,
        }

    def summary(self) -> str:
        """A human summary, laid out like ghz's."""
        s, r = self.settings, self.results
        loop = f"open loop at {s.rate:g} req/s" if s.open_loop else f"closed loop, concurrency {s.concurrency}"
        lines = [
            "Summary:",
            f"  Target:       {', '.join(s.target)}",
            f"  Load:         {s.api} API, {s.mode}, {loop}, batch {s.batch_size}",
            f"  Count:        {r['requests']}",
            f"  Duration:     {s.duration_s:.2f} s (after {s.warmup_s:g} s warm-up)",
            f"  Requests/s:   {r['requests_per_s']:.1f}",
            f"  Items/s:      {r['items_per_s']:.1f}",
            f"  Errors:       {r['error_count']} ({100.0 * r['error_count'] / max(1, r['requests']):.2f}%)",
            "",
        ]
        lat = r["latency_ms"]
        if lat:
            origin = "intended send time" if s.open_loop else "send"
            keys = ["min", "mean", "p50", "p90", "p99", "p99.9", "max"]
            lines += [f"Latency (ms, from the {origin}):", "  " + "".join(f"{k:>10}" for k in keys),
                      "  " + "".join(f"{lat[k]:>10.2f}" for k in keys)]  # fmt: skip
            if s.open_loop:
                svc, lag = r["service_latency_ms"], r["send_lag_ms"]
                lines.append(f"  service time (from the actual send): p50 {svc['p50']:.2f}  p99 {svc['p99']:.2f}  "
                             f"max {svc['max']:.2f};  send lag p99 {lag['p99']:.2f}  max {lag['max']:.2f}")  # fmt: skip
                if lag["p99"] > LATE_SEND_WARNING_MS:
                    lines.append(
                        f"  note: 1% of requests were sent over {lag['p99']:.1f} ms late (--max-inflight was reached, "
                        "or the generator fell behind); that wait is in the latency"
                    )
            lines += ["", "Response time histogram (ms):"]
            hist = r["histogram"]
            top = max(b["count"] for b in hist) or 1
            for b in hist:
                lines.append(f"  {b['le_ms']:10.3f} [{b['count']:>7}] |{'#' * round(40 * b['count'] / top)}")
            lines += ["", "Latency distribution:"]
            lines += [f"  {p:>5g} % in {lat[f'p{p:g}']:.2f} ms" for p in PERCENTILES]
        lines += ["", "Status code distribution:", f"  [OK]   {r['ok']} responses"]
        lines += [f"  [{code}]   {count} responses" for code, count in sorted(r["errors"].items())]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_json` to a file."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    def plot(self, path: str | Path) -> None:
        """A PNG: latency over time (every request, per-second p50/p99), throughput, histogram."""
        from fusionserve.client.loadgen.plot import plot

        plot(self, path)


def histogram(sorted_s: np.ndarray, buckets: int = 10) -> list[dict[str, Any]]:
    """ghz-style: ``buckets`` equal-width buckets from the fastest to the slowest (upper edges, ms)."""
    if not len(sorted_s):
        return []
    ms = sorted_s * 1e3
    edges = np.linspace(ms[0], ms[-1], buckets + 1)
    counts = np.histogram(ms, bins=edges)[0] if ms[-1] > ms[0] else np.array([len(ms)] + [0] * (buckets - 1))
    return [{"le_ms": float(e), "count": int(c)} for e, c in zip(edges[1:], counts, strict=True)]
