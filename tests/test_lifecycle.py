"""Live model versions on a real server: rollout under load, bad versions, removal, explicit control."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from fusionserve.preprocess import Vocabulary, decode_image, preprocess_image
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from fusionserve.v2 import grpc_service_pb2 as v2pb
from fusionserve.v2 import grpc_service_pb2_grpc as v2pb_grpc
from fusionserve.v2_codec import decode_outputs, serialize_bytes
from tests import tiny_repository
from tests.device import ATOL, reference_session
from tests.serving import RunningServer

POLL_S = 0.2


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tiny_repository.build(tmp_path / "repo", seed=0)


def expected(repo: Path, version: int, items) -> np.ndarray:
    """The probabilities version ``version`` of the three graphs gives, run directly."""
    image, text, fusion = (reference_session(repo / m / str(version) / "model.onnx")
                           for m in ("image_encoder", "text_encoder", "fusion"))  # fmt: skip
    images = np.stack([preprocess_image(decode_image(img), 64, 64) for img, _ in items])
    tokens = Vocabulary.load(repo / "multimodal" / str(version) / "vocab.json").encode([t for _, t in items])
    fi, ft = image.run(None, {"image": images})[0], text.run(None, {"tokens": tokens})[0]
    return fusion.run(None, {"image_features": fi, "text_features": ft})[0]


def wait_for(condition, timeout_s: float = 20.0, what: str = "") -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def tried(registry, name: str, version: int) -> bool:
    """Whether that version has been registered and tried: registered LOADING first, READY or FAILED after."""
    return registry.has(name, version) and registry.find(name, version).state != "LOADING"


class Traffic:
    """Typed unary, typed stream and V2 calls in background threads, every answer kept with its version."""

    def __init__(self, target: str, samples) -> None:
        self.samples = samples[:16]
        self.answers: list[tuple[str, int, int, list[float]]] = []  # (api, version, item, probabilities)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._channel = grpc.insecure_channel(target)
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._unary, self._stream, self._v2)]
        for thread in self._threads:
            thread.start()

    def _unary(self) -> None:
        stub, n = pb_grpc.FusionServiceStub(self._channel), 0
        while not self._stop.is_set():
            i = n % len(self.samples)
            try:
                item = pb.Item(image=self.samples[i][0], text=self.samples[i][1])
                r = stub.Classify(pb.ClassifyRequest(items=[item]), timeout=10)
                self.answers.append(("unary", r.model_version, i, list(r.results[0].probabilities)))
            except grpc.RpcError as e:
                self.errors.append(f"unary: {e.code().name} {e.details()}")
            n += 1

    def _stream(self) -> None:
        stub = pb_grpc.FusionServiceStub(self._channel)

        def requests():
            n = 0
            while not self._stop.is_set():
                i = n % len(self.samples)
                yield pb.ClassifyRequest(items=[pb.Item(image=self.samples[i][0], text=self.samples[i][1])],
                                         request_id=str(i))  # fmt: skip
                n += 1
                time.sleep(0.002)

        try:
            for r in stub.ClassifyStream(requests(), timeout=120):
                if r.HasField("error"):
                    self.errors.append(f"stream: {r.error.code} {r.error.message}")
                else:
                    probs = list(r.results[0].probabilities)
                    self.answers.append(("stream", r.model_version, int(r.request_id), probs))
        except grpc.RpcError as e:
            self.errors.append(f"stream: {e.code().name} {e.details()}")

    def _v2(self) -> None:
        stub, n = v2pb_grpc.GRPCInferenceServiceStub(self._channel), 0
        while not self._stop.is_set():
            i = n % len(self.samples)
            request = v2pb.ModelInferRequest(model_name="multimodal")
            for name, value in (("IMAGE", self.samples[i][0]), ("TEXT", self.samples[i][1])):
                request.inputs.add(name=name, datatype="BYTES", shape=[1])
                request.raw_input_contents.append(serialize_bytes([value]))
            try:
                r = stub.ModelInfer(request, timeout=10)
                probs = decode_outputs(r)["PROBABILITIES"][0]
                self.answers.append(("v2", int(r.model_version), i, list(probs)))
            except grpc.RpcError as e:
                self.errors.append(f"v2: {e.code().name} {e.details()}")
            n += 1

    def versions_seen(self, api: str | None = None) -> set[int]:
        return {v for a, v, _, _ in list(self.answers) if api in (None, a)}

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        self._channel.close()


def test_a_new_version_is_served_without_a_restart_and_answers_never_mix(repo, samples):
    with RunningServer(repo, metrics_port=0, repository_poll_secs=POLL_S) as srv:
        traffic = Traffic(srv.target, samples)
        try:
            wait_for(lambda: len(traffic.versions_seen()) and traffic.answers[-1][1] == 1, what="traffic on v1")
            tiny_repository.add_version(repo, 2, seed=7)
            wait_for(lambda: all(2 in traffic.versions_seen(api) for api in ("unary", "stream", "v2")),
                     what="every API answered by version 2")  # fmt: skip
            registry = srv.server.core.registry
            wait_for(lambda: all(registry.versions(m) == [2] for m in registry.names()), what="version 1 unloaded")
            seen_after = len(traffic.answers)
            wait_for(lambda: len(traffic.answers) > seen_after + 30, what="more answers from version 2")
        finally:
            traffic.stop()
        metrics = _metrics(srv.metrics_url)
    assert not traffic.errors, traffic.errors[:5]
    want = {v: expected(repo, v, traffic.samples) for v in (1, 2)}
    assert not np.allclose(want[1], want[2], atol=1e-3), "the two versions must answer differently"
    for api, version, item, probs in traffic.answers:
        np.testing.assert_allclose(probs, want[version][item], atol=max(ATOL, 1e-5), err_msg=f"{api} v{version}")
    assert traffic.answers[-1][1] == 2
    for model in ("image_encoder", "text_encoder", "fusion", "multimodal"):
        assert metrics[("fusionserve_model_serving_version", (("model", model),))] == 2
        assert metrics[("fusionserve_model_loads_total", (("model", model), ("outcome", "success")))] == 2
        assert metrics[("fusionserve_model_unloads_total", (("model", model),))] == 1
        assert metrics[("fusionserve_model_load_seconds_count", (("model", model),))] == 2


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_a_corrupt_new_version_leaves_the_good_one_serving_and_is_retried_when_its_files_change(repo, samples):
    with RunningServer(repo, metrics_port=0, repository_poll_secs=POLL_S) as srv:
        traffic = Traffic(srv.target, samples)
        try:
            staging = repo / ".staging-2"
            tiny_repository.build(staging, seed=7, version=2)
            good = (staging / "image_encoder" / "2" / "model.onnx").read_bytes()
            (staging / "image_encoder" / "2" / "model.onnx").write_bytes(good[:-64] + b"\0" * 64)
            for model in ("image_encoder", "text_encoder", "fusion", "multimodal"):
                (staging / model / "2").rename(repo / model / "2")
            registry = srv.server.core.registry
            wait_for(lambda: registry.has("image_encoder", 2) and registry.find("image_encoder", 2).state == "FAILED",
                     what="image_encoder v2 FAILED")  # fmt: skip
            failed = registry.find("image_encoder", 2)
            assert "image_encoder/2/model.onnx" in failed.reason and "sha256" in failed.reason
            wait_for(lambda: tried(registry, "multimodal", 2), what="the pipeline v2 tried")
            assert registry.find("multimodal", 2).state == "FAILED"
            assert registry.find("multimodal").version == 1 and registry.find("image_encoder").version == 1
            time.sleep(3 * POLL_S)
            assert registry.find("multimodal").version == 1  # still, after more polls: not retried unchanged
            stub = pb_grpc.FusionServiceStub(srv.channel())
            states = {(m.name, m.version): m.state for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert states[("image_encoder", 2)] == "FAILED" and states[("image_encoder", 1)] == "READY"
            answers_on_v1 = len(traffic.answers)
            (repo / "image_encoder" / "2" / "model.onnx").write_bytes(good)  # the file fixed: its fingerprint moves
            wait_for(lambda: traffic.versions_seen() == {1, 2} and traffic.answers[-1][1] == 2, what="v2 after the fix")
            assert answers_on_v1 > 0
        finally:
            traffic.stop()
    assert not traffic.errors, traffic.errors[:5]
    failures = srv.server.metrics.registry.get_sample_value(
        "fusionserve_model_loads_total", {"model": "image_encoder", "outcome": "failure"})
    assert failures == 1


def test_a_pipeline_whose_steps_are_missing_fails_until_they_come(repo, samples):
    """Version folders arriving pipeline first (not export's order): the pipeline is FAILED naming the
    missing step, version 1 serves meanwhile, and once the steps are there version 2 loads."""
    with RunningServer(repo, metrics_port=-1, repository_poll_secs=POLL_S) as srv:
        staging = repo / ".staging-2"
        tiny_repository.build(staging, seed=7, version=2)
        (staging / "multimodal" / "2").rename(repo / "multimodal" / "2")  # the pipeline first
        registry = srv.server.core.registry
        wait_for(lambda: tried(registry, "multimodal", 2), what="pipeline v2 tried")
        assert registry.find("multimodal", 2).state == "FAILED" and "not in the repository" in (
            registry.find("multimodal", 2).reason)
        assert registry.find("multimodal").version == 1 and registry.find("multimodal").state == "READY"
        for model in ("image_encoder", "text_encoder", "fusion"):
            (staging / model / "2").rename(repo / model / "2")
        wait_for(lambda: registry.find("multimodal").version == 2 and registry.find("multimodal").state == "READY",
                 what="pipeline v2 READY")  # fmt: skip
        stub = pb_grpc.FusionServiceStub(srv.channel())
        r = stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=samples[0][0], text=samples[0][1])]))
        assert r.model_version == 2
        np.testing.assert_allclose(r.results[0].probabilities, expected(repo, 2, samples[:1])[0], atol=max(ATOL, 1e-5))


def test_removed_versions_and_models_are_unloaded(repo, samples):
    tiny_repository.add_version(repo, 2, seed=7)
    with RunningServer(repo, metrics_port=-1, repository_poll_secs=POLL_S,
                       model_version_policy={"fusion": "all"}) as srv:  # fmt: skip
        registry = srv.server.core.registry
        assert registry.versions("fusion") == [1, 2] and registry.versions("multimodal") == [2]
        shutil.rmtree(repo / "fusion" / "1")
        wait_for(lambda: registry.versions("fusion") == [2], what="fusion v1 unloaded")
        shutil.rmtree(repo / "multimodal" / "2")  # the latest pipeline goes: version 1 comes back
        wait_for(lambda: registry.versions("multimodal") == [1] and registry.find("multimodal").state == "FAILED",
                 what="multimodal v1 tried again")  # fmt: skip
        assert "fusion v1" in registry.find("multimodal").reason or "fusion" in registry.find("multimodal").reason
        shutil.rmtree(repo / "multimodal")
        wait_for(lambda: "multimodal" not in registry.names(), what="multimodal unloaded")
        stub = pb_grpc.FusionServiceStub(srv.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=samples[0][0], text=samples[0][1])]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(srv.channel())
        assert health.Check(health_pb2.HealthCheckRequest(service="multimodal")).status == (
            health_pb2.HealthCheckResponse.NOT_SERVING)


def test_explicit_control_over_v2_and_the_typed_api(repo, samples):
    with RunningServer(repo, metrics_port=-1, model_control_mode="explicit") as srv:
        v2 = v2pb_grpc.GRPCInferenceServiceStub(srv.channel())
        typed = pb_grpc.FusionServiceStub(srv.channel())
        index = {(m.name, m.version): m.state for m in v2.RepositoryIndex(v2pb.RepositoryIndexRequest()).models}
        assert index == {(m, "1"): "READY" for m in ("fusion", "image_encoder", "multimodal", "text_encoder")}
        with pytest.raises(grpc.RpcError) as info:
            v2.RepositoryModelUnload(v2pb.RepositoryModelUnloadRequest(model_name="fusion"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "step of multimodal v1" in info.value.details()
        v2.RepositoryModelUnload(v2pb.RepositoryModelUnloadRequest(model_name="multimodal"))
        assert not v2.ModelReady(v2pb.ModelReadyRequest(name="multimodal")).ready
        with pytest.raises(grpc.RpcError) as info:
            typed.Classify(pb.ClassifyRequest(items=[pb.Item(image=samples[0][0], text=samples[0][1])]))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        index = {(m.name, m.version): m.state for m in v2.RepositoryIndex(v2pb.RepositoryIndexRequest()).models}
        assert index[("multimodal", "")] == ""  # in the repository, not loaded
        assert {m.name for m in v2.RepositoryIndex(v2pb.RepositoryIndexRequest(ready=True)).models} == {
            "fusion", "image_encoder", "text_encoder"}
        loaded = typed.LoadModel(pb.LoadModelRequest(name="multimodal")).models
        assert [(m.name, m.version, m.state) for m in loaded] == [("multimodal", 1, "READY")]
        r = typed.Classify(pb.ClassifyRequest(items=[pb.Item(image=samples[0][0], text=samples[0][1])]))
        np.testing.assert_allclose(r.results[0].probabilities, expected(repo, 1, samples[:1])[0], atol=max(ATOL, 1e-5))
        with pytest.raises(grpc.RpcError) as info:
            v2.RepositoryModelLoad(v2pb.RepositoryModelLoadRequest(model_name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        request = v2pb.RepositoryModelLoadRequest(model_name="fusion")
        request.parameters["config"].string_param = "{}"
        with pytest.raises(grpc.RpcError) as info:
            v2.RepositoryModelLoad(request)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "config" in info.value.details()


def test_unload_under_load_finishes_the_calls_in_flight(repo, samples):
    with RunningServer(repo, metrics_port=-1, model_control_mode="explicit") as srv:
        traffic = Traffic(srv.target, samples)
        try:
            wait_for(lambda: len(traffic.answers) > 30, what="answers")
            pb_grpc.FusionServiceStub(srv.channel()).UnloadModel(pb.UnloadModelRequest(name="multimodal"))
            answered = len(traffic.answers)
            time.sleep(0.5)
        finally:
            traffic.stop()
    assert answered > 30 and not srv.server.core.registry.has("multimodal", 1)
    # Calls that got the version before the unload were answered; later ones are told it is going
    # (UNAVAILABLE, while it finishes its calls) or gone (NOT_FOUND).
    codes = {e.split(": ")[1].split(" ")[0] for e in traffic.errors}
    assert codes <= {"UNAVAILABLE", "NOT_FOUND"}, traffic.errors[:5]
    assert all("UNLOADING" in e or "unknown model 'multimodal'" in e for e in traffic.errors), traffic.errors[:5]
    want = expected(repo, 1, traffic.samples)
    for api, _, item, probs in traffic.answers:
        np.testing.assert_allclose(probs, want[item], atol=max(ATOL, 1e-5), err_msg=api)


def test_load_and_unload_need_explicit_mode(repo):
    with RunningServer(repo, metrics_port=-1) as srv:  # the default: poll
        v2 = v2pb_grpc.GRPCInferenceServiceStub(srv.channel())
        for call in (lambda: v2.RepositoryModelUnload(v2pb.RepositoryModelUnloadRequest(model_name="multimodal")),
                     lambda: v2.RepositoryModelLoad(v2pb.RepositoryModelLoadRequest(model_name="multimodal"))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--model-control-mode explicit" in info.value.details() and "'poll'" in info.value.details()
        assert v2.ModelReady(v2pb.ModelReadyRequest(name="multimodal")).ready


@pytest.mark.slow
def test_fifty_unload_load_cycles_give_the_memory_back(repo, samples):
    from fusionserve.client import FusionClient
    from fusionserve.server.process import ServerProcess

    order = ("multimodal", "image_encoder", "text_encoder", "fusion")
    with ServerProcess(repo, "--model-control-mode", "explicit") as server, FusionClient(server.target) as client:
        rss = []
        for _ in range(50):
            for model in order:
                client.unload_model(model)
            for model in reversed(order):
                client.load_model(model)
            assert client.classify(samples[0][0], samples[0][1]).label in ("match", "mismatch")
            rss.append(server.rss_mb())
    print(f"RSS after cycle 1: {rss[0]:.1f} MiB, after cycle 50: {rss[-1]:.1f} MiB")
    assert rss[-1] < 1.10 * rss[0], rss


@pytest.fixture(scope="module")
def trained_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another training of the models, from another seed: other weights, other answers."""
    from fusionserve.export.train import train

    out = tmp_path_factory.mktemp("trained-seed-2")
    train(out, samples=600, epochs=1, seed=2, probes=False)
    return out


@pytest.mark.slow
def test_an_export_under_open_loop_load_rolls_out_with_nothing_lost(trained_dir, trained_again, samples, tmp_path):
    """The real thing: export version 1, serve it, export version 2 (another seed) under load."""
    from fusionserve.client.loadgen import LoadSettings, run
    from fusionserve.export.convert import export_from_dir

    repo = tmp_path / "repo"
    export_from_dir(trained_dir, repo)
    with RunningServer(repo, metrics_port=0, repository_poll_secs=POLL_S) as srv:
        reports: dict[str, object] = {}

        def open_loop(api: str, mode: str) -> None:
            settings = LoadSettings([srv.target], api=api, mode=mode, rate=80, duration_s=12, warmup_s=0,
                                    progress=False, timeout_s=10)  # fmt: skip
            reports[f"{api} {mode}"] = run(settings, samples[:32])

        loads = [threading.Thread(target=open_loop, args=a) for a in (("typed", "unary"), ("v2", "stream"))]
        for thread in loads:
            thread.start()
        traffic = Traffic(srv.target, samples)
        try:
            wait_for(lambda: len(traffic.answers) > 20, what="answers from version 1")
            export_from_dir(trained_again, repo)
            exported = time.monotonic()
            wait_for(lambda: 2 in traffic.versions_seen(), what="an answer from version 2")
            delay = time.monotonic() - exported
            wait_for(lambda: all(2 in traffic.versions_seen(api) for api in ("unary", "stream", "v2")),
                     what="every API answered by version 2")  # fmt: skip
        finally:
            traffic.stop()
            for thread in loads:
                thread.join(60)
        metrics = _metrics(srv.metrics_url)
    load_s = sum(metrics[("fusionserve_model_load_seconds_sum", (("model", m),))]
                 for m in ("image_encoder", "text_encoder", "fusion", "multimodal"))  # fmt: skip
    print(f"rollout: first answer from version 2 {delay:.2f} s after the export (poll {POLL_S} s, loading "
          f"both versions took {load_s:.2f} s); open loop: "
          + ", ".join(f"{k} {r.results['ok']} OK {r.results['errors']}" for k, r in reports.items()))  # type: ignore[attr-defined]
    assert delay < POLL_S + load_s + 2.0
    failures = [k for k, v in metrics.items()
                if k[0] == "fusionserve_model_loads_total" and ("outcome", "failure") in k[1] and v]  # fmt: skip
    assert not failures, f"the poller read a half-moved export: {failures}"  # polling every 0.2 s through the export
    for name, report in reports.items():
        results = report.results  # type: ignore[attr-defined]
        assert results["error_count"] == 0 and results["ok"] == results["requests"] > 500, (name, results)
    assert not traffic.errors, traffic.errors[:5]
    want = {v: expected(repo, v, traffic.samples) for v in (1, 2)}
    assert not np.allclose(want[1], want[2], atol=1e-3)
    for api, version, item, probs in traffic.answers:
        np.testing.assert_allclose(probs, want[version][item], atol=1e-5, err_msg=f"{api} v{version}")
