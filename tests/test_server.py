"""The typed gRPC API against a real server on loopback (tiny models; see conftest)."""

from __future__ import annotations

import asyncio
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
from tests.processes import ServerProcess, wait_until
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
def uncached(heavy_repository):
    """A server with the embedding cache off: every item reaches the encoders (and their counters)."""
    with RunningServer(heavy_repository, embedding_cache_mb=0) as running:
        yield running


async def _classify_rounds(target: str, samples, calls: range, together: int) -> list[tuple[int, list[float]]]:
    """One-item Classify calls ``i`` (sample ``i % 64``), sent ``together`` at a time; (i, probabilities) each."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.FusionServiceStub(channel)

        async def call(i: int) -> tuple[int, list[float]]:
            reply = await stub.Classify(request([samples[i % 64]]), timeout=30)
            return i, list(reply.results[0].probabilities)

        answers = []
        for start in range(calls.start, calls.stop, together):
            answers += await asyncio.gather(*(call(i) for i in range(start, min(start + together, calls.stop))))
        return answers


def test_concurrent_unary_callers_each_get_their_own_answer(heavy_repository, samples):
    # A server process of its own (no GIL shared with the callers), the cache off (every item reaches
    # the image encoder), and callers that send together: 10 rounds of 32 concurrent one-item calls.
    with ServerProcess(heavy_repository, "--embedding-cache-mb", "0", metrics_port=0) as server:
        expected = dict(asyncio.run(_classify_rounds(server.target, samples, range(64), together=1)))
        def runs() -> tuple[float, float, float]:  # (items, runs, runs of at most 4 items) so far
            samples_ = {(s.name, s.labels.get("le")): s.value for s in server.samples()
                        if s.labels.get("model") == "image_encoder" and s.name.startswith("fusionserve_batch_size")}
            return (samples_[("fusionserve_batch_size_sum", None)], samples_[("fusionserve_batch_size_count", None)],
                    samples_[("fusionserve_batch_size_bucket", "4.0")])  # fmt: skip

        before = runs()
        results = asyncio.run(_classify_rounds(server.target, samples, range(320), together=32))
        after = runs()
    for i, probs in results:
        assert np.allclose(probs, expected[i % 64], atol=ATOL), f"call {i} got another caller's answer"
    items, batches, small = (a - b for a, b in zip(after, before, strict=True))
    assert items == 320 and len(results) == 320
    print(f"32 callers: 320 items in {batches:.0f} image-encoder runs ({items / batches:.1f} per run), "
          f"{batches - small:.0f} of more than 4")  # fmt: skip
    # 32 calls sent together: runs merge calls as a rule (on a machine busy with other work the loop
    # takes calls up more slowly and the runs are smaller, so the rule is 1.5 a run on average), and
    # some runs merge many.
    assert items / batches >= 1.5, f"{batches:.0f} runs for 320 items: hardly any batching under 32 callers"
    assert batches - small > 0, "no run of more than 4 items under 32 callers sent together"


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


def _gauge(srv: RunningServer, name: str, **labels: str) -> float:
    return srv.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_call_whose_deadline_cannot_be_met_is_refused_at_once_and_never_computed(heavy_repository, samples):
    """Behind a 64-item call, a call with 30 ms left is refused before any work; one with time to wait is served."""
    with RunningServer(heavy_repository, embedding_cache_mb=0) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        big = request([samples[i] for i in range(64)])
        stub.Classify(big, timeout=60)  # the door measures the capacity and a lone call's time
        assert _gauge(srv, "fusionserve_admission_capacity_items_per_second") > 0
        items = ("fusionserve_items_total", {"model": "image_encoder"})
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(stub.Classify, big, timeout=60)
            assert wait_until(lambda: _gauge(srv, "fusionserve_inflight_requests", model="multimodal") == 1, 10)
            computed = _gauge(srv, *items[:1], **items[1])
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(request(samples[64:66]), timeout=0.03)
            refused_after_s = time.monotonic() - started
            patient = pool.submit(stub.Classify, request(samples[66:68]), timeout=60)
            assert len(first.result().results) == 64 and len(patient.result().results) == 2
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "server busy" in error.details() and "after its deadline" in error.details()
    assert 1 <= int(dict(error.trailing_metadata())["grpc-retry-pushback-ms"]) <= 1000
    assert refused_after_s < 0.03  # at once: not after waiting out its deadline
    assert _gauge(srv, *items[:1], **items[1]) - computed == 64 + 2  # the refused call's 2 items never ran
    assert _gauge(srv, "fusionserve_shed_requests_total", reason="deadline") == 1


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
    """Three sequential calls of 2 items each, and one refused: the counters move by exactly what was served."""
    server, stub = uncached, pb_grpc.FusionServiceStub(uncached.channel())
    before = _metrics(server.metrics_url)
    for i in range(3):
        stub.Classify(request(samples[2 * i : 2 * i + 2]))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Classify(request([(samples[0][0], " ")]))  # an empty text
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = _metrics(server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"{name} {labels} is not exported"
        return after[key] - before.get(key, 0.0)

    assert delta("fusionserve_requests_total", api="typed", code="OK", model="multimodal", version="1") == 3
    refused = delta("fusionserve_requests_total", api="typed", code="INVALID_ARGUMENT", model="multimodal", version="1")
    assert refused == 1
    assert delta("fusionserve_request_latency_seconds_count", api="typed", model="multimodal", version="1") == 4
    assert delta("fusionserve_request_latency_seconds_sum", api="typed", model="multimodal", version="1") > 0
    for model in ("image_encoder", "text_encoder", "fusion"):
        assert delta("fusionserve_items_total", model=model) == 6, model
        # Each model version's batcher has its own batch figures.
        assert delta("fusionserve_batch_size_sum", model=model, version="1") == 6, model  # rows per run, summed
        assert delta("fusionserve_batch_size_count", model=model, version="1") == 3, model  # one run per call
        assert delta("fusionserve_compute_time_seconds_count", model=model, version="1") == 3, model
        assert delta("fusionserve_queue_time_seconds_count", model=model, version="1") == 3, model
        assert after[("fusionserve_queued_items", (("model", model),))] == 0, model
    # The pipeline's decoding: each served item's image once (the refused call's text failed first).
    assert delta("fusionserve_image_decodes_total", model="multimodal", version="1") == 6
    assert delta("fusionserve_image_decode_seconds_total", model="multimodal", version="1") > 0
    assert after[("fusionserve_inflight_requests", (("model", "multimodal"),))] == 0
    assert after[("fusionserve_resident_memory_bytes", ())] > 50 * 2**20  # this process, onnxruntime loaded


@pytest.mark.parametrize("limit, bound", [({"max_queue_size": 8}, 8), ({"max_pipeline_items": 16}, 16)])
def test_a_full_queue_or_pipeline_holds_callers_back_and_answers_them_all(heavy_repository, samples, limit, bound):
    # 24 callers of 8 items each (192 items) against a bound of 8 or 16: callers wait for room, none is
    # refused, and the pipeline's queue never holds more than the bound.
    with RunningServer(heavy_repository, metrics_port=-1, embedding_cache_mb=0, **limit) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        done, queued = threading.Event(), []

        def watch() -> None:
            while not done.is_set():
                queued.append(_gauge(srv, "fusionserve_queued_items", model="multimodal"))
                time.sleep(0.001)

        def call(i: int) -> str:
            try:
                return f"{len(stub.Classify(request(samples[8 * i : 8 * i + 8]), timeout=60).results)}"
            except grpc.RpcError as e:
                return f"{e.code().name}: {e.details()}"

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with concurrent.futures.ThreadPoolExecutor(24) as pool:
                answers = list(pool.map(call, range(24)))
        finally:
            done.set()
            watcher.join()
    assert answers == ["8"] * 24, set(answers)
    assert max(queued) > 0 and max(queued) <= bound, max(queued)


def test_calls_that_arrive_together_are_batched_though_a_lone_call_runs_at_once(repository, samples):
    # A lone call's batch runs at once (no wait for a batch). Calls that arrive together must not each
    # find the pipeline empty in turn (the one before them already answered) and be served one by one.
    with RunningServer(repository, embedding_cache_mb=0, metrics_port=-1) as srv:
        core = srv.server.core
        batcher = core.registry.find("multimodal").pipeline.batcher  # type: ignore[union-attr]

        async def calls(callers: int, each: int) -> None:
            async def caller(k: int) -> None:
                for i in range(each):
                    image, text = samples[(k * each + i) % 64]
                    await core.classify("multimodal", 0, [image], [text])
                    await asyncio.sleep(0)  # the next call arrives a little later, as a client's would

            await asyncio.gather(*(caller(k) for k in range(callers)))

        srv.call(calls(1, 8))  # one caller: its batches run at once
        before = batcher.batches_run
        srv.call(calls(16, 4))
        assert batcher.batches_run - before <= 16, "64 calls from 16 callers at once should share batches"


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
    # A drain delay of 2 s: health is NOT_SERVING and new calls are UNAVAILABLE for all of it.
    srv = RunningServer(repository, metrics_port=-1, drain_delay_s=2)
    channel = srv.channel()
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.FusionServiceStub(channel)
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    assert stub.Classify(request([(png, "a")])).results
    stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(10), srv.loop)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(service="")).status != serving, 10)
    for service in ("", "fusionserve.v1.FusionService", "multimodal"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(request([(png, "a")]))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    assert not stopping.done()  # still within the drain delay
    stopping.result(30)
    srv.stop()  # the loop (the server has stopped already)


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


def _runs_of_one_stream(heavy_repository, samples, inflight: int) -> tuple[float, float]:
    """(image-encoder runs, of which of more than 2 rows) while one stream sends 24 one-item requests.

    The heavy image encoder takes milliseconds per item: requests pile up behind each run, as many as
    the stream's window lets through.
    """
    with RunningServer(heavy_repository, max_stream_inflight=inflight, embedding_cache_mb=0) as srv:
        stub = pb_grpc.FusionServiceStub(srv.channel())
        replies = list(stub.ClassifyStream(iter([request([samples[n]], request_id=str(n)) for n in range(24)]),
                                           timeout=30))  # fmt: skip
        runs = _gauge(srv, "fusionserve_batch_size_count", model="image_encoder", version="1")
        up_to_two = _gauge(srv, "fusionserve_batch_size_bucket", model="image_encoder", version="1", le="2.0")
        rows = _gauge(srv, "fusionserve_batch_size_sum", model="image_encoder", version="1")
    assert sorted(int(r.request_id) for r in replies) == list(range(24)) and not any(r.error.code for r in replies)
    assert rows == 24 + 1  # the stream's 24 items and the warm-up's one: no item ran twice
    return runs, runs - up_to_two


def test_a_stream_runs_at_most_max_stream_inflight_requests_at_once(heavy_repository, samples):
    runs, bigger = _runs_of_one_stream(heavy_repository, samples, inflight=2)
    assert bigger == 0, f"{bigger:.0f} of {runs:.0f} runs had more than 2 rows with a window of 2"
    runs, bigger = _runs_of_one_stream(heavy_repository, samples, inflight=8)
    assert bigger > 0, "no run of more than 2 rows with a window of 8: the window is not what limits"


def test_calls_over_max_concurrent_rpcs_are_refused_with_pushback_and_health_is_exempt(repository, samples):
    with RunningServer(repository, max_concurrent_rpcs=2) as srv:
        channel = srv.channel()
        stub = pb_grpc.FusionServiceStub(channel)
        closing = [threading.Event(), threading.Event()]

        def held(close: threading.Event):  # an open stream holds one place until it is closed
            yield request([samples[0]], request_id="0")
            close.wait(30)

        streams = [stub.ClassifyStream(held(close), timeout=60) for close in closing]
        for open_stream in streams:
            assert next(open_stream).request_id == "0"
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request(samples[:1]), timeout=10)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        closing[0].set()
        assert list(streams[0]) == []
        assert stub.Classify(request(samples[:1]), timeout=10).results  # a place is free again
        closing[1].set()
        assert list(streams[1]) == []
        refused = _gauge(srv, "fusionserve_shed_requests_total", reason="calls")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many calls in flight (max_concurrent_rpcs 2)" in info.value.details()
    assert 1 <= int(dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"]) <= 1000
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert refused == 1


def test_connections_recycled_for_their_age_keep_serving(repository, samples):
    # Connections live 0.3 s: in 1.5 s the client's one channel reconnects several times (each recycled
    # connection ends in GOAWAY; the channel goes through IDLE or CONNECTING back to READY) and no
    # call in between fails.
    with RunningServer(repository, metrics_port=-1, max_connection_age_s=0.3, max_connection_age_grace_s=1) as srv:
        channel = srv.channel()
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append, try_to_connect=True)
        stub = pb_grpc.FusionServiceStub(channel)
        end, calls = time.monotonic() + 1.5, 0
        while time.monotonic() < end:
            assert stub.Classify(request(samples[:2]), timeout=10, wait_for_ready=True).results[0].label
            calls += 1
        channel.unsubscribe(states.append)
    ready = states.count(grpc.ChannelConnectivity.READY)
    assert calls > 5 and ready >= 3, (calls, states)
