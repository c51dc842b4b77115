"""What a refused call costs a Python gRPC server, beside one it serves: server CPU per call.

Overload control refuses calls in the server's own code, after grpc.aio has taken them up, so each
refusal costs the event loop the fixed price of a gRPC call in Python. This measures that price, on a
server process pinned to one CPU while a load generator process on the other keeps 64 calls in flight:

- ``grpc.aio, answer``: a bare grpc.aio server whose handler answers at once (the floor of a call);
- ``grpc.aio, refuse``: the same handler aborting with RESOURCE_EXHAUSTED;
- ``fusionserve, refuse``: ``fusionserve serve`` refusing every Classify at its call limit (one open
  stream holds the only place), the path a refused call really takes (interceptor, pushback trailer);
- ``fusionserve, serve``: the real job (a 64×64 PNG and a caption), for comparison.

    python bench/shed_cost.py [--duration-s 5] [--smoke]

Prints µs of server CPU per call (the server's processes, gRPC core's threads included) and calls per
second; writes ``bench/results/shed_cost[-smoke].json``. docs/RELIABILITY.md#overload-control uses the
ratio: refusing costs a sixth to a quarter of serving, which bounds what shedding in the process can
save under a flood.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Any

import grpc
from _common import ServerProcess, machine, repository, result_name, samples, write

from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc

SERVER_CPU, CLIENT_CPU = 0, 1
CALLERS = 64


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bare_server(refuse: bool, ports: Any) -> None:
    """A grpc.aio server with one Classify handler: answer at once, or refuse."""
    os.sched_setaffinity(0, {SERVER_CPU})

    class Servicer(pb_grpc.FusionServiceServicer):
        async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> Any:
            if refuse:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
            return pb.ClassifyResponse()

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_FusionServiceServicer_to_server(Servicer(), server)
        ports.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


async def _drive(target: str, request: pb.ClassifyRequest, duration_s: float) -> int:
    """CALLERS callers, one call at a time each, for ``duration_s``; how many calls ended (any status)."""
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    stubs = [pb_grpc.FusionServiceStub(c) for c in channels]
    done = 0
    end = time.monotonic() + duration_s

    async def caller(k: int) -> None:
        nonlocal done
        while time.monotonic() < end:
            try:
                await stubs[k % 4].Classify(request, timeout=10)
            except grpc.aio.AioRpcError:
                pass
            done += 1

    await asyncio.gather(*(caller(k) for k in range(CALLERS)))
    for channel in channels:
        await channel.close()
    return done


def measure(name: str, target: str, pids: list[int], request: pb.ClassifyRequest, duration_s: float) -> dict:
    asyncio.run(_drive(target, request, 1.0))  # warm up
    before, wall = sum(map(_cpu_s, pids)), time.monotonic()
    calls = asyncio.run(_drive(target, request, duration_s))
    cpu, wall = sum(map(_cpu_s, pids)) - before, time.monotonic() - wall
    row = {"server": name, "calls": calls, "calls_per_s": calls / wall, "us_per_call": cpu / calls * 1e6,
           "server_cores": cpu / wall}  # fmt: skip
    print(f"{name:<22} {row['us_per_call']:7.0f} µs of server CPU per call  {row['calls_per_s']:7.0f} calls/s  "
          f"(server {row['server_cores']:.2f} cores)", flush=True)  # fmt: skip
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=5.0)
    p.add_argument("--smoke", action="store_true", help="1 s per server (CI)")
    args = p.parse_args()
    duration_s = 1.0 if args.smoke else args.duration_s
    image, text = samples(1)[0]
    real = pb.ClassifyRequest(items=[pb.Item(image=image, text=text)])
    rows = []
    for refuse in (False, True):
        ports: Any = mp.Queue()
        bare = mp.Process(target=_bare_server, args=(refuse, ports), daemon=True)
        bare.start()
        target = f"127.0.0.1:{ports.get(timeout=30)}"
        os.sched_setaffinity(0, {CLIENT_CPU})
        rows.append(measure(f"grpc.aio, {'refuse' if refuse else 'answer'}", target, [bare.pid], real, duration_s))
        bare.terminate()
        bare.join(10)

    repo = repository(None, smoke=args.smoke)
    os.sched_setaffinity(0, {SERVER_CPU})
    with ServerProcess(repo, "--embedding-cache-mb", "0", env={"FUSIONSERVE_MAX_CONCURRENT_RPCS": "1"}) as server:
        os.sched_setaffinity(0, {CLIENT_CPU})
        # One open stream holds the only place: every Classify is refused at the call limit.
        channel = grpc.insecure_channel(server.target)
        release = threading.Event()

        def held() -> Any:
            yield real
            release.wait(600)

        stream = pb_grpc.FusionServiceStub(channel).ClassifyStream(held(), timeout=600)
        next(stream)
        rows.append(measure("fusionserve, refuse", server.target, [server.pid], real, duration_s))
        release.set()
        list(stream)
        channel.close()
    os.sched_setaffinity(0, {SERVER_CPU})
    with ServerProcess(repo, "--embedding-cache-mb", "0") as server:
        os.sched_setaffinity(0, {CLIENT_CPU})
        rows.append(measure("fusionserve, serve", server.target, [server.pid], real, duration_s))
    serve = rows[-1]["us_per_call"]
    print(f"refusing costs fusionserve {rows[-2]['us_per_call'] / serve:.2f} of serving a call")
    print("wrote", write(result_name("shed_cost", smoke=args.smoke), {"machine": machine(), "rows": rows,
                                                                      "callers": CALLERS}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
