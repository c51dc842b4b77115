"""The client's hand-encoded health messages are byte for byte grpcio-health-checking's."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from fusionserve.client.health import decode_status, encode_request


@pytest.mark.parametrize("service", ["", "multimodal", "é" * 100, "x" * 300])
def test_requests_encode_as_the_generated_message_does(service: str) -> None:
    assert encode_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()


@pytest.mark.parametrize("status", health_pb2.HealthCheckResponse.ServingStatus.keys())
def test_every_status_decodes_to_its_name(status: str) -> None:
    value = health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    assert decode_status(health_pb2.HealthCheckResponse(status=value).SerializeToString()) == status


def test_unknown_fields_are_skipped_and_an_unknown_status_is_unknown() -> None:
    extra = b"\x12\x03abc" + b"\x19" + b"\x00" * 8  # field 2 (bytes), field 3 (fixed64)
    assert decode_status(extra + health_pb2.HealthCheckResponse(status=2).SerializeToString()) == "NOT_SERVING"
    assert decode_status(b"\x08\x2a") == "UNKNOWN"
    with pytest.raises(ValueError, match="cut short"):
        decode_status(b"\x08\x80")
