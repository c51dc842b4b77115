"""The committed gRPC stubs are exactly what protos/generate.py produces from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_are_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.is_file(), f"{rel} is not committed: run python protos/generate.py"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run python protos/generate.py and commit the result"
        )


def test_installed_package_imports_the_stubs():
    from fusionserve.v1 import fusion_pb2, fusion_pb2_grpc

    assert fusion_pb2.DESCRIPTOR.package == "fusionserve.v1"
    assert hasattr(fusion_pb2_grpc, "FusionServiceStub")
