"""Serving overhead, dynamic batching, and what tracing and the access log cost, measured side by side in one run.

Compares the raw in-process ``multimodal`` pipeline (same preprocessing and onnxruntime sessions, no
gRPC, no batcher) with the server: typed and V2 APIs, unary and stream, at concurrency 1 and under
load, and dynamic batching on vs off with 32 one-item callers. The calls come from the project's
load generator (``fusionserve.client.loadgen``, as ``fusionserve loadtest``), after a 0.5 s warm-up.

Observability: servers with tracing and the access log off, tracing every call (spans to an OTLP
receiver in this process), tracing 1% of the calls, the access log of every call (to a file), and
off again (the run-to-run noise): the p50 of a lone caller, the server's CPU per call under an open
loop of 300 one-item calls/s, the throughput of 32 one-item callers; plus what the hooks cost when
both are off, timed directly (``--observability-only`` runs just this part).

    python bench/overhead.py [--repository REPO] [--duration 5] [--smoke] [--device cpu|cuda] [--io-binding false]
                             [--observability-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
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
from fusionserve.repository import load_config, variable_length, version_dir


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
        # A text encoder that takes each batch cut to its longest caption is fed so, as the server feeds it.
        self.cut_text = variable_length(load_config(repo, "text_encoder", pipeline.steps["text_encoder"])) is not None
        image_input = self.sessions["image_encoder"].session.get_inputs()[0].shape
        self.size = (int(image_input[1]), int(image_input[2]))

    def run(self, items: list[tuple[bytes, str]]) -> np.ndarray:
        """Encoded (image, text) items → probabilities, as the server computes them."""
        images = np.stack([preprocess_image(decode_image(img), *self.size) for img, _ in items])
        tokens = self.vocab.encode([t for _, t in items])
        tokens = self.vocab.cut(tokens) if self.cut_text else tokens
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


SERVER_LATENCY = 'fusionserve_request_latency_seconds_{}{{api="typed",model="multimodal",version="1"}}'


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
ROUNDS = 5
RATE = 300.0
"""Calls per second of the open loop the server's CPU per call is measured under (well below capacity)."""
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


class _Context:
    """What the observer reads of a gRPC call's context (a caller with a traceparent, over IPv4)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-python/1.85"), ("traceparent", f"00-{'4b' * 16}-{'0f' * 8}-01"))

    def peer(self) -> str:
        return "ipv4:10.0.0.5:43210"

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Environment variables set for a while (OpenTelemetry reads its own when its objects are made)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def direct_costs(calls: int = 3000) -> dict[str, float]:
    """Microseconds of work per one-item call that tracing and the access log add, each timed on its own thread.

    The event loop's side (opening and closing a call's record, its hooks, recording its 12 spans) and
    the side threads' (formatting and writing a log line; encoding the spans for OTLP), for the calls
    a server makes: the real classes, a stand-in for gRPC's call context.
    """
    import tempfile

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from fusionserve.server.access_log import AccessLog, _line
    from fusionserve.server.calls import current
    from fusionserve.server.observe import Observer
    from fusionserve.server.tracing import Tracing

    def loop_side(observer: Observer) -> float:
        """One one-item Classify's worth of work on the loop: the interceptor, the call's record and its hooks."""
        context, method = _Context(), "/fusionserve.v1.FusionService/Classify"

        async def classify(request: object, _: object) -> None:
            call = current()
            assert call is not None
            call.admitted("multimodal", 1, 1)
            for step in ("cache image_encoder", "decode", "tokenise", "cache text_encoder"):
                call.step(step, time.perf_counter())
            t = time.perf_counter()
            for _ in range(3):
                call.queue_s += 0.0001  # what batched() does for an untraced call
                if call.trace is not None:
                    call.trace.span("queue fusion", t, t, {})
                    call.trace.span("batch fusion", t, t, {"fusionserve.batch.size": 1})
            call.finished("multimodal", "OK")

        async def calls_through_the_interceptor() -> float:
            interceptor, handler = observer.interceptor(), grpc.unary_unary_rpc_method_handler(classify)
            details = types.SimpleNamespace(method=method, invocation_metadata=context.invocation_metadata())

            async def continuation(_: object) -> grpc.RpcMethodHandler:
                return handler

            started = time.thread_time()
            for _ in range(calls):
                wrapped = await interceptor.intercept_service(continuation, details)
                await wrapped.unary_unary(None, context)
            return (time.thread_time() - started) / calls * 1e6

        return asyncio.run(calls_through_the_interceptor())

    with tempfile.TemporaryDirectory() as folder:
        log = AccessLog(1.0, Path(folder) / "access.log")
        log_loop_us = loop_side(Observer(None, log))
        log.close()
        values = (time.time(), "/fusionserve.v1.FusionService/Classify", "multimodal", 1, 1, "OK", 1.2, 0.1,
                  "ipv4:10.0.0.5:43210", "4b" * 16, False, None, None)  # fmt: skip
        started = time.thread_time()
        with open(Path(folder) / "lines.log", "a") as out:
            for _ in range(calls):
                out.write(_line(values))
        log_writer_us = (time.thread_time() - started) / calls * 1e6
    memory = InMemorySpanExporter()
    with environment(OTEL_BSP_MAX_QUEUE_SIZE=str(20 * calls)):  # keep every span: time them all
        tracing = Tracing(exporter=memory)
    trace_loop_us = loop_side(Observer(tracing, None))
    with environment(OTEL_TRACES_SAMPLER="always_off"):  # what a call not sampled costs
        unsampled = Tracing(exporter=InMemorySpanExporter())
    unsampled_loop_us = loop_side(Observer(unsampled, None))
    unsampled.shutdown()
    tracing.provider.force_flush()
    spans = memory.get_finished_spans()
    started = time.thread_time()
    encode_spans(spans).SerializeToString()
    trace_export_us = (time.thread_time() - started) / calls * 1e6
    tracing.shutdown()
    return {"access_log_loop_us": log_loop_us, "access_log_writer_us": log_writer_us,
            "tracing_loop_us": trace_loop_us, "tracing_export_us": trace_export_us,
            "tracing_unsampled_loop_us": unsampled_loop_us,
            "spans_per_call": len(spans) / calls}  # fmt: skip


def served_calls(server: ServerProcess) -> float:
    """Calls the server has answered so far (its own count, every status code)."""
    return sum(s.value for s in server.samples() if s.name == "fusionserve_requests_total")


def bench_observability(repo: Path, items: list, duration: float, server_args: tuple[str, ...],
                        server_env: dict[str, str], smoke: bool) -> dict[str, Any]:  # fmt: skip
    """Each OBSERVED server at 1 and 32 callers; ratios to ``off``, and the off-path hooks' share of a call's CPU.

    The servers run side by side and are measured in turn, over ``ROUNDS`` rounds whose order rotates;
    each ratio is the median over the rounds of one round's figure over ``off``'s in the same round,
    so a change in what else runs on the machine moves both sides of it.
    """
    from fusionserve.server.otlp_receiver import SpanReceiver

    names = ["off", "tracing_all", "access_log_all"] if smoke else list(OBSERVED)
    rounds = 1 if smoke else ROUNDS
    log = RESULTS / "overhead-access.log"
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with SpanReceiver(keep=0) as receiver, contextlib.ExitStack() as stack:
        servers = {}
        for name in names:
            env = {k: v.format(endpoint=receiver.endpoint, log=log) for k, v in OBSERVED[name].items()}
            servers[name] = stack.enter_context(ServerProcess(repo, *server_args, env={**server_env, **env},
                                                              metrics_port=0, start=False))  # fmt: skip
        for server in servers.values():
            server.wait_started()
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                server = servers[name]
                c1 = load(server.target, items, duration_s=duration, concurrency=1)
                cpu, calls = server.cpu_seconds(), served_calls(server)
                load(server.target, items, duration_s=duration, rate=RATE, warmup_s=0)
                cpu_ms = (server.cpu_seconds() - cpu) / (served_calls(server) - calls) * 1e3
                c32 = load(server.target, items, duration_s=duration, concurrency=32)
                figures[name].append({"c1_p50_ms": c1["p50_ms"], "c32_items_per_s": c32["items_per_s"],
                                      "server_cpu_ms_per_call": cpu_ms})  # fmt: skip
        spans = receiver.received
    log.unlink(missing_ok=True)
    off = figures["off"]
    runs = {name: {k: float(np.median([f[k] for f in rows])) for k in rows[0]} for name, rows in figures.items()}
    ratios = {f"{name}_vs_off": {k: float(np.median([f[k] / o[k] for f, o in zip(rows, off, strict=True)]))
                                 for k in rows[0]}
              for name, rows in figures.items() if name != "off"}  # fmt: skip
    hook_ns = hook_cost_ns()
    per_call_us = runs["off"]["server_cpu_ms_per_call"] * 1e3
    off_hooks = {"ns_per_hook": hook_ns, "hooks_per_call": HOOKS_PER_CALL,
                 "share_of_server_cpu_per_call": HOOKS_PER_CALL * hook_ns / 1e3 / per_call_us}  # fmt: skip
    direct = direct_costs(300 if smoke else 3000)
    direct["share_access_log"] = (direct["access_log_loop_us"] + direct["access_log_writer_us"]) / per_call_us
    direct["share_tracing"] = (direct["tracing_loop_us"] + direct["tracing_export_us"]) / per_call_us
    direct["share_tracing_unsampled"] = direct["tracing_unsampled_loop_us"] / per_call_us
    return {"rounds": rounds, "per_round": figures, "runs": runs, "ratios": ratios, "off_path_hooks": off_hooks,
            "direct": direct, "spans_received": spans}


def print_observability(o: dict[str, Any]) -> None:
    print(f"\nobservability: medians of {o['rounds']} rounds; ratios to off in the same round")
    print(f"{'':<16}{'c1 p50 ms':>10}{'c32 items/s':>12}{'CPU ms/call':>12}{'p50 ×off':>10}{'items/s ×off':>13}"
          f"{'CPU ×off':>10}")  # fmt: skip
    ones = {"c1_p50_ms": 1.0, "c32_items_per_s": 1.0, "server_cpu_ms_per_call": 1.0}
    for name, r in o["runs"].items():
        ratio = o["ratios"].get(f"{name}_vs_off", ones)
        print(f"{name:<16}{r['c1_p50_ms']:>10.2f}{r['c32_items_per_s']:>12.0f}{r['server_cpu_ms_per_call']:>12.3f}"
              f"{ratio['c1_p50_ms']:>10.2f}{ratio['c32_items_per_s']:>13.2f}{ratio['server_cpu_ms_per_call']:>10.2f}")
    h, d = o["off_path_hooks"], o["direct"]
    print(f"off-path hooks: {h['ns_per_hook']:.0f} ns each × {h['hooks_per_call']} per call = "
          f"{h['share_of_server_cpu_per_call'] * 100:.3f}% of the server's CPU per call; "
          f"{o['spans_received']} spans received")  # fmt: skip
    print(f"timed directly, per call: access log {d['access_log_loop_us']:.1f} µs on the loop + "
          f"{d['access_log_writer_us']:.1f} µs in its thread = {d['share_access_log'] * 100:.1f}% of the server's "
          f"CPU per call; tracing ({d['spans_per_call']:.0f} spans) {d['tracing_loop_us']:.1f} µs on the loop + "
          f"{d['tracing_export_us']:.1f} µs encoding = {d['share_tracing'] * 100:.1f}%; a call not sampled "
          f"{d['tracing_unsampled_loop_us']:.1f} µs = {d['share_tracing_unsampled'] * 100:.1f}%")  # fmt: skip


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
