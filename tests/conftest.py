"""Session-wide fixtures: small models trained and exported once per test session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keep TensorFlow off any GPU in tests; parity is checked on CPU.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by ``fusionserve train`` (small and quick: accuracy is not the point)."""
    from fusionserve.export.train import train

    out = tmp_path_factory.mktemp("trained")
    train(out, samples=1000, epochs=2, seed=1, probes=False)
    return out


@pytest.fixture(scope="session")
def repository(trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository exported from ``trained_dir`` (version 1 of every model)."""
    from fusionserve.export.convert import export_from_dir

    repo = tmp_path_factory.mktemp("repo")
    export_from_dir(trained_dir, repo)
    return repo


@pytest.fixture(scope="session")
def server(repository: Path):
    """One shared server over the session repository (tests that stop a server start their own)."""
    from tests.serving import RunningServer

    running = RunningServer(repository)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def samples():
    """Held-out generated (PNG bytes, caption) pairs, distinct per index."""
    from fusionserve.export import data
    from fusionserve.preprocess import encode_png

    ds = data.generate(256, seed=4242)
    return [(encode_png(img), cap) for img, cap in zip(ds.images, ds.captions, strict=True)]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate (made now)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=fusionserve test CA", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext", cwd=d)  # fmt: skip
    return d
