"""A caller cannot point a camera at the worker's own loopback or the cloud's metadata service: such a host is
refused as written at CreateStream, as resolved before a connect (and so is the machine's own routable address), and
neither an HTTP redirect nor a playlist's entries are followed. Real PyAV against real HTTP servers on this machine,
and the machine's real resolver."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from typing import ClassVar

import pytest
from http_pages import serving

from mosaic_core.errors import ConfigError, InvalidArgumentError
from mosaic_core.model.video import sample_clip_path
from services.source_hosts import parse_networks, resolved_refusal
from services.source_policy import check_source_url
from services.sources import SourceReader, SourceState


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "rtsp://127.3.2.1/live",
        "http://[::1]:8080/a.mp4",
        "http://[::ffff:127.0.0.1]/a.mp4",
        "http://localhost:8265/api/jobs",
        "rtsp://admin:pw@LOCALHOST./live",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1%25eth0]/a.mp4",
        "rtsp://0.0.0.0:554/live",
    ],
)
def test_a_host_in_a_blocked_network_is_refused_as_written(url):
    with pytest.raises(InvalidArgumentError, match="source_blocked_networks") as info:
        check_source_url(url)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/a.mp4",  # 127.0.0.1 as one decimal number
        "rtsp://127.1/live",  # shorthand: the last part fills the rest
        "http://0x7f.0.0.1/a.mp4",  # hexadecimal
        "http://017700000001/a.mp4",  # octal
        "http://0/a.mp4",  # 0.0.0.0
        "http://2852039166/latest/meta-data/",  # 169.254.169.254
        "http://169.254.43518/latest/meta-data/",
    ],
)
def test_a_blocked_address_written_in_a_shorthand_or_another_base_is_refused_as_written(url):
    """FFmpeg's resolver reads these as the addresses they stand for, without any lookup, and connects there: they
    are addresses as written, and CreateStream refuses them as it refuses the dotted form."""
    with pytest.raises(InvalidArgumentError, match="source_blocked_networks"):
        check_source_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:80x/secret", "rtsp://169.254.169.254:80abc/", "http://cam:+80/"])
def test_a_port_that_is_no_number_is_refused_before_and_at_the_connect(url):
    """FFmpeg reads a port's leading digits (``80x`` is 80) where Python reads no port: such a URL must not pass
    as one whose host nothing checked."""
    with pytest.raises(InvalidArgumentError, match="is not a number"):
        check_source_url(url)
    assert "is not a number" in resolved_refusal(url, parse_networks(["169.254.0.0/16"]))


def test_camera_networks_stay_open_and_the_operator_can_open_loopback():
    for url in ("rtsp://10.0.0.3/live", "http://192.168.1.20/mjpg", "rtsps://[fd12::5]/live", "rtsp://cam-7/live"):
        assert check_source_url(url) == url
    assert check_source_url("http://127.0.0.1:8000/a.mp4", blocked_networks=()) == "http://127.0.0.1:8000/a.mp4"
    blocked = parse_networks(["10.0.0.0/8"])
    with pytest.raises(InvalidArgumentError):
        check_source_url("rtsp://10.0.0.3/live", blocked_networks=blocked)
    with pytest.raises(ConfigError, match="not an address"):
        parse_networks(["10.0.0.0/33"])


class _Clip(http.server.BaseHTTPRequestHandler):
    data = b""
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        if self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/clip.mp4")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(self.data) - 1  # FFmpeg seeks in an MP4 with byte ranges
        asked = self.headers.get("Range", "")
        if asked.startswith("bytes="):
            first, _, last = asked[len("bytes=") :].partition("-")
            start, end = int(first or 0), min(int(last) if last else end, end)
        self.send_response(206 if asked else 200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Accept-Ranges", "bytes")
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(self.data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(self.data[start : end + 1])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def clip_server():
    _Clip.data = open(sample_clip_path("bikes.mp4"), "rb").read()  # noqa: SIM115 (read at once)
    _Clip.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Clip)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _until_settled(reader: SourceReader, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = reader.progress()
        if progress.state is SourceState.ERROR or progress.frames_read:
            return progress
        time.sleep(0.05)
    return reader.progress()


def test_a_name_that_resolves_to_loopback_is_refused_before_any_connect(clip_server):
    name = socket.gethostname()
    addresses = {info[4][0] for info in socket.getaddrinfo(name, None)}
    if not any(a.startswith("127.") or a == "::1" for a in addresses):
        pytest.skip(f"this machine's name {name!r} resolves to {addresses}, not to loopback")
    url = f"http://{name}:{clip_server}/clip.mp4"
    assert check_source_url(url) == url  # as written, a name: nothing is resolved at CreateStream
    reader = SourceReader(url, fps=1.0, sink=lambda t, rgb: None, realtime=False, backoff_s=0.01).start()
    progress = _until_settled(reader)
    reader.stop()
    assert progress.state is SourceState.ERROR and progress.frames_read == 0
    assert "resolves to 127." in progress.error or "resolves to ::1" in progress.error
    assert _Clip.requests == []  # the server never heard from it


def test_an_http_redirect_is_not_followed(clip_server):
    frames = []
    direct = SourceReader(
        f"http://127.0.0.1:{clip_server}/clip.mp4", fps=1.0, sink=lambda t, rgb: frames.append(t), realtime=False,
        blocked_networks=(),
    ).start()  # fmt: skip
    assert _until_settled(direct).frames_read > 0, "the clip itself is served and read"
    direct.stop()
    _Clip.requests.clear()
    moved = SourceReader(
        f"http://127.0.0.1:{clip_server}/moved", fps=1.0, sink=lambda t, rgb: None, realtime=False, backoff_s=0.01,
        max_failures=2, blocked_networks=(),
    ).start()  # fmt: skip
    deadline = time.monotonic() + 20
    while moved.progress().state is not SourceState.ERROR and time.monotonic() < deadline:
        time.sleep(0.05)
    progress = moved.progress()
    moved.stop()
    assert progress.state is SourceState.ERROR and progress.frames_read == 0
    assert _Clip.requests and all(path == "/moved" for path in _Clip.requests)


def test_a_playlist_cannot_send_the_reader_to_a_blocked_host(clip_server):
    """An HLS playlist on an allowed host lists a segment on a blocked one (the metadata service, a loopback-only
    port): the reader refuses the playlist, says why, fetches nothing from the blocked host, and does not fetch the
    playlist again (the refusal is the server's own: trying again cannot help)."""
    try:
        internal = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Clip)  # the blocked host, recording requests
    except OSError as err:
        pytest.skip(f"cannot listen on 127.0.0.2: {err}")
    threading.Thread(target=internal.serve_forever, daemon=True).start()
    playlist = (
        "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\n"
        f"http://127.0.0.2:{internal.server_address[1]}/latest/meta-data/iam.ts\n#EXT-X-ENDLIST\n"
    ).encode()

    camera_requests: list[str] = []
    try:
        with serving(playlist, "application/vnd.apple.mpegurl", camera_requests) as camera:  # the URL's own host
            reader = SourceReader(
                f"{camera}/cam.m3u8", fps=1.0, sink=lambda t, rgb: None, realtime=False, backoff_s=0.01,
                max_failures=3, blocked_networks=parse_networks(["127.0.0.2/32"]),
            ).start()  # fmt: skip
            _until_settled(reader)
            time.sleep(1.0)  # three attempts 10 and 20 ms apart would all be made by now
            progress = reader.progress()
            reader.stop()
    finally:
        internal.shutdown()
        internal.server_close()
    assert _Clip.requests == [], f"the reader fetched {_Clip.requests} from a host in source_blocked_networks"
    assert progress.state is SourceState.ERROR and "if it is a playlist" in progress.error
    assert camera_requests == ["/cam.m3u8"] and progress.num_reconnects == 0, "a refused playlist was fetched again"


def test_an_error_page_served_as_200_is_tried_again_as_a_passing_failure():
    """A proxy's HTML page in place of the stream (status 200) is no container FFmpeg reads: it fails as bad data,
    not as a refusal of the server's own, so the reader tries again, up to ``max_failures`` times."""
    page = b"<html><head><title>502 Bad Gateway</title></head><body>The camera did not answer.</body></html>"
    requests: list[str] = []
    with serving(page, "text/html", requests) as proxy:
        reader = SourceReader(
            f"{proxy}/cam.mjpg", fps=1.0, sink=lambda t, rgb: None, realtime=False, backoff_s=0.01, max_failures=3,
            blocked_networks=(),
        ).start()  # fmt: skip
        deadline = time.monotonic() + 20
        while len(requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # a fourth attempt, were there one, would come by now
        progress = reader.progress()
        reader.stop()
    assert len(requests) == 3, requests
    assert progress.state is SourceState.ERROR and "3 attempts in a row failed" in progress.error, progress.error


@pytest.mark.parametrize("url", ["http://:8080/secret", "http://user@:8080/a", "rtsp://:554/x", "rtsp://@/x"])
def test_a_url_with_no_host_is_refused_as_written_and_at_the_connect(url):
    """FFmpeg connects to an empty host's loopback, so such a URL reached the worker's own services."""
    with pytest.raises(InvalidArgumentError, match="source_blocked_networks"):
        check_source_url(url)
    with pytest.raises(InvalidArgumentError, match="names no host"):
        check_source_url(url, blocked_networks=())  # the operator opened loopback: still no camera's URL
    assert "source_blocked_networks" in resolved_refusal(url, parse_networks(["127.0.0.0/8"]))


def test_an_empty_host_reaches_no_server_on_loopback(clip_server):
    """A stored source of that shape (from before the check) is refused before any connect."""
    reader = SourceReader(f"http://:{clip_server}/clip.mp4", fps=1.0, sink=lambda t, rgb: None).start()
    progress = _until_settled(reader)
    reader.stop()
    assert progress.state is SourceState.ERROR and "source_blocked_networks" in progress.error
    assert _Clip.requests == []


def _routable_own_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # sends nothing: picks the interface a route to elsewhere would use
        except OSError:
            pytest.skip("this machine has no route off loopback")
        address = sock.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    return address


def test_this_machines_own_address_is_closed_with_loopback(clip_server):
    """A server listening on every interface (``--host 0.0.0.0``'s gRPC and metrics, Ray's agents) answers on the
    machine's routable address as it does on loopback: the default policy closes both; opening loopback opens both."""
    own = _routable_own_address()
    server = http.server.ThreadingHTTPServer((own, 0), _Clip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://{own}:{server.server_address[1]}/clip.mp4"
    try:
        refused = SourceReader(url, fps=1.0, sink=lambda t, rgb: None, realtime=False).start()
        refused_progress = _until_settled(refused)
        refused.stop()
        requests_while_closed = list(_Clip.requests)
        opened = SourceReader(
            url, fps=1.0, sink=lambda t, rgb: None, realtime=False, blocked_networks=parse_networks(["169.254.0.0/16"])
        ).start()
        opened_progress = _until_settled(opened)
        opened.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert refused_progress.state is SourceState.ERROR and "an address of this machine" in refused_progress.error
    assert requests_while_closed == [], "the default policy let a source reach this machine's own address"
    assert opened_progress.frames_read > 0, "with loopback open, this machine's address is open too"
