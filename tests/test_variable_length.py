"""Text that pays for words, at export: the graph rewrite (tiny graphs, no TensorFlow) and the detection (Keras).

The rewrite gives a graph's one LSTM ``sequence_lens`` counted from the tokens and reads its final state
``Y_h``: on a batch of captions of many lengths cut to its longest, it must answer for each caption
what the graph answers for that caption alone, unpadded. The detection (``decide``, tf tier) exports
a masked model so, and keeps every other model (no mask, padding at the front) at full length, as
before, equal to Keras.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fusionserve.errors import ExportError
from fusionserve.export import variable_length
from fusionserve.preprocess import Vocabulary

HIDDEN, FEATURES, ROWS, LENGTH = 6, 5, 50, 12
INT_MAX = np.iinfo(np.int64).max


def lstm_graph(reading: str = "last step", direction: str = "forward", lstms: int = 1) -> onnx.ModelProto:
    """tokens [N, T] → embedding → LSTM → ``reading`` of its Y → dense: the shape tf2onnx gives a Keras LSTM.

    ``reading``: ``last step`` (Squeeze, Slice of the last step, Squeeze: a Keras LSTM's last output),
    ``mean`` (the mean over time, as return_sequences + pooling), ``Y_h`` (the final state, read directly).
    """
    rng = np.random.default_rng(0)
    directions = 2 if direction == "bidirectional" else 1
    nodes = [helper.make_node("Gather", ["embedding", "tokens"], ["embedded"]),
             helper.make_node("Transpose", ["embedded"], ["x0"], perm=[1, 0, 2])]  # fmt: skip
    for k in range(lstms):  # a stack passes its steps on: [T, 1, N, H] → [T, N, H]
        nodes.append(helper.make_node("LSTM", [f"x{k}", "w", "r", "b"], [f"y{k}", f"h{k}"], hidden_size=HIDDEN,
                                      direction=direction))  # fmt: skip
        if directions == 1:
            nodes.append(helper.make_node("Squeeze", [f"y{k}", "axis1"], [f"x{k + 1}"]))
        else:  # [T, 2, N, H] → [T, N, 2H]
            nodes += [helper.make_node("Transpose", [f"y{k}"], [f"t{k}"], perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"t{k}", "merge_directions"], [f"x{k + 1}"])]  # fmt: skip
    y = f"x{lstms}"  # [T, N, directions × H]
    if reading == "last step":
        nodes += [helper.make_node("Slice", [y, "minus1", "int_max", "axis0"], ["last"]),
                  helper.make_node("Squeeze", ["last", "axis0"], ["state"])]  # fmt: skip
    elif reading == "mean":
        nodes.append(helper.make_node("ReduceMean", [y], ["state"], axes=[0], keepdims=0))
    else:
        nodes[-1] = helper.make_node("Squeeze", [f"h{lstms - 1}", "axis0"], ["state"])
    nodes += [helper.make_node("MatMul", ["state", "dense_w"], ["dense"]),
              helper.make_node("Add", ["dense", "dense_b"], ["features"])]  # fmt: skip
    inits = [numpy_helper.from_array(rng.normal(0, 1, shape).astype(np.float32), name) for name, shape in (
        ("embedding", (ROWS, HIDDEN)), ("w", (directions, 4 * HIDDEN, HIDDEN)),
        ("r", (directions, 4 * HIDDEN, HIDDEN)), ("b", (directions, 8 * HIDDEN)),
        ("dense_w", (directions * HIDDEN, FEATURES)), ("dense_b", (FEATURES,)))]  # fmt: skip
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("axis0", [0]), ("axis1", [1]), ("minus1", [-1]), ("int_max", [INT_MAX]), ("merge_directions", [0, 0, -1]))]
    graph = helper.make_graph(nodes, "text", [helper.make_tensor_value_info("tokens", TensorProto.INT32, ["N", "T"])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, tokens: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"tokens": tokens})[0]


VOCAB = Vocabulary({f"w{i}": i for i in range(2, ROWS)}, max_words=ROWS, max_length=LENGTH, padding="post",
                   truncating="post")  # fmt: skip


def captions(rng: np.random.Generator) -> list[list[int]]:
    """Two captions of every length 1 … LENGTH, shuffled."""
    return [rng.integers(1, ROWS, n).tolist() for n in rng.permutation(np.repeat(np.arange(1, LENGTH + 1), 2))]


def test_the_rewritten_graph_answers_each_caption_of_a_cut_batch_as_the_graph_does_it_alone():
    original = lstm_graph()
    rewritten = variable_length.with_sequence_lengths(original, "tokens", VOCAB.pad_value)
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops.count("LSTM") == 1 and "Slice" not in ops
    rng = np.random.default_rng(1)
    ids = captions(rng)
    alone = np.concatenate([run(original, np.array([c], np.int32)) for c in ids])  # no padding at all
    for size in (1, 3, 8, len(ids)):  # batches mixing lengths, each cut to its longest
        got = np.concatenate([run(rewritten, VOCAB.cut(VOCAB.pad(ids[k : k + size])))
                              for k in range(0, len(ids), size)])  # fmt: skip
        np.testing.assert_allclose(got, alone, atol=1e-6)
    full = run(rewritten, VOCAB.pad(ids))  # at full length too: the padding is skipped, not read
    np.testing.assert_allclose(full, alone, atol=1e-6)


def test_an_all_padding_row_reads_the_zero_state():
    rewritten = variable_length.with_sequence_lengths(lstm_graph(), "tokens", 0)
    bias = numpy_helper.to_array(next(t for t in rewritten.graph.initializer if t.name == "dense_b"))
    np.testing.assert_allclose(run(rewritten, np.zeros((2, 4), np.int32)), np.stack([bias, bias]), atol=1e-7)


@pytest.mark.parametrize(("graph", "message"), [
    (lambda: lstm_graph(reading="mean"), "not read only at its last step"),
    (lambda: lstm_graph(direction="bidirectional"), "not a forward one"),
    (lambda: lstm_graph(lstms=2), r"recurrent ops are \['LSTM', 'LSTM'\], not one LSTM"),
    (lambda: lstm_graph(reading="Y_h"), "output Y is not read"),
    (lambda: variable_length.with_sequence_lengths(lstm_graph(), "tokens", 0), "already has sequence lengths"),
])  # fmt: skip
def test_graphs_the_rewrite_does_not_cover_are_refused_saying_why(graph, message):
    with pytest.raises(ExportError, match=message):
        variable_length.with_sequence_lengths(graph(), "tokens", 0)


def test_the_check_batches_hold_every_length_and_mix_them():
    rows, batches = variable_length.check_batches(VOCAB, (0, ROWS), np.dtype(np.int32))
    lengths = (rows != VOCAB.pad_value).sum(1)
    assert sorted(set(lengths)) == list(range(LENGTH + 1))
    assert sum(len(b) for b in batches) == len(rows)
    mixed = [b for b in batches if len(set((b != 0).sum(1))) > 1]
    assert len(mixed) > len(batches) // 2
    assert all(b.shape[1] == max(1, (b != 0).sum(1).max()) for b in batches)  # each cut to its longest


# ---------------------------------------------------------------------------------- with TensorFlow


def every_length(vocab: Vocabulary, seed: int = 7) -> list[str]:
    """Two captions of every length 1 … max_length, of the vocabulary's own words, shuffled."""
    rng = np.random.default_rng(seed)
    words = sorted(vocab.word_index)
    return [" ".join(rng.choice(words, n)) for n in rng.permutation(np.repeat(np.arange(1, vocab.max_length + 1), 2))]


@pytest.mark.slow
def test_the_trained_text_encoder_takes_cut_batches_and_equals_keras_on_captions_of_every_length(
    trained_repository, trained_dir
):
    import keras

    from fusionserve.repository import load_config

    config = load_config(trained_repository, "text_encoder", 1)
    assert config.preprocessing["sequence_length"] == "dynamic" and config.input("tokens").shape == (-1, -1)
    vocab = Vocabulary.load(trained_repository / "text_encoder" / "1" / "vocab.json")
    texts = every_length(vocab)
    tokens = vocab.encode(texts)
    assert sorted(set((tokens != 0).sum(1))) == list(range(1, vocab.max_length + 1))
    want = np.asarray(keras.models.load_model(trained_dir / "text_encoder.keras", compile=False)(tokens))
    session = ort.InferenceSession(str(trained_repository / "text_encoder" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    full = session.run(None, {"tokens": tokens})[0]
    for size in (1, 5, 32):  # each batch mixes lengths, cut to its longest
        cut = np.concatenate([session.run(None, {"tokens": vocab.cut(tokens[k : k + size])})[0]
                              for k in range(0, len(tokens), size)])  # fmt: skip
        np.testing.assert_allclose(cut, full, atol=1e-6)  # cutting changes nothing
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(cut - want).max() <= variable_length.TOLERANCE * scale


def _text_model(mask: bool):
    import keras
    from keras import layers

    inputs = keras.Input((100,), dtype="int32", name="tokens")
    x = layers.LSTM(64, use_cudnn=False)(layers.Embedding(10_000, 16, mask_zero=mask)(inputs))
    return keras.Model(inputs, layers.Dense(64)(x))


@pytest.mark.slow
@pytest.mark.parametrize(("padding", "why"), [
    ("post", "its answers depend on the padding"),
    ("pre", r"the tokenizer pads at the front \('pre'\)"),
])  # fmt: skip
def test_a_text_model_whose_answers_depend_on_the_padding_is_exported_full_length_as_before(
    trained_dir, tmp_path, padding, why
):
    import keras

    from fusionserve.export import convert
    from fusionserve.repository import load_config

    image, fusion = (keras.models.load_model(trained_dir / f"{n}.keras", compile=False) for n in ("image_encoder",
                                                                                                "fusion"))  # fmt: skip
    text = _text_model(mask=False)
    vocab = Vocabulary.load(trained_dir / "vocab.json").with_padding(padding=padding, truncating=padding)
    convert.export(image, text, fusion, vocab, None, tmp_path / "repo")
    config = load_config(tmp_path / "repo", "text_encoder", 1)
    assert config.input("tokens").shape == (-1, 100) and config.preprocessing["sequence_length"] == 100
    assert config.parity["sequence_length"]["dynamic"] is False
    assert re.match(why, config.parity["sequence_length"]["why"])
    tokens = vocab.encode(every_length(vocab))
    session = ort.InferenceSession(str(tmp_path / "repo" / "text_encoder" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    np.testing.assert_allclose(session.run(None, {"tokens": tokens})[0], np.asarray(text(tokens)), atol=1e-4)


@pytest.mark.slow
def test_a_masked_model_padded_at_the_front_is_refused_saying_why(trained_dir, tmp_path):
    import keras

    from fusionserve.export import convert

    image, fusion = (keras.models.load_model(trained_dir / f"{n}.keras", compile=False) for n in ("image_encoder",
                                                                                                "fusion"))  # fmt: skip
    vocab = Vocabulary.load(trained_dir / "vocab.json").with_padding(padding="pre", truncating="pre")
    with pytest.raises(ExportError, match=r"text_encoder: graph holds control-flow ops \['Loop'\].*nor can it be "
                                          r"exported to skip its padding: the tokenizer pads at the front"):
        convert.export(image, _text_model(mask=True), fusion, vocab, None, tmp_path / "repo")
    assert not (tmp_path / "repo" / "text_encoder").exists()
