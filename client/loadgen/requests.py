"""Requests serialised once, and the id and status of a stream reply.

Protobuf merges concatenated messages, so a body is serialised once and each stream request adds
only its few id bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc

from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v2_codec import serialize_bytes

CLASSIFY = "/fusionserve.v1.FusionService/Classify"
CLASSIFY_STREAM = "/fusionserve.v1.FusionService/ClassifyStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
IN_BAND_ERROR = "IN_BAND_ERROR"
"""Code recorded for a V2 stream ``error_message`` that does not start with a status code name."""


def typed_request(items: Sequence[tuple[bytes, str]], model: str) -> bytes:
    """A serialised ``ClassifyRequest``."""
    request = pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items], model=model)
    return request.SerializeToString()


def v2_request(items: Sequence[tuple[bytes, str]], model: str) -> bytes:
    """A serialised ``ModelInferRequest`` with BYTES inputs IMAGE and TEXT of shape ``[B]``."""
    from fusionserve.v2 import grpc_service_pb2 as v2

    request = v2.ModelInferRequest(model_name=model)
    for name in ("IMAGE", "TEXT"):
        request.inputs.add(name=name, datatype="BYTES", shape=[len(items)])
    request.raw_input_contents.append(serialize_bytes([i for i, _ in items]))
    request.raw_input_contents.append(serialize_bytes([t for _, t in items]))
    return request.SerializeToString()


def with_id(api: str) -> Callable[[bytes, str], bytes]:
    """A function appending an id to a serialised request.

    Protobuf merges concatenated messages, so the body is serialised once and each request adds
    only its few id bytes.
    """
    if api == "typed":
        return lambda body, rid: body + pb.ClassifyRequest(request_id=rid).SerializeToString()
    from fusionserve.v2 import grpc_service_pb2 as v2

    return lambda body, rid: body + v2.ModelInferRequest(id=rid).SerializeToString()


def typed_stream_reply(data: bytes) -> tuple[str, str]:
    """(request id, status code name) of a serialised ``ClassifyResponse``."""
    r = pb.ClassifyResponse.FromString(data)
    if r.error.code:
        return r.request_id, r.error.code
    for result in r.results:
        if result.error.code:
            return r.request_id, result.error.code
    return r.request_id, "OK"


def v2_stream_reply(data: bytes) -> tuple[str, str]:
    """(request id, status code name) of a serialised ``ModelStreamInferResponse``."""
    from fusionserve.v2 import grpc_service_pb2 as v2

    r = v2.ModelStreamInferResponse.FromString(data)
    if not r.error_message:
        return r.infer_response.id, "OK"
    code = r.error_message.partition(":")[0]  # fusionserve writes "CODE: message"
    return r.infer_response.id, code if code in grpc.StatusCode.__members__ else IN_BAND_ERROR
