"""A Redis outage while the router's watch polls re-send each worker its watch list: each poll logs it once, with its
cause and no traceback, and says when Redis answers again (the router's ``WatchRegistry._poll``).

The e2e suite's session server (two workers, real Ray, real gRPC) on its real redis-server, frozen by SIGSTOP for a
few of the store's reply timeouts. ``redis_server`` is the e2e conftest's, the session server's: a module's own import
of it would be another fixture, and so another redis-server, once another module has started the session server.
"""

from __future__ import annotations

import logging
import time

from service_support import API_KEY, connect, wait_for

import services.watches
from tests.integration.conftest import frozen_redis, redis_client  # noqa: F401

NUM_WORKERS = 2  # the session server's
# Several failed re-sends per poll: each waits a poll (1 s) and the store's reply timeout (5 s), and the router's
# threads for store calls are shared with its other loops, which wait on the frozen Redis too.
FROZEN_S = 24.0


def _lines(caplog, saying: str) -> dict[int, list[int]]:
    """Worker index -> the levels of the watch poll's lines "re-sending worker <index>'s watch list <saying>"."""
    lines = {index: f"re-sending worker {index}'s watch list {saying}" for index in range(NUM_WORKERS)}
    return {index: [r.levelno for r in caplog.records if line in r.getMessage()] for index, line in lines.items()}


def test_a_redis_outage_is_logged_once_per_poll_and_its_end_too(service, frozen_redis, monkeypatch, caplog):  # noqa: F811
    monkeypatch.setattr(services.watches, "RESYNC_INTERVAL_S", 0.0)  # every poll re-sends: each reads Redis
    with connect(service, api_key=API_KEY) as client:
        client.create_stream("outage-cam", fps=2.0)
        client.create_watch("Is the gate open?", ["outage-cam"], watch_id="outage-gate", threshold=1e9)
        try:
            with caplog.at_level(logging.DEBUG, logger="services.watches"):
                with frozen_redis():
                    time.sleep(FROZEN_S)
                wait_for(lambda: all(_lines(caplog, "works again").values()), timeout_s=30,
                         what="every watch poll saying that Redis answers again")  # fmt: skip
        finally:
            client.delete_watch("outage-gate")
            client.delete_stream("outage-cam")

    failed = _lines(caplog, "failed")
    assert all(levels[:1] == [logging.WARNING] for levels in failed.values()), caplog.text
    assert all(set(levels[1:]) <= {logging.DEBUG} for levels in failed.values()), caplog.text
    assert max(map(len, failed.values())) >= 2, failed  # a poll failed again, and said so only at debug level
    first = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "watch list failed" in
             r.getMessage()]  # fmt: skip
    assert all("cannot be reached (TimeoutError: " in line for line in first), first
    handled = [r for r in caplog.records if "watch events failed" in r.getMessage()]
    assert not handled, "a Redis outage logged as a bug, with its traceback:\n" + caplog.text
    assert all(levels == [logging.WARNING] for levels in _lines(caplog, "works again").values())
