"""The floor of a Python gRPC server on this machine: grpc.aio answering Triton's V2 calls with no work.

:class:`FloorServer` records a real server's answers for one model (its metadata, config, statistics
and one ``ModelInfer`` answer), then serves them from a child process: grpc.aio, the V2 methods
perf_analyzer calls, each request parsed and its id copied into the recorded answer, nothing else.
No server whose calls go through grpc.aio in Python answers faster on the same machine, so beside
fusionserve (bench/peers.py) it shows how much of a call is gRPC's own price in Python and how much is
our work; beside PyTriton, which goals a Python gRPC front-end can reach at all.

    with ServerProcess(repo) as server:
        recorded = record(server.target, "multimodal", request)
    with FloorServer(recorded) as floor:
        ...  # perf_analyzer -x floor.version against floor.target
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

# Triton's own client's classes (fusionserve's V2 classes share their names: one process holds one of them)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

SERVICE = "inference.GRPCInferenceService"


def record(target: str, model: str, request: pb.ModelInferRequest) -> dict[str, bytes]:
    """A running server's answers for ``model``, serialized, by V2 method name (``ModelInfer``: to ``request``)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        answers = {
            "ServerLive": stub.ServerLive(pb.ServerLiveRequest()),
            "ServerReady": stub.ServerReady(pb.ServerReadyRequest()),
            "ServerMetadata": stub.ServerMetadata(pb.ServerMetadataRequest()),
            "ModelReady": stub.ModelReady(pb.ModelReadyRequest(name=model)),
            "ModelMetadata": stub.ModelMetadata(pb.ModelMetadataRequest(name=model)),
            "ModelConfig": stub.ModelConfig(pb.ModelConfigRequest(name=model)),
            "ModelStatistics": stub.ModelStatistics(pb.ModelStatisticsRequest(name=model)),
            "ModelInfer": stub.ModelInfer(request),
        }
    return {method: answer.SerializeToString() for method, answer in answers.items()}


def _answer(recorded: bytes, request: bytes) -> pb.ModelInferResponse:
    """The recorded answer with the request's id: what a caller matching answers to requests needs."""
    answer = pb.ModelInferResponse.FromString(recorded)
    answer.id = pb.ModelInferRequest.FromString(request).id
    return answer


def _canned(reply: bytes) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    """A unary handler that answers ``reply`` to anything."""

    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply

    return handle


def _handler(recorded: dict[str, bytes]) -> grpc.GenericRpcHandler:
    """Every recorded method answered as recorded; ModelInfer and ModelStreamInfer per request.

    ModelStatistics counts the answers given.
    """
    answered = 0

    def answer(request: bytes) -> pb.ModelInferResponse:
        nonlocal answered
        answered += 1
        return _answer(recorded["ModelInfer"], request)

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer(request).SerializeToString()

    async def stream_infer(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield pb.ModelStreamInferResponse(infer_response=answer(request)).SerializeToString()

    async def statistics(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        stats = pb.ModelStatisticsResponse.FromString(recorded["ModelStatistics"])
        for model in stats.model_stats:
            model.inference_count = model.execution_count = answered
            model.inference_stats.success.count = answered
        return stats.SerializeToString()

    methods = {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer),
               "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream_infer),
               "ModelStatistics": grpc.unary_unary_rpc_method_handler(statistics)}  # fmt: skip
    for method, reply in recorded.items():
        methods.setdefault(method, grpc.unary_unary_rpc_method_handler(_canned(reply)))
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def _serve(recorded: dict[str, bytes]) -> None:
    """Serve until killed; print the port first."""

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(recorded),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


class FloorServer:
    """The floor server, a child process (``python bench/_grpc_floor.py``, the answers on its stdin as JSON).

    ``target`` is ``127.0.0.1:PORT``.
    """

    name = "grpc.aio floor (no work)"

    def __init__(self, recorded: dict[str, bytes]) -> None:
        self.version = pb.ModelMetadataResponse.FromString(recorded["ModelMetadata"]).versions[0]
        """The recorded model's version: perf_analyzer, given no ``-x``, does not find it in the floor's
        statistics (it does in fusionserve's), so callers name it."""
        self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)  # fmt: skip
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps({method: answer.hex() for method, answer in recorded.items()}))
        self._process.stdin.close()
        port = self._process.stdout.readline().strip()
        if not port:
            self.close()
            raise RuntimeError(f"the floor server did not start (exit status {self._process.returncode})")
        self.target = f"127.0.0.1:{port}"

    def close(self) -> None:
        """Stop the child."""
        self._process.kill()
        self._process.wait(10)

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    _serve({method: bytes.fromhex(answer) for method, answer in json.load(sys.stdin).items()})
