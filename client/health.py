"""The gRPC health-checking protocol's two messages, encoded by hand.

``grpc.health.v1.HealthCheckRequest`` is one string (field 1) and ``HealthCheckResponse`` one enum
(field 1): writing them here keeps the client on grpcio, protobuf and numpy alone (no
grpcio-health-checking), and no second copy of ``grpc.health.v1`` lands in a process's protobuf pool.
"""

from __future__ import annotations

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data):
            raise ValueError("health response: varint cut short")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not byte & 0x80:
            return value, offset


def encode_request(service: str) -> bytes:
    """A serialised ``HealthCheckRequest`` (the empty service, the whole server, is the empty message)."""
    data = service.encode("utf-8")
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_status(data: bytes) -> str:
    """The status name of a serialised ``HealthCheckResponse`` (fields other than ``status`` are skipped)."""
    status, offset = 0, 0
    while offset < len(data):
        key, offset = _read_varint(data, offset)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, offset = _read_varint(data, offset)
            if field == 1:
                status = value
        elif wire_type == 2:
            length, offset = _read_varint(data, offset)
            offset += length
        elif wire_type in (1, 5):
            offset += 8 if wire_type == 1 else 4
        else:
            raise ValueError(f"health response: unexpected wire type {wire_type}")
    return STATUS_NAMES.get(status, "UNKNOWN")
