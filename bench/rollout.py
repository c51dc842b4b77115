"""A rollout under load: latency through ``fusionserve export`` of a new version while serving.

A server (``--model-control-mode poll``) serves version 1 of the bench models under open-loop load
(typed unary, ``--rate`` requests/s, from the project's load generator). After ``--before`` seconds
the trained models are exported again, as version 2 (in a child process, as a user's ``fusionserve
export`` would run; TensorFlow's start takes most of its time). A watcher sends one call every 10 ms
and notes the version that answers, and when the new pipeline folder lands in the repository.
Printed: errors, p50/p99 before the export, during the rollout (from the folder landing until
version 1 is unloaded) and after it, and the time from the folder landing to the first answer from
version 2. Plot: latency over time.

    python bench/rollout.py [--rate 200] [--duration 30] [--before 8] [--poll 1] [--smoke]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import (
    RESULTS,
    ServerProcess,
    export_next_version,
    machine,
    pyplot,
    repository,
    result_name,
    samples,
    save_figure,
    trained_models,
    write,
)

from fusionserve.client.loadgen import LoadSettings, run
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc


def watch(target: str, items: list, folder: Path, stop: threading.Event, seen: list[tuple[float, int]],
          landed: list[float]) -> None:  # fmt: skip
    """One call every 10 ms: (time, version that answered); and the time ``folder`` appeared."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FusionServiceStub(channel)
        request = pb.ClassifyRequest(items=[pb.Item(image=items[0][0], text=items[0][1])])
        while not stop.is_set():
            if not landed and folder.is_dir():
                landed.append(time.perf_counter())
            try:
                seen.append((time.perf_counter(), stub.Classify(request, timeout=10).model_version))
            except grpc.RpcError:
                seen.append((time.perf_counter(), -1))
            time.sleep(0.01)


def window(t: np.ndarray, latency: np.ndarray, ok: np.ndarray, start: float, end: float) -> dict[str, Any]:
    """Percentiles of the OK requests intended in [start, end) (seconds from the load's start)."""
    sel = (t >= start) & (t < end) & ok
    values = np.sort(latency[sel]) * 1e3
    if not len(values):
        return {"requests": 0}
    return {"requests": int(len(values)), "p50_ms": float(np.percentile(values, 50)),
            "p99_ms": float(np.percentile(values, 99)), "max_ms": float(values[-1])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop requests per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--before", type=float, default=8.0, help="seconds of load before the export starts")
    parser.add_argument("--poll", type=float, default=1.0, help="--repository-poll-secs of the server")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    args = parser.parse_args()
    duration, rate, before = (14.0, 50.0, 2.0) if args.smoke else (args.duration, args.rate, args.before)
    trained = trained_models(smoke=args.smoke)
    repo = RESULTS / f"rollout-repo{'-smoke' if args.smoke else ''}"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(repository(smoke=args.smoke), repo)
    items = samples(64)
    new_folder = repo / "multimodal" / str(max(int(p.name) for p in (repo / "multimodal").iterdir()) + 1)
    with ServerProcess(repo, "--repository-poll-secs", str(args.poll), metrics_port=0) as server:
        stop, seen, landed, reports = threading.Event(), [], [], {}
        watcher = threading.Thread(target=watch, args=(server.target, items, new_folder, stop, seen, landed))
        settings = LoadSettings([server.target], rate=rate, duration_s=duration, warmup_s=0, progress=False)
        load = threading.Thread(target=lambda: reports.setdefault("load", run(settings, items)))
        started = time.perf_counter()
        watcher.start()
        load.start()
        time.sleep(before)
        export_started = time.perf_counter()
        version = export_next_version(trained, repo)
        exported = time.perf_counter()
        first_new = None
        while first_new is None and time.perf_counter() < exported + 60:
            first_new = next((t for t, v in list(seen) if v == version), None)
            time.sleep(0.05)
        while server.metric('fusionserve_model_unloads_total{model="multimodal"}') < 1 and (
                time.perf_counter() < exported + 60):  # fmt: skip
            time.sleep(0.05)
        unloaded = time.perf_counter()
        load.join()
        stop.set()
        watcher.join()
        rss_mb = server.rss_mb()
    report = reports["load"]
    t, latency, ok = report.samples["t_s"], report.samples["latency_s"], report.samples["ok"]
    marks = {"export_started_s": export_started - started, "exported_s": exported - started,
             "new_version_landed_s": (landed[0] - started) if landed else None,
             "first_answer_from_new_version_s": (first_new - started) if first_new else None,
             "old_version_unloaded_s": unloaded - started}  # fmt: skip
    rollout_start = marks["new_version_landed_s"] or marks["exported_s"]
    windows = {
        "before": window(t, latency, ok, 0, marks["export_started_s"]),
        "during": window(t, latency, ok, rollout_start, marks["old_version_unloaded_s"]),
        "after": window(t, latency, ok, marks["old_version_unloaded_s"], duration),
    }
    results = {"machine": machine(), "settings": {"rate": rate, "duration_s": duration, "before_s": before,
               "poll_s": args.poll, "new_version": version}, "marks": marks, "windows": windows,
               "load": report.results, "watch_errors": sum(v == -1 for _, v in seen),
               "server_rss_mb": rss_mb}  # fmt: skip
    print(f"open loop {rate:g} req/s for {duration:g} s; the export of version {version} took "
          f"{marks['exported_s'] - marks['export_started_s']:.1f} s (mostly TensorFlow starting)")  # fmt: skip
    errors, requests = report.results["error_count"], report.results["requests"]
    print(f"errors: {errors} of {requests} (watcher: {results['watch_errors']})")
    if first_new and landed:
        delay = marks["first_answer_from_new_version_s"] - marks["new_version_landed_s"]
        print(f"first answer from version {version}: {delay:.2f} s after its folder landed (poll every "
              f"{args.poll:g} s); version 1 unloaded {marks['old_version_unloaded_s'] - rollout_start:.2f} s after")
    for name, w in windows.items():
        if w["requests"]:
            print(f"  {name:<7} {w['requests']:>6} requests  p50 {w['p50_ms']:7.2f} ms  p99 {w['p99_ms']:7.2f} ms  "
                  f"max {w['max_ms']:7.2f} ms")  # fmt: skip
    name = result_name("rollout", smoke=args.smoke)
    plot(t, latency, ok, marks, name)
    print("wrote", write(name, results))


def plot(t: np.ndarray, latency: np.ndarray, ok: np.ndarray, marks: dict[str, Any], name: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter(t[ok], latency[ok] * 1e3, s=3, alpha=0.4, label="request")
    if np.any(~ok):
        ax.scatter(t[~ok], latency[~ok] * 1e3, s=12, marker="x", color="red", label="error")
    for key, colour in (("new_version_landed_s", "black"), ("first_answer_from_new_version_s", "green"),
                        ("old_version_unloaded_s", "orange")):  # fmt: skip
        if marks.get(key) is not None:
            ax.axvline(marks[key], color=colour, linestyle="--", label=key.removesuffix("_s").replace("_", " "))
    ax.set(yscale="log", xlabel="intended send time (s)", ylabel="latency (ms)", title="Rollout under open-loop load")
    ax.legend(fontsize="small")
    print("wrote", save_figure(fig, name))
    plt.close(fig)


if __name__ == "__main__":
    main()
