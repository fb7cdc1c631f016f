"""Standing questions end to end: real Ray, real redis-server, real gRPC, a real webhook receiver.

One server for the module (one worker, watches and events in Redis, history in a data directory), restarted
once in the middle to show that watches, their cooldowns and the event ids survive and that a client resumes
from its last event id.

How a match is forced with random weights: attention is nearly uniform, so no question "means" anything. The
test calibrates instead. A watch with a threshold no cluster can miss runs on a calibration camera and reports
every sealed cluster's lift; a second camera then gets exactly the same frames (pushed one ingest at a time,
so both cameras see identical forward passes), and a watch whose threshold sits between the best and the
second-best lift must fire exactly once, on the best cluster's span.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from service_support import clip_frames, metric, wait_for

from tests.integration.conftest import redis_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "e2e-watches"
FPS = 2.0
NUM_FRAMES = 14
SECRET = "hook-secret"


class Hooks:
    """A loopback HTTP receiver that records every POST."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Service:
    """The module's server, restartable on the same Redis namespace and data directory."""

    def __init__(self, config) -> None:
        self.config = config
        self.server = None
        self.client = None

    def start(self):
        from services.client import MosaicClient
        from services.embedded import ServerThread

        self.server = ServerThread(self.config).start(timeout_s=400)
        self.client = MosaicClient(self.server.target, timeout_s=60)
        return self

    def stop(self) -> None:
        self.client.close()
        self.server.stop()

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def hooks():
    receiver = Hooks()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def svc(ray_cluster, redis_server, hooks, tmp_path_factory):  # noqa: F811 - the imported fixture
    import redis as redis_lib

    from mosaic_core.config import MIB
    from services.config import load_config

    flush = redis_lib.Redis(host=redis_server.host, port=redis_server.port)
    for key in flush.scan_iter(match=f"{NAMESPACE}:*"):
        flush.delete(key)
    flush.close()
    config = load_config(
        None,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        workers=1,
        worker_cpus=0.5,
        redis_url=redis_server.url,
        redis_namespace=NAMESPACE,
        device_budget_bytes=4 * MIB,
        host_budget_bytes=4 * MIB,
        data_dir=str(tmp_path_factory.mktemp("watch-history")),
        ingest_headroom=0.0,
        telemetry_interval_s=0.25,
        shutdown_grace_s=1.0,
        shutdown_drain_s=0.2,
        webhook_allowed_urls=[f"http://127.0.0.1:{hooks.port}/hooks"],
        webhook_max_attempts=2,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    service = Service(config).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def frames():
    return clip_frames("bikes.mp4", fps=FPS, num_frames=NUM_FRAMES, step=4)


def push_paced(client, stream_id: str, frames) -> None:
    """One frame, then wait until it is ingested: every ingest pass holds exactly one frame of the stream."""
    start = client.get_stream(stream_id).stats.frames_ingested
    for i, (t, rgb) in enumerate(frames):
        client.push_frames([(stream_id, t, rgb)])
        wait_for(
            lambda n=start + i + 1: client.get_stream(stream_id).stats.frames_ingested >= n,
            timeout_s=60,
            interval_s=0.05,
            what=f"frame {i} of {stream_id}",
        )


def collect(client, watch_ids, *, after: int | None, count: int, timeout_s: float = 90.0) -> list:
    """Reads events until ``count`` arrived (then cancels the call) or the deadline passes."""
    got = []
    call = client.watch_events(watch_ids, after_event_id=after, timeout_s=timeout_s)
    try:
        for event in call:
            got.append(event)
            if len(got) >= count:
                break
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        call.cancel()
    return got


def sealed_count(client, stream_id: str) -> int:
    return client.get_stream(stream_id).stats.num_clusters - 1  # the newest may still grow


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- 1. bad input ----------------------------------------------------------------------------------------
def test_bad_input_gets_the_right_status_and_a_sentence(svc, hooks):
    c = svc.client
    c.create_stream("bad-cam", fps=FPS)
    long_url = f"http://127.0.0.1:{hooks.port}/hooks/{'a' * 100_000}"
    cases = [
        (lambda: c.create_watch("  ", ["bad-cam"]), grpc.StatusCode.INVALID_ARGUMENT, "question is empty"),
        (lambda: c.create_watch("q?", ["no-such-cam"]), grpc.StatusCode.NOT_FOUND, "unknown stream"),
        (lambda: c.create_watch("q?", ["bad cam"]), grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
        (lambda: c.create_watch("q?", threshold=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "threshold"),
        (lambda: c.create_watch("q?", cooldown_s=-1), grpc.StatusCode.INVALID_ARGUMENT, "cooldown_s"),
        (lambda: c.create_watch("q?", active_hours=("25:00", "06:00", "")), grpc.StatusCode.INVALID_ARGUMENT, "HH:MM"),
        (lambda: c.create_watch("q?", active_hours=("22:00", "06:00", "Mars/Base")), grpc.StatusCode.INVALID_ARGUMENT,
         "time zone"),
        (lambda: c.create_watch("q?", active_hours=("22:00", "06:00", "a/" * 300 + "b")),
         grpc.StatusCode.INVALID_ARGUMENT, "time zone"),
        (lambda: c.create_watch("q?", webhook_url="http://169.254.169.254/latest"), grpc.StatusCode.INVALID_ARGUMENT,
         "not under any URL"),
        (lambda: c.create_watch("q?", webhook_url=f"http://127.0.0.1:{hooks.port}/hooks-evil"),
         grpc.StatusCode.INVALID_ARGUMENT, "not under any URL"),
        (lambda: c.create_watch("q?", webhook_url=f"http://u:p@127.0.0.1:{hooks.port}/hooks"),
         grpc.StatusCode.INVALID_ARGUMENT, "user info"),
        # Strings kept in the metadata store (Redis) and in the router's memory for as long as the watch lives
        (lambda: c.create_watch("q?", webhook_url=long_url), grpc.StatusCode.INVALID_ARGUMENT,
         f"the webhook URL is {len(long_url)} characters long; the limit is 2048"),
        (lambda: c.create_watch("q?", webhook_url=f"http://127.0.0.1:{hooks.port}/hooks", webhook_secret="s" * 100_000),
         grpc.StatusCode.INVALID_ARGUMENT, "the webhook secret is 100000 characters long; the limit is 256"),
        (lambda: c.create_watch("q?", watch_id="-bad"), grpc.StatusCode.INVALID_ARGUMENT, "watch id"),
        (lambda: c.create_watch("q?", max_answer_tokens=100000), grpc.StatusCode.INVALID_ARGUMENT, "max_answer_tokens"),
        # 1000 characters, as many as a question may have, but 1006 tokens: more than the engine answers
        (lambda: c.create_watch("\N{GRINNING FACE}" * 1000, ["bad-cam"]), grpc.StatusCode.INVALID_ARGUMENT,
         "the question is 1006 tokens long; the limit is 512"),
        (lambda: c.delete_watch("never-made"), grpc.StatusCode.NOT_FOUND, "unknown watch"),
        (lambda: next(iter(c.watch_events(["never-made"], timeout_s=10))), grpc.StatusCode.NOT_FOUND, "unknown watch"),
        (lambda: next(iter(c.watch_events([], after_event_id=-1, timeout_s=10))), grpc.StatusCode.INVALID_ARGUMENT,
         "after_event_id"),
    ]  # fmt: skip
    for call, code, words in cases:
        got_code, details = code_of(call)
        assert (got_code, words in details) == (code, True), details
    c.create_watch("q?", ["bad-cam"], watch_id="dup")
    assert code_of(lambda: c.create_watch("q?", ["bad-cam"], watch_id="dup"))[0] == grpc.StatusCode.ALREADY_EXISTS
    c.delete_watch("dup")
    c.delete_stream("bad-cam")


# -- 2. calibrate, then exactly one event with the right span, and the cooldown -----------------------------
@pytest.fixture(scope="module")
def calibration(svc, frames):
    c = svc.client
    c.create_stream("cal", fps=FPS)
    c.create_watch("Is a cyclist passing?", ["cal"], watch_id="cal-all", threshold=-1e9, cooldown_s=0)
    push_paced(c, "cal", frames)
    expected = wait_for(lambda: (n := sealed_count(c, "cal")) >= 3 and n, what="sealed calibration clusters")
    events = collect(c, ["cal-all"], after=0, count=expected)
    assert len(events) == expected, [e.cluster_id for e in events]
    return events


def test_a_calibrated_watch_fires_exactly_once_on_the_best_span_and_the_cooldown_holds(svc, hooks, frames, calibration):
    c = svc.client
    ranked = sorted(calibration, key=lambda e: -e.score)
    best, second = ranked[0], ranked[1]
    assert best.score - second.score > 1e-5, "the calibration lifts tie; pick another clip or more frames"
    threshold = (best.score + second.score) / 2
    cooldown_before = metric(svc.server.metrics_url, "mosaic_watch_suppressed_total", reason="cooldown")
    c.create_stream("scene", fps=FPS)
    c.create_watch(
        "Is a cyclist passing?", ["scene"], watch_id="match", threshold=threshold, cooldown_s=0,
        labels={"gate": "2"}, webhook_url=f"http://127.0.0.1:{hooks.port}/hooks/scene", webhook_secret=SECRET,
    )  # fmt: skip
    c.create_watch("Anything at all?", ["scene"], watch_id="once", threshold=-1e9, cooldown_s=1e6)
    push_paced(c, "scene", frames)
    assert sealed_count(c, "scene") == len(calibration)
    match = collect(c, ["match"], after=0, count=2, timeout_s=30)  # waits for a second event that must not come
    assert [(e.start_s, e.end_s) for e in match] == [(best.start_s, best.end_s)]
    event = match[0]
    assert event.cluster_id.split("/")[-1] == best.cluster_id.split("/")[-1]
    assert event.score >= threshold and event.labels["gate"] == "2" and event.question == "Is a cyclist passing?"
    assert event.answer or event.answer_error
    once = collect(c, ["once"], after=0, count=2, timeout_s=5)
    assert len(once) == 1 and once[0].start_s == calibration[0].start_s  # the first sealed cluster, then quiet
    suppressed = metric(svc.server.metrics_url, "mosaic_watch_suppressed_total", reason="cooldown") - cooldown_before
    assert suppressed == len(calibration) - 1
    # The webhook got the same event, signed with the watch's secret.
    path, headers, body = wait_for(lambda: hooks.received and hooks.received[-1], timeout_s=30, what="the webhook")
    assert path == "/hooks/scene"
    signed = hmac.new(SECRET.encode(), headers["X-Mosaic-Timestamp"].encode() + b"." + body, hashlib.sha256)
    assert headers["X-Mosaic-Signature"] == "sha256=" + signed.hexdigest()
    payload = json.loads(body)
    assert (payload["event_id"], payload["start_s"], payload["end_s"]) == (event.event_id, best.start_s, best.end_s)
    watches = {w.watch_id: w for w in c.list_watches()}
    assert watches["match"].num_events == 1 and watches["once"].num_events == 1
    assert watches["match"].webhook_url == f"http://127.0.0.1:{hooks.port}/..."  # the path may hold a secret
    assert metric(svc.server.metrics_url, "mosaic_watches") == len(watches)
    assert metric(svc.server.metrics_url, "mosaic_watch_events_total") >= len(calibration) + 2


# -- 3. the command line ----------------------------------------------------------------------------------
def _mosaic(svc, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mosaic_core.cli", *args, "--target", svc.server.target]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def _tail_in_background(svc, watch_id: str) -> subprocess.Popen:
    """``mosaic watch tail WATCH_ID``, returned once the server counts it among its subscribers."""
    before = metric(svc.server.metrics_url, "mosaic_watch_subscribers")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "mosaic_core.cli", "watch", "tail", watch_id, "--target", svc.server.target]
    tail = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: metric(svc.server.metrics_url, "mosaic_watch_subscribers") > before, timeout_s=60,
                 what="the tail's subscription")  # fmt: skip
    except AssertionError:
        tail.kill()
        raise
    return tail


def test_watch_commands(svc, calibration):
    made = _mosaic(
        svc, "watch", "create", "--question", "Cyclist?", "--stream", "cal", "--threshold", "1e9", "--id", "cli-w",
        "--label", "site=x", "--hours", "08:00-18:00", "--timezone", "Europe/Berlin",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "created watch cli-w on cal: threshold 1e+09, cooldown 60s" in made.stdout
    listed = _mosaic(svc, "watch", "list")
    assert listed.returncode == 0 and any(line.split()[:2] == ["cli-w", "cal"] for line in listed.stdout.splitlines())
    tail = _mosaic(svc, "watch", "tail", "cal-all", "--after", "0", "--count", "2")
    lines = [line for line in tail.stdout.splitlines() if line.startswith("#")]
    assert tail.returncode == 0 and len(lines) == 2 and all(" cal-all cal " in line for line in lines), tail.stdout
    assert lines[0].startswith(f"#{calibration[0].event_id} ")
    following = _tail_in_background(svc, "cli-w")
    try:
        assert _mosaic(svc, "watch", "delete", "cli-w").returncode == 0
        _, stderr = following.communicate(timeout=30)
    finally:
        following.kill()
    assert following.returncode == 1 and "the server ended the event stream after 0 event(s)" in stderr, stderr
    again = _mosaic(svc, "watch", "delete", "cli-w")
    assert again.returncode == 1 and "NOT_FOUND: unknown watch 'cli-w'" in again.stderr
    bad = _mosaic(svc, "watch", "create", "--question", "q", "--hours", "0800")
    assert bad.returncode == 2 and "HH:MM-HH:MM" in bad.stderr
    refused = _mosaic(svc, "watch", "create", "--question", "q", "--hours", "08:00-25:00")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr


# -- 4. resume without loss or duplicates; survive a restart -------------------------------------------------
def test_a_reconnecting_subscriber_resumes_without_losing_or_repeating(svc, calibration):
    c = svc.client
    everything = [e.event_id for e in collect(c, [], after=0, count=10_000, timeout_s=5)]
    assert everything == sorted(set(everything))
    first = collect(c, [], after=0, count=3)
    rest = collect(c, [], after=first[-1].event_id, count=10_000, timeout_s=5)
    assert [e.event_id for e in first + rest] == everything
    assert not any(e.missed_before for e in first + rest)


def _store_a_watch_created_before_the_token_check(svc) -> None:
    """Writes a watch whose question is past the engine's token limit straight into Redis, as a server from before
    CreateWatch counted tokens stored it. Its only stream is gone, so it never fires during the test."""
    from services.metadata.watches import RedisWatchStore
    from services.watches_spec import WatchRecord

    store = RedisWatchStore.from_url(svc.config.redis_url, namespace=NAMESPACE)
    try:
        assert store.put_watch(WatchRecord(watch_id="old-long", question="\N{GRINNING FACE}" * 1000,
                                           stream_ids=["bad-cam"]))  # fmt: skip
    finally:
        store.close()


def test_watches_cooldowns_and_event_ids_survive_a_restart(svc, frames, calibration):
    c = svc.client
    _store_a_watch_created_before_the_token_check(svc)  # it must not stop the restart
    before = {w.watch_id: w for w in c.list_watches()}
    assert "old-long" in before
    last_id = collect(c, [], after=0, count=10_000, timeout_s=5)[-1].event_id
    old_end = max(e.end_s for e in calibration)
    svc.restart()
    c = svc.client
    after = {w.watch_id: w for w in c.list_watches()}
    assert after.keys() == before.keys()
    assert all(after[w].num_events == before[w].num_events for w in after)
    assert after["match"].threshold == before["match"].threshold
    assert collect(c, [], after=last_id, count=1, timeout_s=3) == []  # nothing old comes back
    offset = frames[-1][0] + 1.0 / FPS
    later = [(t + offset, rgb) for t, rgb in frames[:8]]
    push_paced(c, "cal", later)
    push_paced(c, "scene", later)
    new = collect(c, ["cal-all"], after=last_id, count=1)
    assert new and new[0].event_id > last_id
    assert all(e.start_s > old_end for e in collect(c, ["cal-all"], after=last_id, count=100, timeout_s=5))
    assert collect(c, ["once"], after=last_id, count=1, timeout_s=5) == []  # its cooldown outlived the restart
