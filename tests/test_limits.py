"""Image header sniffing (decompression-bomb guard) against real encoders."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from fusionserve.errors import InvalidInputError
from fusionserve.server.limits import Limits, check_image_header, image_dimensions


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp"])
@pytest.mark.parametrize("shape", [(1, 1), (37, 211), (480, 640), (64, 64, 1)])
def test_dimensions_read_from_the_header_match_the_decoder(ext, shape):
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    assert image_dimensions(buf.tobytes()) == (shape[1], shape[0])


def test_progressive_jpeg_header():
    image = np.zeros((90, 120, 3), np.uint8)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and image_dimensions(buf.tobytes()) == (120, 90)


def test_limits_are_enforced_before_decoding():
    ok, buf = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))
    data = buf.tobytes()
    check_image_header(data, Limits(max_image_pixels=10_000))
    with pytest.raises(InvalidInputError, match="100x100 pixels"):
        check_image_header(data, Limits(max_image_pixels=9_999))
    with pytest.raises(InvalidInputError, match="bytes, over the limit"):
        check_image_header(data, Limits(max_image_bytes=len(data) - 1))


def test_unknown_or_truncated_headers_are_left_to_the_decoder():
    assert image_dimensions(b"") is None
    assert image_dimensions(b"\xff\xd8\xff") is None
    assert image_dimensions(b"GIF89a....") is None
