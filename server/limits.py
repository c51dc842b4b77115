"""Input limits checked before any expensive work, decompression bombs included.

An image is decoded only when its format is one of ``ACCEPTED_FORMATS`` and its header states a
size within ``max_image_pixels``: a small file that claims 50 000 × 50 000 pixels never reaches
the decoder, and neither does any format whose size is not checked here (TIFF, PNM, GIF, …).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fusionserve.errors import InvalidInputError

if TYPE_CHECKING:
    from fusionserve.server.settings import ServerSettings


@dataclass(frozen=True)
class Limits:
    """Per-item limits; :meth:`from_settings` gives the server's (see ServerSettings for each)."""

    max_image_bytes: int
    max_image_pixels: int
    max_text_chars: int

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Limits:
        """The limits a server's settings set."""
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.max_text_chars)


# The image formats accepted, by name; each one's size is read from its header before decoding.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "WebP")


def image_format(data: bytes) -> str | None:
    """The accepted format ``data`` starts like, or None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"\xff\xd8":
        return "JPEG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from an accepted format's header, or None when it cannot be read there."""
    kind = image_format(data)
    if kind == "PNG" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if kind == "BMP" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if kind == "JPEG":
        return _jpeg_dimensions(data)
    if kind == "WebP":
        return _webp_dimensions(data)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        # SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC), carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24-bit canvas size minus one
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit sizes minus one
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def check_image_header(data: bytes, limits: Limits) -> None:
    """Refuse, before decoding, images over the byte or pixel limits and formats not accepted.

    Raises:
        InvalidInputError: saying which limit or what to send instead.
    """
    if len(data) > limits.max_image_bytes:
        raise InvalidInputError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    if not data:
        raise InvalidInputError(f"image is empty: send encoded {', '.join(ACCEPTED_FORMATS)} bytes")
    kind = image_format(data)
    if kind is None:
        raise InvalidInputError(
            f"image is not in an accepted format ({', '.join(ACCEPTED_FORMATS)}): starts with {data[:8]!r}"
        )
    dims = image_dimensions(data)
    if dims is None:
        raise InvalidInputError(f"image: the {kind} header is cut short or malformed: its size cannot be read")
    if dims[0] * dims[1] > limits.max_image_pixels:
        raise InvalidInputError(
            f"image is {dims[0]}x{dims[1]} pixels, over the limit of {limits.max_image_pixels} pixels"
        )
