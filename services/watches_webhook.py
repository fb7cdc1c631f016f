"""Webhooks of watch events: only to URLs the operator allowed, signed, retried, bounded.

**Which URLs.** A client must not be able to make the server open arbitrary URLs (docs/security.md), so a
watch may name a webhook only under one of the server's ``webhook_allowed_urls`` prefixes; there are none by
default, which turns webhooks off. A prefix names a scheme (``http``/``https``), a host, an optional port and
a path prefix; a URL matches when scheme, host and port are equal and its path continues the prefix's path at
a ``/`` boundary (``https://hooks.example.com/mosaic`` allows ``.../mosaic/cam7`` but not ``.../mosaic-evil``,
nor ``https://hooks.example.com.evil.net/...``). URLs with user info are refused, and so are paths with dot
segments or percent-encoded ``/``, ``.`` or ``\\`` (a receiver that decodes them could land outside the
prefix), and paths or queries with a space, a control or a non-ASCII character (HTTP cannot send them
unencoded). Redirects are not followed.

**Secrets in URLs.** Slack- and Teams-style webhook URLs carry a secret in the path, so logs name only a
URL's ``scheme://host[:port]`` (``origin``) and ``ListWatches`` returns ``redact`` of it (the origin and
``/...`` when there is a path).

**Signature.** Each POST carries ``X-Mosaic-Timestamp`` (Unix seconds) and ``X-Mosaic-Signature:
sha256=<hex>``, the HMAC-SHA256 of ``"{timestamp}." + body`` under the watch's secret; receivers recompute it
and reject stale timestamps. ``X-Mosaic-Event-Id`` lets them drop duplicates (a retry after a lost reply).

**Delivery.** A bounded queue (overflow drops the new delivery, counted; so does ``stop`` for those it cuts
short) and a few sender tasks; an attempt that fails (a host that does not resolve, a connection error, a timeout,
a non-2xx status) is retried after 1, 2, 4, ... seconds, up to ``max_attempts`` attempts in all. An attempt's
``timeout_s`` bounds all of it, resolving the host included, and it connects to the addresses that lookup gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from mosaic_core.errors import ConfigError, InvalidArgumentError

log = logging.getLogger(__name__)
SCHEMES = ("http", "https")
OUTCOMES = ("delivered", "retried", "failed", "dropped")
SIGNATURE_HEADER = "X-Mosaic-Signature"
TIMESTAMP_HEADER = "X-Mosaic-Timestamp"
EVENT_ID_HEADER = "X-Mosaic-Event-Id"
RESOLVERS_PER_SENDER = 8


@dataclass(frozen=True, slots=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str


def _parse(url: str) -> _Target | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in SCHEMES or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    default_port = 443 if parts.scheme == "https" else 80
    return _Target(parts.scheme, parts.hostname.lower(), port or default_port, parts.path or "/")


def check_allowed_prefixes(prefixes: list[str]) -> None:
    """Config check: every prefix is an http(s) URL with a host, no user info, query or fragment."""
    for prefix in prefixes:
        target = _parse(prefix)
        if target is None or urlsplit(prefix).query or urlsplit(prefix).fragment:
            raise ConfigError(
                f"webhook_allowed_urls entry {prefix!r} must be an http:// or https:// URL with a host and no user "
                "info, query or fragment"
            )


def origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: what logs may show of a webhook URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def redact(url: str) -> str:
    """``url`` without its path, query and fragment (they may hold a secret), ``/...`` marking that it had any."""
    parts = urlsplit(url)
    rest = parts.path not in ("", "/") or parts.query or parts.fragment
    return origin(url) + ("/..." if rest else "")


_ENCODED_SEPARATORS = ("%2f", "%2e", "%5c")  # '/', '.', '\\' percent-encoded


def _unsafe_path(path: str) -> bool:
    lowered = path.lower()
    return (
        "\\" in path
        or any(e in lowered for e in _ENCODED_SEPARATORS)
        or any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))  # Java servers drop ";..."
    )


def _sendable(path_and_query: str) -> bool:
    """Only printable ASCII: ``http.client`` refuses anything else in a request line (raising an error that quotes
    the whole path, a Slack-style secret included), so such a webhook could never be delivered."""
    return all("!" <= c <= "~" for c in path_and_query)


def _under(url: _Target, prefix: _Target) -> bool:
    if (url.scheme, url.host, url.port) != (prefix.scheme, prefix.host, prefix.port):
        return False
    base = prefix.path.rstrip("/")
    return url.path == base or url.path.startswith(base + "/") or prefix.path == "/"


def check_webhook_url(url: str, allowed_prefixes: list[str]) -> str:
    """Returns ``url`` if the server allows it; else ``InvalidArgumentError`` with a sentence."""
    if not allowed_prefixes:
        raise InvalidArgumentError(
            "this server allows no webhooks (its webhook_allowed_urls setting is empty); subscribe with "
            "WatchEvents instead, or ask the operator to allow your URL"
        )
    target = _parse(url)
    if target is None:
        raise InvalidArgumentError(
            f"webhook URL {origin(url)!r}... must be an http:// or https:// URL with a host and no user info"
        )
    if _unsafe_path(target.path):
        raise InvalidArgumentError(
            f"webhook URL {redact(url)!r} has a path with '.' or '..' segments, a backslash, or a percent-encoded "
            "'/', '.' or '\\'; give the plain path"
        )
    if not _sendable(target.path + "?" + urlsplit(url).query):
        raise InvalidArgumentError(
            f"webhook URL {redact(url)!r} has a space, a control character or a non-ASCII character in its path or "
            "query, which HTTP cannot send; percent-encode it"
        )
    if not any(_under(target, p) for p in map(_parse, allowed_prefixes) if p is not None):
        raise InvalidArgumentError(
            f"webhook URL {origin(url)!r}/... is not under any URL this server allows webhooks to; ask the operator "
            "to add it to webhook_allowed_urls"
        )
    return url


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Mosaic-Signature`` value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def _connect_to(addresses: list[tuple], _named: tuple, timeout: float, source_address=None) -> socket.socket:
    """``http.client``'s connect, to the ``addresses`` a lookup gave (``getaddrinfo``'s answers), each in turn as
    ``socket.create_connection`` tries them, within ``timeout`` in all; the connection keeps its name for its Host
    header and, over TLS, for the certificate's check. Raises the last address's error."""
    deadline = time.monotonic() + timeout
    failure: OSError = OSError("the host resolved to no address")
    for family, kind, proto, _, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            failure = err
    raise failure


def _cut(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    """Ends an attempt past its deadline: a blocked read or write of its socket returns at once."""
    cut.set()
    if connection.sock is not None:
        with contextlib.suppress(OSError):
            connection.sock.shutdown(socket.SHUT_RDWR)


@dataclass(slots=True, eq=False)
class Delivery:
    url: str
    secret: str
    event_id: int
    payload: dict
    attempt: int = 1  # the next attempt's number


class WebhookSender:
    """Delivers watch events to webhooks from ``senders`` asyncio tasks. A failed attempt waits for its retry off
    the senders (a timer puts it back in the queue), so a receiver that fails or hangs holds one sender for at most
    ``timeout_s`` an attempt (a whole attempt: resolving the host, however slow the DNS, and the exchange, however
    slowly the receiver answers), and the others' deliveries go on. A redirect is a failed attempt: it could lead
    anywhere.

    Args:
        allowed_prefixes: re-checked before every attempt (the config may have narrowed since creation).
        on_outcome: called with one of ``OUTCOMES`` per delivery attempt result.
        timeout_s: per attempt.
        max_attempts: attempts per event, the first included.
        queue_size: deliveries that may wait (retries included: one that finds the queue full is dropped).
        senders: attempts under way at once. Hosts are resolved on ``RESOLVERS_PER_SENDER`` threads a sender, one
            lookup a host at a time (attempts to a host whose lookup is under way wait for that one): a lookup past
            its attempt's timeout keeps its thread until the system's resolver gives up (its own timeouts and
            attempts), so one host whose DNS hangs holds one thread, and other hosts' lookups find free ones.
        resolve: ``socket.getaddrinfo`` or another function with its arguments and answers.
    """

    def __init__(
        self,
        allowed_prefixes: list[str],
        on_outcome: Callable[[str], None],
        *,
        timeout_s: float = 5.0,
        max_attempts: int = 4,
        queue_size: int = 1000,
        backoff_s: float = 1.0,
        senders: int = 4,
        resolve: Callable[..., list] = socket.getaddrinfo,
    ) -> None:
        self.allowed_prefixes = list(allowed_prefixes)
        self.on_outcome = on_outcome
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.senders = senders
        self.resolve = resolve
        self._resolver = ThreadPoolExecutor(RESOLVERS_PER_SENDER * senders, thread_name_prefix="webhook-dns")
        self._lookups: dict[tuple[str, int], asyncio.Future] = {}  # under way, by host and port
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(queue_size)
        self._tasks: list[asyncio.Task] = []
        self._in_flight: set[Delivery] = set()  # taken from the queue, not yet ended
        self._waiting: dict[Delivery, asyncio.TimerHandle] = {}  # failed once or more, waiting for their retry

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.senders)]

    async def stop(self) -> None:
        """Ends delivery; deliveries cut short, waiting for a retry or still queued are not sent, and count as
        dropped."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._resolver.shutdown(wait=False, cancel_futures=True)
        for timer in self._waiting.values():
            timer.cancel()
        num_dropped = self._queue.qsize() + len(self._in_flight) + len(self._waiting)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._in_flight.clear()
        self._waiting.clear()
        for _ in range(num_dropped):
            self.on_outcome("dropped")
        if num_dropped:
            log.warning("%d webhook deliveries not sent: the router stopped before them", num_dropped)

    def enqueue(self, delivery: Delivery) -> bool:
        """Queues a delivery, or drops it (counted) when ``queue_size`` deliveries wait already, in the queue or
        for a retry."""
        if self._queue.qsize() + len(self._waiting) >= self._queue.maxsize:
            self.on_outcome("dropped")
            log.warning("webhook queue full: event %d to %s dropped", delivery.event_id, origin(delivery.url))
            return False
        self._queue.put_nowait(delivery)
        return True

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            self._in_flight.add(delivery)
            try:
                await self._attempt(delivery)
            except Exception:
                log.exception("webhook delivery of event %d failed", delivery.event_id)
                self.on_outcome("failed")
            self._in_flight.discard(delivery)

    async def _attempt(self, delivery: Delivery) -> None:
        """One attempt; a failure before the last schedules the next after its back-off."""
        try:
            check_webhook_url(delivery.url, self.allowed_prefixes)
        except InvalidArgumentError as err:
            log.warning("webhook of event %d not sent: %s", delivery.event_id, err)
            self.on_outcome("failed")
            return
        body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
        error = await self._deliver(delivery, body)
        if error is None:
            self.on_outcome("delivered")
            return
        if delivery.attempt >= self.max_attempts:
            log.warning("webhook of event %d to %s failed after %d attempts: %s", delivery.event_id,
                        origin(delivery.url), delivery.attempt, error)  # fmt: skip
            self.on_outcome("failed")
            return
        self.on_outcome("retried")
        delay_s = self.backoff_s * 2 ** (delivery.attempt - 1)
        delivery.attempt += 1
        self._waiting[delivery] = asyncio.get_running_loop().call_later(delay_s, self._retry, delivery)

    def _retry(self, delivery: Delivery) -> None:
        del self._waiting[delivery]
        self.enqueue(delivery)

    async def _deliver(self, delivery: Delivery, body: bytes) -> str | None:
        """One attempt within ``timeout_s``: its host resolved on the resolver threads, then the POST to the
        addresses found; None on a 2xx answer, else why it failed."""
        parts = urlsplit(delivery.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        started = time.monotonic()
        try:
            addresses = await asyncio.wait_for(asyncio.shield(self._lookup(parts.hostname, port)), self.timeout_s)
        except TimeoutError:
            return f"{parts.hostname} did not resolve within {self.timeout_s:g} s"
        except (OSError, UnicodeError) as err:
            return f"{parts.hostname} did not resolve: {err}"
        timeout_s = max(0.001, self.timeout_s - (time.monotonic() - started))  # 0 would make the socket non-blocking
        return await asyncio.to_thread(self._post, delivery, body, addresses, timeout_s)

    def _lookup(self, host: str, port: int) -> asyncio.Future:
        """The lookup of ``host`` under way, or a new one on the resolver threads: the stream addresses it resolves
        to."""
        key = (host, port)
        lookup = self._lookups.get(key)
        if lookup is None:
            resolve = functools.partial(self.resolve, host, port, type=socket.SOCK_STREAM)
            lookup = asyncio.get_running_loop().run_in_executor(self._resolver, resolve)
            self._lookups[key] = lookup
            lookup.add_done_callback(functools.partial(self._lookup_ended, key))
        return lookup

    def _lookup_ended(self, key: tuple[str, int], lookup: asyncio.Future) -> None:
        if self._lookups.get(key) is lookup:
            del self._lookups[key]
        if not lookup.cancelled():
            lookup.exception()  # read by the attempts that waited for it; none may wait when it ends late

    def _post(self, delivery: Delivery, body: bytes, addresses: list[tuple], timeout_s: float) -> str | None:
        """The POST of one attempt to the ``addresses`` its host resolved to, cut at ``timeout_s``; None on a 2xx
        answer, else why it failed."""
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp,
                   EVENT_ID_HEADER: str(delivery.event_id)}  # fmt: skip
        if delivery.secret:
            headers[SIGNATURE_HEADER] = sign(delivery.secret, timestamp, body)
        parts = urlsplit(delivery.url)
        connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_type(parts.hostname, parts.port, timeout=timeout_s)
        connection._create_connection = functools.partial(_connect_to, addresses)
        cut = threading.Event()
        deadline = threading.Timer(timeout_s, _cut, args=(connection, cut))
        deadline.start()
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("POST", path, body=body, headers=headers)
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as err:
            failure = str(err) or type(err).__name__
        else:
            failure = None if 200 <= status < 300 else f"HTTP {status}"
        finally:
            deadline.cancel()
            connection.close()
        return f"no answer within {self.timeout_s:g} s" if cut.is_set() else failure  # a cut answer may read whole
