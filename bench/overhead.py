"""Serving overhead, dynamic batching, and what tracing and the access log cost, measured side by side in one run.

Compares the raw in-process ``multimodal`` pipeline (same preprocessing and onnxruntime sessions, no
gRPC, no batcher) with the server: typed and V2 APIs, unary and stream, at concurrency 1 and under
load, and dynamic batching on vs off with 32 one-item callers. The calls come from the project's
load generator (``fusionserve.client.loadgen``, as ``fusionserve loadtest``), after a 0.5 s warm-up.

Observability: servers with tracing and the access log off, tracing every call (spans to an OTLP
receiver in this process), tracing 1% of the calls, the access log of every call (to a file), and
off again (the run-to-run noise), each at 1 and 32 one-item callers; plus what the hooks cost when
both are off, timed directly (``--observability-only`` runs just this part).

    python bench/overhead.py [--repository REPO] [--duration 5] [--smoke] [--device cpu|cuda] [--io-binding false]
                             [--observability-only]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    RESULTS,
    OrtModel,
    ServerProcess,
    load,
    machine,
    percentiles,
    repository,
    result_name,
    samples,
    write,
)

from fusionserve.preprocess import Vocabulary, decode_image, preprocess_image
from fusionserve.repository import load_config, version_dir


class RawPipeline:
    """The multimodal pipeline with no server: what the server's overhead is measured against."""

    def __init__(self, repo: Path, *, device: str = "cpu", io_binding: bool = True) -> None:
        pipeline = load_config(repo, "multimodal", max(int(p.name) for p in (repo / "multimodal").iterdir()))
        self.sessions = {}
        for step, version in pipeline.steps.items():
            config = load_config(repo, step, version)
            path = version_dir(repo, step, version) / str(config.model_file)
            # One intra-op thread, no spinning: the server's defaults; see docs/BENCHMARKS.md.
            self.sessions[step] = OrtModel(path, device=device, threads=1, io_binding=io_binding)
        self.vocab = Vocabulary.load(version_dir(repo, "multimodal", pipeline.version) / "vocab.json")
        image_input = self.sessions["image_encoder"].session.get_inputs()[0].shape
        self.size = (int(image_input[1]), int(image_input[2]))

    def run(self, items: list[tuple[bytes, str]]) -> np.ndarray:
        """Encoded (image, text) items → probabilities, as the server computes them."""
        images = np.stack([preprocess_image(decode_image(img), *self.size) for img, _ in items])
        tokens = self.vocab.encode([t for _, t in items])
        fi = self.sessions["image_encoder"].run({"image": images})[0]
        ft = self.sessions["text_encoder"].run({"tokens": tokens})[0]
        return self.sessions["fusion"].run({"image_features": fi, "text_features": ft})[0]


def bench_raw(raw: RawPipeline, items: list, batch: int, duration_s: float, gap_s: float = 0.0) -> dict[str, Any]:
    """Calls back to back, or with ``gap_s`` of idle time before each (not counted in the latency).

    A lone caller's requests reach an idle server: between two of them the CPU served the network
    round trip or slept, and the models' weights left the caches. The gap measures that cost.
    """
    latencies, n_items, i = [], 0, 0
    end = time.perf_counter() + duration_s
    started = time.perf_counter()
    while time.perf_counter() < end:
        chunk = [items[(i + k) % len(items)] for k in range(batch)]
        if gap_s:
            time.sleep(gap_s)
        t = time.perf_counter()
        raw.run(chunk)
        latencies.append(time.perf_counter() - t)
        n_items += batch
        i += batch
    elapsed = time.perf_counter() - started
    return {"items_per_s": n_items / elapsed, "requests_per_s": len(latencies) / elapsed, **percentiles(latencies)}


SERVER_LATENCY = 'fusionserve_request_latency_seconds_{}{{api="typed",model="multimodal"}}'


def server_side(server: ServerProcess, since: dict[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """The server's own metrics: (sum s, count) of request latency and of each model's queue and compute time.

    With ``since`` (an earlier reading): the mean of each, in ms, over the calls in between.
    """
    now = {"request": (server.metric(SERVER_LATENCY.format("sum")), server.metric(SERVER_LATENCY.format("count")))}
    for kind in ("queue", "compute"):
        for model, value in server.histogram(f"fusionserve_{kind}_time_seconds").items():
            now[f"{model} {kind}"] = value
    if since is None:
        return now
    return {k: (v[0] - since.get(k, (0.0, 0.0))[0]) / n * 1e3 for k, v in now.items()
            if (n := v[1] - since.get(k, (0.0, 0.0))[1]) > 0}  # fmt: skip


OBSERVED = {  # run name → the server's environment
    "off": {},
    "tracing_all": {"FUSIONSERVE_TRACE_ENDPOINT": "{endpoint}"},
    "tracing_1pct": {"FUSIONSERVE_TRACE_ENDPOINT": "{endpoint}", "OTEL_TRACES_SAMPLER": "traceidratio",
                     "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "access_log_all": {"FUSIONSERVE_ACCESS_LOG": "all", "FUSIONSERVE_ACCESS_LOG_FILE": "{log}"},
    "off_again": {},
}  # fmt: skip
HOOKS_PER_CALL = 12
"""Hook checks one one-item ``Classify`` makes when tracing and the access log are off (server/calls.py's
``current()`` or a ``call is not None``): 1 in tracking, 1 at admission, 2 in the encoders, 2 in the cache,
3 batcher submits and 3 batch results."""


def hook_cost_ns() -> float:
    """Nanoseconds one off-path hook takes: a context-variable read and an ``if`` (the best of 5 timings)."""
    import timeit

    from fusionserve.server.calls import current

    loops = 1_000_000
    statement = "if (call := current()) is not None: pass"
    best = min(timeit.repeat(statement, globals={"current": current}, number=loops, repeat=5))
    empty = min(timeit.repeat("pass", number=loops, repeat=5))
    return (best - empty) / loops * 1e9


def bench_observability(repo: Path, items: list, duration: float, server_args: tuple[str, ...],
                        server_env: dict[str, str], smoke: bool) -> dict[str, Any]:  # fmt: skip
    """Each OBSERVED server at 1 and 32 callers; ratios to ``off``, and the off-path hooks' share of a call's CPU."""
    from fusionserve.server.otlp_receiver import SpanReceiver

    names = ["off", "tracing_all", "access_log_all"] if smoke else list(OBSERVED)
    log = RESULTS / "overhead-access.log"
    runs: dict[str, Any] = {}
    with SpanReceiver(keep=0) as receiver:
        for name in names:
            env = {k: v.format(endpoint=receiver.endpoint, log=log) for k, v in OBSERVED[name].items()}
            with ServerProcess(repo, *server_args, env={**server_env, **env}) as server:
                cpu = server.cpu_seconds()
                c1 = load(server.target, items, duration_s=duration, concurrency=1)
                c32 = load(server.target, items, duration_s=duration, concurrency=32)
                calls = (c1["requests_per_s"] + c32["requests_per_s"]) * duration
                cpu_ms = (server.cpu_seconds() - cpu) / calls * 1e3
                runs[name] = {"c1": c1, "c32": c32, "server_cpu_ms_per_call": cpu_ms}
        spans = receiver.received
    log.unlink(missing_ok=True)
    off = runs["off"]
    ratios = {f"{name}_vs_off": {"c1_p50": r["c1"]["p50_ms"] / off["c1"]["p50_ms"],
                                 "c32_throughput": r["c32"]["items_per_s"] / off["c32"]["items_per_s"],
                                 "cpu_per_call": r["server_cpu_ms_per_call"] / off["server_cpu_ms_per_call"]}
              for name, r in runs.items() if name != "off"}  # fmt: skip
    hook_ns = hook_cost_ns()
    off_hooks = {"ns_per_hook": hook_ns, "hooks_per_call": HOOKS_PER_CALL,
                 "share_of_server_cpu_per_call": HOOKS_PER_CALL * hook_ns / (off["server_cpu_ms_per_call"] * 1e6)}
    return {"runs": runs, "ratios": ratios, "off_path_hooks": off_hooks, "spans_received": spans}


def print_observability(o: dict[str, Any]) -> None:
    print(f"\n{'observability':<18}{'c1 p50 ms':>10}{'c32 items/s':>12}{'CPU ms/call':>12}"
          f"{'p50 ×off':>10}{'items/s ×off':>13}{'CPU ×off':>10}")  # fmt: skip
    for name, r in o["runs"].items():
        ratio = o["ratios"].get(f"{name}_vs_off", {"c1_p50": 1.0, "c32_throughput": 1.0, "cpu_per_call": 1.0})
        print(f"{name:<18}{r['c1']['p50_ms']:>10.2f}{r['c32']['items_per_s']:>12.0f}{r['server_cpu_ms_per_call']:>12.3f}"
              f"{ratio['c1_p50']:>10.2f}{ratio['c32_throughput']:>13.2f}{ratio['cpu_per_call']:>10.2f}")  # fmt: skip
    h = o["off_path_hooks"]
    print(f"off-path hooks: {h['ns_per_hook']:.0f} ns each × {h['hooks_per_call']} per call = "
          f"{h['share_of_server_cpu_per_call'] * 100:.3f}% of the server's CPU per call; "
          f"{o['spans_received']} spans received")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--batch", type=int, default=32, help="items per request for throughput runs")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="raw sessions and server")
    parser.add_argument("--io-binding", choices=["true", "false"], default="true", help="on CUDA (server setting)")
    parser.add_argument("--observability-only", action="store_true", help="only the tracing and access log runs")
    args = parser.parse_args()
    duration = 0.5 if args.smoke else args.duration
    io_binding = args.io_binding == "true"
    repo = repository(args.repository, smoke=args.smoke)
    items = samples(512)
    raw = RawPipeline(repo, device=args.device, io_binding=io_binding)
    raw.run(items[:4])
    raw.run(items[: args.batch])  # on CUDA a new shape may pay a cuDNN algorithm search once
    b = args.batch
    server_args = ("--device", args.device)
    server_env = {"FUSIONSERVE_IO_BINDING": args.io_binding}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {"duration_s": duration, "batch": args.batch, "device": args.device, "io_binding": io_binding,
                     "repository": str(repo), "server_args": server_args, "server_env": server_env,
                     "provider_options": raw.sessions["image_encoder"].provider_options()},
    }  # fmt: skip
    if args.observability_only:
        results["observability"] = o = bench_observability(repo, items, duration, server_args, server_env, args.smoke)
        print_observability(o)
        print("wrote", write(result_name("overhead-observability", smoke=args.smoke, device=args.device), results))
        return
    r = results["runs"] = {}
    r["raw_c1_b1"] = bench_raw(raw, items, 1, duration)
    r["raw_c1_b1_idle_1ms_before_each"] = bench_raw(raw, items, 1, duration, gap_s=0.001)
    r[f"raw_b{args.batch}"] = bench_raw(raw, items, args.batch, duration)
    with ServerProcess(repo, *server_args, env=server_env, metrics_port=0) as server:
        results["server_rss_mb"] = server.rss_mb()
        before = server_side(server)
        t = server.target
        r["typed_unary_c1_b1"] = load(t, items, duration_s=duration, concurrency=1)
        results["lone_call_server_side_ms"] = lone = server_side(server, since=before)
        for api in ("typed", "v2"):
            if api == "v2":
                r["v2_unary_c1_b1"] = load(t, items, duration_s=duration, api=api, concurrency=1)
            r[f"{api}_unary_c4_b{b}"] = load(t, items, duration_s=duration, api=api, concurrency=4, batch_size=b)
            r[f"{api}_stream_w4_b{b}"] = load(t, items, duration_s=duration, api=api, mode="stream", concurrency=4,
                                              streams=1, batch_size=b)  # fmt: skip
        r["typed_unary_c32_b1_batching_on"] = load(t, items, duration_s=duration, concurrency=32)
        results["server_rss_mb_after_load"] = server.rss_mb()
    with ServerProcess(repo, *server_args, "--max-batch-size", "1", env=server_env) as server:
        r["typed_unary_c32_b1_batching_off"] = load(server.target, items, duration_s=duration, concurrency=32)
    raw_tp = r[f"raw_b{args.batch}"]["items_per_s"]
    ratios = results["ratios"] = {
        "stream_vs_raw_throughput": r[f"typed_stream_w4_b{args.batch}"]["items_per_s"] / raw_tp,
        "unary_c4_vs_raw_throughput": r[f"typed_unary_c4_b{args.batch}"]["items_per_s"] / raw_tp,
        "v2_stream_vs_raw_throughput": r[f"v2_stream_w4_b{args.batch}"]["items_per_s"] / raw_tp,
        "v2_unary_c4_vs_raw_throughput": r[f"v2_unary_c4_b{args.batch}"]["items_per_s"] / raw_tp,
        "unary_c1_p50_added_ms": r["typed_unary_c1_b1"]["p50_ms"] - r["raw_c1_b1"]["p50_ms"],
        "v2_unary_c1_p50_added_ms": r["v2_unary_c1_b1"]["p50_ms"] - r["raw_c1_b1"]["p50_ms"],
        # The same, against raw calls that also start from an idle CPU (as a lone caller's do).
        "unary_c1_p50_added_ms_vs_idle_raw": r["typed_unary_c1_b1"]["p50_ms"]
        - r["raw_c1_b1_idle_1ms_before_each"]["p50_ms"],
        "batching_on_vs_off_c32": r["typed_unary_c32_b1_batching_on"]["items_per_s"]
        / r["typed_unary_c32_b1_batching_off"]["items_per_s"],
    }
    print(f"{'run':<34}{'items/s':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, v in r.items():
        print(f"{name:<34}{v['items_per_s']:>10.0f}{v['requests_per_s']:>10.0f}{v['p50_ms']:>9.2f}"
              f"{v['p99_ms']:>9.2f}{v.get('errors', 0):>8}")  # fmt: skip
    print()
    for name, v in ratios.items():
        print(f"{name:<34}{v:>10.2f}")
    print(f"{'server RSS after load (MB)':<34}{results['server_rss_mb_after_load']:>10.0f}")
    print("typed unary, concurrency 1, as the server's own metrics saw it (mean ms): "
          + ", ".join(f"{k} {v:.3f}" for k, v in lone.items()))  # fmt: skip
    results["observability"] = o = bench_observability(repo, items, duration, server_args, server_env, args.smoke)
    print_observability(o)
    tags = ["no-iobinding"] if args.device == "cuda" and not io_binding else []
    print("wrote", write(result_name("overhead", smoke=args.smoke, device=args.device, tags=tags), results))


if __name__ == "__main__":
    main()
