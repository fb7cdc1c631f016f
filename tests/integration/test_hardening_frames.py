"""Image sizes come from the header, before decoding, for every format the service accepts."""

from __future__ import annotations

import struct
import time
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest

from mosaic_core.errors import InvalidFrameError
from services.frames import MAX_SIDE_PX, PNG_MAGIC, decode_image, encode_image, image_size, sniff_codec


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


def _with_sof_hidden_in_a_jpg0_segment(real: bytes, shown: tuple[int, int]) -> bytes:
    """``real`` JPEG with a start-of-frame of ``shown`` (width, height) where its own was, and its own inside a JPG0
    segment after it: the header walk skips the segment by its length, FFmpeg's decoder scans it and finds the SOF."""
    sof = real.index(b"\xff\xc0")
    end = sof + 2 + int.from_bytes(real[sof + 2 : sof + 4], "big")
    own = real[sof:end]
    fake = own[:5] + struct.pack(">HH", shown[1], shown[0]) + own[9:]
    return real[:sof] + fake + b"\xff\xf0" + struct.pack(">H", 2 + len(own)) + own + real[end:]


@pytest.mark.parametrize("max_pixels", [401_408, None])
def test_a_start_of_frame_hidden_from_the_header_walk_cannot_pass_a_huge_picture(max_pixels):
    """The decoder refuses more than MAX_SIDE_PX squared pixels itself (FFmpeg's max_pixels), before allocating."""
    small = encode_image(np.zeros((16, 16, 3), np.uint8), "jpeg")
    huge = bytearray(small)
    sof = huge.index(b"\xff\xc0")
    huge[sof + 5 : sof + 9] = struct.pack(">HH", 12000, 12000)  # height, width: 144 M pixels, a 16x16 file
    data = _with_sof_hidden_in_a_jpg0_segment(bytes(huge), (16, 16))
    assert image_size(data, "mjpeg") == (16, 16)
    with pytest.raises(InvalidFrameError, match=f"cannot be decoded: .*more than {MAX_SIDE_PX}x{MAX_SIDE_PX} px"):
        decode_image(data, max_pixels)


@pytest.mark.parametrize("max_pixels", [401_408, None])
def test_a_decoded_picture_wider_than_the_limit_is_refused_whatever_its_header_said(max_pixels):
    """Few pixels, one side over the limit: under FFmpeg's pixel bound, refused once decoded (never scaled down)."""
    ctx = av.CodecContext.create("mjpeg", "w")  # encode_image refuses a side over the limit itself
    ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = MAX_SIDE_PX + 8, 8, "yuvj420p", Fraction(1, 25)
    picture = av.VideoFrame.from_ndarray(np.zeros((8, MAX_SIDE_PX + 8, 3), np.uint8), format="rgb24")
    wide = b"".join(bytes(p) for p in ctx.encode(picture.reformat(format="yuvj420p")) + ctx.encode(None))
    data = _with_sof_hidden_in_a_jpg0_segment(wide, (16, 16))
    assert image_size(data, "mjpeg") == (16, 16)
    with pytest.raises(InvalidFrameError, match=f"{MAX_SIDE_PX + 8}x8 px .*each side must be 1..{MAX_SIDE_PX} px"):
        decode_image(data, max_pixels)


def test_a_png_whose_first_chunk_is_not_ihdr_is_refused_before_decoding():
    """PNG puts IHDR first; a chunk before it would hide the size from the header check, not from FFmpeg."""
    png = encode_image(np.zeros((16, 16, 3), np.uint8), "png")
    text = b"a\x00b"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    with pytest.raises(InvalidFrameError, match=r"names no picture size \(no IHDR chunk first\)"):
        decode_image(png[:8] + chunk + png[8:])


def _blank_png(width: int, height: int, depth: int, colour_type: int, channels: int) -> bytes:
    """A valid all-zero PNG, streamed row by row: a few hundred KB however large the picture."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\x00" * (1 + width * channels * depth // 8), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_a_png_that_would_decode_to_more_bytes_than_8bit_rgb_at_the_largest_size_is_refused_before_decoding():
    """A 16-bit RGBA PNG of 8192x8192 px is 500 KB: decoded, it took seconds and over 500 MB of the router's."""
    bomb = _blank_png(MAX_SIDE_PX, MAX_SIDE_PX, 16, 6, 4)
    assert len(bomb) < 1 << 20  # it fits any gRPC message
    started = time.perf_counter()
    with pytest.raises(InvalidFrameError, match=rf"{MAX_SIDE_PX}x{MAX_SIDE_PX} px of 64 bits per pixel, 512 MiB"):
        decode_image(bomb, 4 * 401_408)
    assert time.perf_counter() - started < 0.5  # refused from its header, not after a decode
    # The same picture at the bytes of 8-bit RGB still decodes, and so does 16-bit RGBA of a 4K camera.
    for width, height, depth, colour_type, channels in ((2048, 2048, 8, 2, 3), (3840, 2160, 16, 6, 4)):
        picture = decode_image(_blank_png(width, height, depth, colour_type, channels))
        assert picture.shape == (height, width, 3)
