"""Serving on CUDA against raw onnxruntime: throughput, first requests after start, GPU memory held.

1. ``throughput``: the image encoder (``vgg16`` at 224×224 on a GPU) through the server, V2
   ``ModelStreamInfer`` with ``--batch`` items (default 64) per request, from the project's load
   generator over ``--streams`` streams (one connection each) with ``--window`` requests in flight
   each, against a raw onnxruntime session of the server's own setup (provider options, threads,
   I/O binding) at the same batch size in this process. The goal: served ≥ 0.8 × raw.
2. ``first requests``: a fresh server, then one request of every batch size it can form (1 … max)
   to each tensor model, then the same again; the first pass shows what a new shape costs (cuDNN's
   algorithm choice, memory growth) after the warm-up. Run for the server's defaults and for
   ``--compare-option`` settings (``EXHAUSTIVE`` search with onnxruntime's power-of-two arena, say).
3. GPU memory the server process holds after each part (``nvidia-smi``).

Requests are serialised once beforehand, so the client's own protobuf work stays out of the figures.

    python bench/cuda_serving.py --repository REPO [--device cuda] [--duration 5] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _common import OrtModel, ServerProcess, load, machine, onnx_path, repository, time_calls, write

from fusionserve.repository import list_versions, load_config, variable_length
from fusionserve.v2 import grpc_service_pb2 as v2pb
from fusionserve.v2_codec import add_raw_input

INFER = "/inference.GRPCInferenceService/ModelInfer"
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
TENSOR_MODELS = ("image_encoder", "text_encoder", "fusion")


def _inputs(repo: Path, model: str, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of ``rows`` rows that the model takes (token ids within their range).

    A text encoder that takes captions of any length gets them at full length (the most it costs).
    """
    rng = np.random.default_rng(seed)
    config = load_config(repo, model, max(list_versions(repo, model)))
    words = variable_length(config)
    feeds = {}
    for spec in config.inputs:
        shape = (rows, *(words.max_length if d < 0 and words else d for d in spec.shape[1:]))
        if spec.range is not None:
            feeds[spec.name] = rng.integers(spec.range[0], spec.range[1], shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
    return feeds


def _request(model: str, feeds: dict[str, np.ndarray], rid: str) -> bytes:
    request = v2pb.ModelInferRequest(model_name=model, id=rid)
    for name, value in feeds.items():
        add_raw_input(request, name, value)
    return request.SerializeToString()


# ---- 1. throughput ---------------------------------------------------------------------------
def served_throughput(target: str, repo: Path, model: str, batch: int, streams: int, window: int,
                      seconds: float) -> dict[str, Any]:  # fmt: skip
    """Items/s through the server, from the load generator.

    ``streams`` V2 streams (one connection each), ``window`` requests in flight on each, requests of
    ``batch`` rows serialised once beforehand.
    """
    payloads = [_request(model, _inputs(repo, model, batch, seed=k), "") for k in range(window)]
    result = load(target, payloads=payloads, duration_s=seconds, warmup_s=1.0, api="v2", mode="stream",
                  model=model, batch_size=batch, streams=streams, connections=streams,
                  concurrency=streams * window, timeout_s=60)  # fmt: skip
    return {"streams": streams, "window": window, "batch": batch, **result}


def raw_throughput(repo: Path, model: str, batch: int, device: str, seconds: float) -> dict[str, Any]:
    """Items/s of one raw onnxruntime session set up as the server sets up its own, at ``batch``."""
    raw = OrtModel(onnx_path(repo, model), device=device)
    feeds = _inputs(repo, model, batch)
    raw.run(feeds)
    times = time_calls(lambda: raw.run(feeds), seconds)
    median = statistics.median(times)
    return {"batch": batch, "ms_per_call": median * 1e3, "items_per_s": batch / median, "calls": len(times),
            "provider_options": raw.provider_options()}  # fmt: skip


# ---- 2. first requests -----------------------------------------------------------------------
def first_requests(target: str, repo: Path, sizes: dict[str, list[int]]) -> dict[str, Any]:
    """Per model: latency of one request of each size, the first time (cold) and again (warm)."""
    out: dict[str, Any] = {}
    with grpc.insecure_channel(target, options=UNLIMITED) as channel:
        infer = channel.unary_unary(INFER, request_serializer=None,
                                    response_deserializer=v2pb.ModelInferResponse.FromString)  # fmt: skip
        for model, batch_sizes in sizes.items():
            payloads = {b: _request(model, _inputs(repo, model, b, seed=b), str(b)) for b in batch_sizes}
            passes = []
            for _ in ("cold", "warm"):
                latencies = {}
                for b, payload in payloads.items():
                    t = time.perf_counter()
                    infer(payload, timeout=600)
                    latencies[b] = time.perf_counter() - t
                passes.append(latencies)
            cold, warm = passes
            worst = max(cold, key=cold.get)  # type: ignore[arg-type]
            out[model] = {"cold_ms": {str(b): v * 1e3 for b, v in cold.items()},
                          "warm_ms": {str(b): v * 1e3 for b, v in warm.items()},
                          "worst_cold_ms": cold[worst] * 1e3, "worst_cold_batch": worst,
                          "median_cold_over_warm": statistics.median(cold[b] / warm[b] for b in cold)}  # fmt: skip
    return out


def gpu_memory_mib(pid: int) -> dict[str, float | None]:
    """GPU memory used by ``pid`` and by the whole GPU, in MiB (None where nvidia-smi cannot tell)."""
    out: dict[str, float | None] = {"process": None, "gpu_total_used": None}
    try:
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout  # fmt: skip
        for line in apps.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid):
                out["process"] = float(fields[1])
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout.split()  # fmt: skip
        out["gpu_total_used"] = float(used[0]) if used else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    return out


def max_batch_sizes(repo: Path, models: tuple[str, ...], cap: int) -> dict[str, list[int]]:
    """Every batch size 1 … min(max_batch_size, cap) of each model."""
    out = {}
    for model in models:
        config = load_config(repo, model, max(list_versions(repo, model)))
        out[model] = list(range(1, min(config.max_batch_size, cap) + 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, help="repository to serve (default: the bench's small one)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput measurement")
    parser.add_argument("--batch", type=int, default=64, help="items per throughput request")
    parser.add_argument("--streams", default="1,4", help="stream counts to measure, comma-separated")
    parser.add_argument("--window", type=int, default=2, help="requests in flight per client stream")
    parser.add_argument("--compare-option", action="append", default=[], metavar="SETTING=VALUE",
                        help="a second server for the first-request part, e.g. cuda_conv_algo_search=EXHAUSTIVE")
    parser.add_argument("--compare-sizes", default="2,3,5,17,33,63", help="batch sizes asked of the second server")
    parser.add_argument("--smoke", action="store_true", help="seconds-long CPU run for CI (no claims)")
    args = parser.parse_args()
    device = "cpu" if args.smoke else args.device
    duration = 0.5 if args.smoke else args.duration
    batch = 8 if args.smoke else args.batch
    repo = repository(args.repository, smoke=args.smoke)
    cap = 4 if args.smoke else 1024
    compare_env = {f"FUSIONSERVE_{k.upper()}": v for k, v in (o.split("=", 1) for o in args.compare_option)}
    results: dict[str, Any] = {
        "machine": machine(),
        "settings": {"repository": str(repo), "device": device, "duration_s": duration, "batch": batch,
                     "window": args.window, "compare_env": compare_env},
    }  # fmt: skip

    started = time.perf_counter()
    with ServerProcess(repo, "--device", device, start_timeout_s=600) as server:
        results["ready_s"] = time.perf_counter() - started
        results["gpu_memory_mib_after_start"] = gpu_memory_mib(server.proc.pid)
        sizes = max_batch_sizes(repo, TENSOR_MODELS, cap)
        first = results["first_requests"] = first_requests(server.target, repo, sizes)
        results["gpu_memory_mib_after_first_requests"] = gpu_memory_mib(server.proc.pid)
        served = results["served"] = {}
        for streams in (int(c) for c in args.streams.split(",")):
            served[str(streams)] = served_throughput(server.target, repo, "image_encoder", batch, streams,
                                                     args.window, duration)  # fmt: skip
        results["gpu_memory_mib_after_throughput"] = gpu_memory_mib(server.proc.pid)
    raw = results["raw"] = raw_throughput(repo, "image_encoder", batch, device, duration)
    best = max(served.values(), key=lambda v: v["items_per_s"])
    results["served_vs_raw"] = best["items_per_s"] / raw["items_per_s"]

    if compare_env:
        started = time.perf_counter()
        with ServerProcess(repo, "--device", device, env=compare_env, start_timeout_s=600) as server:
            ready = time.perf_counter() - started
            sizes = {"image_encoder": [int(b) for b in args.compare_sizes.split(",") if int(b) <= cap]}
            results["compare"] = {"ready_s": ready, "first_requests": first_requests(server.target, repo, sizes),
                                  "gpu_memory_mib": gpu_memory_mib(server.proc.pid)}  # fmt: skip

    print(f"{device}, {repo.name}: server ready after {results['ready_s']:.1f} s")
    print("first request of each batch size after start (the warm-up ran 1"
          + (" and the maximum" if device == "cuda" else "") + "), worst per model:")
    for model, v in first.items():
        print(f"  {model:<14} worst {v['worst_cold_ms']:8.1f} ms (batch {v['worst_cold_batch']}), "
              f"median first/again {v['median_cold_over_warm']:.2f}×")  # fmt: skip
    if "compare" in results:
        c = results["compare"]
        v = c["first_requests"]["image_encoder"]
        print(f"  with {compare_env}: ready after {c['ready_s']:.1f} s; image_encoder first requests "
              + ", ".join(f"b{b} {ms:.0f} ms" for b, ms in v["cold_ms"].items())
              + f" (again: {statistics.median(v['warm_ms'].values()):.0f} ms median)")  # fmt: skip
    print(f"\nimage_encoder, {batch} items per request: raw onnxruntime {raw['items_per_s']:.0f} items/s "
          f"({raw['ms_per_call']:.2f} ms per call)")  # fmt: skip
    for streams, v in served.items():
        print(f"  served, V2 stream, {streams} stream(s) × {args.window} in flight: "
              f"{v['items_per_s']:.0f} items/s = {v['items_per_s'] / raw['items_per_s']:.2f} × raw, "
              f"p50 {v['p50_ms']:.1f} ms, p99 {v['p99_ms']:.1f} ms, {v['errors']} errors")  # fmt: skip
    print(f"  best served / raw: {results['served_vs_raw']:.2f}")
    for key in ("gpu_memory_mib_after_start", "gpu_memory_mib_after_first_requests", "gpu_memory_mib_after_throughput"):
        print(f"{key}: {results[key]}")
    if "compare" in results:
        print(f"gpu_memory_mib with {compare_env}: {results['compare']['gpu_memory_mib']}")
    print("wrote", write(f"cuda-serving-{device}" + ("-smoke" if args.smoke else ""), results))


if __name__ == "__main__":
    main()
