"""``ConsoleServer``: the console's aiohttp app on the router's event loop.

Routes (everything under ``/api/`` needs the server's API key, when it has one, in the ``X-API-Key`` header):

- ``GET /``, ``/app.js``, ``/style.css``: the page, from a fixed allow-list of this package's files;
- ``GET /api/streams``: ListStreams as JSON;
- ``GET /api/keyframes?stream_id=S&id=K&id=...`` (or ``&cluster_id=C``, or ``&latest=1``): GetKeyframes as
  JSON with base64 JPEGs;
- ``POST /api/query`` with ``{"question", "stream_ids", "max_new_tokens"}``: Query as Server-Sent Events
  (``token``, ``evidence``, ``timings``, or ``error``);
- ``GET /api/watches``: ListWatches as JSON; ``GET /api/watch-events?after_event_id=N``: WatchEvents as
  Server-Sent Events (``watch_event``, or ``error``).

Each API call is the same call made to the router's own gRPC server over a Unix socket in a private folder,
with the caller's key as ``x-api-key``: the gRPC interceptors, servicer checks, status sentences and metrics
apply unchanged. A call that fails within ``STREAM_OPEN_WAIT_S`` answers with the HTTP status of its gRPC code
(``convert.HTTP_STATUS``) and ``{"code", "message"}``; a stream that fails later ends with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import shutil
import ssl
import tempfile
from pathlib import Path

import grpc
from aiohttp import web

from mosaic_core.errors import ConfigError
from services.client import LIST_PAGE_SIZE
from services.config import ServiceConfig
from services.console import convert
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.gen.mosaic.v1 import mosaic_pb2_grpc

log = logging.getLogger(__name__)
API_KEY_HEADER = "X-API-Key"
# URL path -> (file of services/console/static, content type); nothing else is ever read from disk.
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
MAX_REQUEST_BYTES = 16 * 1024
MAX_API_KEY_CHARS = 512
MAX_KEYFRAME_IDS = 64
FLAGS = {"1": True, "true": True, "0": False, "false": False}  # how a query parameter says yes or no
# Event streams open at once, per kind: idle tabs following watches must not take the room of questions.
MAX_OPEN_STREAMS = {"question": 32, "watch": 32}
HEARTBEAT_S = 15.0  # an idle event stream sends a comment this often, so a peer that went away frees its slot
UNARY_TIMEOUT_S = 10.0
QUERY_TIMEOUT_S = 120.0
STREAM_OPEN_WAIT_S = 0.5
SHUTDOWN_TIMEOUT_S = 1.0
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Server": "mosaic",  # not aiohttp's name and version
}


class ConsoleServer:
    """Call ``bind_grpc`` before the gRPC server starts, then ``start``; ``stop`` before the gRPC server stops.

    Args:
        config: the service config; ``host``, ``console_port``, ``tls_cert``/``tls_key`` and
            ``max_message_bytes`` are used (with TLS the page is served over HTTPS with the same certificate).
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.port = 0
        self._socket_dir: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: mosaic_pb2_grpc.MosaicStub | None = None
        self._runner: web.AppRunner | None = None
        self._num_open_streams = dict.fromkeys(MAX_OPEN_STREAMS, 0)
        package = importlib.resources.files("services.console") / "static"
        self._static = {path: ((package / name).read_bytes(), kind) for path, (name, kind) in STATIC_FILES.items()}

    def bind_grpc(self, server: grpc.aio.Server) -> None:
        """Adds the Unix socket the console calls the API through, in a folder only this user may enter."""
        self._socket_dir = tempfile.mkdtemp(prefix="mosaic-console-")
        address = f"unix:{Path(self._socket_dir) / 'grpc.sock'}"
        server.add_insecure_port(address)
        options = [("grpc.max_receive_message_length", self.config.max_message_bytes)]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = mosaic_pb2_grpc.MosaicStub(self._channel)

    async def start(self) -> None:
        assert self._stub is not None, "bind_grpc must come first"
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[_grpc_errors_as_http])
        app.on_response_prepare.append(_add_security_headers)
        app.router.add_get("/", self._static_file)
        app.router.add_get("/app.js", self._static_file)
        app.router.add_get("/style.css", self._static_file)
        app.router.add_get("/api/streams", self._streams)
        app.router.add_get("/api/keyframes", self._keyframes)
        app.router.add_post("/api/query", self._query)
        app.router.add_get("/api/watches", self._watches)
        app.router.add_get("/api/watch-events", self._watch_events)
        # A closed tab cancels its handler, which cancels the gRPC call it relays.
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await self._runner.setup()
        cfg = self.config
        site = web.TCPSite(self._runner, cfg.host, cfg.console_port, ssl_context=_ssl_context(cfg))
        try:
            await site.start()
        except OSError as err:
            raise ConfigError(
                f"Cannot serve the console on {cfg.host}:{cfg.console_port} ({err.strerror or err}); "
                "pass --console-port with a free port."
            ) from err
        self.port = self._runner.addresses[0][1]
        log.info("console on %s://%s:%d/", "https" if cfg.tls_cert else "http", cfg.host, self.port)
        if not (cfg.api_key or cfg.api_key_file):
            log.warning(
                "the console runs without an API key: anyone who reaches %s:%d, and any web page whose host name "
                "is made to resolve there (DNS rebinding), can read the cameras and ask questions; set --api-key",
                cfg.host,
                self.port,
            )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- handlers ---------------------------------------------------------------------------------------
    async def _static_file(self, request: web.Request) -> web.Response:
        body, kind = self._static[request.path]
        return web.Response(body=body, headers={"Content-Type": kind})

    async def _streams(self, request: web.Request) -> web.Response:
        streams, token = [], ""
        while True:  # page by page, as a reply of every stream may pass the server's message limit
            page = pb.ListStreamsRequest(page_size=LIST_PAGE_SIZE, page_token=token)
            reply = await self._stub.ListStreams(page, **self._call_options(request))
            streams += [convert.stream_json(s) for s in reply.streams]
            token = reply.next_page_token
            if not token:
                return web.json_response({"streams": streams})

    async def _keyframes(self, request: web.Request) -> web.Response:
        query = request.query
        keyframe_ids = query.getall("id", [])
        if len(keyframe_ids) > MAX_KEYFRAME_IDS:
            return _bad_request(f"at most {MAX_KEYFRAME_IDS} keyframe ids per call, got {len(keyframe_ids)}")
        latest = query.get("latest", "0")
        if latest not in FLAGS:
            return _bad_request(f"latest must be one of {', '.join(FLAGS)}, got {latest[:40]!r}")
        message = pb.GetKeyframesRequest(
            stream_id=query.get("stream_id", ""),
            keyframe_ids=keyframe_ids,
            cluster_id=query.get("cluster_id", ""),
            latest=FLAGS[latest],
        )
        reply = await self._stub.GetKeyframes(message, **self._call_options(request))
        return web.json_response({"keyframes": [convert.keyframe_json(k) for k in reply.keyframes]})

    async def _watches(self, request: web.Request) -> web.Response:
        reply = await self._stub.ListWatches(pb.ListWatchesRequest(), **self._call_options(request))
        return web.json_response({"watches": [convert.watch_json(w) for w in reply.watches]})

    async def _query(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":  # also keeps other sites' plain form posts out
            return _error(415, "INVALID_ARGUMENT", "send the question as application/json")
        try:
            message = _query_request(await request.json())
        except (ValueError, LookupError) as err:  # JSON or text that cannot be read (an unknown charset)
            return _bad_request(str(err))
        except RecursionError:
            return _bad_request("the question's JSON is nested too deeply")
        call = self._stub.Query(message, **self._call_options(request, timeout_s=QUERY_TIMEOUT_S))
        return await self._relay(request, call, convert.query_event_json, "question")

    async def _watch_events(self, request: web.Request) -> web.StreamResponse:
        after = request.query.get("after_event_id")
        message = pb.WatchEventsRequest()
        if after is not None:
            if not (after.isascii() and after.isdigit() and len(after) <= 19 and int(after) < 2**63):
                return _bad_request(f"after_event_id must be a non-negative integer, got {after[:40]!r}")
            message.after_event_id = int(after)
        call = self._stub.WatchEvents(message, **self._call_options(request, timeout_s=None))
        return await self._relay(request, call, lambda e: ("watch_event", convert.watch_event_json(e)), "watch")

    # -- helpers ----------------------------------------------------------------------------------------
    def _call_options(self, request: web.Request, *, timeout_s: float | None = UNARY_TIMEOUT_S) -> dict:
        key = request.headers.get(API_KEY_HEADER, "")
        if len(key) > MAX_API_KEY_CHARS or not (key.isascii() and key.isprintable()):
            sentence = f"the {API_KEY_HEADER} header is not a valid key."
            raise web.HTTPUnauthorized(
                text=json.dumps({"code": "UNAUTHENTICATED", "message": sentence}), content_type="application/json"
            )
        metadata = (("x-api-key", key),) if key else ()
        return {"metadata": metadata, "timeout": timeout_s}

    async def _relay(self, request: web.Request, call, event_json, kind: str) -> web.StreamResponse:
        """Relays a server-streaming call of ``kind`` (``MAX_OPEN_STREAMS``) as Server-Sent Events; a quick
        failure, a refused key among them, is an HTTP error instead, and so is a call past the kind's limit."""
        pending = asyncio.ensure_future(call.read())
        counted = False
        try:
            await asyncio.wait({pending}, timeout=STREAM_OPEN_WAIT_S)
            if pending.done() and pending.exception() is not None:
                raise pending.exception()  # the middleware answers with its HTTP status
            if self._num_open_streams[kind] >= MAX_OPEN_STREAMS[kind]:
                limit = MAX_OPEN_STREAMS[kind]
                return _error(
                    429, "RESOURCE_EXHAUSTED", f"the console has {limit} {kind} event streams open, its limit"
                )
            self._num_open_streams[kind] += 1
            counted = True
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b": open\n\n")
            try:
                while True:
                    done, _ = await asyncio.wait({pending}, timeout=HEARTBEAT_S)
                    if not done:  # a write to a peer that went away fails, and ends the relay
                        await response.write(b": ping\n\n")
                        continue
                    if (item := pending.result()) is grpc.aio.EOF:
                        break
                    await response.write(convert.sse(*event_json(item)))
                    pending = asyncio.ensure_future(call.read())
            except grpc.aio.AioRpcError as err:
                body = {**convert.error_json(err), "status": convert.http_status(err.code())}
                await response.write(convert.sse("error", body))
            return response
        finally:
            if counted:
                self._num_open_streams[kind] -= 1
            call.cancel()
            if not pending.done():
                pending.cancel()
            with contextlib.suppress(BaseException):
                pending.exception()  # read, so an abandoned read's error is not reported as never retrieved


def _query_request(body) -> pb.QueryRequest:
    """A ``QueryRequest`` from the page's JSON; the servicer checks the values as it does for any client."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object with a question")
    question, stream_ids = body.get("question"), body.get("stream_ids", [])
    max_new_tokens = body.get("max_new_tokens", 0)
    if not isinstance(question, str):
        raise ValueError("question must be a string")
    if not isinstance(stream_ids, list) or not all(isinstance(s, str) for s in stream_ids):
        raise ValueError("stream_ids must be a list of stream ids")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or abs(max_new_tokens) >= 2**31:
        raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    return pb.QueryRequest(question=question, stream_ids=stream_ids, max_new_tokens=max_new_tokens)


def _ssl_context(cfg: ServiceConfig) -> ssl.SSLContext | None:
    if not cfg.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return context


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


def _bad_request(message: str) -> web.Response:
    return _error(400, "INVALID_ARGUMENT", message)


@web.middleware
async def _grpc_errors_as_http(request: web.Request, handler):
    try:
        return await handler(request)
    except grpc.aio.AioRpcError as err:
        body = convert.error_json(err)
        response = web.json_response(body, status=convert.http_status(err.code()))
        if "retry_after_s" in body:
            response.headers["Retry-After"] = str(max(1, round(body["retry_after_s"])))
        return response


async def _add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(SECURITY_HEADERS)
