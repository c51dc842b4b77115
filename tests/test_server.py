"""The typed gRPC API against a real server on loopback (tiny models; see conftest)."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fusionserve.errors import RepositoryError
from fusionserve.preprocess import Vocabulary, decode_image, encode_png, preprocess_image
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests.device import ATOL, PROVIDER, reference_session
from tests.serving import RunningServer


@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.FusionServiceStub(server.channel())


def request(items, **kw) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items], **kw)


def reference_pipeline(repository: Path, items) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The repository's three graphs run directly on the CPU on the same raw inputs."""
    image, text, fusion = (reference_session(repository / m / "1" / "model.onnx")
                           for m in ("image_encoder", "text_encoder", "fusion"))  # fmt: skip
    size = image.get_inputs()[0].shape[1]
    images = np.stack([preprocess_image(decode_image(img), size, size) for img, _ in items])
    tokens = Vocabulary.load(repository / "multimodal" / "1" / "vocab.json").encode([t for _, t in items])
    fi = image.run(None, {"image": images})[0]
    ft = text.run(None, {"tokens": tokens})[0]
    return fusion.run(None, {"image_features": fi, "text_features": ft})[0], fi, ft


def test_classify_matches_onnxruntime_on_raw_inputs(stub, samples, repository):
    items = samples[:32]
    response = stub.Classify(request(items, return_embeddings=True))
    probs, fi, ft = reference_pipeline(repository, items)
    np.testing.assert_allclose([list(r.probabilities) for r in response.results], probs, atol=ATOL)
    np.testing.assert_allclose([list(r.image_embedding) for r in response.results], fi, atol=ATOL)
    np.testing.assert_allclose([list(r.text_embedding) for r in response.results], ft, atol=ATOL)
    assert [r.label for r in response.results] == [list(response.labels)[i] for i in probs.argmax(1)]
    assert response.model == "multimodal" and response.model_version == 1


def test_classify_accepts_jpeg_and_bmp_of_other_sizes(stub, samples):
    import cv2

    image = cv2.resize(decode_image(samples[0][0]), (150, 97))
    for ext in (".jpg", ".bmp", ".png"):
        ok, buf = cv2.imencode(ext, image)
        assert ok
        response = stub.Classify(request([(buf.tobytes(), samples[0][1])]))
        assert len(response.results) == 1 and abs(sum(response.results[0].probabilities) - 1) < 1e-5


@pytest.fixture(scope="module")
def heavy_repository(tmp_path_factory):
    """Tiny graphs over 256×256 images: an image-encoder run takes about 0.2 ms per item, not 0.02 ms,
    and leaves the event loop for the executor, so calls that arrive meanwhile wait in the queue, on
    any machine (with the 64×64 graphs, runs are so short that whether calls meet is chance)."""
    from tests import tiny_repository

    return tiny_repository.build(tmp_path_factory.mktemp("heavy") / "repo", image_size=(256, 256))


@pytest.fixture(scope="module")
def uncached(heavy_repository):
    """A server with the embedding cache off: every item reaches the encoders (and their counters)."""
    with RunningServer(heavy_repository, embedding_cache_mb=0) as running:
        yield running


def test_concurrent_unary_callers_each_get_their_own_answer(uncached, samples):
    server, stub = uncached, pb_grpc.FusionServiceStub(uncached.channel())
    expected = {i: list(stub.Classify(request([samples[i]])).results[0].probabilities) for i in range(64)}
    before = server.server.core.registry.find("image_encoder").batcher
    batches_before, items_before = before.batches_run, before.items_run

    def call(i: int):
        return i, list(stub.Classify(request([samples[i % 64]])).results[0].probabilities)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(320)))
    for i, probs in results:
        assert np.allclose(probs, expected[i % 64], atol=ATOL), f"call {i} got another caller's answer"
    batches = before.batches_run - batches_before
    items = before.items_run - items_before
    assert items == 320
    print(f"32 callers: 320 items in {batches} image-encoder runs ({items / batches:.1f} per run)")
    # 32 callers wait on 1-item calls: runs must merge calls as a rule, not the odd pair.
    assert items / batches >= 2, f"{batches} runs for 320 items: hardly any batching under 32 callers"


def test_stream_of_10000_items_loses_duplicates_and_mixes_nothing(stub, samples):
    reference = stub.Classify(request(samples[:64])).results
    expected = np.array([list(r.probabilities) for r in reference])

    def requests():
        for n in range(1250):
            idx = [(n * 8 + k) % 64 for k in range(8)]
            yield request([samples[i] for i in idx], request_id=f"r{n}")

    seen: dict[str, np.ndarray] = {}
    for response in stub.ClassifyStream(requests(), timeout=300):
        assert not response.HasField("error"), response.error
        assert response.request_id not in seen, f"duplicate {response.request_id}"
        seen[response.request_id] = np.array([list(r.probabilities) for r in response.results])
    assert len(seen) == 1250
    for rid, probs in seen.items():
        n = int(rid[1:])
        idx = [(n * 8 + k) % 64 for k in range(8)]
        assert np.allclose(probs, expected[idx], atol=ATOL), f"request {rid} got mixed-up results"


def test_stream_reports_bad_items_in_band_and_goes_on(stub, samples):
    good = samples[0]
    reqs = [
        request([good, (b"not an image", "a red circle"), good], request_id="a"),
        request([], request_id="b"),
        request([good], request_id="c", model="nope"),
        request([(good[0], "")], request_id="d"),
        request([good], request_id="e"),
    ]
    responses = {r.request_id: r for r in stub.ClassifyStream(iter(reqs))}
    assert set(responses) == {"a", "b", "c", "d", "e"}
    a = responses["a"]
    assert [r.HasField("error") for r in a.results] == [False, True, False]
    assert a.results[1].error.code == "INVALID_ARGUMENT" and "accepted format" in a.results[1].error.message
    assert a.results[0].label and a.results[2].label
    assert responses["b"].error.code == "INVALID_ARGUMENT" and "empty batch" in responses["b"].error.message
    assert responses["c"].error.code == "NOT_FOUND"
    assert responses["d"].results[0].error.code == "INVALID_ARGUMENT"
    assert not responses["e"].HasField("error") and responses["e"].results[0].label


BAD_REQUESTS = {
    "not an image": ([(b"\x89PNG garbage", "a")], {}, grpc.StatusCode.INVALID_ARGUMENT, "not in an accepted format"),
    "undecodable image": ([("BROKEN", "a")], {}, grpc.StatusCode.INVALID_ARGUMENT, "does not decode"),
    "empty image": ([(b"", "a red circle")], {}, grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "empty text": ([("GOOD", "  ")], {}, grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    "over-long text": ([("GOOD", "x" * 10_001)], {}, grpc.StatusCode.INVALID_ARGUMENT, "over the limit"),
    "empty batch": ([], {}, grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "batch over max": ([("GOOD", "a red circle")] * 65, {}, grpc.StatusCode.INVALID_ARGUMENT, "over the maximum"),
    "unknown model": ([("GOOD", "a")], {"model": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown model"),
    "unknown version": ([("GOOD", "a")], {"model_version": 9}, grpc.StatusCode.NOT_FOUND, "no version 9"),
    "path in model name": ([("GOOD", "a")], {"model": "../fusion"}, grpc.StatusCode.NOT_FOUND, "unknown model"),
    "tensor model": ([("GOOD", "a")], {"model": "fusion"}, grpc.StatusCode.INVALID_ARGUMENT, "tensor model"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_bad_requests_get_the_right_status_and_message(stub, samples, case, mode):
    items, kw, code, words = BAD_REQUESTS[case]
    broken = samples[0][0][:40] + b"\x00" * 200  # a PNG header that holds, then garbage
    items = [({"GOOD": samples[0][0], "BROKEN": broken}.get(img, img), text) for img, text in items]
    if mode == "unary":
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request(items, **kw))
        assert info.value.code() == code
        assert words in info.value.details()
    else:
        (response,) = list(stub.ClassifyStream(iter([request(items, request_id="x", **kw)])))
        errors = [r.error for r in response.results if r.HasField("error")]
        if response.HasField("error"):
            errors = [response.error]
        assert errors, "stream answered a bad request without an error"
        assert errors[0].code == code.name and words in errors[0].message


def test_decompression_bomb_is_refused_from_the_header(stub, samples):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0))
    bomb += chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request([(bomb, "a red circle")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "50000x50000 pixels" in info.value.details()


def test_work_whose_deadline_passes_in_the_queue_is_never_computed(repository, samples):
    """A call waiting behind a slow run gets DEADLINE_EXCEEDED, and its rows are dropped, not run late."""
    with RunningServer(repository, metrics_port=-1) as srv:
        batcher = srv.server.core.registry.find("image_encoder").batcher
        run, running = batcher._run, threading.Event()

        def slow(inputs):  # the model itself, made slow for the first call's run
            running.set()
            time.sleep(0.5)
            return run(inputs)

        batcher._run = slow
        batcher.inline_below_s = batcher.inline_idle_below_s = 0.0  # runs in the executor: the loop stays free
        stub = pb_grpc.FusionServiceStub(srv.channel())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            first = pool.submit(stub.Classify, request(samples[:1]), timeout=10)
            assert running.wait(5)
            rows_before = batcher.items_run
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(request(samples[1:3]), timeout=0.1)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert first.result().results[0].label in ("match", "mismatch")
        batcher._run = run
        stub.Classify(request(samples[3:4]), timeout=10)  # runs after anything still queued
        assert batcher.items_run - rows_before == 2, "the expired call's 2 rows were computed anyway"


def test_embed_returns_each_encoders_features(stub, samples, repository):
    items = samples[:5]
    response = stub.Embed(pb.EmbedRequest(images=[i for i, _ in items], texts=[t for _, t in items[:3]]))
    assert len(response.image_embeddings) == 5 and len(response.text_embeddings) == 3
    _, fi, ft = reference_pipeline(repository, items)
    np.testing.assert_allclose([list(e.values) for e in response.image_embeddings], fi, atol=ATOL)
    np.testing.assert_allclose([list(e.values) for e in response.text_embeddings], ft[:3], atol=ATOL)
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_and_get_models_report_state_io_and_providers(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert set(models) == {"image_encoder", "text_encoder", "fusion", "multimodal"}
    for m in models.values():
        assert m.state == "READY" and m.execution_providers[0] == PROVIDER
    mm = stub.GetModel(pb.GetModelRequest(name="multimodal"))
    assert [t.name for t in mm.inputs] == ["IMAGE", "TEXT"] and list(mm.labels) == ["mismatch", "match"]
    assert sorted(mm.steps) == ["fusion:1", "image_encoder:1", "text_encoder:1"]
    assert list(stub.GetModel(pb.GetModelRequest(name="text_encoder")).inputs[0].shape) == [-1, 100]
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_overall_and_per_model(server):
    health = health_pb2_grpc.HealthStub(server.channel())
    for service in ("", "multimodal", "image_encoder", "fusionserve.v1.FusionService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(server):
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    database = ProtoReflectionDescriptorDatabase(server.channel())
    services = database.get_services()
    assert "fusionserve.v1.FusionService" in services and "grpc.health.v1.Health" in services
    pool = DescriptorPool(database)
    method = pool.FindServiceByName("fusionserve.v1.FusionService").FindMethodByName("ClassifyStream")
    assert method.client_streaming and method.server_streaming


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the metrics endpoint, keyed by name and sorted labels."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_metrics_count_what_was_served(uncached, samples):
    """Three sequential calls of 2 items each: the counters move by exactly what was served."""
    server, stub = uncached, pb_grpc.FusionServiceStub(uncached.channel())
    before = _metrics(server.metrics_url)
    for i in range(3):
        stub.Classify(request(samples[2 * i : 2 * i + 2]))
    after = _metrics(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"{name} {labels} is not exported"
        return after[key] - before.get(key, 0.0)

    assert delta("fusionserve_requests_total", api="typed", code="OK", model="multimodal") == 3
    assert delta("fusionserve_request_latency_seconds_count", api="typed", model="multimodal") == 3
    assert delta("fusionserve_request_latency_seconds_sum", api="typed", model="multimodal") > 0
    for model in ("image_encoder", "text_encoder", "fusion"):
        assert delta("fusionserve_items_total", model=model) == 6, model
        # Each model version's batcher has its own batch figures.
        assert delta("fusionserve_batch_size_sum", model=model, version="1") == 6, model  # rows per run, summed
        assert delta("fusionserve_batch_size_count", model=model, version="1") == 3, model  # one run per call
        assert delta("fusionserve_compute_time_seconds_count", model=model, version="1") == 3, model
        assert delta("fusionserve_queue_time_seconds_count", model=model, version="1") == 3, model
        assert after[("fusionserve_queued_items", (("model", model),))] == 0, model
    assert after[("fusionserve_inflight_requests", (("model", "multimodal"),))] == 0
    assert after[("fusionserve_resident_memory_bytes", ())] > 50 * 2**20  # this process, onnxruntime loaded


@pytest.mark.parametrize(
    "limit, refusal",
    [({"max_queue_size": 8}, "queue is full (8 of 8 items)"),
     ({"max_pipeline_items": 16}, "pipeline is at capacity")],
)  # fmt: skip
def test_full_queue_answers_resource_exhausted(heavy_repository, samples, limit, refusal):
    # Overload control off: these limits, not the door, must refuse.
    with RunningServer(heavy_repository, metrics_port=-1, queue_delay_target_ms=0, **limit) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())

        def call(i):
            try:
                stub.Classify(request(samples[:8]))
                return "OK"
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"

        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(96)))
        refused = [a for a in answers if a != "OK"]
        assert refused and len(refused) < len(answers), answers
        assert all(a.startswith("RESOURCE_EXHAUSTED: ") and refusal in a for a in refused), set(refused)


def test_message_over_the_limit_is_refused(repository, samples):
    with RunningServer(repository, max_message_bytes=10_000, metrics_port=-1) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request([(samples[0][0], "x" * 20_000)]))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_shutdown_drains_in_flight_work_and_refuses_new_calls(repository, samples):
    srv = RunningServer(repository, metrics_port=-1)
    channel = srv.channel()
    stub = pb_grpc.FusionServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)

    def long_stream():
        for n in range(300):
            yield request(samples[:8], request_id=str(n))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(lambda: list(stub.ClassifyStream(long_stream()))) for _ in range(2)]
        unary = [pool.submit(stub.Classify, request(samples[:16])) for _ in range(2)]
        import time

        time.sleep(0.3)
        stopping = pool.submit(srv.stop, 20.0)
        time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request(samples[:1]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        stopping.result(60)
        for f in in_flight:
            # Every request of a stream is answered: served, or refused in-band with UNAVAILABLE
            # once draining began (the client resends those elsewhere). None is lost.
            responses = f.result()
            assert sorted(int(r.request_id) for r in responses) == list(range(300))
            codes = [r.error.code if r.HasField("error") else "OK" for r in responses]
            assert set(codes) <= {"OK", "UNAVAILABLE"} and codes.count("OK") > 0
        for f in unary:
            assert len(f.result().results) == 16
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)


def test_health_goes_not_serving_while_draining(repository):
    srv = RunningServer(repository, metrics_port=-1)
    health = health_pb2_grpc.HealthStub(srv.channel())
    srv.call(srv.server._publish_health())
    srv.server.core.begin_drain()
    srv.call(srv.server._publish_health())
    status = health.Check(health_pb2.HealthCheckRequest(service="")).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    stub = pb_grpc.FusionServiceStub(srv.channel())
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request([(encode_png(np.zeros((8, 8, 3), np.uint8)), "a")]))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    srv.stop()


def test_corrupted_model_fails_alone_and_its_pipeline_is_unavailable(repository, tmp_path, samples):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    onnx = repo / "image_encoder" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100] + b"\0" * 100)
    with RunningServer(repo, metrics_port=-1) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert models["image_encoder"].state == "FAILED" and "model.onnx" in models["image_encoder"].reason
        assert "sha256" in models["image_encoder"].reason
        assert models["multimodal"].state == "FAILED"
        assert models["text_encoder"].state == "READY" and models["fusion"].state == "READY"
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request(samples[:1]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "FAILED" in info.value.details()
        health = health_pb2_grpc.HealthStub(srv.channel())
        status = health.Check(health_pb2.HealthCheckRequest(service="multimodal")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_missing_model_file_is_named_in_the_error(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    (repo / "fusion" / "1" / "model.onnx").unlink()
    with RunningServer(repo, metrics_port=-1) as srv:
        entry = srv.server.core.registry.find("fusion")
        assert entry.state == "FAILED" and "fusion/1/model.onnx: model file is missing" in entry.reason


def test_version_policy_all_serves_every_version(repository, tmp_path, samples):
    repo = _with_version_2(repository, tmp_path)
    with RunningServer(repo, metrics_port=-1, model_version_policy={"fusion": "all"}) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        assert list(stub.GetModel(pb.GetModelRequest(name="fusion")).versions) == [1, 2]
        assert stub.GetModel(pb.GetModelRequest(name="fusion", version=1)).version == 1
    with RunningServer(repo, metrics_port=-1) as srv:  # default: latest only, plus what pipelines pin
        assert srv.server.core.registry.versions("fusion") == [1, 2]
        assert srv.server.core.registry.find("fusion").version == 2


def _with_version_2(repository: Path, tmp_path: Path, model: str = "fusion") -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    shutil.copytree(repo / model / "1", repo / model / "2")
    config = json.loads((repo / model / "2" / "config.json").read_text())
    config["version"] = 2
    (repo / model / "2" / "config.json").write_text(json.dumps(config))
    return repo


def test_a_version_list_serves_exactly_those_and_latest_falls_back_to_the_newest_ready(repository, tmp_path, samples):
    repo = _with_version_2(repository, tmp_path)
    with RunningServer(repo, metrics_port=-1, model_version_policy={"fusion": [1]}) as srv:
        assert srv.server.core.registry.versions("fusion") == [1]
    onnx = repo / "fusion" / "2" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-50] + b"\0" * 50)  # version 2 fails its hash check
    with RunningServer(repo, metrics_port=-1, model_version_policy={"fusion": [1, 2]}) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        assert stub.GetModel(pb.GetModelRequest(name="fusion", version=2)).state == "FAILED"
        latest = stub.GetModel(pb.GetModelRequest(name="fusion"))
        assert (latest.version, latest.state) == (1, "READY")  # version 0: the newest READY one
        assert stub.Classify(request(samples[:1])).results[0].label in ("match", "mismatch")
    with pytest.raises(RepositoryError, match=r"version policy asks for versions \[3\], repository has \[1, 2\]"):
        RunningServer(repo, metrics_port=-1, model_version_policy={"fusion": [1, 3]})


def test_internal_errors_say_only_internal_error(repository, samples, caplog):
    with RunningServer(repository, metrics_port=-1) as srv:

        async def broken(*args, **kwargs):
            raise ZeroDivisionError("secret detail of a bug")

        srv.server.core.classify = broken  # a bug in the core, as the front-end meets it
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.FusionServiceStub(srv.channel()).Classify(request(samples[:1]))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error"
    assert "secret detail of a bug" in caplog.text  # the detail goes to the server log only


def test_one_stream_over_max_concurrent_streams_is_resource_exhausted(repository, samples):
    with RunningServer(repository, metrics_port=-1, max_concurrent_streams=1) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        more = threading.Event()

        def requests():
            yield request([samples[0]], request_id="0")
            more.wait(10)  # the stream stays open until the second one has been refused
            yield request([samples[1]], request_id="1")

        open_stream = stub.ClassifyStream(requests(), timeout=30)
        assert next(open_stream).request_id == "0"
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ClassifyStream(iter([request([samples[2]])]), timeout=10))
        more.set()
        assert [r.request_id for r in open_stream] == ["1"]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many open streams (limit 1)" in info.value.details()


def _rows_per_run_of_one_stream(repository, samples, inflight: int) -> list[int]:
    """Rows of each image-encoder run while one stream sends 24 one-item requests to a slowed model."""
    with RunningServer(repository, metrics_port=-1, max_stream_inflight=inflight) as srv:
        batcher = srv.server.core.registry.find("image_encoder").batcher
        run, rows = batcher._run, []

        def slowed(inputs):  # the model itself, slowed so that requests pile up behind each run
            rows.append(len(inputs["image"]))
            time.sleep(0.02)
            return run(inputs)

        batcher._run = slowed
        batcher.inline_below_s = batcher.inline_idle_below_s = 0.0
        stub = pb_grpc.FusionServiceStub(srv.channel())
        replies = list(stub.ClassifyStream(iter([request([samples[n]], request_id=str(n)) for n in range(24)]),
                                           timeout=30))  # fmt: skip
    assert sorted(int(r.request_id) for r in replies) == list(range(24)) and sum(rows) == 24
    return rows


def test_a_stream_runs_at_most_max_stream_inflight_requests_at_once(repository, samples):
    assert max(_rows_per_run_of_one_stream(repository, samples, inflight=2)) <= 2
    assert max(_rows_per_run_of_one_stream(repository, samples, inflight=8)) > 2  # the window is what limits


def test_calls_over_max_concurrent_rpcs_are_resource_exhausted(repository, samples):
    with RunningServer(repository, metrics_port=-1, max_concurrent_rpcs=2) as srv:
        batcher = srv.server.core.registry.find("image_encoder").batcher
        run = batcher._run
        batcher._run = lambda inputs: (time.sleep(0.3), run(inputs))[1]  # the model, slowed: calls overlap
        batcher.inline_below_s = batcher.inline_idle_below_s = 0.0
        stub = pb_grpc.FusionServiceStub(srv.channel())

        def call(n: int) -> str:
            try:
                stub.Classify(request([samples[n]]), timeout=20)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(call, range(6)))
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and codes.count("OK") >= 2, codes


def test_connections_recycled_for_their_age_keep_serving(repository, samples):
    import time

    with RunningServer(repository, metrics_port=-1, max_connection_age_s=0.3, max_connection_age_grace_s=1) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        end, calls = time.time() + 1.5, 0
        while time.time() < end:
            assert stub.Classify(request(samples[:2]), timeout=10, wait_for_ready=True).results[0].label
            calls += 1
        assert calls > 5
