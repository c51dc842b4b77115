"""Preprocessing shared by training and serving; imports neither TensorFlow nor gRPC.

Text: :class:`Vocabulary` turns texts into token ids the way the model was trained to read them:
fusionserve's own convention by default (Keras' ``text_to_word_sequence``, 0 = padding, 1 = out of
vocabulary, ``pad_sequences`` at the front), and every setting of a Keras ``Tokenizer`` (``lower``,
``filters``, ``split``, ``char_level``, ``num_words``, ``oov_token`` or dropping unknown words, the
index base) or a Keras 3 ``TextVectorization`` layer (ASCII lower-casing, punctuation stripped,
whitespace or character split, padding at the back) when a repository records them. Images:
:class:`ImagePreprocessing` (the seed's OpenCV path by default: BGR, ``cv2.INTER_LINEAR`` resize,
``/ 255``), with any colour order, interpolation, scale, per-channel mean and std, which covers
``keras.applications``' ``caffe``, ``tf`` and ``torch`` modes (:data:`IMAGE_MODES`). Both are tested
against the reference implementations, so train/serve skew cannot creep in.
"""

from __future__ import annotations

import collections
import functools
import json
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fusionserve.errors import InvalidInputError
from fusionserve.preprocessing_defaults import IMAGE_MODES, PAD_SEQUENCES_DEFAULTS, SIDES

KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
PAD_INDEX = PAD_SEQUENCES_DEFAULTS["value"]
OOV_INDEX = 1
OOV_TOKEN = "[UNK]"
VOCABULARY_FORMAT = 2  # version 1 (no "format" key) knew only fusionserve's own convention

# How a text is split into words: on a separator string (Keras' Tokenizer, ``split=" "``), on runs
# of ASCII whitespace (``tf.strings.split``, TextVectorization's "whitespace") or into characters.
SPLIT_WHITESPACE = "whitespace"
SPLIT_CHARACTER = "character"
# ``lower``: True is Python's ``str.lower`` (Keras' Tokenizer), "ascii" lower-cases A-Z only (``tf.strings.lower``).
LOWER_ASCII = "ascii"
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_ASCII_WHITESPACE = re.compile("[ \t\n\x0b\x0c\r]+")


@functools.lru_cache(maxsize=64)
def _filter_table(filters: str, replacement: str) -> dict[int, str]:
    """``str.translate``'s table turning each of ``filters`` into ``replacement`` (built once, not per text)."""
    return str.maketrans(dict.fromkeys(filters, replacement))


def split_words(text: str, *, lower: bool | str = True, filters: str = KERAS_FILTERS, replacement: str = " ",
                split: str = " ") -> list[str]:  # fmt: skip
    """Lower-case, replace every filtered character by ``replacement``, split, drop empty words.

    With the defaults this is Keras' ``text_to_word_sequence``; ``split`` is a separator string,
    :data:`SPLIT_WHITESPACE` or :data:`SPLIT_CHARACTER` (every code point left a word).
    """
    if lower is True:
        text = text.lower()
    elif lower == LOWER_ASCII:
        text = text.translate(_ASCII_LOWER)
    if filters:
        text = text.translate(_filter_table(filters, replacement))
    if split == SPLIT_CHARACTER:
        return list(text)
    parts = _ASCII_WHITESPACE.split(text) if split == SPLIT_WHITESPACE else text.split(split)
    return [w for w in parts if w]


def text_to_word_sequence(text: str) -> list[str]:
    """Split a text into words exactly as Keras' ``text_to_word_sequence`` does by default.

    Lower-cases, turns every filtered character into a space, splits on single spaces and drops
    empty strings.
    """
    return split_words(text)


def pad_tokens(sequences: Sequence[Sequence[int]], max_length: int, padding: str = "pre", truncating: str = "pre",
               value: int = PAD_INDEX) -> np.ndarray:  # fmt: skip
    """Pad and truncate as Keras' ``pad_sequences`` does (``pre``: at the front, its default; or ``post``).

    Returns:
        int32 array of shape ``[len(sequences), max_length]``, ``value`` where there are no tokens.
    """
    out = np.full((len(sequences), max_length), value, dtype=np.int32)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        kept = seq[-max_length:] if truncating == "pre" else seq[:max_length]
        if padding == "pre":
            out[row, max_length - len(kept) :] = kept
        else:
            out[row, : len(kept)] = kept
    return out


@dataclass(frozen=True)
class Vocabulary:
    """How texts become the text encoder's token ids: words, their ids, and padding to a fixed length.

    Words come from :func:`split_words` (``lower``, ``filters`` turned into ``filter_replacement``,
    ``split``); a word of ``word_index`` with an id below ``max_words`` takes that id, any other word
    ``oov_index`` (None: it is dropped, as Keras' Tokenizer without ``oov_token`` does); the ids are
    padded and truncated to ``max_length`` with ``pad_value`` (the padding settings, in one place:
    :meth:`pad` is their only reader). The defaults are fusionserve's own convention: 0 pads, 1 is
    out of vocabulary, words from 2.
    """

    word_index: dict[str, int]
    max_words: int = 10_000
    max_length: int = 100
    padding: str = "pre"
    truncating: str = "pre"
    pad_value: int = PAD_INDEX
    oov_index: int | None = OOV_INDEX
    oov_token: str | None = OOV_TOKEN
    lower: bool | str = True
    filters: str = KERAS_FILTERS
    filter_replacement: str | None = None  # None: the split separator (Keras' Tokenizer); "" strips them
    split: str = " "

    def __post_init__(self) -> None:
        problems = []
        if self.padding not in SIDES or self.truncating not in SIDES:
            problems.append(f"padding/truncating must be 'pre' or 'post', not {self.padding!r}/{self.truncating!r}")
        if self.max_length < 1 or self.max_words < 2:
            problems.append(f"needs max_length >= 1 and max_words >= 2, has {self.max_length} and {self.max_words}")
        if self.lower not in (True, False, LOWER_ASCII):
            problems.append(f"lower must be true, false or {LOWER_ASCII!r}, not {self.lower!r}")
        if not self.split:
            problems.append("split must be a separator, 'whitespace' or 'character', not empty")
        if self.oov_index is not None and not 0 <= self.oov_index < self.max_words:
            problems.append(f"oov_index {self.oov_index} is outside [0, {self.max_words})")
        ids = self.word_index.values()
        if ids and (min(ids) < 1 or max(ids) >= self.max_words):
            problems.append(f"word indices must lie in [1, {self.max_words})")
        clashes = sorted(w for w, i in self.word_index.items() if i == self.oov_index and w != self.oov_token)
        if clashes:
            problems.append(f"words {clashes[:5]} take the out-of-vocabulary index {self.oov_index}")
        if problems:
            raise ValueError("vocabulary " + "; ".join(problems))

    @classmethod
    def fit(cls, texts: Iterable[str], max_words: int = 10_000, max_length: int = 100) -> Vocabulary:
        """Build a vocabulary from texts: most frequent first, ties by first appearance."""
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(text_to_word_sequence(text))
        # Counter.most_common keeps insertion order among equal counts, so the result is stable.
        words = [w for w, _ in counts.most_common(max_words - 2)]
        return cls({w: i + 2 for i, w in enumerate(words)}, max_words=max_words, max_length=max_length)

    def words(self, text: str) -> list[str]:
        """The words of one text, as this vocabulary splits it."""
        replacement = self.filter_replacement
        if replacement is None:
            replacement = self.split if self.split not in (SPLIT_WHITESPACE, SPLIT_CHARACTER) else " "
        return split_words(text, lower=self.lower, filters=self.filters, replacement=replacement, split=self.split)

    def ids(self, text: str) -> list[int]:
        """The token ids of one text before padding (unknown words: ``oov_index``, or none)."""
        index, oov = self.word_index, self.oov_index
        found = (index.get(w, oov) for w in self.words(text))
        return [i for i in found if i is not None]

    def pad(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """Token ids padded and truncated to ``[N, max_length]`` int32 with this vocabulary's settings."""
        return pad_tokens(sequences, self.max_length, self.padding, self.truncating, self.pad_value)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → int32 tokens ``[N, max_length]``."""
        return self.pad([self.ids(t) for t in texts])

    def cut(self, tokens: np.ndarray) -> np.ndarray:
        """Rows padded at the back, cut after the last column that holds a token in any row (at least one column).

        What a text encoder that takes each batch at its longest caption is fed (see export/variable_length.py).

        Raises:
            ValueError: this vocabulary pads at the front, where cutting would drop words.
        """
        if self.padding != "post":
            raise ValueError(f"only rows padded at the back can be cut, this vocabulary pads {self.padding!r}")
        used = np.flatnonzero((tokens != self.pad_value).any(axis=0))
        return np.ascontiguousarray(tokens[:, : int(used[-1]) + 1 if used.size else 1])

    def with_padding(self, **settings: Any) -> Vocabulary:
        """The same words with other padding settings (``max_length``, ``padding``, ``truncating``, ``pad_value``)."""
        return replace(self, **settings)

    def to_json(self) -> dict:
        """A JSON-ready dict; see :meth:`from_json`."""
        return {
            "format": VOCABULARY_FORMAT,
            "max_words": self.max_words,
            "max_length": self.max_length,
            "pad_index": self.pad_value,
            "oov_index": self.oov_index,
            "oov_token": self.oov_token,
            "filters": self.filters,
            "filter_replacement": self.filter_replacement,
            "lower": self.lower,
            "split": self.split,
            "padding": self.padding,
            "truncating": self.truncating,
            "word_index": self.word_index,
        }

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        """Load a vocabulary written by :meth:`to_json` (either format), checking that it is well formed.

        A version 1 file (no ``format``) names only fusionserve's own convention, the defaults here.
        """
        defaults = cls({})
        try:
            version = int(data.get("format", 1))
            if version > VOCABULARY_FORMAT:
                raise ValueError(f"vocabulary format {version} is newer than this fusionserve's {VOCABULARY_FORMAT}")
            oov = data.get("oov_index", defaults.oov_index)
            replacement = data.get("filter_replacement", defaults.filter_replacement)
            return cls(
                {str(k): int(v) for k, v in data["word_index"].items()},
                max_words=int(data["max_words"]),
                max_length=int(data["max_length"]),
                padding=str(data.get("padding", defaults.padding)),
                truncating=str(data.get("truncating", defaults.truncating)),
                pad_value=int(data.get("pad_index", defaults.pad_value)),
                oov_index=None if oov is None else int(oov),
                oov_token=data.get("oov_token", defaults.oov_token),
                lower=data.get("lower", defaults.lower),
                filters=str(data.get("filters", defaults.filters)),
                filter_replacement=None if replacement is None else str(replacement),
                split=str(data.get("split", defaults.split)),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed vocabulary: {e!r}") from e

    def save(self, path: Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """Read a vocabulary JSON file."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, …) into a BGR uint8 array ``[H, W, 3]``.

    Grayscale images are expanded to three channels and alpha is dropped, as ``cv2.imread`` does.

    Raises:
        InvalidInputError: the bytes are empty or not an image OpenCV can decode.
    """
    if not data:
        raise InvalidInputError("image is empty: send encoded PNG, JPEG, BMP or WebP bytes")
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as e:
        # OpenCV asserts (rather than returning None) on some headers, e.g. too many pixels.
        raise InvalidInputError(
            f"image does not decode ({len(data)} bytes): OpenCV rejects it ({e.err})"
        ) from e
    if image is None:
        raise InvalidInputError(
            f"image does not decode ({len(data)} bytes): send encoded PNG, JPEG, BMP or WebP bytes"
        )
    return image


def preprocess_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a BGR uint8 image with ``cv2.INTER_LINEAR`` and scale it to float32 in [0, 1] (the seed's way).

    Returns:
        float32 array ``[height, width, 3]``.
    """
    return ImagePreprocessing(height, width).apply(image)


_INTERPOLATIONS = {"INTER_LINEAR": cv2.INTER_LINEAR, "INTER_AREA": cv2.INTER_AREA,
                   "INTER_CUBIC": cv2.INTER_CUBIC, "INTER_NEAREST": cv2.INTER_NEAREST}  # fmt: skip


Channels = tuple[float, float, float]


@dataclass(frozen=True)
class ImagePreprocessing:
    """How decoded images become an image encoder's input.

    Resize to ``height`` × ``width`` (``interpolation``), put the channels in ``color_order``, then in
    float32: multiply by ``scale`` (or divide, when written ``"1/N"``: the default ``"1/255"`` is the
    seed's ``/ 255`` exactly, not a rounded multiplier), subtract the per-channel ``mean``, divide by
    the per-channel ``std`` (both in ``color_order``), add ``offset``: the order ``keras.applications``'
    ``preprocess_input`` works in, so each step rounds as it does there.
    """

    height: int
    width: int
    color_order: str = "BGR"
    interpolation: str = "INTER_LINEAR"
    scale: str | float = "1/255"
    offset: float = 0.0
    mean: Channels | None = None
    std: Channels | None = None

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, not {self.height}x{self.width}")
        if self.color_order not in ("BGR", "RGB"):
            raise ValueError(f"color_order must be BGR or RGB, not {self.color_order!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, not {self.interpolation!r}")
        self._divisor()  # raises on a malformed scale
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
                raise ValueError(f"{name} must be three numbers, one per channel in {self.color_order}, not {value!r}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise ValueError(f"std must be positive, not {self.std!r}")

    @classmethod
    def mode(cls, name: str, height: int, width: int) -> ImagePreprocessing:
        """A named mode of :data:`IMAGE_MODES` at the given size."""
        if name not in IMAGE_MODES:
            raise ValueError(f"unknown image preprocessing mode {name!r}; the modes are {sorted(IMAGE_MODES)}")
        return cls(height, width, **IMAGE_MODES[name])

    def _divisor(self) -> float | None:
        if isinstance(self.scale, str):
            numerator, _, denominator = self.scale.partition("/")
            try:
                if numerator.strip() == "1" and float(denominator) > 0:
                    return float(denominator)
            except ValueError:
                pass
            raise ValueError(f"scale must be a number or '1/N', not {self.scale!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"scale must be a number or '1/N', not {self.scale!r}")
        return None

    def apply(self, image: np.ndarray) -> np.ndarray:
        """A decoded BGR uint8 image ``[H, W, 3]`` as the model's float32 input ``[height, width, 3]``."""
        return self.scale_pixels(self.resize(image))

    def resize(self, image: np.ndarray) -> np.ndarray:
        """A decoded BGR uint8 image ``[H, W, 3]`` at the model's size (uint8 ``[height, width, 3]``, still BGR)."""
        if image.shape[0] != self.height or image.shape[1] != self.width:
            image = cv2.resize(image, (self.width, self.height), interpolation=_INTERPOLATIONS[self.interpolation])
        return image

    def scale_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Resized BGR uint8 images (``[height, width, 3]``, or a batch of them) as the model's float32 input.

        A batch goes through each step once, not image by image: a pipeline's batch thread then gives up
        Python's lock (as numpy does around each large step) a few times per batch instead of per image,
        and waits less for the event loop to hand it back. Each step works element by element, so the
        values are the same either way.
        """
        if self.color_order == "RGB":
            pixels = pixels[..., ::-1]  # BGR → RGB: the channels reversed, as cv2.COLOR_BGR2RGB does
        divisor = self._divisor()
        scaled = pixels.astype(np.float32)
        scaled = scaled / np.float32(divisor) if divisor else scaled * np.float32(self.scale)
        if self.mean is not None:
            scaled -= np.asarray(self.mean, np.float32)
        if self.std is not None:
            scaled /= np.asarray(self.std, np.float32)
        return scaled + np.float32(self.offset) if self.offset else scaled

    def to_json(self) -> dict:
        """A JSON-ready dict (a pipeline config's ``preprocessing.image``); mean and std only when set."""
        data = {"height": self.height, "width": self.width, "channels": 3, "color_order": self.color_order,
                "interpolation": self.interpolation, "scale": self.scale, "offset": self.offset}  # fmt: skip
        data.update({k: list(v) for k, v in (("mean", self.mean), ("std", self.std)) if v is not None})
        return data

    @classmethod
    def from_json(cls, data: dict) -> ImagePreprocessing:
        """Read :meth:`to_json`'s dict; ``mode`` (a key of :data:`IMAGE_MODES`) sets what the dict leaves out.

        ValueError names what is wrong.
        """
        try:
            if int(data.get("channels", 3)) != 3:
                raise ValueError(f"channels must be 3, not {data['channels']!r}")
            height, width = int(data["height"]), int(data["width"])
            keys = ("color_order", "interpolation", "scale", "offset", "mean", "std")
            given = {k: data[k] for k in keys if k in data}
            for key in ("mean", "std"):
                if given.get(key) is not None:
                    given[key] = tuple(given[key])
            if "offset" in given:
                given["offset"] = float(given["offset"])
            return replace(cls.mode(str(data.get("mode", "seed")), height, width), **given)
        except (KeyError, TypeError) as e:
            raise ValueError(f"image preprocessing needs height and width ({e!r})") from e


def encode_png(image: np.ndarray) -> bytes:
    """Encode a BGR uint8 array as PNG bytes (lossless, so decoding gives the same pixels)."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InvalidInputError("image could not be encoded as PNG")
    return buf.tobytes()
