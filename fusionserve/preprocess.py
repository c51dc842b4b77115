"""Preprocessing shared by training and serving; imports neither TensorFlow nor gRPC.

Text follows Keras' ``text_to_word_sequence`` + ``pad_sequences`` (padding and truncation at the
front by default, at the back when a vocabulary says ``post``); images follow the seed's OpenCV
``preprocess_image`` by default (BGR, ``cv2.INTER_LINEAR`` resize, float32 in [0, 1]), and
:class:`ImagePreprocessing` describes any other colour order, scale or interpolation a
repository's models were trained with. Both are tested against the reference implementations, so
train/serve skew cannot creep in.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fusionserve.errors import InvalidInputError

KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
PAD_INDEX = 0
OOV_INDEX = 1
OOV_TOKEN = "[UNK]"

_FILTER_TABLE = str.maketrans({c: " " for c in KERAS_FILTERS})
# The settings to_json() records; from_json() rejects a file that declares different ones.
_CONVENTIONS = {
    "pad_index": PAD_INDEX,
    "oov_index": OOV_INDEX,
    "filters": KERAS_FILTERS,
    "lower": True,
}
SIDES = ("pre", "post")  # where pad_sequences pads and truncates


def text_to_word_sequence(text: str) -> list[str]:
    """Split a text into words exactly as Keras' ``text_to_word_sequence`` does by default.

    Lower-cases, turns every filtered character into a space, splits on single spaces and drops
    empty strings.
    """
    return [w for w in text.lower().translate(_FILTER_TABLE).split(" ") if w]


def pad_tokens(
    sequences: Sequence[Sequence[int]], max_length: int, padding: str = "pre", truncating: str = "pre"
) -> np.ndarray:
    """Pad and truncate as Keras' ``pad_sequences`` does (``pre``: at the front, its default; or ``post``).

    Returns:
        int32 array of shape ``[len(sequences), max_length]``.
    """
    out = np.full((len(sequences), max_length), PAD_INDEX, dtype=np.int32)
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
    """Word → index map: 0 is padding, 1 is out-of-vocabulary, then words by frequency."""

    word_index: dict[str, int]
    max_words: int = 10_000
    max_length: int = 100
    padding: str = "pre"
    truncating: str = "pre"

    @classmethod
    def fit(cls, texts: Iterable[str], max_words: int = 10_000, max_length: int = 100) -> Vocabulary:
        """Build a vocabulary from texts: most frequent first, ties by first appearance."""
        counts: collections.Counter[str] = collections.Counter()
        for text in texts:
            counts.update(text_to_word_sequence(text))
        # Counter.most_common keeps insertion order among equal counts, so the result is stable.
        words = [w for w, _ in counts.most_common(max_words - 2)]
        return cls({w: i + 2 for i, w in enumerate(words)}, max_words=max_words, max_length=max_length)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Texts → int32 tokens ``[N, max_length]``; unknown words map to the OOV index."""
        index = self.word_index
        seqs = [[index.get(w, OOV_INDEX) for w in text_to_word_sequence(t)] for t in texts]
        return pad_tokens(seqs, self.max_length, self.padding, self.truncating)

    def to_json(self) -> dict:
        """A JSON-ready dict; see :meth:`from_json`."""
        return {
            "max_words": self.max_words,
            "max_length": self.max_length,
            "pad_index": PAD_INDEX,
            "oov_index": OOV_INDEX,
            "oov_token": OOV_TOKEN,
            "filters": KERAS_FILTERS,
            "lower": True,
            "padding": self.padding,
            "truncating": self.truncating,
            "word_index": self.word_index,
        }

    @classmethod
    def from_json(cls, data: dict) -> Vocabulary:
        """Load a vocabulary written by :meth:`to_json`, checking that it is well formed."""
        try:
            word_index = {str(k): int(v) for k, v in data["word_index"].items()}
            max_words = int(data["max_words"])
            max_length = int(data["max_length"])
            padding, truncating = str(data.get("padding", "pre")), str(data.get("truncating", "pre"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed vocabulary: {e!r}") from e
        if padding not in SIDES or truncating not in SIDES:
            raise ValueError(f"vocabulary padding/truncating must be 'pre' or 'post', not {padding!r}/{truncating!r}")
        if max_length < 1 or max_words < 2:
            raise ValueError(
                f"vocabulary needs max_length >= 1 and max_words >= 2, has {max_length} and {max_words}"
            )
        if word_index and (min(word_index.values()) < 2 or max(word_index.values()) >= max_words):
            raise ValueError(f"vocabulary indices must lie in [2, {max_words})")
        # A file that declares other tokenisation settings would be encoded differently from how
        # its model was trained: refuse it rather than skew silently.
        for key, ours in _CONVENTIONS.items():
            if key in data and data[key] != ours:
                raise ValueError(f"vocabulary declares {key}={data[key]!r}; only {ours!r} is supported")
        return cls(word_index, max_words=max_words, max_length=max_length, padding=padding, truncating=truncating)

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


@dataclass(frozen=True)
class ImagePreprocessing:
    """How decoded images become an image encoder's input: size, colour order, interpolation, scale.

    ``scale`` multiplies the pixel values, or divides them when written as ``"1/N"`` (the default,
    ``"1/255"``, is the seed's ``/ 255``: exactly, not a rounded multiplier); ``offset`` is added after.
    """

    height: int
    width: int
    color_order: str = "BGR"
    interpolation: str = "INTER_LINEAR"
    scale: str | float = "1/255"
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, not {self.height}x{self.width}")
        if self.color_order not in ("BGR", "RGB"):
            raise ValueError(f"color_order must be BGR or RGB, not {self.color_order!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, not {self.interpolation!r}")
        self._divisor()  # raises on a malformed scale

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
        if image.shape[0] != self.height or image.shape[1] != self.width:
            image = cv2.resize(image, (self.width, self.height), interpolation=_INTERPOLATIONS[self.interpolation])
        if self.color_order == "RGB":
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        divisor = self._divisor()
        pixels = image.astype(np.float32)
        pixels = pixels / np.float32(divisor) if divisor else pixels * np.float32(self.scale)
        return pixels + np.float32(self.offset) if self.offset else pixels

    def to_json(self) -> dict:
        """A JSON-ready dict (a pipeline config's ``preprocessing.image``)."""
        return {"height": self.height, "width": self.width, "channels": 3, "color_order": self.color_order,
                "interpolation": self.interpolation, "scale": self.scale, "offset": self.offset}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict) -> ImagePreprocessing:
        """Read :meth:`to_json`'s dict; ValueError names what is wrong."""
        try:
            if int(data.get("channels", 3)) != 3:
                raise ValueError(f"channels must be 3, not {data['channels']!r}")
            return cls(int(data["height"]), int(data["width"]), str(data.get("color_order", "BGR")),
                       str(data.get("interpolation", "INTER_LINEAR")), data.get("scale", "1/255"),
                       float(data.get("offset", 0.0)))  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ValueError(f"image preprocessing needs height and width ({e!r})") from e


def encode_png(image: np.ndarray) -> bytes:
    """Encode a BGR uint8 array as PNG bytes (lossless, so decoding gives the same pixels)."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise InvalidInputError("image could not be encoded as PNG")
    return buf.tobytes()
