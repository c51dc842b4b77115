"""Image limits before decoding: sizes read from each accepted format's header, bombs refused, other formats refused."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from fusionserve.errors import InvalidInputError
from fusionserve.server.limits import ACCEPTED_FORMATS, Limits, check_image_header, image_dimensions
from fusionserve.server.settings import ServerSettings

LIMITS = Limits.from_settings(ServerSettings())
WEBP = {"webp lossy": [cv2.IMWRITE_WEBP_QUALITY, 80], "webp lossless": [cv2.IMWRITE_WEBP_QUALITY, 101]}


def encode(ext: str, image: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


ENCODINGS = {"png": (".png", ()), "jpeg": (".jpg", ()), "bmp": (".bmp", ()),
             **{name: (".webp", params) for name, params in WEBP.items()}}  # fmt: skip


@pytest.mark.parametrize(("ext", "params"), ENCODINGS.values(), ids=ENCODINGS.keys())
@pytest.mark.parametrize("shape", [(1, 1), (37, 211), (480, 640), (64, 64, 1)])
def test_dimensions_read_from_the_header_match_the_decoder(ext, params, shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    data = encode(ext, image, params)
    assert image_dimensions(data) == (shape[1], shape[0])
    check_image_header(data, LIMITS)


def test_extended_webp_with_alpha_and_progressive_jpeg_headers():
    bgra = np.dstack([np.zeros((90, 120, 3), np.uint8), np.full((90, 120), 128, np.uint8)])
    extended = encode(".webp", bgra, [cv2.IMWRITE_WEBP_QUALITY, 80])
    assert extended[12:16] == b"VP8X" and image_dimensions(extended) == (120, 90)
    progressive = encode(".jpg", np.zeros((90, 120, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert image_dimensions(progressive) == (120, 90)


def _png_bomb(side: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))  # fmt: skip


def _jpeg_bomb(side: int) -> bytes:
    data = bytearray(encode(".jpg", np.zeros((8, 8, 3), np.uint8)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def _bmp_bomb(side: int) -> bytes:
    data = bytearray(encode(".bmp", np.zeros((8, 8, 3), np.uint8)))
    data[18:26] = struct.pack("<ii", side, side)
    return bytes(data)


def _webp_lossy_bomb(side: int) -> bytes:
    data = bytearray(encode(".webp", np.zeros((8, 8, 3), np.uint8), WEBP["webp lossy"]))
    data[26:30] = struct.pack("<HH", side, side)
    return bytes(data)


def _webp_lossless_bomb(side: int) -> bytes:
    data = bytearray(encode(".webp", np.zeros((8, 8, 3), np.uint8), WEBP["webp lossless"]))
    bits = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
    data[21:25] = (bits | (side - 1) | ((side - 1) << 14)).to_bytes(4, "little")
    return bytes(data)


def _webp_extended_bomb(side: int) -> bytes:
    bgra = np.dstack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 128, np.uint8)])
    data = bytearray(encode(".webp", bgra, WEBP["webp lossy"]))
    data[24:30] = (side - 1).to_bytes(3, "little") * 2
    return bytes(data)


BOMBS = {"PNG": (_png_bomb, 50_000), "JPEG": (_jpeg_bomb, 65_000), "BMP": (_bmp_bomb, 50_000),
         "WebP lossy": (_webp_lossy_bomb, 16_000), "WebP lossless": (_webp_lossless_bomb, 16_000),
         "WebP extended": (_webp_extended_bomb, 1_000_000)}  # fmt: skip


@pytest.mark.parametrize(("make", "side"), BOMBS.values(), ids=BOMBS.keys())
def test_a_bomb_in_each_accepted_format_is_refused_from_its_header(make, side):
    bomb = make(side)
    assert len(bomb) < 10_000 and image_dimensions(bomb) == (side, side)
    with pytest.raises(InvalidInputError, match=f"image is {side}x{side} pixels, over the limit of 40000000 pixels"):
        check_image_header(bomb, LIMITS)


def test_every_accepted_format_has_a_bomb_test():
    assert {name.split()[0] for name in BOMBS} == set(ACCEPTED_FORMATS)


@pytest.mark.parametrize("ext", [".tiff", ".ppm", ".gif", ".hdr", ".ras", ".pfm"])
def test_formats_whose_size_is_not_checked_are_refused(ext):
    data = encode(ext, np.zeros((16, 16, 3), np.uint8))
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None  # OpenCV would decode it
    with pytest.raises(InvalidInputError, match=r"not in an accepted format \(PNG, JPEG, BMP, WebP\)"):
        check_image_header(data, LIMITS)


CUT_SHORT = [b"\x89PNG\r\n\x1a\n\x00", b"\xff\xd8\xff", b"BM\x00", b"RIFF\x00\x00\x00\x00WEBPVP8X"]


@pytest.mark.parametrize("data", CUT_SHORT)
def test_a_header_cut_short_is_refused_naming_the_format(data):
    with pytest.raises(InvalidInputError, match="header is cut short or malformed"):
        check_image_header(data, LIMITS)


def test_byte_and_pixel_limits_come_from_the_settings():
    data = encode(".png", np.zeros((100, 100, 3), np.uint8))
    check_image_header(data, Limits.from_settings(ServerSettings(max_image_pixels=10_000)))
    with pytest.raises(InvalidInputError, match="100x100 pixels"):
        check_image_header(data, Limits.from_settings(ServerSettings(max_image_pixels=9_999)))
    with pytest.raises(InvalidInputError, match="bytes, over the limit"):
        check_image_header(data, Limits.from_settings(ServerSettings(max_image_bytes=len(data) - 1)))
