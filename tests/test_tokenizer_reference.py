"""The tokeniser equals its reference, Keras 2's text utilities (tf-keras, in the ``export`` extra)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusionserve.preprocess import OOV_INDEX, Vocabulary, text_to_word_sequence
from tests.test_preprocess import CORPUS, LONG, MAX_LENGTH, TEXTS, _alphabet, _words

pytestmark = pytest.mark.tf
# Keras 2's text utilities are the reference; Keras 3 dropped them. Without tf-keras (a venv with
# the dev extra only) these tests are deselected by -m "not tf"; run anyway, they fail, not skip.
try:
    from tf_keras.preprocessing import sequence as keras_sequence
    from tf_keras.preprocessing import text as keras_text
except ImportError:
    keras_sequence = keras_text = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.fit(CORPUS + TEXTS, max_words=10_000, max_length=MAX_LENGTH)


def keras_reference(texts: list[str], word_index: dict[str, int]) -> np.ndarray:
    """What a Keras 2 pipeline feeds the model: text_to_word_sequence → ids → pad_sequences."""
    seqs = [[word_index.get(w, OOV_INDEX) for w in keras_text.text_to_word_sequence(t)] for t in texts]
    return keras_sequence.pad_sequences(seqs, maxlen=MAX_LENGTH)


@pytest.mark.parametrize("text", TEXTS, ids=[repr(t[:24]) for t in TEXTS])
def test_words_match_keras(text: str) -> None:
    assert text_to_word_sequence(text) == keras_text.text_to_word_sequence(text)


@pytest.mark.parametrize("text", TEXTS, ids=[repr(t[:24]) for t in TEXTS])
def test_encode_matches_keras_pad_sequences(text: str, vocab: Vocabulary) -> None:
    ours = vocab.encode([text])
    ref = keras_reference([text], vocab.word_index)
    assert ours.dtype == np.int32 and ref.dtype == np.int32
    np.testing.assert_array_equal(ours, ref)


def test_encode_batch_matches_keras(vocab: Vocabulary) -> None:
    np.testing.assert_array_equal(vocab.encode(TEXTS), keras_reference(TEXTS, vocab.word_index))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(_alphabet, max_size=40), _words), max_size=160).map(" ".join))
def test_encode_matches_keras_property(text: str) -> None:
    vocab = Vocabulary.fit(CORPUS + [text[: len(text) // 2]], max_length=MAX_LENGTH)
    assert text_to_word_sequence(text) == keras_text.text_to_word_sequence(text)
    np.testing.assert_array_equal(vocab.encode([text]), keras_reference([text], vocab.word_index))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_words_match_keras_on_any_unicode(text: str) -> None:
    assert text_to_word_sequence(text) == keras_text.text_to_word_sequence(text)


def _tokenizer(texts: list[str], num_words: int):
    tokenizer = keras_text.Tokenizer(num_words=num_words, oov_token="[UNK]")
    tokenizer.fit_on_texts(texts)
    return tokenizer


@pytest.mark.parametrize("num_words", [3, 5, 8, 10_000])
def test_fit_agrees_with_keras_tokenizer(num_words: int) -> None:
    # Many ties in the counts, and a cut-off (num_words) that falls among them.
    texts = CORPUS + ["b a c", "c b a d", "d d e e f f", "g", "a"]
    ours = Vocabulary.fit(texts, max_words=num_words, max_length=MAX_LENGTH)
    tokenizer = _tokenizer(texts, num_words)
    assert tokenizer.word_index["[UNK]"] == OOV_INDEX
    expected = {w: i for w, i in tokenizer.word_index.items() if 2 <= i < num_words}
    assert ours.word_index == expected
    probe = [*texts, "unseen words and a b c", LONG]
    ref = keras_sequence.pad_sequences(tokenizer.texts_to_sequences(probe), maxlen=MAX_LENGTH)
    np.testing.assert_array_equal(ours.encode(probe), ref)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from("a b c d e f g h Ω ß 日".split()), max_size=12).map(" ".join), max_size=12),
    st.integers(2, 12),
)
def test_fit_agrees_with_keras_tokenizer_property(texts: list[str], num_words: int) -> None:
    # Both sort by count with a stable sort, so ties keep first-appearance order in both.
    ours = Vocabulary.fit(texts, max_words=num_words, max_length=MAX_LENGTH)
    tokenizer = _tokenizer(texts, num_words)
    assert ours.word_index == {w: i for w, i in tokenizer.word_index.items() if 2 <= i < num_words}


@pytest.mark.parametrize(("padding", "truncating"), [("post", "post"), ("pre", "post"), ("post", "pre")])
def test_padding_sides_match_keras_pad_sequences(padding: str, truncating: str) -> None:
    vocab = Vocabulary.fit(CORPUS + TEXTS, max_length=MAX_LENGTH)
    vocab = Vocabulary(vocab.word_index, max_length=7, padding=padding, truncating=truncating)
    seqs = [[vocab.word_index.get(w, OOV_INDEX) for w in keras_text.text_to_word_sequence(t)] for t in TEXTS]
    ref = keras_sequence.pad_sequences(seqs, maxlen=7, padding=padding, truncating=truncating)
    np.testing.assert_array_equal(vocab.encode(TEXTS), ref)
