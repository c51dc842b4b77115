"""A user's own preprocessing, read from the files they have; no TensorFlow.

A Keras ``Tokenizer.to_json()`` or a fusionserve vocabulary; an image preprocessing mode or JSON declaration.

``fusionserve export`` and ``fusionserve import`` read them here into the objects the repository
records (:class:`~fusionserve.preprocess.Vocabulary`, :class:`~fusionserve.preprocess.ImagePreprocessing`),
so the server reproduces them; what cannot be reproduced is refused with a ValueError saying why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fusionserve.preprocess import SPLIT_CHARACTER, ImagePreprocessing, Vocabulary
from fusionserve.preprocessing_defaults import IMAGE_MODES


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content; ValueError naming ``what`` and the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{what} {str(path)!r} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} is not readable JSON: {e}") from e


def keras_tokenizer(data: dict, max_length: int) -> Vocabulary:
    """A Keras ``Tokenizer`` (tf.keras / tf_keras ``to_json()``, parsed) as a vocabulary of ``max_length`` tokens.

    Reproduces ``texts_to_sequences``: ``lower``, ``filters`` (each becomes ``split``), ``split``,
    ``char_level`` (every character a token, no filters), ids from 1, ``num_words`` (ids at or over it
    are out of vocabulary), ``oov_token`` (unknown words take its id) or, without one, unknown words
    dropped. Padding is ``pad_sequences``' default (set other settings with ``with_padding``).
    """
    config = data.get("config")
    if data.get("class_name") != "Tokenizer" or not isinstance(config, dict):
        raise ValueError("not a Keras Tokenizer's to_json(): no class_name 'Tokenizer' with a config")
    try:
        word_index = config["word_index"]
        word_index = {str(w): int(i) for w, i in (json.loads(word_index) if isinstance(word_index, str)
                                                  else word_index).items()}  # fmt: skip
        num_words = config.get("num_words")
        oov_token = config.get("oov_token")
        split = str(config.get("split", " "))
        char_level = bool(config.get("char_level", False))
        filters, lower = str(config.get("filters", "")), bool(config.get("lower", True))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed Keras Tokenizer JSON: {e!r}") from e
    if oov_token is not None and oov_token not in word_index:
        raise ValueError(f"the tokenizer's oov_token {oov_token!r} has no index (was it fitted?)")
    largest = max(word_index.values(), default=0)
    # Keras treats num_words=0 as no limit; ids at or over the limit never reach the model.
    max_words = int(num_words) if num_words else largest + 1
    kept = {w: i for w, i in word_index.items() if i < max_words}
    return Vocabulary(
        kept,
        max_words=max(max_words, 2),
        max_length=max_length,
        oov_index=word_index[oov_token] if oov_token is not None else None,
        oov_token=oov_token,
        lower=lower,
        filters="" if char_level else filters,
        split=SPLIT_CHARACTER if char_level else split,
    )


def read_tokenizer(path: Path, max_length: int | None) -> Vocabulary:
    """A tokenizer file: a Keras ``Tokenizer.to_json()`` or a fusionserve vocabulary JSON.

    ``max_length`` (a Keras tokenizer's padded length, the text model's input length) is needed for
    the first; a fusionserve vocabulary carries its own.

    Raises:
        ValueError: naming the file and what is wrong with it.
    """
    data = read_json(path, "tokenizer")
    try:
        if isinstance(data, dict) and data.get("class_name") == "Tokenizer":
            if max_length is None:
                raise ValueError("a Keras Tokenizer pads to no length of its own: give maxlen")
            return keras_tokenizer(data, max_length)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return Vocabulary.from_json(data)
    except ValueError as e:
        raise ValueError(f"tokenizer {str(path)!r} is neither a Keras Tokenizer's to_json() nor a valid "
                         f"fusionserve vocabulary JSON: {e}") from e  # fmt: skip


def with_pad_sequences(vocabulary: Vocabulary, settings: dict[str, Any]) -> Vocabulary:
    """``vocabulary`` padded as ``pad_sequences(maxlen, padding, truncating, value)`` would (None: keep)."""
    names = {"maxlen": "max_length", "padding": "padding", "truncating": "truncating", "value": "pad_value"}
    given = {names[k]: v for k, v in settings.items() if v is not None}
    if "pad_value" in given:
        value = float(given["pad_value"])
        if not value.is_integer():
            raise ValueError(f"pad_sequences value {value} is not a whole number: token ids are integers")
        given["pad_value"] = int(value)
    return vocabulary.with_padding(**given)


def image_preprocessing(declared: str | None, height: int, width: int) -> ImagePreprocessing:
    """An image preprocessing declaration at the model's input size.

    Args:
        declared: a mode of :data:`~fusionserve.preprocess.IMAGE_MODES` (``seed``, ``caffe``, ``tf``,
            ``torch``), a JSON file with ``mode``, ``color_order``, ``interpolation``, ``scale``,
            ``offset``, ``mean``, ``std`` (``height``/``width`` only if they equal the model's), or
            None (``seed``).
        height: the image model's input height.
        width: the image model's input width.

    Raises:
        ValueError: an unknown mode, or a file that is missing, malformed or contradicts the model.
    """
    if declared is None or declared in IMAGE_MODES:
        return ImagePreprocessing.mode(declared or "seed", height, width)
    data = read_json(Path(declared), f"image preprocessing (not a mode of {sorted(IMAGE_MODES)})")
    if not isinstance(data, dict):
        raise ValueError(f"image preprocessing {declared!r} must be a JSON object")
    for key, size in (("height", height), ("width", width)):
        if key in data and data[key] != size:
            raise ValueError(f"image preprocessing {declared!r} says {key} {data[key]}, the image model takes {size}")
    try:
        return ImagePreprocessing.from_json({**data, "height": height, "width": width})
    except ValueError as e:
        raise ValueError(f"image preprocessing {declared!r}: {e}") from e
