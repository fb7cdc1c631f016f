"""Frame payloads to RGB arrays and back: JPEG and PNG through PyAV's codecs, or raw RGB with its shape.

PyAV is already a core dependency (video sources), so images need no extra library. The format is sniffed
from the magic bytes rather than trusted from the client, and the picture's size is read from its header
(PNG ``IHDR``, JPEG ``SOFn``) before anything is decoded: a small file that claims a huge picture is refused
with the size limit. A header can also lie to that reading and not to FFmpeg (a second JPEG start-of-frame inside
a segment FFmpeg scans and the walk skips), so the decoder itself is bounded too: FFmpeg's ``max_pixels`` refuses
a picture of more than ``MAX_SIDE_PX`` squared pixels before it allocates it, and a decoded picture with a side over
``MAX_SIDE_PX`` is refused. A PNG whose header's size, bit depth and colour type add up to more decoded bytes than
``MAX_PNG_DECODED_BYTES`` is refused before decoding too. Every failure is an ``InvalidFrameError``
(INVALID_ARGUMENT) naming what was wrong; nothing here touches a stream, so a bad frame harms no one.
"""

from __future__ import annotations

import struct
from fractions import Fraction

import av
import numpy as np

from mosaic_core.errors import InvalidFrameError
from mosaic_core.model.geometry import downscaled_size
from mosaic_core.model.pixels import validate_frames
from mosaic_core.model.video import frame_rgb
from mosaic_core.model.video_sources import MAX_SIDE_PX

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Samples per pixel of each PNG colour type (IHDR byte 25): grey, RGB, palette, grey + alpha, RGBA.
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# The most bytes FFmpeg may decode a PNG into: those of an 8-bit RGB picture of MAX_SIDE_PX squared. A PNG is never
# shrunk as it is decoded (a JPEG is, by ``lowres``), and a 16-bit RGBA one of 8192x8192 px (500 KB, well within a
# message) took 4.2 s and over 500 MB to decode on this project's CPU, against 0.95 s for 8-bit RGB: a few of them
# held every decode thread, and the router's memory, from the other cameras' frames.
MAX_PNG_DECODED_BYTES = 3 * MAX_SIDE_PX * MAX_SIDE_PX


def sniff_codec(data: bytes) -> str:
    """The PyAV decoder for an encoded image: ``mjpeg`` or ``png``."""
    if data.startswith(JPEG_MAGIC):
        return "mjpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    head = data[:8].hex(" ") if data else "nothing"
    raise InvalidFrameError(f"the encoded frame is neither JPEG nor PNG (it starts with {head})")


def image_size(data: bytes, codec: str) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG or JPEG header without decoding; None when the header cannot be read. A
    JPEG's segments are walked as FFmpeg's decoder walks them: bytes between them that start no marker are skipped,
    so a stray byte cannot hide the start-of-frame that FFmpeg would still find."""
    if codec == "png":
        # signature (8) | IHDR length (4) | "IHDR" | width (4) | height (4); IHDR must come first
        if len(data) < 24 or data[12:16] != b"IHDR":
            return None
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    pos = 2  # JPEG: walk the marker segments to the first start-of-frame
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker == 0xFF or (marker < 0xC0 and marker != 0x01):  # junk, a fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        if length < 2:
            return None
        pos += 2 + length
    return None


def check_image_size(data: bytes, codec: str) -> None:
    """Refuses a picture whose header claims an empty side or one over ``MAX_SIDE_PX``, and one whose header
    names no size where it must (a JPEG's start-of-frame, a PNG's first chunk): it is never decoded unchecked."""
    size = image_size(data, codec)
    if size is None:
        where = "no start-of-frame before its data" if codec == "mjpeg" else "no IHDR chunk first"
        raise InvalidFrameError(
            f"the {codec_name(codec)} frame ({len(data)} bytes) cannot be decoded: it names no picture size ({where})"
        )
    check_sides(*size, codec)
    if codec == "png":
        check_png_bytes(data, *size)


def check_png_bytes(data: bytes, width: int, height: int) -> None:
    """Refuses a PNG whose decoded picture (its IHDR's size, bit depth and colour type) would take more than
    ``MAX_PNG_DECODED_BYTES``; an unknown colour type is left to the decoder, which refuses it."""
    if len(data) < 26:
        return  # the decoder refuses a header this short
    depth, colour_type = data[24], data[25]
    channels = PNG_CHANNELS.get(colour_type)
    if channels is None:
        return
    decoded = width * height * max(1, channels * depth // 8)
    if decoded > MAX_PNG_DECODED_BYTES:
        raise InvalidFrameError(
            f"the PNG frame is {width}x{height} px of {channels * depth} bits per pixel, {decoded / 2**20:.0f} MiB "
            f"decoded; at most {MAX_PNG_DECODED_BYTES / 2**20:.0f} MiB (8-bit RGB of {MAX_SIDE_PX}x{MAX_SIDE_PX} px) "
            "is decoded: send fewer bits per pixel or a smaller picture"
        )


def check_sides(width: int, height: int, codec: str) -> None:
    if not (0 < height <= MAX_SIDE_PX and 0 < width <= MAX_SIDE_PX):
        raise InvalidFrameError(
            f"the {codec_name(codec)} frame is {width}x{height} px (width x height): "
            f"each side must be 1..{MAX_SIDE_PX} px"
        )


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decodes JPEG or PNG bytes to an ``[H, W, 3]`` uint8 RGB array (size checked from the header first), scaled
    down to at most ``max_pixels`` pixels, aspect ratio kept, when it has more (``video.frame_rgb``).

    A JPEG at least 4 times wider and higher than ``max_pixels`` needs is decoded at a quarter (or an eighth) of
    its size by FFmpeg's ``lowres``, which skips the finer DCT coefficients: on this project's CPU a 4K frame took
    7.7 ms to decode and scale, against 13.8 ms to decode at full size (``bench.decode_downscale``; bench/NOTES.md,
    session 33). Half size decoded slower than full size there, so it is not used."""
    codec = sniff_codec(data)
    check_image_size(data, codec)
    lowres = jpeg_lowres(data, max_pixels) if codec == "mjpeg" else 0
    try:
        frames = decode_picture(codec, data, lowres)
        if not frames and lowres:
            frames, lowres = decode_picture(codec, data, 0), 0
    except (av.FFmpegError, ValueError) as err:
        raise InvalidFrameError(
            f"the {codec_name(codec)} frame ({len(data)} bytes) cannot be decoded: {err} (a picture of more than "
            f"{MAX_SIDE_PX}x{MAX_SIDE_PX} px is not decoded at all)"
        ) from err
    if not frames:
        raise InvalidFrameError(f"the {codec_name(codec)} frame ({len(data)} bytes) decoded to no picture")
    picture = frames[0]
    check_sides(picture.width << lowres, picture.height << lowres, codec)  # its full size, at most a few px over
    return validate_frames(frame_rgb(picture, max_pixels))[0]


def decode_picture(codec: str, data: bytes, lowres: int) -> list:
    """The pictures FFmpeg decodes from ``data`` with ``codec``, at ``2**-lowres`` of each side (JPEG only)."""
    ctx = av.CodecContext.create(codec, "r")
    ctx.options = {"max_pixels": str(MAX_SIDE_PX * MAX_SIDE_PX), **({"lowres": str(lowres)} if lowres else {})}
    return ctx.decode(av.Packet(data)) or ctx.decode(None)


def jpeg_lowres(data: bytes, max_pixels: int | None) -> int:
    """FFmpeg's ``lowres`` for a JPEG: 3 or 2 (an eighth or a quarter of each side) when that still has at least
    ``max_pixels`` pixels, else 0 (full size)."""
    size = image_size(data, "mjpeg")
    if max_pixels is None or size is None:
        return 0
    width, height = size
    return next((k for k in (3, 2) if (width >> k) * (height >> k) >= max_pixels), 0)


def decode_raw(rgb: bytes, *, height: int, width: int, channels: int) -> np.ndarray:
    """Checks a raw frame's shape against its byte count and returns it as ``[H, W, 3]`` uint8."""
    check_raw_shape(rgb, height=height, width=width, channels=channels)
    return np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, channels).copy()


def check_raw_shape(rgb: bytes, *, height: int, width: int, channels: int) -> None:
    """Refuses a raw frame that is not RGB, has a side out of 1..``MAX_SIDE_PX``, or bytes that do not fill its
    shape."""
    if channels != 3:
        raise InvalidFrameError(f"raw frames must have 3 channels (RGB), got channels={channels}")
    if not (0 < height <= MAX_SIDE_PX and 0 < width <= MAX_SIDE_PX):
        raise InvalidFrameError(
            f"the raw frame is {width}x{height} px (width x height): each side must be 1..{MAX_SIDE_PX} px"
        )
    expected = height * width * channels
    if len(rgb) != expected:
        raise InvalidFrameError(
            f"raw frame of shape {height}x{width}x{channels} needs {expected} bytes, got {len(rgb)}"
        )


def decode_frame(frame, max_pixels: int | None = None) -> np.ndarray:
    """RGB pixels of a ``mosaic.v1.Frame`` message (``encoded`` or ``raw`` payload), scaled down to at most
    ``max_pixels`` pixels, aspect ratio kept, when it has more."""
    payload = frame.WhichOneof("payload")
    if payload == "encoded":
        return decode_image(frame.encoded, max_pixels)
    if payload == "raw":
        raw = frame.raw
        rgb = decode_raw(raw.rgb, height=raw.height, width=raw.width, channels=raw.channels)
        if downscaled_size(raw.height, raw.width, max_pixels) == (raw.height, raw.width):
            return rgb
        return frame_rgb(av.VideoFrame.from_ndarray(rgb, format="rgb24"), max_pixels)
    raise InvalidFrameError("the frame has no payload: set `encoded` (JPEG/PNG) or `raw`")


def check_header(frame) -> None:
    """Checks a ``mosaic.v1.Frame`` message as far as it can be without decoding it, raising as ``decode_frame`` would:
    its payload, an encoded picture's codec and size from its header, a raw picture's shape against its bytes."""
    payload = frame.WhichOneof("payload")
    if payload == "encoded":
        check_image_size(frame.encoded, sniff_codec(frame.encoded))
    elif payload == "raw":
        raw = frame.raw
        check_raw_shape(raw.rgb, height=raw.height, width=raw.width, channels=raw.channels)
    else:
        raise InvalidFrameError("the frame has no payload: set `encoded` (JPEG/PNG) or `raw`")


def encode_image(rgb: np.ndarray, fmt: str = "jpeg") -> bytes:
    """Encodes an ``[H, W, 3]`` uint8 array as JPEG (``fmt="jpeg"``) or PNG; used by clients and the demo."""
    rgb = validate_frames(rgb)[0]
    codec, pix_fmt = {"jpeg": ("mjpeg", "yuvj420p"), "png": ("png", "rgb24")}[fmt]
    height, width = rgb.shape[:2]
    if codec == "mjpeg" and (height % 2 or width % 2):
        rgb = rgb[: height - height % 2, : width - width % 2]  # 4:2:0 chroma needs even sides
        height, width = rgb.shape[:2]
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
    ctx.time_base = Fraction(1, 25)
    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format=pix_fmt)
    packets = ctx.encode(picture) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def codec_name(codec: str) -> str:
    return {"mjpeg": "JPEG", "png": "PNG"}.get(codec, codec)
