"""The console's HTTP edge without an engine: a real aiohttp server relaying to a real (empty) gRPC server.

The gRPC server here has no Mosaic servicer, so every API call comes back UNIMPLEMENTED: that is enough to check
the allow-listed static files, the security headers, the request bounds and the gRPC -> HTTP error mapping. The
e2e browser test (tests/e2e/test_e2e_console_browser.py) drives the console against the real service.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import pytest

from services.config import load_config
from services.console import convert
from services.console.server import MAX_REQUEST_BYTES, STATIC_FILES, ConsoleServer
from services.gen.mosaic.v1 import mosaic_pb2 as pb


@pytest.fixture(scope="module")
def console_url():
    """A console on a free loopback port, its loop in a thread so the test can use a blocking HTTP client."""
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = load_config(None, host="127.0.0.1", console=True, console_port=0)

    async def start():
        server = grpc.aio.server()
        console = ConsoleServer(config)
        console.bind_grpc(server)
        await server.start()
        await console.start()
        return server, console

    server, console = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    yield f"http://127.0.0.1:{console.port}"

    async def stop():
        await console.stop()
        await server.stop(0)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def fetch(url: str, *, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.mark.parametrize("path", sorted(STATIC_FILES))
def test_static_files_are_served_with_security_headers(console_url, path):
    status, headers, body = fetch(console_url + path)
    assert status == 200 and body
    assert headers["Content-Type"] == STATIC_FILES[path][1]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "mosaic"


@pytest.mark.parametrize(
    "path", ["/index.html", "/static/app.js", "/../pyproject.toml", "/%2e%2e/pyproject.toml", "/server.py"]
)
def test_nothing_outside_the_allow_list_is_served(console_url, path):
    status, _, body = fetch(console_url + path)
    assert status == 404
    assert b"import" not in body and b"[project]" not in body


def test_a_grpc_status_becomes_its_http_status_with_the_servers_sentence(console_url):
    status, headers, body = fetch(console_url + "/api/streams", headers={"X-API-Key": "k"})
    assert status == 501, body  # UNIMPLEMENTED: this gRPC server has no Mosaic servicer
    assert json.loads(body)["code"] == "UNIMPLEMENTED"
    assert headers["Cache-Control"] == "no-store"


def test_a_key_that_cannot_be_a_grpc_header_is_refused(console_url):
    status, _, body = fetch(console_url + "/api/streams", headers={"X-API-Key": "k" * 600})
    assert status == 401 and json.loads(body)["code"] == "UNAUTHENTICATED"


def test_questions_must_be_small_json_objects(console_url):
    url = console_url + "/api/query"
    as_json = {"Content-Type": "application/json"}
    assert fetch(url, data=b'{"question": "hi"}', headers={"Content-Type": "text/plain"})[0] == 415
    assert fetch(url, data=b"[1, 2]", headers=as_json)[0] == 400
    assert fetch(url, data=b'{"question": 3}', headers=as_json)[0] == 400
    assert fetch(url, data=b'{"question": "q", "stream_ids": "cam"}', headers=as_json)[0] == 400
    big = json.dumps({"question": "x" * MAX_REQUEST_BYTES}).encode()
    assert fetch(url, data=big, headers=as_json)[0] == 413
    status, _, body = fetch(url, data=b'{"question": "what moved?"}', headers=as_json)
    assert status == 501 and json.loads(body)["code"] == "UNIMPLEMENTED"  # reached gRPC, failed fast


def test_keyframe_and_watch_event_arguments_are_bounded(console_url):
    ids = "".join(f"&id=k{i}" for i in range(65))
    assert fetch(f"{console_url}/api/keyframes?stream_id=cam{ids}")[0] == 400
    status, _, body = fetch(f"{console_url}/api/keyframes?stream_id=cam&latest=yes")
    assert status == 400 and b"latest must be one of" in body  # not read as "no" in silence
    assert fetch(f"{console_url}/api/keyframes?stream_id=cam&latest=true")[0] == 501  # passed on (no servicer here)
    assert fetch(f"{console_url}/api/watch-events?after_event_id=-1")[0] == 400
    assert fetch(f"{console_url}/api/watch-events?after_event_id=1e3")[0] == 400


def test_every_grpc_code_has_an_http_status():
    assert set(convert.HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert convert.http_status(grpc.StatusCode.RESOURCE_EXHAUSTED) == 429
    assert convert.http_status(grpc.StatusCode.UNAUTHENTICATED) == 401


def test_sse_messages_are_one_data_line_even_for_multiline_text():
    message = convert.sse("token", {"text": "a\nb"}).decode()
    assert message == 'event: token\ndata: {"text":"a\\nb"}\n\n'


def test_stream_json_reports_state_lag_and_drops():
    stream = pb.Stream(stream_id="cam-1", source_state=pb.SOURCE_STATE_RUNNING)
    stream.stats.frames_dropped = 3
    stream.stats.lag_s = 1.5
    stream.stats.tiers.add(tier=pb.TIER_HOST, num_clusters=2, num_bytes=4096)
    got = convert.stream_json(stream)
    assert (got["state"], got["frames_dropped"], got["lag_s"]) == ("running", 3, 1.5)
    assert got["tier_bytes"] == {"host": 4096} and got["first_timestamp_s"] is None


def test_a_console_port_in_use_is_one_sentence(console_url):
    from mosaic_core.errors import ConfigError

    taken = int(console_url.rsplit(":", 1)[1])
    config = load_config(None, host="127.0.0.1", console=True, console_port=taken)

    async def start():
        server = grpc.aio.server()
        console = ConsoleServer(config)
        console.bind_grpc(server)
        try:
            await console.start()
        finally:
            await console.stop()

    with pytest.raises(ConfigError, match=f"Cannot serve the console on 127.0.0.1:{taken}.*--console-port"):
        asyncio.run(start())


@pytest.mark.parametrize(
    "value",
    [
        "%C2%B2",  # '²': str.isdigit() is True, int() refuses it -> ValueError in the handler
        "9999999999999999999",  # 19 digits pass the length check but overflow int64 after_event_id
    ],
)
def test_bad_after_event_id_is_400_not_500(console_url, value):
    status, _, body = fetch(f"{console_url}/api/watch-events?after_event_id={value}", headers={"X-API-Key": "k"})
    assert status == 400, (status, body[:200])
    assert json.loads(body)["code"] == "INVALID_ARGUMENT"


def test_deeply_nested_json_question_is_400_not_500(console_url):
    body = b"[" * 8000 + b"]" * 8000  # 16000 bytes, under the 16 KiB limit
    status, _, reply = fetch(
        console_url + "/api/query", data=body, headers={"Content-Type": "application/json", "X-API-Key": "k"}
    )
    assert status == 400, (status, reply[:200])
    assert json.loads(reply)["code"] == "INVALID_ARGUMENT"


def test_unknown_charset_is_4xx_not_500(console_url):
    status, _, reply = fetch(
        console_url + "/api/query",
        data=b'{"question": "q"}',
        headers={"Content-Type": "application/json; charset=no-such-codec", "X-API-Key": "k"},
    )
    assert 400 <= status < 500, (status, reply[:200])
