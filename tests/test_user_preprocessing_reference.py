"""A user's own preprocessing, read by fusionserve, equals the Keras objects it came from.

Keras' ``Tokenizer`` + ``pad_sequences`` (tf-keras), Keras 3's ``TextVectorization`` and
``keras.applications.<family>.preprocess_input`` after OpenCV's decode and resize are the
references; each is run on awkward inputs (punctuation, case, unknown words, empty, very long,
non-ASCII texts; odd sizes, grey and alpha images) and must give exactly the same arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusionserve.preprocess import ImagePreprocessing, decode_image
from fusionserve.user_preprocessing import image_preprocessing, keras_tokenizer, read_tokenizer, with_pad_sequences
from tests.test_preprocess import CORPUS, LONG, TEXTS, _alphabet, _picture, _words

pytestmark = pytest.mark.tf
try:
    from tf_keras.preprocessing import sequence as keras_sequence
    from tf_keras.preprocessing import text as keras_text
except ImportError:
    keras_sequence = keras_text = None  # type: ignore[assignment]

FIT = [*CORPUS, "a red dog under the blue sky", "The sky, the SKY!", "Ω ω Straße", LONG[:200]]
AWKWARD = [*TEXTS, "a red dog under the blue sky", "unknown zebra ZEBRA, zébra", "x" * 3000,
           "tab\tsep,comma,sep", "ÀÉÎ İ ß ǅ ﬁ"]  # fmt: skip
TOKENIZERS = {
    "the recipe: num_words, no oov_token": {"num_words": 10_000},
    "few num_words, oov_token": {"num_words": 6, "oov_token": "<OOV>"},
    "no num_words, oov_token": {"oov_token": "[UNK]"},
    "no lower-casing, other filters": {"lower": False, "filters": "!,"},
    "split on commas": {"split": ",", "oov_token": "?"},
    "characters": {"char_level": True, "num_words": 20},
    "characters, oov_token, no lower-casing": {"char_level": True, "oov_token": "~", "lower": False},
}
PADDING = {
    "keras defaults": {},
    "post, value 3": {"padding": "post", "truncating": "post", "value": 3},
    "pre padding, post truncating, maxlen 7": {"maxlen": 7, "truncating": "post"},
}


def fitted(options: dict):
    tokenizer = keras_text.Tokenizer(**options)
    tokenizer.fit_on_texts(FIT)
    return tokenizer


def keras_ids(tokenizer, texts: list[str], maxlen: int, pad: dict) -> np.ndarray:
    return keras_sequence.pad_sequences(tokenizer.texts_to_sequences(texts), maxlen=maxlen,
                                        **{k: v for k, v in pad.items() if k != "maxlen"})  # fmt: skip


@pytest.mark.parametrize("pad", PADDING.values(), ids=PADDING.keys())
@pytest.mark.parametrize("options", TOKENIZERS.values(), ids=TOKENIZERS.keys())
def test_a_keras_tokenizer_json_encodes_as_the_tokenizer_does(options: dict, pad: dict, tmp_path: Path) -> None:
    tokenizer = fitted(options)
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_json(), encoding="utf-8")
    vocab = with_pad_sequences(read_tokenizer(path, max_length=20), pad)
    maxlen = pad.get("maxlen", 20)
    np.testing.assert_array_equal(vocab.encode(AWKWARD), keras_ids(tokenizer, AWKWARD, maxlen, pad))
    for text in AWKWARD:  # one by one too: an empty row is all padding
        np.testing.assert_array_equal(vocab.encode([text]), keras_ids(tokenizer, [text], maxlen, pad))


def test_the_issues_sentence() -> None:
    """Without oov_token Keras numbers words from 1 and drops unknown ones: so must the served tokenizer."""
    tokenizer = keras_text.Tokenizer(num_words=10_000)
    tokenizer.fit_on_texts(["a red dog", "the blue sky", "a red sky", "the blue dog"])
    vocab = keras_tokenizer(json.loads(tokenizer.to_json()), max_length=8)
    sentence = "a red dog under the blue sky"
    assert vocab.ids(sentence) == tokenizer.texts_to_sequences([sentence])[0]
    assert len(vocab.ids(sentence)) == 6  # "under" dropped, not replaced


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.text(_alphabet, max_size=40), _words), max_size=60).map(" ".join),
       st.sampled_from(list(TOKENIZERS.values())))  # fmt: skip
def test_keras_tokenizer_property(text: str, options: dict) -> None:
    tokenizer = fitted(options)
    vocab = keras_tokenizer(json.loads(tokenizer.to_json()), max_length=30)
    np.testing.assert_array_equal(vocab.encode([text]), keras_ids(tokenizer, [text], 30, {}))


# ------------------------------------------------------------------------------ TextVectorization

VECTORIZERS = {
    "defaults": {},
    "lower only": {"standardize": "lower"},
    "strip punctuation only": {"standardize": "strip_punctuation"},
    "no standardize": {"standardize": None},
    "characters": {"split": "character", "max_tokens": 30},
    "few tokens": {"max_tokens": 6},
}


def _vectorizer(options: dict):
    import keras

    layer = keras.layers.TextVectorization(output_sequence_length=12, **options)
    layer.adapt(FIT + AWKWARD[:10])
    return layer


@pytest.mark.parametrize("options", VECTORIZERS.values(), ids=VECTORIZERS.keys())
def test_a_lifted_text_vectorization_encodes_as_the_layer_does(options: dict) -> None:
    from fusionserve.export import text_vectorization

    layer = _vectorizer(options)
    vocab = text_vectorization.vocabulary(layer)
    for text in AWKWARD:
        np.testing.assert_array_equal(vocab.encode([text]), np.asarray(layer([text])), err_msg=repr(text[:40]))


@settings(max_examples=100, deadline=None)
@given(st.text(st.sampled_from(list("abcXYZ \t\n\r\x0b\x0c\u00a0\u2003\x1c\u0085.,!'-_İßé日🎉")), max_size=50))
def test_text_vectorization_property(text: str) -> None:
    from fusionserve.export import text_vectorization

    layer = _vectorizer({})
    np.testing.assert_array_equal(text_vectorization.vocabulary(layer).encode([text]), np.asarray(layer([text])))


# ------------------------------------------------------------------------------------- images

FAMILIES = {  # keras.applications family → the declaration that reproduces its preprocess_input
    "vgg16": "caffe",
    "resnet50": "caffe",
    "mobilenet_v2": "tf",
    "inception_v3": "tf",
    "densenet": "torch",
    "efficientnet": {"color_order": "RGB", "scale": 1},  # its preprocess_input passes pixels through
}
IMAGES = {
    "odd size": (".png", lambda: _picture(37, 53, 3, 1)),
    "exact size": (".png", lambda: _picture(32, 40, 3, 2)),
    "grey": (".png", lambda: _picture(45, 29, None, 3)),
    "alpha": (".png", lambda: _picture(23, 61, 4, 4)),
    "jpeg": (".jpg", lambda: _picture(101, 77, 3, 5)),
    "16-bit": (".png", lambda: _picture(40, 40, 3, 6, np.uint16)),
}


@pytest.mark.parametrize("image", IMAGES.values(), ids=IMAGES.keys())
@pytest.mark.parametrize("family", FAMILIES.keys())
def test_image_modes_equal_keras_preprocess_input(family: str, image, tmp_path: Path) -> None:
    import importlib

    preprocess_input = importlib.import_module(f"keras.applications.{family}").preprocess_input
    ext, make = image
    path = tmp_path / f"picture{ext}"
    assert cv2.imwrite(str(path), make())
    declared = FAMILIES[family]
    if isinstance(declared, dict):
        (tmp_path / "pre.json").write_text(json.dumps(declared))
        declared = str(tmp_path / "pre.json")
    ours = image_preprocessing(declared, 32, 40).apply(decode_image(path.read_bytes()))
    # The user's own pipeline: OpenCV reads BGR, Keras' families take RGB.
    rgb = cv2.cvtColor(cv2.resize(cv2.imread(str(path)), (40, 32)), cv2.COLOR_BGR2RGB)
    reference = preprocess_input(rgb.astype(np.float32))
    assert ours.dtype == reference.dtype == np.float32
    np.testing.assert_array_equal(ours, reference)


def test_a_mode_is_recorded_as_its_settings() -> None:
    spec = image_preprocessing("torch", 8, 8)
    assert ImagePreprocessing.from_json(spec.to_json()) == spec
    assert spec.to_json()["mean"] == [0.485, 0.456, 0.406]
