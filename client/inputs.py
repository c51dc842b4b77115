"""Client inputs: images as a path, encoded bytes or a BGR array; load-test input sets."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import grpc
import numpy as np

from fusionserve.client.errors import FusionClientError

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]
"""A file path, encoded image bytes (PNG, JPEG, BMP), or a BGR uint8 array (sent as PNG)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def invalid(message: str) -> FusionClientError:
    """The error for a call refused before it was sent (INVALID_ARGUMENT)."""
    return FusionClientError(grpc.StatusCode.INVALID_ARGUMENT, message)


def image_bytes(image: ImageInput) -> bytes:
    """Encoded image bytes for the wire.

    Raises:
        FusionClientError: INVALID_ARGUMENT when the file cannot be read or the array is not an image.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise invalid(
                f"an image array must be uint8 [H, W] or [H, W, 1|3|4] (BGR), got {image.dtype} {list(image.shape)}"
            )
        from fusionserve.extras import require

        require("server", "a NumPy image (OpenCV encodes it as PNG; or send encoded bytes or a path)")
        from fusionserve.preprocess import encode_png

        return encode_png(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise invalid(f"cannot read image {str(image)!r}: {e.strerror or e}") from e
    raise invalid(f"an image must be a path, encoded bytes or a NumPy BGR array, not {type(image).__name__}")


def text_of(text: Any) -> str:
    """The text of an item, which must be a str."""
    if not isinstance(text, str):
        raise invalid(f"an item's text must be a str, not {type(text).__name__}")
    return text


def pair(item: Any) -> tuple[ImageInput, str]:
    """An (image, text) item, accepting any two-element sequence."""
    try:
        image, text = item
    except (TypeError, ValueError) as e:
        raise invalid(f"an item must be an (image, text) pair, not {type(item).__name__}") from e
    return image, text


# ---- load-test inputs -----------------------------------------------------------------------------
def generated_inputs(n: int = 64, seed: int = 0) -> list[tuple[bytes, str]]:
    """``n`` generated (PNG bytes, caption) pairs from the training data generator (no TensorFlow)."""
    from fusionserve.extras import require

    require("server", "generated load-test inputs (OpenCV draws them; or pass --inputs FOLDER)")
    from fusionserve.data import encoded_pairs

    return encoded_pairs(n, seed)


def directory_inputs(folder: Path) -> list[tuple[bytes, str]]:
    """(image bytes, caption) pairs from the image files of a folder, sorted by name.

    Each image's caption is its line in ``captions.txt`` (``FILE<TAB>caption``, ``#`` comments),
    or else its file stem with ``_`` and ``-`` read as spaces (``red_circle.png`` → "red circle").

    Raises:
        ValueError: the folder holds no PNG, JPEG, BMP or WebP file.
    """
    folder = Path(folder)
    captions: dict[str, str] = {}
    listing = folder / "captions.txt"
    if listing.exists():
        for line in listing.read_text(encoding="utf-8").splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, caption = line.partition("\t")
            if not sep:
                raise ValueError(f"{listing}: expected 'FILE<TAB>caption', got {line!r}")
            captions[name.strip()] = caption.strip()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no {', '.join(IMAGE_SUFFIXES)} files in {folder}")
    return [(p.read_bytes(), captions.get(p.name) or p.stem.replace("_", " ").replace("-", " ")) for p in files]


def load_inputs(spec: str, n: int = 64) -> list[tuple[bytes, str]]:
    """``generated`` (``n`` generated pairs) or a folder of images (see :func:`directory_inputs`)."""
    if spec == "generated":
        return generated_inputs(n)
    return directory_inputs(Path(spec))


def sample(inputs: Sequence[tuple[bytes, str]], start: int, size: int) -> list[tuple[bytes, str]]:
    """``size`` consecutive inputs from ``start``, wrapping around."""
    return [inputs[(start + j) % len(inputs)] for j in range(size)]
