"""The client library and its CLI against real servers on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import cv2
import grpc
import numpy as np
import pytest

from fusionserve.cli.main import main as cli_main
from fusionserve.client import AsyncFusionClient, FusionClient, FusionClientError, StreamResult, TLSConfig
from fusionserve.client.channel import channel_target
from fusionserve.errors import FusionServeError
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.serving import RunningServer, ServicerServer


@pytest.fixture(scope="module")
def client(server):
    with FusionClient(server.target, timeout_s=20) as c:
        yield c


def _stream_requests(srv: RunningServer) -> float:
    """Stream requests answered OK by a server (from its own metrics)."""
    labels = {"model": "multimodal", "version": "1", "api": "typed_stream", "code": "OK"}
    return srv.server.metrics.registry.get_sample_value("fusionserve_requests_total", labels) or 0.0


def _unary_requests(srv: RunningServer) -> float:
    labels = {"model": "multimodal", "version": "1", "api": "typed", "code": "OK"}
    return srv.server.metrics.registry.get_sample_value("fusionserve_requests_total", labels) or 0.0


def _stop(*servers: RunningServer) -> None:
    """Stop servers that are still running (a stopped RunningServer cannot be stopped again)."""
    for srv in servers:
        if srv.loop.is_running():
            srv.stop(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- unary calls ---------------------------------------------------------------------------------
def test_classify_takes_a_path_bytes_or_a_bgr_array_alike(client, samples, tmp_path):
    png, caption = samples[0]
    path = tmp_path / "image.png"
    path.write_bytes(png)
    array = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    results = [client.classify(image, caption) for image in (path, str(path), png, array)]
    first = results[0]
    assert first.labels == ("mismatch", "match")
    assert first.label == first.labels[first.label_index]
    assert sum(first.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert first.model == "multimodal" and first.model_version == 1
    for other in results[1:]:
        assert other.label_index == first.label_index
        np.testing.assert_allclose(other.probabilities, first.probabilities, atol=1e-6)


def test_classify_batch_answers_each_item_in_order(client, samples):
    batch = client.classify_batch(samples[:6])
    assert len(batch) == 6
    for (image, text), got in zip(samples[:6], batch, strict=True):
        alone = client.classify(image, text)
        assert got.label_index == alone.label_index
        np.testing.assert_allclose(got.probabilities, alone.probabilities, atol=1e-5)


def test_embeddings_from_classify_and_embed_agree(client, samples):
    (png, text), (png2, _) = samples[0], samples[1]
    result = client.classify(png, text, return_embeddings=True)
    assert result.image_embedding is not None and result.text_embedding is not None
    embedded = client.embed([png, png2], [text])
    assert embedded.image is not None and embedded.text is not None
    assert embedded.image.shape == (2, result.image_embedding.shape[0])
    assert embedded.text.shape == (1, result.text_embedding.shape[0])
    np.testing.assert_allclose(embedded.image[0], result.image_embedding, atol=1e-5)
    np.testing.assert_allclose(embedded.text[0], result.text_embedding, atol=1e-5)
    assert client.embed(texts=["a red circle"]).image is None


def test_models_and_health(client):
    models = {m.name: m for m in client.models()}
    assert {"multimodal", "image_encoder", "text_encoder", "fusion"} <= set(models)
    assert all(m.ready for m in models.values())
    pipeline = client.model("multimodal")
    assert pipeline.platform == "pipeline" and pipeline.labels == ("mismatch", "match")
    assert [t.name for t in pipeline.inputs] == ["IMAGE", "TEXT"]
    assert client.health() == "SERVING"
    assert client.health("multimodal") == "SERVING"
    assert client.health("no-such-model") == "SERVICE_UNKNOWN"


ERRORS = {
    "unknown model": (lambda c, s: c.classify(s[0][0], s[0][1], model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
    "unknown version": (lambda c, s: c.model("multimodal", 99), grpc.StatusCode.NOT_FOUND, "99"),
    "not an image": (lambda c, s: c.classify(b"not an image", "x"), grpc.StatusCode.INVALID_ARGUMENT,
                     "not in an accepted format"),
    "empty text": (lambda c, s: c.classify_batch([s[0], (s[1][0], " ")]), grpc.StatusCode.INVALID_ARGUMENT, "item 1"),
    "embed nothing": (lambda c, s: c.embed(), grpc.StatusCode.INVALID_ARGUMENT, ""),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_server_errors_raise_one_exception_type_with_code_and_message(client, samples, case):
    call, code, fragment = ERRORS[case]
    with pytest.raises(FusionClientError) as info:
        call(client, samples)
    error = info.value
    assert isinstance(error, FusionServeError)
    assert error.code == code, error
    assert fragment in error.details
    assert isinstance(error.__cause__, grpc.RpcError)
    assert str(error).startswith(code.name)


def test_bad_inputs_are_refused_before_sending(client, tmp_path):
    with pytest.raises(FusionClientError) as info:
        client.classify(tmp_path / "missing.png", "x")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "missing.png" in info.value.details
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(FusionClientError, match="uint8"):
        client.classify(np.zeros((4, 4, 3), np.float32), "x")


# ---- streams ---------------------------------------------------------------------------------------
class CountingItems:
    """An item iterable that records how many items were taken but not yet consumed, at most."""

    def __init__(self, items):
        self.items = list(items)
        self.taken = 0
        self.consumed = 0
        self.most_in_flight = 0

    def __iter__(self):
        for item in self.items:
            self.taken += 1
            self.most_in_flight = max(self.most_in_flight, self.taken - self.consumed)
            yield item


def test_stream_keeps_at_most_window_items_in_flight(client, samples):
    items = CountingItems(samples[:80])
    results: dict[int, StreamResult] = {}
    for r in client.classify_stream(items, window=5):
        assert r.index not in results
        results[r.index] = r
        items.consumed += 1
    assert sorted(results) == list(range(80))
    assert 3 <= items.most_in_flight <= 5  # the window is used, and never exceeded
    assert all(r.ok for r in results.values())
    reference = client.classify_batch(samples[:8])
    for i in range(8):
        result = results[i].result
        assert result is not None and result.label_index == reference[i].label_index
        np.testing.assert_allclose(result.probabilities, reference[i].probabilities, atol=1e-5)


def test_stream_answers_bad_items_in_band_and_goes_on(client, samples, tmp_path):
    items = [samples[0], (b"junk", "x"), (tmp_path / "missing.png", "y"), (samples[1][0], ""), samples[2]]
    results = {r.index: r for r in client.classify_stream(items, window=2)}
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert [results[i].ok for i in range(5)] == [True, False, False, False, True]
    for i in (1, 2, 3):
        error = results[i].error
        assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "accepted format" in results[1].error.details and "missing.png" in results[2].error.details


def test_stream_can_be_left_early(client, samples):
    taken = []
    stream = client.classify_stream(iter(samples), window=4)
    for r in stream:
        taken.append(r.index)
        if len(taken) == 3:
            break
    stream.close()
    assert len(taken) == 3
    assert client.health() == "SERVING"  # the client still works


async def test_async_client(server, samples):
    async def items():
        for pair in samples[:30]:
            await asyncio.sleep(0)
            yield pair

    async with AsyncFusionClient(server.target) as client:
        one = await client.classify(*samples[0])
        seen = [r.index async for r in client.classify_stream(items(), window=3)]
        assert sorted(seen) == list(range(30))
        assert await client.health() == "SERVING"
        assert "multimodal" in [m.name for m in await client.models()]
        with pytest.raises(FusionClientError) as info:
            await client.classify(samples[0][0], "x", model="nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        batch = await asyncio.gather(*(client.classify(*pair) for pair in samples[:8]))
    assert batch[0].label_index == one.label_index


# ---- channel behaviour: replicas, restarts, retries -------------------------------------------------
def test_several_targets_become_one_round_robin_address_list():
    assert channel_target("host:1") == "host:1"
    assert channel_target(["127.0.0.1:1"]) == "127.0.0.1:1"
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="mix"):
        channel_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError, match="HOST:PORT"):
        channel_target(["127.0.0.1", "127.0.0.1:2"])


def test_round_robin_spreads_calls_and_survives_a_dead_replica(repository, samples):
    a, b = RunningServer(repository), RunningServer(repository)
    try:
        with FusionClient([a.target, b.target], timeout_s=10) as client:
            for _ in range(10):
                client.classify(*samples[0])
            assert _unary_requests(a) > 0 and _unary_requests(b) > 0
            a.stop(0.2)
            before = _unary_requests(b)
            for pair in samples[:20]:
                assert client.classify(*pair).label
            assert _unary_requests(b) == before + 20
    finally:
        _stop(a, b)


def test_unary_calls_ride_through_a_restart_on_the_same_port(repository, samples):
    port = _free_port()
    first = RunningServer(repository, port=port)
    second: list[RunningServer] = []

    def restart() -> None:
        first.stop(0.2)  # drains: new calls get UNAVAILABLE (retried), then the port closes
        time.sleep(0.5)
        second.append(RunningServer(repository, port=port))

    try:
        with FusionClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            client.classify(*samples[0])
            thread = threading.Thread(target=restart)
            thread.start()
            deadline = time.monotonic() + 10
            answered = 0
            while not second or (_unary_requests(second[0]) < 3 and time.monotonic() < deadline):
                assert client.classify(*samples[answered % 8]).label  # never raises
                answered += 1
            thread.join()
            assert _unary_requests(second[0]) >= 3
    finally:
        _stop(first, *second)


class FlakyServicer(pb_grpc.FusionServiceServicer):
    """Answers UNAVAILABLE to the first ``failures`` calls of each method, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def Classify(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "overloaded, try again")
        return pb.ClassifyResponse(
            labels=["mismatch", "match"],
            results=[pb.Result(label="match", label_index=1, probabilities=[0.25, 0.75])],
        )


def test_the_retry_policy_retries_unavailable(samples):
    servicer = FlakyServicer(failures=3)
    srv = ServicerServer(servicer)
    try:
        with FusionClient(srv.target) as client:
            result = client.classify(*samples[0])
            assert result.label == "match" and result.probability == 0.75
            assert servicer.calls == 4
            servicer.calls, servicer.failures = 0, 10  # more failures than attempts: the error surfaces
            with pytest.raises(FusionClientError) as info:
                client.classify(*samples[0])
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and "overloaded" in info.value.details
            assert servicer.calls == 5  # gRPC's cap on attempts
    finally:
        srv.stop()


def test_stream_resumes_on_a_live_replica_when_its_server_dies(repository, samples, caplog):
    a, b = RunningServer(repository), RunningServer(repository)
    servers = {a.target: a, b.target: b}
    stopper: list[threading.Thread] = []
    seen: list[int] = []
    try:
        with FusionClient([a.target, b.target], timeout_s=10) as client, caplog.at_level(logging.WARNING):
            for r in client.classify_stream(samples * 2, window=8):
                assert r.ok, r.error
                seen.append(r.index)
                if len(seen) == 60:  # kill the replica this stream is on
                    victim = max(servers.values(), key=_stream_requests)
                    survivor = a if victim is b else b
                    stopper.append(threading.Thread(target=victim.stop, args=(0.1,)))
                    stopper[0].start()
        assert sorted(seen) == list(range(2 * len(samples)))  # nothing lost, nothing twice
        assert _stream_requests(survivor) > 0
        assert "again on a new stream" in caplog.text
    finally:
        for t in stopper:
            t.join()
        _stop(a, b)


# ---- TLS and tokens -----------------------------------------------------------------------------------
def test_mutual_tls_and_bearer_token(repository, pki, samples, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    settings = {"tls_cert": pki / "server.pem", "tls_key": pki / "server.key", "tls_client_ca": pki / "ca.pem"}
    with RunningServer(repository, metrics_port=-1, auth_token_file=tokens, **settings) as srv:
        tls = TLSConfig.from_files(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        with FusionClient(srv.target, tls=tls, token="s3cret") as client:
            assert client.classify(*samples[0]).label
        with FusionClient(srv.target, tls=tls, token="wrong") as client:
            with pytest.raises(FusionClientError) as info:
                client.classify(*samples[0])
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert client.health() == "SERVING"  # probes need no token
        with FusionClient(srv.target, tls=TLSConfig.from_files(pki / "ca.pem"), token="s3cret",
                          wait_for_ready=False) as client:  # fmt: skip
            with pytest.raises(FusionClientError) as info:
                client.classify(*samples[0])
            assert info.value.code == grpc.StatusCode.UNAVAILABLE  # no client certificate: no handshake
        connection = ["--target", srv.target, "--ca-cert", str(pki / "ca.pem"), "--token", "s3cret",
                      "--client-cert", str(pki / "client.pem"), "--client-key", str(pki / "client.key")]  # fmt: skip
        image = tmp_path / "image.png"
        image.write_bytes(samples[0][0])
        assert cli_main(["classify", *connection, "--image", str(image), "--text", "a red circle", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["label"] in ("match", "mismatch")
    with pytest.raises(ValueError, match="both"):
        TLSConfig.from_files(pki / "ca.pem", client_cert=pki / "client.pem")


# ---- the CLI --------------------------------------------------------------------------------------------
def test_cli_classify_health_and_models(server, samples, tmp_path, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(samples[0][0])
    target = ["--target", server.target]
    assert cli_main(["classify", *target, "--image", str(image), "--text", samples[0][1], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in ("match", "mismatch") and set(out["scores"]) == {"match", "mismatch"}
    assert cli_main(["classify", *target, "--image", str(image), "--text", samples[0][1]]) == 0
    assert "multimodal v1" in capsys.readouterr().out
    assert cli_main(["health", *target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli_main(["health", *target, "--service", "multimodal"]) == 0
    assert cli_main(["health", *target, "--service", "no-such-model"]) == 1
    assert "SERVICE_UNKNOWN" in capsys.readouterr().out
    assert cli_main(["models", *target]) == 0
    listing = capsys.readouterr().out
    assert "multimodal" in listing and "READY" in listing
    assert cli_main(["models", *target, "--json"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} >= {"multimodal", "fusion"}


def test_cli_models_load_and_unload(server, repository, capsys):
    assert cli_main(["models", "unload", "multimodal", "--target", server.target]) == 2  # the shared server polls
    assert "FAILED_PRECONDITION" in capsys.readouterr().err
    with RunningServer(repository, metrics_port=-1, model_control_mode="explicit") as explicit:
        target = ["--target", explicit.target]
        assert cli_main(["models", "unload", "multimodal", *target]) == 0
        assert "multimodal" not in capsys.readouterr().out
        assert cli_main(["models", "load", "multimodal", *target, "--json"]) == 0
        assert [(m["name"], m["state"]) for m in json.loads(capsys.readouterr().out)] == [("multimodal", "READY")]
        assert cli_main(["models", "load", *target]) == 2
        assert "models load needs a model name" in capsys.readouterr().err


def test_cli_reports_errors_and_unreachable_servers(server, samples, tmp_path, capsys):
    image = tmp_path / "image.png"
    image.write_bytes(samples[0][0])
    assert cli_main(["classify", "--target", server.target, "--image", str(image), "--text", "x",
                     "--model", "nope"]) == 2  # fmt: skip
    assert "NOT_FOUND" in capsys.readouterr().err
    started = time.monotonic()
    assert cli_main(["health", "--target", f"127.0.0.1:{_free_port()}", "--timeout-s", "3"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert time.monotonic() - started < 5
