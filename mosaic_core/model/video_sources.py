"""How a video source is opened with PyAV: the protocols its scheme may use, the containers read, and the bound on
a picture's size.

FFmpeg opens only the protocols the source's own scheme needs (``protocol_whitelist``): a local file reads
files only, an ``http(s)`` URL speaks HTTP over TCP/TLS only, ``rtsp(s)`` RTSP/RTP over TCP/UDP/TLS; any other
scheme (``concat:``, ``data:``, ``ftp://``, ``tcp://``...) is refused before FFmpeg sees it. From a file or over
HTTP it reads only the containers of ``SOURCE_FORMATS`` (``format_whitelist``): an HLS or DASH playlist is refused
before any of its entries is opened, since they name hosts, or files outside the source roots, that no check of the
source saw.

A source's pictures are bounded as pushed images are: a side over ``MAX_SIDE_PX``, in the container's header or in a
decoded frame, is an ``InvalidFrameError``, and the decoder refuses a picture of more than ``MAX_SIDE_PX`` squared
pixels before it allocates it (FFmpeg's ``max_pixels``), whatever the header said.
"""

from __future__ import annotations

import re

import av

from mosaic_core.errors import InvalidArgumentError, InvalidFrameError, RefusedSourceError

OPEN_TIMEOUT_S = 10.0  # for network sources; a stalled camera must not hang a worker forever
# The largest side of a picture decoded from a source or a pushed image. FFmpeg's decoder refuses a picture of more
# than its square before allocating it, so a source that sends a huge picture cannot exhaust a worker's memory.
MAX_SIDE_PX = 8192
DECODER_OPTIONS = {"max_pixels": str(MAX_SIDE_PX * MAX_SIDE_PX)}
# FFmpeg protocols each source scheme may use, nested ones included (RTSP runs over RTP/UDP/TCP, HTTPS over TLS).
PROTOCOLS_BY_SCHEME = {
    "file": "file",
    "rtsp": "rtsp,rtp,srtp,udp,tcp,tls",
    "rtsps": "rtsp,rtp,srtp,udp,tcp,tls",
    "http": "http,https,tcp,tls,crypto,httpproxy",
    "https": "http,https,tcp,tls,crypto,httpproxy",
}
# The demuxers a file or http(s) source may use: the containers that cameras and video files come in, and a camera's
# snapshot picture. No playlist or manifest (HLS, DASH, concat, IMF): their demuxers open the URLs or files they list,
# on hosts or outside the source roots, where no check of the source saw.
SOURCE_FORMATS = (
    "mpjpeg,mjpeg,mpegts,mov,matroska,flv,live_flv,avi,asf,mpeg,mpegvideo,h264,hevc,m4v,ogg,ivf,"
    "jpeg_pipe,png_pipe,webp_pipe"
)


def source_scheme(source: str) -> str:
    """The URL scheme of ``source`` in lower case; ``file`` for a plain path."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", str(source))
    if match is None or len(match.group(1)) == 1:  # "C:" is a drive letter, not a scheme
        return "file"
    return match.group(1).lower()


def protocol_whitelist(source: str) -> str:
    """FFmpeg's ``protocol_whitelist`` for ``source``: only what its own scheme needs.

    Raises:
        InvalidArgumentError: a scheme that no camera or video file uses (``concat:``, ``data:``, ``ftp://``...).
    """
    scheme = source_scheme(source)
    if str(source).lower().startswith("file:"):
        scheme = "file:"  # file: URLs are refused: a local source is a plain path
    protocols = PROTOCOLS_BY_SCHEME.get(scheme)
    if protocols is None:
        allowed = ", ".join(f"{s}://" for s in PROTOCOLS_BY_SCHEME if s != "file")
        raise InvalidArgumentError(f"Video source scheme {scheme!r} is not supported; use a file path or {allowed}.")
    return protocols


def open_options(source: str) -> dict[str, str]:
    """FFmpeg's options for opening ``source``: the protocols its scheme may use, the decoder's bound on a picture's
    pixels (opening decodes a picture to learn the stream's size), RTSP over TCP, over HTTP no redirects, and from a
    file or over HTTP only the containers of ``SOURCE_FORMATS`` (the scheme in any case, as the protocol check reads
    it). A redirect, or a playlist's entries, would take the connection to a host, or a file outside the source
    roots, that no check of the source saw."""
    options = {"protocol_whitelist": protocol_whitelist(source), **DECODER_OPTIONS}  # probing decodes a picture too
    scheme = source_scheme(source)
    if scheme in ("rtsp", "rtsps"):
        options["rtsp_transport"] = "tcp"
    if scheme in ("http", "https"):
        options["max_redirects"] = "0"
    if scheme in ("file", "http", "https"):
        options["format_whitelist"] = SOURCE_FORMATS
    return options


def open_source(source: str) -> av.container.InputContainer:
    options = open_options(source)
    try:
        container = av.open(str(source), mode="r", timeout=OPEN_TIMEOUT_S, options=options)
    except (av.FFmpegError, OSError) as err:
        if "format_whitelist" in options and isinstance(err, av.ArgumentError):  # a container the list refused
            hint = f"if it is a playlist or another container: this server reads {SOURCE_FORMATS} only"
            raise RefusedSourceError(f"Cannot open video source {source!r}: {err} ({hint}).") from err
        raise InvalidArgumentError(f"Cannot open video source {source!r}: {err}.") from err
    if not container.streams.video:
        container.close()
        raise InvalidArgumentError(f"Video source {source!r} has no video stream.")
    return container


def check_sides(width: int, height: int, source: str) -> None:
    if width > MAX_SIDE_PX or height > MAX_SIDE_PX:
        raise InvalidFrameError(
            f"Video source {source!r} has {width}x{height} px pictures (width x height): each side must be at most "
            f"{MAX_SIDE_PX} px."
        )
