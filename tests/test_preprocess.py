"""Preprocessing: the tokeniser's behaviour and the seed's OpenCV image path.

The tokeniser's Keras reference is in test_tokenizer_reference (TensorFlow tier).
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import strategies as st

from fusionserve.errors import InvalidInputError
from fusionserve.preprocess import (
    IMAGE_MODES,
    KERAS_FILTERS,
    OOV_INDEX,
    ImagePreprocessing,
    Vocabulary,
    decode_image,
    encode_png,
    pad_tokens,
    preprocess_image,
    text_to_word_sequence,
)

MAX_LENGTH = 100
CORPUS = [
    "a photo of a red circle",
    "a blue square",
    "the star is yellow",
    "Straße und Maße, große Straße",
    "İstanbul ıslak IŞIK",
    "日本語 テキスト 日本語",
    "café crème brûlée café",
    "emoji 🎉 party 🎉🎉 party",
]
LONG = " ".join(f"w{i}" for i in range(250))
TEXTS = [
    "",
    "   ",
    "!!!",
    KERAS_FILTERS,
    "...,;:!?",
    "a photo of a red circle",
    "A PHOTO of a Red CIRCLE",
    "Look: a red star, drawn small.",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeeds",
    "repeated    spaces   between  words ",
    "Straße ß STRASSE",
    "İstanbul ıslak IŞIK İİ",
    "日本語のテキスト 日本語 テキスト",
    "café crème brûlée Ça",
    "emoji 🎉 party🎉 🎉🎉",
    "e\u0301 combining accent and \u00a0no-break\u2003em space",
    "hyphen-ated under_score sl/ash back\\slash 'quote' \"double\"",
    "[UNK] <OOV> unk",
    LONG,
    LONG + " tail words at the end",
    " ".join(["circle"] * 101),
    " ".join(["red"] * 100),
    " ".join(["red"] * 99),
]


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.fit(CORPUS + TEXTS, max_words=10_000, max_length=MAX_LENGTH)


# ---------------------------------------------------------------------------------------- text


def test_truncation_keeps_the_last_words(vocab: Vocabulary) -> None:
    text = LONG + " tail words at the end"
    row = vocab.encode([text])[0]
    words = text_to_word_sequence(text)
    assert len(words) > MAX_LENGTH
    assert row.tolist() == [vocab.word_index[w] for w in words[-MAX_LENGTH:]]
    # Short texts are padded at the front.
    short = vocab.encode(["a red circle"])[0]
    assert short[:-3].tolist() == [0] * (MAX_LENGTH - 3)
    assert short[-3:].tolist() == [vocab.word_index[w] for w in ("a", "red", "circle")]


def test_unknown_words_map_to_oov(vocab: Vocabulary) -> None:
    row = vocab.encode(["zzz-unseen red qqq"])[0]
    assert row[-4:].tolist() == [OOV_INDEX, OOV_INDEX, vocab.word_index["red"], OOV_INDEX]


def test_pad_tokens_shapes() -> None:
    out = pad_tokens([[], [5], list(range(2, 9))], 4)
    assert out.dtype == np.int32
    assert out.tolist() == [[0, 0, 0, 0], [0, 0, 0, 5], [5, 6, 7, 8]]


# Characters that exercise the filters, whitespace, case folding and non-ASCII words.
_alphabet = st.sampled_from(
    list("abcxyzABCXYZ0123 ") + list(KERAS_FILTERS) + list("\r\x0b\x0c\u00a0\u2003ßİıŞçé日本🎉\u0301")
)
_words = st.sampled_from(["red", "Red", "circle", "star!", "straße", "İz", "日本", "🎉", "", " "])


# ------------------------------------------------------------------------------ vocabulary fit


def test_fit_orders_by_frequency_then_first_appearance() -> None:
    vocab = Vocabulary.fit(["b a", "a c c", "d"], max_words=10)
    assert vocab.word_index == {"a": 2, "c": 3, "b": 4, "d": 5}
    assert Vocabulary.fit(["b a", "a c c", "d"], max_words=4).word_index == {"a": 2, "c": 3}


# ---------------------------------------------------------------------------- vocabulary JSON


def test_vocabulary_json_round_trip(tmp_path: Path, vocab: Vocabulary) -> None:
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab
    assert "straße" in loaded.word_index and "日本語" in loaded.word_index
    np.testing.assert_array_equal(loaded.encode(TEXTS), vocab.encode(TEXTS))
    # Non-ASCII words are stored as themselves, not \u escapes.
    assert "straße" in path.read_text(encoding="utf-8")


def _valid() -> dict:
    return Vocabulary({"red": 2, "circle": 3}, max_words=10, max_length=5).to_json()


MALFORMED = {
    "not an object": [1, 2, 3],
    "no word_index": {k: v for k, v in _valid().items() if k != "word_index"},
    "no max_words": {k: v for k, v in _valid().items() if k != "max_words"},
    "word_index is a list": {**_valid(), "word_index": ["red", "circle"]},
    "index not a number": {**_valid(), "word_index": {"red": "two"}},
    "index on padding": {**_valid(), "word_index": {"red": 0}},
    "index on oov": {**_valid(), "word_index": {"red": 1}},
    "index beyond max_words": {**_valid(), "word_index": {"red": 10}},
    "max_length zero": {**_valid(), "max_length": 0},
    "max_length negative": {**_valid(), "max_length": -3},
    "padding in the middle": {**_valid(), "padding": "middle"},
    "truncating sideways": {**_valid(), "truncating": "sideways"},
    "oov index 2": {**_valid(), "oov_index": 2},
    "lower in upper case": {**_valid(), "lower": "upper"},
    "empty split": {**_valid(), "split": ""},
    "oov index beyond max_words": {**_valid(), "oov_index": 10},
    "a newer format": {**_valid(), "format": 3},
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_vocabulary_raises(data) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        Vocabulary.from_json(data)


def test_valid_minimal_vocabulary_loads() -> None:
    data = {"word_index": {"red": 2}, "max_words": 10, "max_length": 5}
    assert Vocabulary.from_json(data).encode(["red blue"]).tolist() == [[0, 0, 0, 2, 1]]
    assert Vocabulary.from_json(_valid()) == Vocabulary({"red": 2, "circle": 3}, max_words=10, max_length=5)


def test_a_version_1_file_loads_with_fusionserves_own_convention() -> None:
    # What 'fusionserve export' wrote before the format had a version: no format, split or pad value.
    old = {"max_words": 10, "max_length": 5, "pad_index": 0, "oov_index": 1, "oov_token": "[UNK]",
           "filters": KERAS_FILTERS, "lower": True, "padding": "pre", "truncating": "pre",
           "word_index": {"red": 2, "circle": 3}}  # fmt: skip
    vocab = Vocabulary.from_json(old)
    assert vocab == Vocabulary({"red": 2, "circle": 3}, max_words=10, max_length=5)
    assert vocab.encode(["A red, CIRCLE! blue"]).tolist() == [[0, 1, 2, 3, 1]]


KERAS_LIKE = {  # settings a Keras Tokenizer or TextVectorization records, and what they do to one text
    "unknown words dropped": ({"oov_index": None, "oov_token": None}, "A red dog!", [0, 0, 0, 2, 4]),
    "no lower-casing": ({"lower": False}, "A Red dog", [0, 0, 1, 1, 4]),
    "other filters": ({"filters": "!"}, "red,dog! dog", [0, 0, 0, 1, 4]),
    "other separator": ({"split": ","}, "red,dog ,dog", [0, 0, 2, 1, 4]),
    "ascii lower-casing only": ({"lower": "ascii", "word_index": {"red": 2, "ödog": 5}}, "RED ÖDOG", [0, 0, 0, 2, 1]),
    "punctuation stripped": ({"filter_replacement": ""}, "re-d dog", [0, 0, 0, 2, 4]),
    "whitespace split": ({"split": "whitespace"}, "red\u00a0dog\tdog", [0, 0, 0, 1, 4]),
    "characters": ({"split": "character", "word_index": {"r": 2, "e": 3}}, "Re d", [0, 2, 3, 1, 1]),
    "post, value 7": ({"padding": "post", "pad_value": 7}, "red", [2, 7, 7, 7, 7]),
}  # fmt: skip


@pytest.mark.parametrize(("settings", "text", "ids"), KERAS_LIKE.values(), ids=KERAS_LIKE.keys())
def test_keras_settings_change_the_ids_as_keras_does(settings: dict, text: str, ids: list[int]) -> None:
    vocab = Vocabulary(**{"word_index": {"red": 2, "re": 3, "dog": 4}, "max_words": 10, "max_length": 5, **settings})
    assert vocab.encode([text]).tolist() == [ids]
    assert Vocabulary.from_json(json.loads(json.dumps(vocab.to_json()))) == vocab


def test_post_padding_and_truncation_keep_the_first_words() -> None:
    vocab = Vocabulary({"a": 2, "b": 3, "c": 4}, max_words=10, max_length=2, padding="post", truncating="post")
    assert vocab.encode(["a", "a b c", ""]).tolist() == [[2, 0], [2, 3], [0, 0]]
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    assert pad_tokens([[5, 6, 7]], 2, padding="pre", truncating="post").tolist() == [[5, 6]]
    assert pad_tokens([[5]], 3, padding="post", truncating="pre").tolist() == [[5, 0, 0]]


def test_post_padded_rows_are_cut_after_the_last_column_holding_a_token() -> None:
    vocab = Vocabulary({"a": 2, "b": 3, "c": 4}, max_words=10, max_length=6, padding="post", pad_value=7)
    tokens = vocab.encode(["a b", "a b c", "a"])
    assert vocab.cut(tokens).tolist() == [[2, 3, 7], [2, 3, 4], [2, 7, 7]]
    assert vocab.cut(vocab.encode(["", "?"])).tolist() == [[7], [7]]  # no words: one column of padding
    assert vocab.cut(tokens[:0]).shape == (0, 1)
    with pytest.raises(ValueError, match="only rows padded at the back can be cut"):
        vocab.with_padding(padding="pre").cut(tokens)


def test_vocabulary_file_not_json_raises(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError):
        Vocabulary.load(path)


# ---------------------------------------------------------------------------------------- images


def _picture(height: int, width: int, channels: int | None, seed: int, dtype=np.uint8) -> np.ndarray:
    """Noise over gradients: resizing it exercises interpolation everywhere."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    shape = (height, width) if channels is None else (height, width, channels)
    ramp = np.linspace(0, top, width)[None, :] * np.linspace(0.2, 1, height)[:, None]
    if channels is not None:
        ramp = ramp[..., None] * np.linspace(1, 0.3, channels)
    noise = rng.normal(0, top / 8, shape)
    return np.clip(ramp + noise, 0, top).astype(dtype)


def seed_preprocess(path: Path, height: int, width: int) -> np.ndarray:
    """The seed project's preprocessing, verbatim."""
    return cv2.resize(cv2.imread(str(path)), (width, height), interpolation=cv2.INTER_LINEAR).astype("float32") / 255.0


SIZES = [(1, 1), (17, 23), (32, 32), (64, 64), (48, 80), (150, 200), (64, 300), (480, 640)]
TARGETS = [(64, 64), (48, 80)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"to{t[0]}x{t[1]}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
def test_image_matches_seed_preprocessing(tmp_path: Path, ext: str, size, target) -> None:
    path = tmp_path / f"picture{ext}"
    assert cv2.imwrite(str(path), _picture(*size, 3, seed=size[0] * 1000 + size[1]))
    ours = preprocess_image(decode_image(path.read_bytes()), *target)
    ref = seed_preprocess(path, *target)
    assert ours.shape == (*target, 3) and ours.dtype == np.float32
    assert ref.dtype == np.float32
    assert np.array_equal(ours, ref)


VARIANTS = {
    "grayscale png": (".png", lambda: _picture(40, 70, None, 1)),
    "grayscale jpeg": (".jpg", lambda: _picture(90, 50, None, 2)),
    "bgra png": (".png", lambda: _picture(50, 90, 4, 3)),
    "bgra png, exact size": (".png", lambda: _picture(64, 64, 4, 4)),
    "16-bit png": (".png", lambda: _picture(70, 40, 3, 5, np.uint16)),
    "16-bit grayscale png": (".png", lambda: _picture(64, 64, None, 6, np.uint16)),
}


@pytest.mark.parametrize("ext, make", VARIANTS.values(), ids=VARIANTS.keys())
def test_image_variants_match_seed_preprocessing(tmp_path: Path, ext: str, make) -> None:
    path = tmp_path / f"picture{ext}"
    assert cv2.imwrite(str(path), make())
    decoded = decode_image(path.read_bytes())
    assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[2] == 3
    for target in TARGETS:
        assert np.array_equal(preprocess_image(decoded, *target), seed_preprocess(path, *target))


def test_image_preprocessing_other_colour_order_scale_offset_and_interpolation() -> None:
    image = _picture(30, 50, 3, seed=9)
    spec = ImagePreprocessing(20, 40, color_order="RGB", interpolation="INTER_AREA", scale=2 / 255, offset=-1.0)
    expected = cv2.resize(image, (40, 20), interpolation=cv2.INTER_AREA)[..., ::-1].astype(np.float32)
    np.testing.assert_allclose(spec.apply(image), expected * np.float32(2 / 255) - 1, rtol=0, atol=1e-6)
    assert ImagePreprocessing.from_json(spec.to_json()) == spec
    assert ImagePreprocessing.from_json({"height": 8, "width": 8}) == ImagePreprocessing(8, 8)


@pytest.mark.parametrize("mode", sorted(IMAGE_MODES))
def test_a_batch_of_images_is_scaled_as_each_image_is_on_its_own(mode: str) -> None:
    """A pipeline batch scales all its images in one pass (scale_pixels): the same values as image by image."""
    spec = ImagePreprocessing.mode(mode, 24, 40)
    images = [_picture(h, w, 3, seed=k) for k, (h, w) in enumerate([(24, 40), (30, 50), (7, 90), (24, 40)])]
    batch = spec.scale_pixels(np.stack([spec.resize(image) for image in images]))

    def alone(image: np.ndarray) -> np.ndarray:  # each step written out with OpenCV, one image
        image = cv2.resize(image, (40, 24), interpolation=cv2.INTER_LINEAR) if image.shape[:2] != (24, 40) else image
        if spec.color_order == "RGB":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        pixels = image.astype(np.float32)
        divisor = spec._divisor()
        pixels = pixels / np.float32(divisor) if divisor else pixels * np.float32(spec.scale)
        if spec.mean is not None:
            pixels = pixels - np.asarray(spec.mean, np.float32)
        if spec.std is not None:
            pixels = pixels / np.asarray(spec.std, np.float32)
        return pixels + np.float32(spec.offset)

    assert batch.shape == (4, 24, 40, 3) and batch.dtype == np.float32
    for row, image in zip(batch, images, strict=True):
        assert np.array_equal(row, alone(image))
        assert np.array_equal(spec.apply(image), row)


@pytest.mark.parametrize(("data", "message"), [
    ({"width": 8}, "needs height and width"),
    ({"height": 8, "width": 8, "channels": 1}, "channels must be 3"),
    ({"height": 8, "width": 8, "color_order": "GRB"}, "color_order must be BGR or RGB"),
    ({"height": 8, "width": 8, "scale": "2/255"}, "scale must be a number or '1/N'"),
    ({"height": 8, "width": 8, "interpolation": "LANCZOS"}, "interpolation must be one of"),
    ({"height": 0, "width": 8}, "image size must be positive"),
])  # fmt: skip
def test_malformed_image_preprocessing_says_what_is_wrong(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImagePreprocessing.from_json(data)


def _png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def test_alpha_is_dropped_not_composited(tmp_path: Path) -> None:
    bgra = _picture(64, 64, 4, 7)
    bgra[..., 3] = 0  # fully transparent: the colour channels must still come through
    decoded = decode_image(_png_bytes(bgra))
    assert np.array_equal(decoded, bgra[..., :3])


def test_encode_png_round_trips() -> None:
    image = _picture(33, 65, 3, 8)
    assert np.array_equal(decode_image(encode_png(image)), image)


def _png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG signature and IHDR declaring the given size, with almost no pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


UNDECODABLE = {
    "empty": b"",
    "text": b"this is not an image",
    "one byte": b"\x00",
    "png signature only": b"\x89PNG\r\n\x1a\n",
    "truncated png": None,  # filled in below from a real PNG
    "jpeg marker only": b"\xff\xd8\xff",
    "bmp header only": b"BM" + b"\0" * 60,
    "png missing pixel data": _png_header_only(4, 4),
    # OpenCV asserts on this header instead of returning None; it must still be an input error.
    "png claiming 60000x60000": _png_header_only(60_000, 60_000),
    "json": json.dumps({"image": "x"}).encode(),
}


@pytest.mark.parametrize("name", UNDECODABLE.keys())
def test_undecodable_bytes_raise_invalid_input(name: str) -> None:
    data = UNDECODABLE[name]
    if data is None:
        data = encode_png(_picture(32, 32, 3, 9))[:40]
    with pytest.raises(InvalidInputError, match="image") as info:
        decode_image(data)
    assert str(info.value).strip()
