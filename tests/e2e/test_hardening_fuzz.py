"""Hypothesis sends random frame payloads and random field values to the session server (real Ray, Redis and
gRPC over TLS). Nothing crashes: every call either succeeds or fails with a deliberate status code (never
UNKNOWN or INTERNAL) and a non-empty sentence, every refused frame says why, and the server answers
normally after each example and at the end."""

from __future__ import annotations

import math

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import clip_frames, wait_ingested

from services.gen.mosaic.v1 import mosaic_pb2 as pb

TARGET = "fz-target"  # pushed to and asked about by the fuzzer
HEALTHY = "fz-healthy"  # never touched by the fuzzer
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
BUGS = ("UNKNOWN", "INTERNAL")

ids = st.one_of(
    st.sampled_from([TARGET, HEALTHY, "", "nope", "a/b", "x" * 200, "../etc", "fz new"]),
    st.text(max_size=30),
)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e300]))
magic = st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"])
encoded = st.builds(lambda head, tail: head + tail, magic, st.binary(max_size=300))
raw = st.builds(
    pb.RawFrame,
    rgb=st.binary(max_size=600),
    height=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 20),
    width=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 20),
    channels=st.integers(-5, 5),
)


@st.composite
def frames(draw) -> pb.Frame:
    frame = pb.Frame(stream_id=draw(ids), timestamp_s=draw(floats))
    if draw(st.booleans()):
        frame.encoded = draw(encoded)
    elif draw(st.booleans()):
        frame.raw.CopyFrom(draw(raw))
    return frame


@pytest.fixture(scope="module")
def streams(client):
    for stream_id in (TARGET, HEALTHY):
        client.create_stream(stream_id, fps=2.0)
        client.push_frames((stream_id, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=6))
        wait_ingested(client, stream_id, 6)
    yield
    for stream_id in (TARGET, HEALTHY):
        client.delete_stream(stream_id)


def _check_error(err: grpc.RpcError) -> None:
    assert err.code().name not in BUGS, f"{err.code().name}: {err.details()}"
    assert (err.details() or "").strip(), f"{err.code().name} without a sentence"


def _still_answers(client) -> None:
    assert client.get_stream(HEALTHY).stats.frames_ingested >= 6
    assert client.health_status("mosaic.v1.Mosaic") == "SERVING"


@FUZZ
@given(batch=st.lists(frames(), min_size=1, max_size=6))
def test_random_frames(client, streams, batch):
    try:
        response = client.push_frames(batch, timeout_s=60)
    except grpc.RpcError as err:
        _check_error(err)
    else:
        assert response.frames_accepted + response.frames_rejected + response.frames_sampled_out == len(batch)
        assert all(e.reason.strip() for e in response.errors)
    _still_answers(client)


@FUZZ
@given(
    stream_id=ids,
    fps=floats,
    retention_s=floats,
    source_url=st.none() | st.sampled_from(["ftp://127.0.0.1/a.mp4", "concat:a|b", "data:,x", "/etc/hostname"]),
    labels=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)
def test_random_stream_fields(client, streams, stream_id, fps, retention_s, source_url, labels):
    request = pb.CreateStreamRequest(stream_id=stream_id, fps=fps, retention_s=retention_s, labels=labels)
    if source_url is not None:
        request.source_url = source_url
    try:
        created = client.stub.CreateStream(request, timeout=60, metadata=client.metadata)
    except grpc.RpcError as err:
        _check_error(err)
    else:
        assert math.isfinite(created.fps) and 0 < created.fps <= 60
        client.delete_stream(created.stream_id)
    for call in (client.get_stream, client.delete_stream):
        if stream_id in (TARGET, HEALTHY):
            continue
        try:
            call(stream_id)
        except grpc.RpcError as err:
            _check_error(err)
    _still_answers(client)


@FUZZ
@given(
    stream_ids=st.lists(ids, max_size=3),
    question=st.text(max_size=60),
    max_new_tokens=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 4),
    priority=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 3),
    time_range=st.none() | st.tuples(floats, floats),
)
def test_random_questions(client, streams, stream_ids, question, max_new_tokens, priority, time_range):
    request = pb.QueryRequest(
        stream_ids=[s for s in stream_ids if s != HEALTHY] or [TARGET],
        question=question,
        max_new_tokens=min(max_new_tokens, 4) if max_new_tokens > 0 else max_new_tokens,
        priority=priority,
    )
    if time_range is not None:
        request.time_range.start_s, request.time_range.end_s = time_range
    try:
        events = list(client.stub.Query(request, timeout=60, metadata=client.metadata))
    except grpc.RpcError as err:
        _check_error(err)
    else:
        assert events and events[-1].WhichOneof("event") == "timings"
    _still_answers(client)


def test_the_server_answers_normally_after_the_fuzzing(client, streams):
    result = client.ask("Is this camera still fine?", [HEALTHY], max_new_tokens=2, timeout_s=60)
    assert len(result.token_ids) == 2 and result.evidence
