"""Fusion-aware serving: the per-modality embedding cache, and one-to-many ranking (``Rank``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from fusionserve.cli.main import main as cli_main
from fusionserve.client import FusionClient, FusionClientError
from fusionserve.errors import InvalidInputError
from fusionserve.preprocess import decode_image, encode_png
from fusionserve.server.embedding_cache import ENTRY_OVERHEAD_BYTES, CachedEncoder, EmbeddingCache
from fusionserve.server.metrics import Metrics
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from tests import tiny_repository
from tests.device import ATOL
from tests.serving import RunningServer


# ---- the cache on its own ----------------------------------------------------------------------
def test_the_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    row = np.zeros(64, np.float32)  # 256 bytes + the per-entry overhead
    cache = EmbeddingCache(3 * (row.nbytes + ENTRY_OVERHEAD_BYTES), Metrics())
    keys = [("image_encoder", 1, "p", bytes([i])) for i in range(4)]
    for key in keys[:3]:
        cache.put(key, row)
    assert cache.get(keys[0]) is not None  # keys[0] is now the most recently used
    cache.put(keys[3], row)
    assert len(cache) == 3 and cache.get(keys[1]) is None and cache.get(keys[0]) is not None
    assert cache.bytes == 3 * (row.nbytes + ENTRY_OVERHEAD_BYTES)


def test_entries_are_read_only_copies_and_a_version_can_be_dropped():
    cache = EmbeddingCache(1 << 20, Metrics())
    batch = np.arange(8, dtype=np.float32).reshape(2, 4)
    cache.put(("text_encoder", 1, "p", b"a"), batch[0])
    cache.put(("text_encoder", 2, "p", b"a"), batch[1])
    stored = cache.get(("text_encoder", 1, "p", b"a"))
    assert stored is not None and stored.base is None and not stored.flags.writeable  # not a view of the batch
    cache.drop("text_encoder", 1)
    assert cache.get(("text_encoder", 1, "p", b"a")) is None and cache.get(("text_encoder", 2, "p", b"a")) is not None


async def test_a_call_waits_for_inputs_another_computes_and_computes_those_it_gave_up_on():
    encoder = CachedEncoder("image_encoder", 1, "p", EmbeddingCache(1 << 20, Metrics()), Metrics())
    first = encoder.lookup([b"a", b"b", b"a"])  # "a" twice in one call: computed once
    assert first.compute() == [0, 1] and first.computed_as() == {2: 0}
    second, third = encoder.lookup([b"a", b"c"]), encoder.lookup([b"b"])
    assert second.compute() == [1] and list(second.theirs) == [0] and list(third.theirs) == [0]
    waiting = asyncio.ensure_future(second.wait())
    await asyncio.sleep(0)
    assert not waiting.done()  # "a" is still being computed by the first call
    first.store({0: np.ones(2, np.float32)}, {1: InvalidInputError("b is broken")})
    first.close()
    await waiting
    assert sorted(second.found) == [0] and second.found[0][0] == 1.0  # "a", as the first call computed it
    await third.wait()
    assert str(third.errors[0]) == "b is broken"  # the same input fails for the call that waited on it
    assert sorted(first.found) == [0, 2] and list(first.errors) == [1]
    fourth, fifth = encoder.lookup([b"d"]), encoder.lookup([b"d"])
    fourth.close()  # cancelled before it computed "d": the waiter computes "d" itself
    await fifth.wait()
    assert fifth.compute() == [0] and not fifth.found and not fifth.errors
    fifth.store({0: np.zeros(2, np.float32)}, {})
    assert encoder.lookup([b"d"]).found
    second.close()  # "c" announced, never computed: nothing is left in flight
    assert not encoder.inflight



# ---- the cache in the server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(repository):
    """The same repository served with the cache on (the default) and off."""
    with RunningServer(repository) as on, RunningServer(repository, embedding_cache_mb=0) as off:
        yield on, off


def _classify(server: RunningServer, items) -> np.ndarray:
    stub = pb_grpc.FusionServiceStub(server.channel())
    response = stub.Classify(pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items]))
    return np.array([list(r.probabilities) for r in response.results])


def _sample(server: RunningServer, name: str, **labels: str) -> float:
    """One exported metric sample of the server (0 when absent)."""
    return server.server.metrics.registry.get_sample_value(name, labels) or 0.0


def _rows(server: RunningServer, model: str) -> int:
    return server.server.core.registry.find(model).batcher.items_run


def test_answers_with_the_cache_equal_answers_without_it_on_a_mixed_workload(servers, samples):
    on, off = servers
    images, texts = [i for i, _ in samples[:40]], [t for _, t in samples[:40]]
    rng = np.random.default_rng(3)
    for _ in range(30):  # images and texts recombined: a known image with a new caption, and so on
        n = int(rng.integers(1, 9))
        items = [(images[rng.integers(0, 12)], texts[rng.integers(0, 40)]) for _ in range(n)]
        np.testing.assert_allclose(_classify(on, items), _classify(off, items), atol=1e-6)
    for model in ("image_encoder", "text_encoder"):
        assert _sample(on, "fusionserve_embedding_cache_hits_total", model=model) > 0, model


@pytest.mark.parametrize("modality", ["images", "texts"])
def test_embed_of_one_modality_works_with_the_cache_on_and_off(servers, samples, modality):
    request = pb.EmbedRequest(**{modality: [i if modality == "images" else t for i, t in samples[:3]]})
    answers = [pb_grpc.FusionServiceStub(s.channel()).Embed(request) for s in servers]
    rows = [[list(e.values) for e in getattr(a, f"{modality[:-1]}_embeddings")] for a in answers]
    assert len(rows[0]) == 3
    np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)


def test_one_pixel_or_one_word_changed_is_a_new_entry(servers, samples):
    on, off = servers
    image, text = samples[200]
    _classify(on, [(image, text)])
    pixels = decode_image(image)
    pixels[10, 10] = 255 - pixels[10, 10]
    changed_image, changed_text = encode_png(pixels), text + " now"
    rows_before = _rows(on, "image_encoder"), _rows(on, "text_encoder")
    for items in ([(changed_image, text)], [(image, changed_text)]):
        np.testing.assert_allclose(_classify(on, items), _classify(off, items), atol=1e-6)
    assert (_rows(on, "image_encoder"), _rows(on, "text_encoder")) == (rows_before[0] + 1, rows_before[1] + 1)


def test_identical_inputs_in_a_request_or_in_flight_together_are_computed_once(servers, samples):
    on, _ = servers
    image = samples[201][0]
    before = _rows(on, "image_encoder")
    _classify(on, [(image, t) for _, t in samples[:5]])  # one image, five captions, one request
    assert _rows(on, "image_encoder") == before + 1
    fresh = samples[202][0]
    before = _rows(on, "image_encoder")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # eight calls with one new image at once
        list(pool.map(lambda t: _classify(on, [(fresh, t)]), [t for _, t in samples[:8]]))
    assert _rows(on, "image_encoder") == before + 1


def test_two_versions_never_share_entries(tmp_path, samples):
    repo = tiny_repository.build(tmp_path / "repo", seed=0)
    tiny_repository.add_version(repo, 2, seed=7)
    items = samples[:4]
    with RunningServer(repo, model_version_policy={"multimodal": "all"}) as both:
        stub = pb_grpc.FusionServiceStub(both.channel())
        answers = {}
        for version in (1, 2, 1, 2):  # the same inputs, alternately, through each version's steps
            request = pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items], model_version=version)
            answers.setdefault(version, []).append([list(r.probabilities) for r in stub.Classify(request).results])
    with RunningServer(repo, embedding_cache_mb=0, model_version_policy={"multimodal": "all"}) as plain:
        stub = pb_grpc.FusionServiceStub(plain.channel())
        for version in (1, 2):
            request = pb.ClassifyRequest(items=[pb.Item(image=i, text=t) for i, t in items], model_version=version)
            want = [list(r.probabilities) for r in stub.Classify(request).results]
            for got in answers[version]:
                np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"version {version}")
    assert not np.allclose(answers[1][0], answers[2][0], atol=1e-3)


def test_an_unloaded_version_leaves_the_cache(tmp_path, samples):
    repo = tiny_repository.build(tmp_path / "repo", seed=0)
    with RunningServer(repo, model_control_mode="explicit") as srv:
        _classify(srv, samples[:3])
        held = lambda model: _sample(srv, "fusionserve_embedding_cache_bytes", model=model)  # noqa: E731
        assert held("image_encoder") > 0 and held("text_encoder") > 0
        stub = pb_grpc.FusionServiceStub(srv.channel())
        for model in ("multimodal", "image_encoder"):
            stub.UnloadModel(pb.UnloadModelRequest(name=model))
        assert held("image_encoder") == 0 and held("text_encoder") > 0


# ---- Rank --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(servers):
    on, _ = servers
    with FusionClient(on.target) as c:
        yield c


def test_rank_an_image_against_texts_scores_as_classify_does(servers, client, samples):
    on, _ = servers
    image, texts = samples[210][0], [t for _, t in samples[:12]]
    ranking = client.rank(image=image, texts=texts)
    match = _classify(on, [(image, t) for t in texts])[:, 1]  # labels: mismatch, match
    assert sorted(r.index for r in ranking) == list(range(12))
    np.testing.assert_allclose([r.score for r in ranking], match[[r.index for r in ranking]], atol=max(ATOL, 1e-6))
    assert [r.index for r in ranking] == sorted(range(12), key=lambda i: -match[i])
    assert [r.index for r in client.rank(image=image, texts=texts, top_k=3)] == [r.index for r in ranking[:3]]


def test_rank_a_text_against_images(servers, client, samples):
    on, _ = servers
    text, images = samples[211][1], [i for i, _ in samples[20:30]]
    ranking = client.rank(text=text, images=images)
    match = _classify(on, [(i, text) for i in images])[:, 1]
    np.testing.assert_allclose(sorted(r.score for r in ranking), sorted(match), atol=max(ATOL, 1e-6))
    assert ranking[0].index == int(np.argmax(match))


def test_rank_encodes_the_query_once(servers, samples):
    _, off = servers  # no cache: every encoder run shows in the batchers' counts
    stub = pb_grpc.FusionServiceStub(off.channel())
    before = (_rows(off, "image_encoder"), _rows(off, "text_encoder"), _rows(off, "fusion"))
    response = stub.Rank(pb.RankRequest(image=samples[0][0], texts=[t for _, t in samples[:32]]))
    after = (_rows(off, "image_encoder"), _rows(off, "text_encoder"), _rows(off, "fusion"))
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (1, 32, 32)
    assert len(response.scores) == 32 and response.positive_label == "match" and response.model_version == 1


@pytest.mark.parametrize(("request_", "message"), [
    (pb.RankRequest(texts=["a"]), "rank needs one query"),
    (pb.RankRequest(image=b"x"), "empty batch: send at least one of the candidate texts"),
    (pb.RankRequest(text="a red circle", texts=["b"]), "the query is a text: send images as candidates"),
    (pb.RankRequest(text="a red circle", images=[b"junk"]), "candidate 0: image is not in an accepted format"),
    (pb.RankRequest(text="a red circle", images=[b"junk"], top_k=-1), "top_k must be >= 0"),
    (pb.RankRequest(image=b"junk", texts=["a"]), "query 0: image is not in an accepted format"),
    (pb.RankRequest(text=" ", images=[b"x"]), "query 0: text is empty"),
    (pb.RankRequest(image=b"x", texts=["a"] * 65), "65 candidate texts is over the maximum of 64"),
])  # fmt: skip
def test_bad_rank_requests_say_what_to_fix(servers, samples, request_, message):
    on, _ = servers
    if request_.image == b"x":
        request_.image = samples[0][0]
    if list(request_.images) == [b"x"]:
        request_.images[:] = [samples[0][0]]
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.FusionServiceStub(on.channel()).Rank(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_a_tensor_model_is_refused_where_a_pipeline_is_needed(servers, samples):
    on, _ = servers
    stub = pb_grpc.FusionServiceStub(on.channel())
    image, text = samples[0]
    for call, request_ in ((stub.Classify, pb.ClassifyRequest(items=[pb.Item(image=image, text=text)], model="fusion")),
                           (stub.Embed, pb.EmbedRequest(texts=[text], model="fusion")),
                           (stub.Rank, pb.RankRequest(image=image, texts=[text], model="fusion"))):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            call(request_)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'fusion' is a tensor model; classify, embed and rank need a pipeline" in info.value.details()


def test_the_client_refuses_a_rank_without_exactly_one_query(client):
    with pytest.raises(FusionClientError, match="rank needs one query: image="):  # the client's own check
        client.rank(texts=["a"])


def test_cli_rank(servers, samples, tmp_path: Path, capsys):
    on, _ = servers
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"candidate_{k}.png")
        paths[-1].write_bytes(samples[k][0])
    args = ["rank", "--target", on.target, "--text", samples[1][1], *sum((["--image", str(p)] for p in paths), [])]
    assert cli_main([*args, "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)
    assert sorted(r["index"] for r in ranking) == [0, 1, 2] and ranking[0]["score"] >= ranking[-1]["score"]
    assert cli_main([*args, "--top-k", "1"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # header + the best one
    assert cli_main(["rank", "--target", on.target, "--text", "a", "--text", "b"]) == 2
    assert "give one query and its candidates" in capsys.readouterr().err
