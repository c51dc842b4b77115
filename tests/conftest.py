"""Session-wide fixtures and the two test tiers.

The serving tests run on tiny random-weight ONNX graphs built with ``onnx.helper`` (no TensorFlow).
Tests that train or export with Keras, or compare with Keras, use the ``trained_*`` fixtures and are
marked ``tf`` by that alone, so ``pytest -m "not tf"`` runs everything else without TensorFlow.

Options: ``--device cuda`` runs every server the tests start on the CUDA execution provider (the
default, ``cpu``, pins them to the CPU); ``--repository PATH`` serves an existing repository (an
exported one, say) to the serving tests instead of the tiny one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent


def _tested_tree_is_this_checkout() -> None:
    """Refuse to run the tests on an installed copy of the code instead of the tree being edited.

    A plain ``pip install .`` copies ``server/``, ``client/`` and ``export/`` into site-packages:
    an edit there would go untested until the next reinstall. ``pip install -e`` (the README's
    command) maps the package onto this checkout.
    """
    import fusionserve.client
    import fusionserve.export
    import fusionserve.server

    for package in (fusionserve.server, fusionserve.client, fusionserve.export):
        where = Path(package.__file__).resolve().parent
        if not where.is_relative_to(ROOT):
            raise pytest.UsageError(
                f"{package.__name__} is imported from {where}, not from this checkout ({ROOT}): the tests would "
                f"test an installed copy. Install the checkout in editable mode: pip install -e '.[export,dev]'"
            )


_tested_tree_is_this_checkout()
TF_FIXTURES = frozenset({"trained_dir", "trained_repository", "trained_server"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", choices=["cpu", "cuda"], default="cpu", help="device of the servers under test")
    parser.addoption("--repository", type=Path, default=None, help="serve this repository instead of the tiny one")


def pytest_configure(config: pytest.Config) -> None:
    # Servers started in this process (tests.serving) and as child processes read the same variable.
    os.environ["FUSIONSERVE_DEVICE"] = config.getoption("--device")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TF_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.tf)


@pytest.fixture(scope="session")
def repository(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository the serving tests use: tiny ``onnx.helper`` graphs, or ``--repository``."""
    given = request.config.getoption("--repository")
    if given is not None:
        return Path(given)
    from tests import tiny_repository

    return tiny_repository.build(tmp_path_factory.mktemp("repo") / "repo")


@pytest.fixture(scope="session")
def heavy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny graphs over 256×256 images and a 64-channel convolution: an image-encoder run takes a
    millisecond or more per item, several times what the event loop spends taking up a call, so calls
    that arrive meanwhile wait in the queue and meet in the next run, on any machine (with the 64×64
    graphs, runs are so short that whether calls meet is chance)."""
    from tests import tiny_repository

    return tiny_repository.build(tmp_path_factory.mktemp("heavy") / "repo", image_size=(256, 256),
                                 image_channels=64)  # fmt: skip


@pytest.fixture(scope="session")
def server(repository: Path):
    """One shared server over the session repository (tests that stop a server start their own)."""
    from tests.serving import RunningServer

    running = RunningServer(repository)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by ``fusionserve train`` (small and quick: accuracy is not the point)."""
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow stays on the CPU: parity is checked there
    from fusionserve.export.train import train

    out = tmp_path_factory.mktemp("trained")
    train(out, samples=1000, epochs=2, seed=1, probes=False)
    return out


@pytest.fixture(scope="session")
def trained_repository(trained_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository exported from ``trained_dir`` with tf2onnx (version 1 of every model)."""
    from fusionserve.export.convert import export_from_dir

    repo = tmp_path_factory.mktemp("trained-repo")
    export_from_dir(trained_dir, repo)
    return repo


@pytest.fixture(scope="session")
def trained_server(trained_repository: Path):
    """A server over the exported Keras models."""
    from tests.serving import RunningServer

    running = RunningServer(trained_repository)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def samples():
    """Held-out generated (PNG bytes, caption) pairs, distinct per index."""
    from fusionserve.data import encoded_pairs

    return encoded_pairs(256, seed=4242)


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
