"""Session-wide fixtures: small models trained and exported once per test session."""

from __future__ import annotations

import os
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
