"""Wire compatibility of our V2 proto with tritonclient's own copy, field by field.

Both define ``inference.*`` and cannot share one protobuf pool, so tritonclient's descriptors are
dumped as JSON by this same file run as a script in a subprocess (``python tests/test_v2_wire.py``).
Nothing from ``fusionserve.v2`` or ``tritonclient`` is imported at module level.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2


def describe(*file_descriptors: Any) -> dict[str, Any]:
    """Messages (nested ones and map entries included), enums and services of proto files, as plain data."""
    out: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    for file_descriptor in file_descriptors:
        part = _describe_file(file_descriptor)
        for key in ("messages", "enums", "services"):
            out[key].update(part[key])
        out["package"], out["syntax"] = part["package"], part["syntax"]
    return out


def _describe_file(file_descriptor: Any) -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    messages: dict[str, list[dict[str, Any]]] = {}
    enums: dict[str, dict[str, int]] = {}

    def visit_enum(enum: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        enums[f"{prefix}.{enum.name}"] = {v.name: v.number for v in enum.value}

    def visit(message: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        name = f"{prefix}.{message.name}"
        oneofs = [o.name for o in message.oneof_decl]
        messages[name] = [
            {
                "name": f.name,
                "number": f.number,
                "type": descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
                "label": descriptor_pb2.FieldDescriptorProto.Label.Name(f.label),
                "type_name": f.type_name,
                "oneof": oneofs[f.oneof_index] if f.HasField("oneof_index") else None,
            }
            for f in message.field
        ]
        for nested in message.nested_type:
            visit(nested, name)
        for enum in message.enum_type:
            visit_enum(enum, name)

    for message in proto.message_type:
        visit(message, f".{proto.package}")
    for enum in proto.enum_type:
        visit_enum(enum, f".{proto.package}")
    services = {
        f"{proto.package}.{s.name}": {
            m.name: {
                "input_type": m.input_type,
                "output_type": m.output_type,
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
            }
            for m in s.method
        }
        for s in proto.service
    }
    return {
        "package": proto.package, "syntax": proto.syntax, "messages": messages, "enums": enums, "services": services
    }  # fmt: skip


@pytest.fixture(scope="module")
def ours() -> dict[str, Any]:
    from fusionserve.v2 import grpc_service_pb2, model_config_pb2

    return describe(grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR)


@pytest.fixture(scope="module")
def theirs() -> dict[str, Any]:
    result = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_tritonclient_copy_was_read(theirs):
    assert theirs["package"] == "inference"
    assert ".inference.ModelInferRequest" in theirs["messages"]
    assert "ModelStreamInfer" in theirs["services"]["inference.GRPCInferenceService"]


def test_same_package_and_syntax(ours, theirs):
    assert (ours["package"], ours["syntax"]) == (theirs["package"], theirs["syntax"]) == ("inference", "proto3")


def test_every_message_and_field_of_ours_is_on_the_wire_as_tritonclient_expects(ours, theirs):
    problems = []
    for message, fields in ours["messages"].items():
        if message not in theirs["messages"]:
            problems.append(f"{message}: not in tritonclient's proto")
            continue
        their_fields = {f["name"]: f for f in theirs["messages"][message]}
        for field in fields:
            their = their_fields.get(field["name"])
            if their is None:
                problems.append(f"{message}.{field['name']}: not in tritonclient's proto")
            elif their != field:
                problems.append(f"{message}.{field['name']}: ours {field} != theirs {their}")
        numbers = [f["number"] for f in fields]
        assert len(numbers) == len(set(numbers)), f"{message}: duplicate field numbers"
    assert not problems, "\n".join(problems)
    assert len(ours["messages"]) >= 30  # the comparison really covered both protos
    assert ".inference.ModelConfig" in ours["messages"] and ".inference.ModelStatistics" in ours["messages"]


def test_every_enum_value_of_ours_is_tritonclients(ours, theirs):
    assert set(ours["enums"]) == {".inference.DataType", ".inference.ModelInput.Format"}
    for enum, values in ours["enums"].items():
        assert theirs["enums"].get(enum, {}) | values == theirs["enums"].get(enum), enum


def test_every_rpc_we_implement_matches(ours, theirs):
    (service,) = ours["services"]
    assert service == "inference.GRPCInferenceService"
    their_methods = theirs["services"][service]
    for name, method in ours["services"][service].items():
        assert their_methods.get(name) == method, name
    assert set(ours["services"][service]) == {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    }
    assert ours["services"][service]["ModelStreamInfer"]["client_streaming"]
    assert ours["services"][service]["ModelStreamInfer"]["server_streaming"]


def test_the_servicer_implements_every_rpc_of_the_proto():
    from fusionserve.server.v2_servicer import InferenceServicer
    from fusionserve.v2 import grpc_service_pb2, grpc_service_pb2_grpc

    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    base = grpc_service_pb2_grpc.GRPCInferenceServiceServicer
    for method in service.methods:
        assert getattr(InferenceServicer, method.name) is not getattr(base, method.name), method.name


if __name__ == "__main__":
    from tritonclient.grpc import model_config_pb2, service_pb2

    json.dump(describe(service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR), sys.stdout)
