"""How many requests/s ``fusionserve loadtest`` can drive: its own overhead, not the server's.

An instant fusionserve server (a real gRPC server on loopback whose handlers answer at once with
an empty reply, in its own process) takes the load; the generator runs here, closed loop, for
each mode. Printed per mode: requests/s, and CPU time per request of the generator and of the
server process. The generator is the limit when its CPU use is near one core (100%).

    python bench/loadgen_overhead.py [--duration 5] [--concurrency 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import grpc

from fusionserve.client.loadgen import LoadSettings, machine_info, run
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v2 import grpc_service_pb2 as v2

EMPTY = b""  # an empty ClassifyResponse / ModelInferResponse, serialised


async def _typed_stream(requests, context):
    async for data in requests:
        yield pb.ClassifyResponse(request_id=pb.ClassifyRequest.FromString(data).request_id).SerializeToString()


async def _v2_stream(requests, context):
    async for data in requests:
        rid = v2.ModelInferRequest.FromString(data).id
        yield v2.ModelStreamInferResponse(infer_response=v2.ModelInferResponse(id=rid)).SerializeToString()


async def _serve(port_out, control) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return EMPTY

    # Raw handlers (no deserialisation of unary requests): the server does as little as it can.
    handlers = [
        grpc.method_handlers_generic_handler(
            "fusionserve.v1.FusionService",
            {
                "Classify": grpc.unary_unary_rpc_method_handler(unary),
                "ClassifyStream": grpc.stream_stream_rpc_method_handler(_typed_stream),
            },
        ),
        grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {
                "ModelInfer": grpc.unary_unary_rpc_method_handler(unary),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(_v2_stream),
            },
        ),
    ]
    server = grpc.aio.server(handlers=handlers, options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_out.send(port)
    # Answer CPU-time queries from the parent until it says stop.
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, control.recv) != "stop":
        control.send(time.process_time())
    await server.stop(0)


def _server_main(port_out, control) -> None:
    asyncio.run(_serve(port_out, control))


class InstantServer:
    """The instant server in a child process (so it does not share the generator's GIL)."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        port_parent, port_child = ctx.Pipe()
        self._control, control_child = ctx.Pipe()
        self.process = ctx.Process(target=_server_main, args=(port_child, control_child), daemon=True)
        self.process.start()
        self.target = f"127.0.0.1:{port_parent.recv()}"
        self._lock = threading.Lock()

    def cpu_s(self) -> float:
        """The server process's CPU time so far."""
        with self._lock:
            self._control.send("cpu")
            return float(self._control.recv())

    def stop(self) -> None:
        """Stop the server and its process."""
        self._control.send("stop")
        self.process.join(10)


def measure(server: InstantServer, api: str, mode: str, args: argparse.Namespace) -> dict:
    settings = LoadSettings(
        target=[server.target], api=api, mode=mode, concurrency=args.concurrency,
        duration_s=args.duration, warmup_s=1.0, batch_size=1, progress=False,
    )  # fmt: skip
    inputs = [(b"\x89PNG fake image bytes" * 10, "a red circle")]
    server_cpu0, cpu0, wall0 = server.cpu_s(), time.process_time(), time.perf_counter()
    report = run(settings, inputs)
    server_cpu, cpu, wall = server.cpu_s() - server_cpu0, time.process_time() - cpu0, time.perf_counter() - wall0
    total = report.results["requests_with_warmup"]
    return {
        "api": api,
        "mode": mode,
        "requests_per_s": report.results["requests_per_s"],
        "errors": report.results["error_count"],
        "p50_ms": report.results["latency_ms"]["p50"],
        "p99_ms": report.results["latency_ms"]["p99"],
        "generator_cpu_percent": 100.0 * cpu / wall,
        "generator_cpu_us_per_request": 1e6 * cpu / max(1.0, total),
        "server_cpu_percent": 100.0 * server_cpu / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per mode")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    server = InstantServer()
    rows = []
    try:
        for api, mode in (("typed", "unary"), ("typed", "stream"), ("v2", "unary"), ("v2", "stream")):
            rows.append(measure(server, api, mode, args))
    finally:
        server.stop()
    print(f"load generator against an instant server: closed loop, concurrency {args.concurrency}, "
          f"{args.duration:g} s per mode, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'api':<6}{'mode':<8}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'gen CPU %':>11}{'gen µs/req':>12}"
          f"{'server CPU %':>14}{'errors':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['api']:<6}{r['mode']:<8}{r['requests_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
              f"{r['generator_cpu_percent']:>11.0f}{r['generator_cpu_us_per_request']:>12.1f}"
              f"{r['server_cpu_percent']:>14.0f}{r['errors']:>8}")  # fmt: skip
    if args.json:
        settings = vars(args) | {"json": str(args.json)}
        out = {"bench": "loadgen_overhead", "machine": machine_info(), "settings": settings, "results": rows}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
