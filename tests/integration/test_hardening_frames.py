"""Image sizes come from the header, before decoding, for every format the service accepts."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from mosaic_core.errors import InvalidFrameError
from services.frames import MAX_SIDE_PX, decode_image, encode_image, image_size, sniff_codec


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize(("height", "width"), [(2, 2), (38, 54), (144, 176), (97, 17)])
def test_the_header_size_matches_the_decoded_picture(fmt, height, width):
    rgb = np.random.default_rng(height * width).integers(0, 255, (height, width, 3), dtype=np.uint8)
    data = encode_image(rgb, fmt)
    decoded = decode_image(data)
    assert image_size(data, sniff_codec(data)) == (decoded.shape[1], decoded.shape[0])


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (MAX_SIDE_PX + 1, 1), (1, 0), (0, 5), (2**32 - 1, 7)])
def test_a_png_claiming_a_size_out_of_bounds_is_refused_before_decoding(width, height):
    with pytest.raises(InvalidFrameError, match=rf"{width}x{height} px .*each side must be 1\.\.{MAX_SIDE_PX} px"):
        decode_image(_png_header(width, height) + b"\x00" * 32)


def test_a_jpeg_claiming_a_size_out_of_bounds_is_refused_before_decoding():
    data = bytearray(encode_image(np.zeros((16, 16, 3), np.uint8), "jpeg"))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 40000, 9000)  # height, width
    with pytest.raises(InvalidFrameError, match="9000x40000 px"):
        decode_image(bytes(data))


TRUNCATED = [b"\xff\xd8\xff", b"\xff\xd8\xff\xe0\x00", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\x00\x01"]


@pytest.mark.parametrize("data", TRUNCATED)
def test_truncated_headers_are_refused_with_a_sentence(data):
    """A JPEG whose header names no size is refused before decoding; a PNG's gets the decoder's sentence."""
    words = "cannot be decoded: it names no picture size" if data.startswith(b"\xff\xd8") else "cannot be decoded"
    with pytest.raises(InvalidFrameError, match=words):
        decode_image(data)


@pytest.mark.parametrize("max_pixels", [401_408, None])
def test_a_stray_byte_between_jpeg_segments_does_not_hide_its_size(max_pixels):
    """FFmpeg skips bytes between segments that start no marker, and decodes the picture behind them: the header
    check skips them too, so an oversized picture is refused before it costs the decoder its memory."""
    data = bytearray(encode_image(np.zeros((16, 16, 3), np.uint8), "jpeg"))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xC0)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 200, 20000)  # height, width
    first_segment_end = 2 + 2 + int.from_bytes(data[4:6], "big")
    data[first_segment_end:first_segment_end] = b"\x00"
    with pytest.raises(InvalidFrameError, match=f"20000x200 px .* 1..{MAX_SIDE_PX} px"):
        decode_image(bytes(data), max_pixels)
