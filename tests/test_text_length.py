"""Text that pays for words, served: a text encoder that takes each batch cut to its longest caption.

Tiny graphs (no TensorFlow): the repository's text encoder is an LSTM with ``sequence_lens`` and its
config says ``"sequence_length": "dynamic"``. Captions of many lengths, sent in separate calls that
meet in one batch, must get exactly what onnxruntime gives each caption run alone at its own length;
a V2 call straight to the text encoder takes rows of any length up to ``max_length``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import numpy as np
import pytest

from fusionserve.preprocess import Vocabulary
from fusionserve.repository import load_config, variable_length
from fusionserve.server.batcher import DynamicBatcher, Ragged
from fusionserve.v1 import fusion_pb2 as pb
from fusionserve.v1 import fusion_pb2_grpc as pb_grpc
from fusionserve.v2 import grpc_service_pb2 as v2pb
from fusionserve.v2 import grpc_service_pb2_grpc as v2pb_grpc
from fusionserve.v2_codec import decode_outputs, to_raw
from tests import tiny_repository
from tests.device import ATOL, reference_session
from tests.serving import RunningServer

LENGTH = 24  # the tokenizer's max_length: longer captions are truncated to it


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_repository.build(tmp_path_factory.mktemp("cut") / "repo", max_length=LENGTH, variable_length=True)


@pytest.fixture(scope="module")
def vocab(repo: Path) -> Vocabulary:
    return Vocabulary.load(repo / "multimodal" / "1" / "vocab.json")


@pytest.fixture(scope="module")
def captions(vocab: Vocabulary) -> list[str]:
    """Captions of 1 to 30 words (the longest truncated to LENGTH tokens), shuffled."""
    rng = np.random.default_rng(5)
    words = sorted(vocab.word_index)
    return [" ".join(rng.choice(words, n)) for n in rng.permutation(np.arange(1, 31))]


@pytest.fixture(scope="module")
def alone(repo: Path, vocab: Vocabulary):
    """onnxruntime on one caption at a time, at its own length: what each caption's features must be."""
    session = reference_session(repo / "text_encoder" / "1" / "model.onnx")

    def features(texts: list[str]) -> np.ndarray:
        rows = [vocab.cut(vocab.encode([t])) for t in texts]
        assert all(r.shape[1] == min(len(t.split()), LENGTH) for r, t in zip(rows, texts, strict=True))
        return np.concatenate([session.run(None, {"tokens": r})[0] for r in rows])

    return features


def test_the_config_says_dynamic_and_the_repository_reads_it(repo: Path) -> None:
    config = load_config(repo, "text_encoder", 1)
    length = variable_length(config)
    assert length is not None and (length.input, length.max_length, length.pad_value) == ("tokens", LENGTH, 0)
    assert config.input("tokens").shape == (-1, -1)  # type: ignore[union-attr]


async def test_calls_meet_in_one_batch_cut_to_the_longest_caption_and_each_gets_its_own_answer(repo, vocab, captions,
                                                                                             alone):  # fmt: skip
    session = reference_session(repo / "text_encoder" / "1" / "model.onnx")
    batches: list[np.ndarray] = []

    def run(inputs):
        batches.append(inputs["tokens"].copy())
        return {"text_features": session.run(None, {"tokens": inputs["tokens"]})[0]}

    batcher = DynamicBatcher("text_encoder", run, None, max_batch_size=64, max_queue_delay_s=0.002,
                             max_queue_size=512, ragged={"tokens": Ragged(vocab.pad_value, LENGTH)})  # fmt: skip
    await batcher.start()
    short = [c for c in captions if len(c.split()) <= LENGTH // 2]  # 1 to 12 words, shuffled
    calls = [short[:3], short[3:4], short[4:9], *[[c] for c in short[9:]]]
    shorts = [c for call in calls for c in call]
    answers = await asyncio.gather(*(batcher.submit({"tokens": vocab.cut(vocab.encode(call))}) for call in calls))
    await batcher.aclose()
    assert len(batches) == 1, "the calls were queued together, so they ran as one batch"
    lengths = [min(len(c.split()), LENGTH) for c in shorts]
    assert batches[0].shape == (len(shorts), max(lengths))  # cut to the longest caption, not LENGTH
    for row, n in zip(batches[0], lengths, strict=True):
        assert (row[:n] != vocab.pad_value).all() and (row[n:] == vocab.pad_value).all()
    got = np.concatenate([answer["text_features"] for answer in answers])
    np.testing.assert_allclose(got, alone(shorts), atol=ATOL)


@pytest.fixture(scope="module")
def servers(repo: Path):
    with RunningServer(repo, embedding_cache_mb=0, metrics_port=-1) as off, RunningServer(repo, metrics_port=-1) as on:
        yield off, on


def test_the_server_answers_captions_batched_across_calls_as_each_alone(servers, captions, alone) -> None:
    off, _ = servers
    core, text = off.server.core, off.server.core.registry.find("text_encoder")
    before = text.batcher.batches_run

    async def embed_each() -> list[np.ndarray]:  # one call per caption, all queued before the batcher runs
        done = await asyncio.gather(*(core.embed("multimodal", 0, [], [c]) for c in captions))
        return [embeddings.text[0] for _, embeddings in done]

    got = off.call(embed_each())
    assert text.batcher.batches_run - before == 1, "the calls met in one batch"
    np.testing.assert_allclose(np.stack(got), alone(captions), atol=ATOL)


def test_rank_scores_every_caption_as_its_features_alone_give(servers, repo, captions, alone, samples) -> None:
    off, _ = servers
    image = samples[0][0]
    stub = pb_grpc.FusionServiceStub(off.channel())
    ranking = stub.Rank(pb.RankRequest(image=image, texts=captions))
    image_features = np.array(stub.Embed(pb.EmbedRequest(images=[image])).image_embeddings[0].values, np.float32)
    fusion = reference_session(repo / "fusion" / "1" / "model.onnx")
    want = fusion.run(None, {"image_features": np.repeat(image_features[None], len(captions), 0),
                             "text_features": alone(captions)})[0][:, 1]  # fmt: skip
    np.testing.assert_allclose(list(ranking.scores), want, atol=ATOL)


def test_the_cache_keys_a_caption_on_its_full_length_row_whoever_its_neighbours(servers, captions, alone) -> None:
    _, on = servers
    stub = pb_grpc.FusionServiceStub(on.channel())
    text = on.server.core.registry.find("text_encoder")
    short, long_ = min(captions, key=len), max(captions, key=len)
    first = stub.Embed(pb.EmbedRequest(texts=[short])).text_embeddings[0].values
    items = text.batcher.items_run
    second = stub.Embed(pb.EmbedRequest(texts=[long_, short])).text_embeddings
    assert text.batcher.items_run - items == 1  # the short caption came from the cache, cut or not
    assert list(second[1].values) == list(first)
    np.testing.assert_allclose([list(first), list(second[0].values)], alone([short, long_]), atol=ATOL)


def _v2(tokens: np.ndarray) -> v2pb.ModelInferRequest:
    request = v2pb.ModelInferRequest(model_name="text_encoder")
    request.inputs.add(name="tokens", datatype="INT32", shape=tokens.shape)
    request.raw_input_contents.append(to_raw(tokens.astype(np.int32), "INT32"))
    return request


def test_a_v2_call_straight_to_the_text_encoder_takes_rows_of_any_length_up_to_max_length(servers, vocab, captions,
                                                                                        alone) -> None:  # fmt: skip
    off, _ = servers
    stub = v2pb_grpc.GRPCInferenceServiceStub(off.channel())
    full = vocab.encode(captions[:6])
    for tokens in (full, vocab.cut(full), vocab.cut(vocab.encode(captions[:1]))):
        got = decode_outputs(stub.ModelInfer(_v2(tokens)))["text_features"]
        np.testing.assert_allclose(got, alone(captions[: len(tokens)]), atol=ATOL)
    for tokens, message in ((np.ones((2, LENGTH + 1)), f"takes rows of 1 to {LENGTH} values"),
                            (np.full((1, 3), 10_000), r"values must lie in \[0, 10000\)")):  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_v2(tokens))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(message, info.value.details() or ""), info.value.details()
