"""Serving overhead and dynamic batching, measured side by side in one run.

Compares the raw in-process ``multimodal`` pipeline (same preprocessing and onnxruntime sessions, no
gRPC, no batcher) with the server: typed unary and stream (and the V2 API when available), at
concurrency 1 and under load, and dynamic batching on vs off with 32 one-item callers.

    python bench/overhead.py [--repository REPO] [--duration 5] [--smoke] [--device cpu|cuda] [--io-binding false]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import OrtModel, ServerProcess, machine, percentiles, repository, result_name, samples, write

from fusionserve.preprocess import Vocabulary, decode_image, preprocess_image
from fusionserve.repository import load_config, version_dir
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from fusionserve.v2 import grpc_service_pb2 as v2pb
from fusionserve.v2 import grpc_service_pb2_grpc as v2pb_grpc
from fusionserve.v2_codec import serialize_bytes


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


def _request(items: list, start: int, batch: int, rid: str = "") -> pb.ClassifyRequest:
    chunk = [items[(start + k) % len(items)] for k in range(batch)]
    return pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in chunk], request_id=rid)


def _v2_request(items: list, start: int, batch: int, rid: str = "") -> v2pb.ModelInferRequest:
    """A V2 ``multimodal`` request as tritonclient sends it: raw BYTES with 4-byte length prefixes."""
    chunk = [items[(start + k) % len(items)] for k in range(batch)]
    request = v2pb.ModelInferRequest(model_name="multimodal", id=rid)
    for name in ("IMAGE", "TEXT"):
        request.inputs.add(name=name, datatype="BYTES", shape=[batch])
    request.raw_input_contents.append(serialize_bytes([i for i, _ in chunk]))
    request.raw_input_contents.append(serialize_bytes([t for _, t in chunk]))
    return request


class Api:
    """How to call one API: the unary and stream methods, request builder, response id and error."""

    def __init__(self, name: str, channel: grpc.aio.Channel) -> None:
        if name == "typed":
            stub = pb_grpc.FusionServiceStub(channel)
            self.unary, self.stream, self.request = stub.Classify, stub.ClassifyStream, _request
            self.response_id = lambda r: r.request_id
            self.failed = lambda r: r.HasField("error")
        else:
            v2stub = v2pb_grpc.GRPCInferenceServiceStub(channel)
            self.unary, self.stream, self.request = v2stub.ModelInfer, v2stub.ModelStreamInfer, _v2_request
            self.response_id = lambda r: r.infer_response.id
            self.failed = lambda r: bool(r.error_message)


async def bench_unary(
    target: str, items: list, concurrency: int, batch: int, duration_s: float, api: str = "typed"
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        calls = Api(api, channel)
        await calls.unary(calls.request(items, 0, batch))  # connect + warm
        latencies: list[float] = []
        errors = 0
        end = time.perf_counter() + duration_s

        async def worker(w: int) -> None:
            nonlocal errors
            i = w * 997
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await calls.unary(calls.request(items, i, batch), timeout=30)
                    latencies.append(time.perf_counter() - t)
                except grpc.aio.AioRpcError:
                    errors += 1
                i += batch

        started = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"items_per_s": len(latencies) * batch / elapsed, "requests_per_s": len(latencies) / elapsed,
            "errors": errors, **percentiles(latencies)}  # fmt: skip


async def bench_stream(
    target: str, items: list, window: int, batch: int, duration_s: float, api: str = "typed"
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        calls = Api(api, channel)
        await calls.unary(calls.request(items, 0, batch))
        slots = asyncio.Semaphore(window)
        sent: dict[str, float] = {}
        latencies: list[float] = []
        end = time.perf_counter() + duration_s

        async def requests():
            n = 0
            while time.perf_counter() < end:
                await slots.acquire()
                rid = str(n)
                sent[rid] = time.perf_counter()
                yield calls.request(items, n * batch, batch, rid)
                n += 1

        started = time.perf_counter()
        errors = 0
        async for response in calls.stream(requests()):
            latencies.append(time.perf_counter() - sent.pop(calls.response_id(response)))
            errors += calls.failed(response)
            slots.release()
        elapsed = time.perf_counter() - started
    return {"items_per_s": len(latencies) * batch / elapsed, "requests_per_s": len(latencies) / elapsed,
            "errors": errors, **percentiles(latencies)}  # fmt: skip


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--batch", type=int, default=32, help="items per request for throughput runs")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (no claims)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="raw sessions and server")
    parser.add_argument("--io-binding", choices=["true", "false"], default="true", help="on CUDA (server setting)")
    args = parser.parse_args()
    duration = 0.5 if args.smoke else args.duration
    io_binding = args.io_binding == "true"
    repo = repository(args.repository, smoke=args.smoke)
    items = samples(512)
    raw = RawPipeline(repo, device=args.device, io_binding=io_binding)
    raw.run(items[:4])
    raw.run(items[: args.batch])  # on CUDA each new shape pays a cuDNN algorithm search once
    server_args = ("--device", args.device)
    server_env = {"FUSIONSERVE_IO_BINDING": args.io_binding}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {"duration_s": duration, "batch": args.batch, "device": args.device, "io_binding": io_binding,
                     "repository": str(repo), "server_args": server_args, "server_env": server_env,
                     "provider_options": raw.sessions["image_encoder"].provider_options()},
    }  # fmt: skip
    r = results["runs"] = {}
    r["raw_c1_b1"] = bench_raw(raw, items, 1, duration)
    r["raw_c1_b1_idle_1ms_before_each"] = bench_raw(raw, items, 1, duration, gap_s=0.001)
    r[f"raw_b{args.batch}"] = bench_raw(raw, items, args.batch, duration)
    with ServerProcess(repo, *server_args, env=server_env, metrics_port=0) as server:
        results["server_rss_mb"] = server.rss_mb()
        before = server_side(server)
        r["typed_unary_c1_b1"] = asyncio.run(bench_unary(server.target, items, 1, 1, duration))
        results["lone_call_server_side_ms"] = lone = server_side(server, since=before)
        r[f"typed_unary_c4_b{args.batch}"] = asyncio.run(bench_unary(server.target, items, 4, args.batch, duration))
        r[f"typed_stream_w4_b{args.batch}"] = asyncio.run(bench_stream(server.target, items, 4, args.batch, duration))
        r["v2_unary_c1_b1"] = asyncio.run(bench_unary(server.target, items, 1, 1, duration, api="v2"))
        r[f"v2_unary_c4_b{args.batch}"] = asyncio.run(
            bench_unary(server.target, items, 4, args.batch, duration, api="v2")
        )
        r[f"v2_stream_w4_b{args.batch}"] = asyncio.run(
            bench_stream(server.target, items, 4, args.batch, duration, api="v2")
        )
        r["typed_unary_c32_b1_batching_on"] = asyncio.run(bench_unary(server.target, items, 32, 1, duration))
        results["server_rss_mb_after_load"] = server.rss_mb()
    with ServerProcess(repo, *server_args, "--max-batch-size", "1", env=server_env) as server:
        r["typed_unary_c32_b1_batching_off"] = asyncio.run(bench_unary(server.target, items, 32, 1, duration))
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
    tags = ["no-iobinding"] if args.device == "cuda" and not io_binding else []
    print("wrote", write(result_name("overhead", smoke=args.smoke, device=args.device, tags=tags), results))


if __name__ == "__main__":
    main()
