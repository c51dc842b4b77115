"""The load test's PNG: latency over time, throughput per second, latency histogram (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fusionserve.client.loadgen.report import LoadReport


def plot(report: LoadReport, path: str | Path) -> None:
    """Write the PNG for ``report`` to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: only --plot needs it
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    t, latency_ms, ok = report.samples["t_s"], report.samples["latency_s"] * 1e3, report.samples["ok"]
    fig = Figure(figsize=(11, 9), layout="constrained")
    FigureCanvasAgg(fig)
    ax_time, ax_rate, ax_hist = fig.subplots(3, 1, height_ratios=[3, 1, 2])
    s = report.settings
    fig.suptitle(
        f"fusionserve loadtest — {s.api} {s.mode}, "
        + (f"open loop {s.rate:g} req/s" if s.open_loop else f"closed loop c={s.concurrency}")
        + f", batch {s.batch_size}"
    )
    step = max(1, len(t) // 50_000)  # keep the scatter readable and the file small
    ax_time.scatter(t[ok][::step], latency_ms[ok][::step], s=2, alpha=0.3, label="request")
    if np.any(~ok):
        ax_time.scatter(t[~ok], latency_ms[~ok], s=8, marker="x", color="red", label="error")
    rows = [row for row in report.timeline if "p50_ms" in row]
    if rows:
        starts = np.array([row["t_s"] for row in rows], float)
        for key, colour in (("p50_ms", "black"), ("p99_ms", "orange")):
            ax_time.hlines([row[key] for row in rows], starts, starts + 1, colors=colour,
                           label=f"{key[:-3]} per second")  # fmt: skip
    if len(t) and np.any(latency_ms > 0):
        ax_time.set_yscale("log")
        ax_time.yaxis.set_major_formatter(ScalarFormatter())
    ax_time.set_xlabel("intended send time (s from the start of the measurement)")
    ax_time.set_ylabel("latency (ms)")
    ax_time.legend(loc="upper right", fontsize="small")
    ax_rate.bar([row["t_s"] + 0.5 for row in report.timeline], [row["requests"] for row in report.timeline], width=0.9)
    ax_rate.set_ylabel("requests per second")
    ax_rate.set_xlabel("s")
    good = latency_ms[ok]
    if len(good):
        low, high = max(float(good.min()), 1e-3), max(float(good.max()), 2e-3)
        bins = np.geomspace(low, high * 1.0001, 60) if high > low else 10
        ax_hist.hist(good, bins=bins)
        ax_hist.set_xscale("log")
        ax_hist.xaxis.set_major_formatter(ScalarFormatter())
        for p, colour in zip(("p50", "p99", "p99.9"), ("black", "orange", "red"), strict=True):
            value = report.results["latency_ms"][p]
            ax_hist.axvline(value, color=colour, linestyle="--", label=f"{p} {value:.2f} ms")
        ax_hist.legend(fontsize="small")
    ax_hist.set_xlabel("latency (ms)")
    ax_hist.set_ylabel("requests")
    fig.savefig(path, dpi=100)
