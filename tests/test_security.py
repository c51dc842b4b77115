"""TLS, mutual TLS and bearer tokens against a real server; certificates made at test time."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.serving import RunningServer


def _classify(channel: grpc.Channel, samples, metadata=None):
    stub = pb_grpc.FusionServiceStub(channel)
    item = pb.Item(image=samples[0][0], text=samples[0][1])
    return stub.Classify(pb.ClassifyRequest(items=[item]), metadata=metadata, timeout=10)


def test_tls_serves_encrypted_and_refuses_plaintext(repository, pki, samples):
    with RunningServer(repository, metrics_port=-1, tls_cert=pki / "server.pem", tls_key=pki / "server.key") as srv:
        creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
        with grpc.secure_channel(srv.target, creds) as channel:
            assert _classify(channel, samples).results[0].label
        with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as info:
            _classify(channel, samples)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(repository, pki, samples):
    tls = {"tls_cert": pki / "server.pem", "tls_key": pki / "server.key", "tls_client_ca": pki / "ca.pem"}
    with RunningServer(repository, metrics_port=-1, **tls) as srv:
        ca = (pki / "ca.pem").read_bytes()
        key, cert = (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(ca, key, cert)
        with grpc.secure_channel(srv.target, with_cert) as channel:
            assert _classify(channel, samples).results[0].label
        with grpc.secure_channel(srv.target, grpc.ssl_channel_credentials(ca)) as channel:
            with pytest.raises(grpc.RpcError) as info:
                _classify(channel, samples)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens_gate_every_api_but_health(repository, tmp_path, samples):
    tokens = tmp_path / "tokens"
    tokens.write_text("# accepted tokens\nalpha-token\n\nbeta-token\n")
    srv = RunningServer(repository, metrics_port=-1, auth_token_file=tokens)
    with srv, grpc.insecure_channel(srv.target) as ch:
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", "alpha-token"),)):
            with pytest.raises(grpc.RpcError) as info:
                _classify(ch, samples, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for token in ("alpha-token", "beta-token"):
            assert _classify(ch, samples, (("authorization", f"Bearer {token}"),)).results[0].label
        stream = pb_grpc.FusionServiceStub(ch).ClassifyStream(iter([pb.ClassifyRequest(request_id="1")]))
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_health_can_be_closed_too(repository, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("t\n")
    with RunningServer(repository, metrics_port=-1, auth_token_file=tokens, auth_exempt_health=False) as srv:
        with grpc.insecure_channel(srv.target) as ch, pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_bad_security_settings_are_clear_errors(repository, tmp_path):
    from fusionserve.server.settings import ServerSettings

    with pytest.raises(ValueError, match="go together"):
        ServerSettings.load(None, env={}, overrides={"tls_cert": tmp_path / "c.pem"})
    empty = tmp_path / "empty"
    empty.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        RunningServer(repository, metrics_port=-1, auth_token_file=empty)


@pytest.mark.parametrize("case", ["garbage certificate", "key of another certificate", "garbage client CA"])
def test_bad_tls_files_fail_at_start_before_any_model_loads(repository, pki, tmp_path, case):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    cert, key, ca = pki / "server.pem", pki / "server.key", None
    if case == "garbage certificate":
        cert, needle = garbage, "not a PEM certificate chain and its private key"
    elif case == "key of another certificate":
        key, needle = pki / "client.key", "not a PEM certificate chain and its private key"
    else:
        ca, needle = garbage, "TLS client CA"
    args = [sys.executable, "-m", "fusionserve", "serve", "--repository", str(repository), "--port", "0",
            "--metrics-port", "-1", "--tls-cert", str(cert), "--tls-key", str(key)]  # fmt: skip
    if ca is not None:
        args += ["--tls-client-ca", str(ca)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert "READY" not in done.stderr  # refused before loading any model


def test_model_control_always_needs_a_token(repository, tmp_path):
    """Health may stay open for probes; loading and unloading models never does."""
    from fusionserve.v2 import grpc_service_pb2 as v2pb
    from fusionserve.v2 import grpc_service_pb2_grpc as v2pb_grpc

    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with RunningServer(repository, metrics_port=-1, auth_token_file=tokens, model_control_mode="explicit") as srv:
        channel = srv.channel()
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status == 1
        v2 = v2pb_grpc.GRPCInferenceServiceStub(channel)
        typed = pb_grpc.FusionServiceStub(channel)
        for call in (lambda md: v2.RepositoryModelUnload(v2pb.RepositoryModelUnloadRequest(model_name="multimodal"),
                                                         metadata=md),
                     lambda md: v2.RepositoryModelLoad(v2pb.RepositoryModelLoadRequest(model_name="multimodal"),
                                                       metadata=md),
                     lambda md: typed.UnloadModel(pb.UnloadModelRequest(name="multimodal"), metadata=md),
                     lambda md: typed.LoadModel(pb.LoadModelRequest(name="multimodal"), metadata=md)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                call(None)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call((("authorization", "Bearer s3cret"),))
