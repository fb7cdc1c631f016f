"""A source's pictures are bounded as pushed images are (``video.MAX_SIDE_PX``): a clip whose pictures have a side over
the limit, or whose header claims a small picture while its frames are huge, is refused with a sentence, and the decoder
never allocates the huge picture. Before, a caller could register a source serving such pictures and the worker
decoded them whole. Real PyAV, real clips (MJPEG in Matroska, PNG in QuickTime), the real ``SourceReader``."""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from source_runs import read_to_end

from mosaic_core.errors import InvalidFrameError
from mosaic_core.model.video import iter_video_frames
from mosaic_core.model.video_sources import MAX_SIDE_PX
from services.frames import PNG_MAGIC
from services.sources import SourceState

NUM_FRAMES = 3


def _jpegs(width: int, height: int) -> list[bytes]:
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = width, height, "yuvj420p", Fraction(1, 25)
    jpegs = []
    for i in range(NUM_FRAMES):
        picture = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
        picture = picture.reformat(format="yuvj420p")
        picture.pts = i
        jpegs += [bytes(p) for p in ctx.encode(picture)]
    return jpegs + [bytes(p) for p in ctx.encode(None)]


def _clip(path: Path, jpegs: list[bytes], *, width: int, height: int) -> str:
    """A Matroska clip of ``jpegs`` whose header says ``width`` x ``height``, whatever the pictures say."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuvj420p"
        for i, data in enumerate(jpegs):
            packet = av.Packet(data)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 25)
            out.mux(packet)
    return str(path)


def _png(width: int, height: int) -> bytes:
    """A black 8-bit grey PNG, written by hand: a few kilobytes for any size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(bytes((width + 1) * height), 9)  # each row: filter byte 0, then its pixels
    return PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def wide_clip(tmp_path_factory) -> str:
    width = MAX_SIDE_PX + 8  # few pixels, one side over the limit
    return _clip(tmp_path_factory.mktemp("clips") / "wide.mkv", _jpegs(width, 8), width=width, height=8)


def test_a_clip_with_a_side_over_the_limit_is_refused_with_its_size(wide_clip):
    with pytest.raises(InvalidFrameError, match=rf"{MAX_SIDE_PX + 8}x8 px .*at most {MAX_SIDE_PX} px"):
        next(iter_video_frames(wide_clip, fps=5.0))


def test_a_clip_of_huge_pictures_under_a_small_header_is_not_decoded(tmp_path):
    """Opening probes a picture for the stream's size, and decoding reads each picture's own size: both are refused
    by FFmpeg before it allocates 8200x8200 px, so the side check on decoded frames is never reached."""
    side = MAX_SIDE_PX + 8
    path, picture = tmp_path / "huge.mov", _png(side, side)
    with av.open(str(path), "w") as out:  # the header says 16x16; each picture says side x side
        stream = out.add_stream("png", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "gray"
        for i in range(NUM_FRAMES):
            packet = av.Packet(picture)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 25)
            out.mux(packet)
    with pytest.raises(InvalidFrameError, match=f"more than {MAX_SIDE_PX}x{MAX_SIDE_PX} px is not decoded at all"):
        next(iter_video_frames(str(path), fps=5.0, max_pixels=401_408))


def test_a_reader_of_such_a_source_stops_in_error_saying_why_and_hands_over_nothing(wide_clip):
    progress, received = read_to_end(wide_clip, fps=5.0)
    assert progress.state == SourceState.ERROR, progress
    assert f"{MAX_SIDE_PX + 8}x8 px" in progress.error and not received
