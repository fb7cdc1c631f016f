"""Webhook delivery against a real loopback HTTP server: retries, redirects, signatures, the bounded queue."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mosaic_core.errors import InvalidArgumentError
from services.watches_webhook import Delivery, WebhookSender, check_webhook_url, origin, redact


@pytest.fixture
def receiver():
    """Answers each POST with the next status of ``statuses`` (then 204); records what it got."""
    state = {"statuses": [], "got": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["got"].append((self.path, dict(self.headers), body))
            status = state["statuses"].pop(0) if state["statuses"] else 204
            self.send_response(status)
            if status in (301, 302, 307):
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["prefix"] = f"http://127.0.0.1:{httpd.server_address[1]}/hooks"
    yield state
    httpd.shutdown()
    httpd.server_close()


def _send(receiver, deliveries, *, max_attempts=3, queue_size=10, allowed=None) -> list[str]:
    outcomes: list[str] = []

    async def run():
        sender = WebhookSender(
            [receiver["prefix"]] if allowed is None else allowed,
            outcomes.append,
            timeout_s=5.0,
            max_attempts=max_attempts,
            queue_size=queue_size,
            backoff_s=0.01,
        )
        queued = [sender.enqueue(d) for d in deliveries]
        sender.start()
        for _ in range(500):
            if len([o for o in outcomes if o in ("delivered", "failed")]) >= sum(queued):  # every queued one ended
                break
            await asyncio.sleep(0.01)
        await sender.stop()

    asyncio.run(run())
    return outcomes


def test_a_failing_receiver_is_retried_then_delivered_with_a_valid_signature(receiver):
    receiver["statuses"] = [500, 503]
    outcomes = _send(receiver, [Delivery(receiver["prefix"] + "/a", "s3cret", 7, {"event_id": 7})])
    assert outcomes == ["retried", "retried", "delivered"]
    assert len(receiver["got"]) == 3
    path, headers, body = receiver["got"][-1]
    assert path == "/hooks/a" and json.loads(body) == {"event_id": 7} and headers["X-Mosaic-Event-Id"] == "7"
    digest = hmac.new(b"s3cret", headers["X-Mosaic-Timestamp"].encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Mosaic-Signature"] == f"sha256={digest}"


def test_gives_up_after_max_attempts_and_never_follows_a_redirect(receiver):
    receiver["statuses"] = [302, 302, 302]
    outcomes = _send(receiver, [Delivery(receiver["prefix"] + "/a", "", 1, {})])
    assert outcomes == ["retried", "retried", "failed"]
    assert all(path == "/hooks/a" for path, _, _ in receiver["got"])  # nothing went to the Location
    assert "X-Mosaic-Signature" not in receiver["got"][0][1]  # no secret: unsigned


def test_a_url_no_longer_allowed_is_not_sent_and_a_full_queue_drops(receiver):
    outcomes = _send(receiver, [Delivery(receiver["prefix"] + "/a", "", 1, {})], allowed=["https://elsewhere/"])
    assert outcomes == ["failed"] and receiver["got"] == []
    outcomes = _send(receiver, [Delivery(receiver["prefix"] + "/a", "", i, {}) for i in range(3)], queue_size=2)
    assert outcomes.count("dropped") == 1 and outcomes.count("delivered") == 2


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/mosaic/../admin",
        "https://hooks.example.com/mosaic/./cam",
        "https://hooks.example.com/mosaic/%2e%2e/admin",
        "https://hooks.example.com/mosaic/..%2Fadmin",
        "https://hooks.example.com/mosaic/%5c..%5cadmin",
        "https://hooks.example.com/mosaic/..\\admin",
        "https://hooks.example.com/mosaic/..;/admin",  # Tomcat and Spring read "..;" as ".."
        "https://hooks.example.com/mosaic/.;x/cam",
    ],
)
def test_dot_segments_and_encoded_separators_are_refused(url):
    with pytest.raises(InvalidArgumentError, match="plain path"):
        check_webhook_url(url, ["https://hooks.example.com/mosaic"])
    assert check_webhook_url("https://hooks.example.com/mosaic/cam.7", ["https://hooks.example.com/mosaic"])
    assert check_webhook_url("https://hooks.example.com/mosaic/a;b", ["https://hooks.example.com/mosaic"])


def test_logs_and_listings_never_show_a_urls_path():
    secret_url = "https://hooks.slack.com:8443/services/T000/B000/XXXXSECRET?token=abc"
    assert origin(secret_url) == "https://hooks.slack.com:8443"
    assert redact(secret_url) == "https://hooks.slack.com:8443/..."
    assert redact("http://h.example") == "http://h.example"
    with pytest.raises(InvalidArgumentError) as refused:
        check_webhook_url(secret_url, ["https://hooks.example.com/mosaic"])
    assert "SECRET" not in str(refused.value)


def test_a_failed_delivery_logs_only_the_origin(receiver, caplog):
    receiver["statuses"] = [500]
    outcomes = _send(receiver, [Delivery(receiver["prefix"] + "/SECRET-PATH", "", 1, {"a": 1})], max_attempts=1)
    assert outcomes == ["failed"]
    assert "failed after 1 attempts" in caplog.text and "SECRET-PATH" not in caplog.text


@pytest.mark.parametrize("rest", ["/T000 SECRET", "/T000/SECRET\x7f", "/T000/SÉCRET", "/t?token=SECRET abc"])
def test_a_url_that_http_cannot_send_is_refused_and_its_path_is_never_logged(receiver, caplog, rest):
    """A space, a control or a non-ASCII character in a path or query is no URL http.client will send: such a
    webhook could never be delivered, and the error http.client gives quotes the whole path, Slack-style secret
    included, into the log on every event's last attempt. CreateWatch refuses it; one stored before is not sent."""
    with pytest.raises(InvalidArgumentError, match="percent-encode") as refused:
        check_webhook_url(receiver["prefix"] + rest, [receiver["prefix"]])
    assert "SECRET" not in str(refused.value) and "SÉCRET" not in str(refused.value)
    outcomes = _send(receiver, [Delivery(receiver["prefix"] + rest, "", 1, {"a": 1})], max_attempts=2)
    assert outcomes == ["failed"] and receiver["got"] == []
    assert "SECRET" not in caplog.text and "SÉCRET" not in caplog.text


def test_the_cli_reads_the_secret_from_the_environment(monkeypatch):
    from argparse import Namespace

    from services.cli_watches import webhook_secret

    monkeypatch.setenv("MOSAIC_WEBHOOK_SECRET", "from-env")
    assert webhook_secret(Namespace(webhook_secret=None)) == "from-env"
    assert webhook_secret(Namespace(webhook_secret="flag")) == "flag"
    monkeypatch.delenv("MOSAIC_WEBHOOK_SECRET")
    assert webhook_secret(Namespace(webhook_secret=None)) == ""


def test_deliveries_still_queued_at_stop_count_as_dropped(receiver):
    outcomes: list[str] = []

    async def run():
        sender = WebhookSender([receiver["prefix"]], outcomes.append, queue_size=10, backoff_s=60.0, senders=1)
        receiver["statuses"] = [500]  # the first delivery waits in its back-off when the sender stops
        for event_id in range(3):
            assert sender.enqueue(Delivery(receiver["prefix"] + "/x", "", event_id, {"a": event_id}))
        sender.start()
        for _ in range(500):
            if outcomes.count("delivered") == 2:
                break
            await asyncio.sleep(0.01)
        assert sender.enqueue(Delivery(receiver["prefix"] + "/x", "", 3, {"a": 3}))  # queued behind nothing
        await sender.stop()

    asyncio.run(run())
    # The first waits for its retry off the sender, which delivers the other two meanwhile; the one in back-off
    # and the one still queued at the stop count as dropped.
    assert sorted(outcomes) == ["delivered", "delivered", "dropped", "dropped", "retried"]


def test_a_failing_receiver_does_not_hold_back_another_watchs_webhook(receiver):
    """A receiver answering 500 waits for its retry off the senders: another watch's delivery queued behind it goes
    out at once, even with one sender, not after the failing one's back-off."""
    outcomes: list[str] = []
    delivered_s: dict[int, float] = {}

    def on_outcome(outcome: str) -> None:
        outcomes.append(outcome)

    async def run():
        sender = WebhookSender([receiver["prefix"]], on_outcome, queue_size=10, backoff_s=5.0, senders=1)
        receiver["statuses"] = [500]  # the first request: the broken receiver's
        sender.enqueue(Delivery(receiver["prefix"] + "/broken", "", 1, {"a": 1}))
        sender.enqueue(Delivery(receiver["prefix"] + "/healthy", "", 2, {"a": 2}))
        started_s = time.monotonic()
        sender.start()
        while "delivered" not in outcomes and time.monotonic() - started_s < 10:
            await asyncio.sleep(0.02)
        delivered_s[2] = time.monotonic() - started_s
        await sender.stop()

    asyncio.run(run())
    assert "delivered" in outcomes and delivered_s[2] < 2.0, f"the healthy webhook waited {delivered_s[2]:.1f} s"


def test_retries_waiting_for_their_back_off_count_against_the_queue_bound(receiver):
    """A receiver that keeps failing: its deliveries waiting for a retry hold places in the bounded queue, and past
    it new ones are dropped and counted, not held without bound."""
    outcomes: list[str] = []
    held: list[int] = []

    async def run():
        sender = WebhookSender([receiver["prefix"]], outcomes.append, queue_size=2, backoff_s=60.0, senders=1)
        receiver["statuses"] = [500] * 30
        sender.start()
        for event_id in range(30):
            sender.enqueue(Delivery(receiver["prefix"] + "/x", "", event_id, {"a": event_id}))
            for _ in range(200):  # until the sender has tried it, or it was dropped
                if outcomes.count("retried") + outcomes.count("dropped") > event_id:
                    break
                await asyncio.sleep(0.005)
        held.append(sender._queue.qsize() + len(sender._in_flight) + len(sender._waiting))
        await sender.stop()

    asyncio.run(run())
    assert held[0] <= 2 and outcomes.count("dropped") >= 28, (held, outcomes.count("dropped"))


def _trickling_receiver(duration_s: float, gap_s: float) -> int:
    """A receiver that answers one byte of a header every ``gap_s`` for ``duration_s``; returns its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection, listener:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            end = time.monotonic() + duration_s
            try:
                while time.monotonic() < end:
                    time.sleep(gap_s)
                    connection.sendall(b"a")
                connection.sendall(b"\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                return  # the sender cut the attempt

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def test_a_receiver_that_trickles_its_answer_holds_an_attempt_no_longer_than_the_timeout():
    """The timeout bounds a whole attempt, not each read: a byte every 0.3 s would otherwise hold it for 6 s."""
    port = _trickling_receiver(duration_s=6.0, gap_s=0.3)
    prefix = f"http://127.0.0.1:{port}/hooks"
    sender = WebhookSender([prefix], lambda outcome: None, timeout_s=0.5)
    started = time.monotonic()

    addresses = socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)
    error = sender._post(Delivery(prefix + "/a", "", 1, {}), b"{}", addresses, 0.5)

    assert time.monotonic() - started < 1.5
    assert error == "no answer within 0.5 s"


def test_a_host_whose_lookup_hangs_holds_an_attempt_no_longer_than_the_timeout(receiver):
    """A DNS server that never answers: each attempt fails at its timeout, the retry waits for the same lookup, and
    the one sender goes on to another watch's webhook, delivered to the second address its name resolved to (the
    first refuses), with that name in its Host header."""
    lookups_end = threading.Event()
    port = int(receiver["prefix"].split(":")[2].split("/")[0])

    lookups = []

    def resolve(host, port_asked, **kwargs):
        lookups.append(host)
        if host == "hangs.example":
            lookups_end.wait(10.0)
            raise socket.gaierror("the resolver gave up")
        assert host == "hooks.example" and port_asked == port
        refusing = socket.getaddrinfo("127.0.0.2", port_asked, **kwargs)  # nothing listens there: refused
        return refusing + socket.getaddrinfo("127.0.0.1", port_asked, **kwargs)

    hanging, named = f"http://hangs.example:{port}/hooks", f"http://hooks.example:{port}/hooks"
    outcomes: list[str] = []

    async def run():
        sender = WebhookSender([hanging, named], outcomes.append, timeout_s=0.5, max_attempts=2, senders=1,
                               backoff_s=0.01, resolve=resolve)  # fmt: skip
        sender.enqueue(Delivery(hanging + "/a", "", 1, {"n": 1}))
        sender.enqueue(Delivery(named + "/b", "", 2, {"n": 2}))
        started = time.monotonic()
        sender.start()
        for _ in range(300):
            if "failed" in outcomes and "delivered" in outcomes:
                break
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - started
        await sender.stop()
        return elapsed

    try:
        elapsed = asyncio.run(run())
    finally:
        lookups_end.set()
    assert sorted(outcomes) == ["delivered", "failed", "retried"]
    assert elapsed < 2.5
    assert lookups.count("hangs.example") == 1, "the retry waited for the lookup under way, not a new one"
    ((path, headers, _),) = receiver["got"]
    assert path == "/hooks/b" and headers["Host"] == f"hooks.example:{port}"
