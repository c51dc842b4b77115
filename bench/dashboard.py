"""The Grafana dashboard, filled by a real run: its panels drawn from a real Prometheus's answers.

Grafana cannot be installed here, so this draws the same panels: a real Prometheus (Debian's
``prometheus``) scrapes ``fusionserve serve --workers 2`` every second, with the alerting rules
loaded, while the load changes through phases (light, heavy with a V2 stream beside, a rollout of
version 2 exported while serving, an overload of 16-item calls on items the embedding cache has not
seen, which the overload control's queue-delay rule, at 50 ms, refuses in part, light again) and a
trickle of bad requests runs beside. Then every panel query of
``deploy/monitoring/fusionserve-dashboard.json`` is asked over the whole run (``query_range``) and
drawn where the dashboard puts it. The picture in docs/OBSERVABILITY.md is this script's output.

    python bench/dashboard.py [--phase-s 40] [--smoke]      # writes bench/results/dashboard.png and .json
    python bench/dashboard.py --redraw                      # the picture again, from the .json's answers
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    ServerProcess,
    export_next_version,
    load,
    machine,
    pyplot,
    repository,
    result_name,
    samples,
    trained_models,
    write,
)

from fusionserve.client import FusionClient, FusionClientError
from fusionserve.server.prometheus_process import PrometheusError, PrometheusProcess, dashboard_queries

MONITORING = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
DASHBOARD = MONITORING / "fusionserve-dashboard.json"
RULES = MONITORING / "fusionserve.rules.yml"
RATE_WINDOW = "10s"
SHADES = {"rollout of v2": "#dde8f6", "overload (16-item calls)": "#f8dcdc"}
SHADE_NAMES = {"#dde8f6": "in blue", "#f8dcdc": "in red"}
CACHE_MB = 0.5
"""About 1,000 embeddings: the 256 repeated items fit, the overload's 2,048 fresh ones do not."""
UNITS = {"s": (1e3, "ms"), "bytes": (2**-20, "MiB"), "percentunit": (100, "%"), "reqps": (1, "/s")}


def bad_requests(target: str, stop: threading.Event) -> None:
    """An undecodable image every half second: INVALID_ARGUMENT for the status panel."""
    with FusionClient(target) as client:
        while not stop.wait(0.5):
            try:
                client.classify(b"not an image", "a red circle")
            except FusionClientError:
                pass


def drive(target: str, items: list, fresh: list, phase_s: float, trained: Path | None,
          repo: Path) -> list[tuple[str, float]]:  # fmt: skip
    """The phases of load, one after the other; returns (phase, start time) for the picture.

    ``items`` repeat (the cache answers them once seen); the overload sends ``fresh`` ones, more than
    the cache holds, so its calls are real work.
    """
    marks: list[tuple[str, float]] = []

    def phase(name: str, pairs: list | None = None, **settings: Any) -> None:
        marks.append((name, time.time()))
        load(target, pairs or items, duration_s=phase_s, warmup_s=0, connections=4, **settings)

    phase("light", concurrency=4)
    stream = threading.Thread(target=load, args=(target, items), kwargs={
        "duration_s": phase_s, "warmup_s": 0, "api": "v2", "mode": "stream", "concurrency": 8, "streams": 1})
    stream.start()
    phase("heavy + V2 stream", concurrency=24)
    stream.join()
    if trained is not None:
        exporter = threading.Thread(target=export_next_version, args=(trained, repo))
        exporter.start()
        phase("rollout of v2", concurrency=8)
        exporter.join()
    phase("overload (16-item calls)", fresh, concurrency=64, batch_size=16)
    phase("light", concurrency=4)
    marks.append(("end", time.time()))
    return marks


def legend(template: str, labels: dict[str, str]) -> str:
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def draw(panels: list[dict], series: dict[str, list[tuple[str, list]]], marks: list[tuple[str, float]],
         name: str) -> Path | None:  # fmt: skip
    """Each panel where the dashboard puts it (24 columns), its series over the run, the phases shaded."""
    plt = pyplot()
    if plt is None:
        return None
    start, span = marks[0][1], marks[-1][1] - marks[0][1]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(18, rows * 0.3))
    grid = fig.add_gridspec(rows, 24, hspace=0.0, wspace=0.0, top=0.97, bottom=0.01, left=0.01, right=0.99)
    for panel in panels:
        g = panel["gridPos"]
        if panel["type"] == "row":
            ax = fig.add_subplot(grid[g["y"], :])
            ax.axis("off")
            ax.text(0, 0.2, panel["title"], fontsize=11, fontweight="bold")
            continue
        # A grid unit above for the title, one below for the ticks, one at the left for the labels.
        ax = fig.add_subplot(grid[g["y"] + 1 : g["y"] + g["h"] - 1, g["x"] + 1 : g["x"] + g["w"]])
        scale, unit = UNITS.get(panel["fieldConfig"]["defaults"]["unit"], (1, ""))
        for label, values in series.get(panel["title"], []):
            ts = [float(t) - start for t, _ in values]
            ax.plot(ts, [float(v) * scale for _, v in values], linewidth=0.9, label=label)
        for (phase, t0), (_, t1) in zip(marks, marks[1:], strict=False):
            if phase in SHADES:
                ax.axvspan(t0 - start, t1 - start, color=SHADES[phase], zorder=0)
        ax.set_xlim(0, span)
        ax.set_title(panel["title"] + (f" ({unit})" if unit else ""), fontsize=8, loc="left")
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if series.get(panel["title"]):
            ax.legend(fontsize=5, loc="upper left", ncol=2, frameon=False)
    shaded = ", ".join(f"{p} {SHADE_NAMES[SHADES[p]]}" for p, _ in marks if p in SHADES)
    fig.suptitle(f"fusionserve: the dashboard's panels over a real run (x: seconds; {shaded})", fontsize=10)
    path = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72, bbox_inches="tight")
    from PIL import Image  # matplotlib's own dependency

    with Image.open(path) as image:  # a 128-colour palette: a third of the bytes, the same picture
        quantized = image.convert("RGB").quantize(colors=128)
    quantized.save(path, optimize=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=40.0, help="seconds of each load phase")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no rollout, no claims)")
    parser.add_argument("--redraw", action="store_true", help="draw the last run's saved answers again, no new run")
    args = parser.parse_args()
    if args.redraw:
        name = result_name("dashboard", smoke=args.smoke)
        answers = json.loads((RESULTS / f"{name}.json").read_text())["answers"]
        print("wrote", draw(json.loads(DASHBOARD.read_text())["panels"], answers["series"], answers["marks"], name))
        return
    phase_s = 4.0 if args.smoke else args.phase_s
    if shutil.which("prometheus") is None:
        raise SystemExit("bench/dashboard.py needs a Prometheus server: apt-get install prometheus")
    repo = RESULTS / f"dashboard-repo{'-smoke' if args.smoke else ''}"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(repository(smoke=args.smoke), repo)
    trained = None if args.smoke else trained_models()
    items, fresh = samples(256), samples(256 if args.smoke else 2048, seed=7)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    # The overload control's queue-delay rule (opt-in) at 50 ms, so the overload phase shows refusals.
    env = {"FUSIONSERVE_EMBEDDING_CACHE_MB": str(CACHE_MB), "FUSIONSERVE_QUEUE_DELAY_TARGET_MS": "50"}
    with ServerProcess(repo, "--workers", "2", "--repository-poll-secs", "1", metrics_port=0, env=env) as server:
        assert server.metrics_url is not None
        target = server.metrics_url.removeprefix("http://").removesuffix("/metrics")
        with PrometheusProcess([target], rule_files=[RULES]) as prometheus:
            prometheus.wait_for_targets()
            stop = threading.Event()
            trickle = threading.Thread(target=bad_requests, args=(server.target, stop))
            trickle.start()
            try:
                marks = drive(server.target, items, fresh, phase_s, trained, repo)
            finally:
                stop.set()
                trickle.join()
            time.sleep(2)  # the last scrape
            start, end = marks[0][1], time.time()
            series: dict[str, list[tuple[str, list]]] = {}
            empty = []
            variables = {"job": ".*", "model": ".*", "__rate_interval": RATE_WINDOW}
            for title, template, expr in dashboard_queries(DASHBOARD, variables):
                try:
                    result = prometheus.query_range(expr, start, end, 2.0)
                except PrometheusError as e:
                    raise SystemExit(f"panel {title!r}: {e}") from e
                if not result:
                    empty.append(title)
                series.setdefault(title, []).extend((legend(template, r["metric"]), r["values"]) for r in result)
            alerts = [(a["labels"]["alertname"], a["state"]) for a in prometheus.api("alerts")["alerts"]]
    name = result_name("dashboard", smoke=args.smoke)
    picture = draw(panels, series, marks, name)
    summary = {"machine": machine(), "settings": {"phase_s": phase_s, "rate_window": RATE_WINDOW, "workers": 2},
               "phases": [(p, t - marks[0][1]) for p, t in marks], "panels_without_data": empty, "alerts": alerts,
               "series": {title: len(s) for title, s in series.items()},
               "answers": {"marks": marks, "series": series}}  # fmt: skip
    print("phases (s from the start):", ", ".join(f"{p} {t:.0f}" for p, t in summary["phases"]))
    print(f"{len(series)} panels drawn, {sum(summary['series'].values())} series; without data: {empty or 'none'}")
    print("alerts at the end:", alerts or "none")
    if picture is not None:
        print("wrote", picture)
    print("wrote", write(name, summary))


if __name__ == "__main__":
    main()
