"""Input limits checked before any expensive work, decompression bombs included."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fusionserve.errors import InvalidInputError


@dataclass(frozen=True)
class Limits:
    """Per-item limits (see ServerSettings for the meaning of each)."""

    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 10_000


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) read from a PNG, JPEG or BMP header, or None when the header is not one of those."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"BM" and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(width), abs(height)
    if data[:2] == b"\xff\xd8":
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


def check_image_header(data: bytes, limits: Limits) -> None:
    """Refuse images over the byte or pixel limits before decoding them."""
    if len(data) > limits.max_image_bytes:
        raise InvalidInputError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    dims = image_dimensions(data)
    if dims is not None and dims[0] * dims[1] > limits.max_image_pixels:
        raise InvalidInputError(
            f"image is {dims[0]}x{dims[1]} pixels, over the limit of {limits.max_image_pixels} pixels"
        )
