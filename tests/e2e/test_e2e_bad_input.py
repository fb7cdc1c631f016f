"""Bad input, one row per case: each gets its status code and a human sentence, and another camera keeps
answering after every one of them (a bad frame from one camera never harms another camera's stream).

RESOURCE_EXHAUSTED (full question queue, too many PushFrames calls) is covered in test_e2e_backpressure.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from service_support import clip_frames, connect, metric, wait_for, wait_ingested

from services.client import frame_message
from services.gen.mosaic.v1 import mosaic_pb2 as pb

HEALTHY = "bad-healthy"  # never touched by a bad input
VICTIM = "bad-victim"  # receives the bad frames
RETAINED = "bad-retained"  # keeps only its last 2 seconds


@pytest.fixture(scope="module")
def streams(client):
    client.create_stream(HEALTHY, fps=2.0)
    client.create_stream(VICTIM, fps=2.0)
    client.create_stream(RETAINED, fps=2.0, retention_s=2.0)
    client.push_frames((HEALTHY, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=8))
    client.push_frames((VICTIM, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=8))
    client.push_frames((RETAINED, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=20))
    for stream_id, n in ((HEALTHY, 8), (VICTIM, 8), (RETAINED, 20)):
        wait_ingested(client, stream_id, n)
    yield client.get_stream(HEALTHY).stats
    for stream_id in (HEALTHY, VICTIM, RETAINED):
        client.delete_stream(stream_id)


def _raw(stream_id: str, t: float, rgb: np.ndarray, *, cut: int = 0, channels: int = 3) -> pb.Frame:
    h, w, _ = rgb.shape
    raw = pb.RawFrame(rgb=rgb.tobytes()[: len(rgb.tobytes()) - cut], height=h, width=w, channels=channels)
    return pb.Frame(stream_id=stream_id, timestamp_s=t, raw=raw)


RGB = np.full((48, 64, 3), 90, np.uint8)
CORRUPT_JPEG = pb.Frame(stream_id=VICTIM, timestamp_s=100.0, encoded=b"\xff\xd8\xff\xe0" + b"\x13\x37" * 64)

# (case id, call, expected code, words the sentence must contain)
CASES = [
    ("no-api-key", lambda c, s: connect(s).list_streams(), "UNAUTHENTICATED", "x-api-key"),
    (
        "wrong-api-key",
        lambda c, s: connect(s, api_key="nope").get_stream(HEALTHY),
        "UNAUTHENTICATED",
        "wrong",
    ),
    ("bad-id", lambda c, s: c.create_stream("bad id!"), "INVALID_ARGUMENT", "letters, digits"),
    ("bad-fps", lambda c, s: c.create_stream("bad-fps", fps=-2.0), "INVALID_ARGUMENT", "fps"),
    (
        "missing-source",
        lambda c, s: c.create_stream("bad-src", source_url="/no/such/clip.mp4"),
        "INVALID_ARGUMENT",
        "is not allowed",  # the source policy's one sentence: it does not say whether the file exists
    ),
    (
        "ftp-source",
        lambda c, s: c.create_stream("bad-src", source_url="ftp://127.0.0.1/clip.mp4"),
        "INVALID_ARGUMENT",
        "is not allowed",
    ),
    ("corrupt-frame", lambda c, s: c.push_frames([CORRUPT_JPEG]), "INVALID_ARGUMENT", "cannot be decoded"),
    (
        "not-an-image",
        lambda c, s: c.push_frames([pb.Frame(stream_id=VICTIM, timestamp_s=101.0, encoded=b"GIF89a")]),
        "INVALID_ARGUMENT",
        "neither JPEG nor PNG",
    ),
    ("bad-shape", lambda c, s: c.push_frames([_raw(VICTIM, 102.0, RGB, cut=7)]), "INVALID_ARGUMENT", "needs"),
    (
        "bad-channels",
        lambda c, s: c.push_frames([_raw(VICTIM, 103.0, RGB, channels=4)]),
        "INVALID_ARGUMENT",
        "channels",
    ),
    (
        "time-backwards",
        lambda c, s: c.push_frames([frame_message(VICTIM, 0.5, RGB)]),
        "INVALID_ARGUMENT",
        "must increase",
    ),
    ("empty-question", lambda c, s: c.ask("  ", [HEALTHY]), "INVALID_ARGUMENT", "empty"),
    (
        "reversed-range",
        lambda c, s: c.ask("what?", [HEALTHY], time_range=(5.0, 1.0)),
        "INVALID_ARGUMENT",
        "after its end",
    ),
    ("unknown-get", lambda c, s: c.get_stream("nope"), "NOT_FOUND", "unknown stream"),
    ("unknown-delete", lambda c, s: c.delete_stream("nope"), "NOT_FOUND", "unknown stream"),
    ("unknown-query", lambda c, s: c.ask("what?", [HEALTHY, "nope"]), "NOT_FOUND", "nope"),
    ("unknown-push", lambda c, s: c.push_frames([frame_message("nope", 1.0, RGB)]), "NOT_FOUND", "unknown stream"),
    ("duplicate", lambda c, s: c.create_stream(HEALTHY), "ALREADY_EXISTS", "already exists"),
    ("range-outside", lambda c, s: c.ask("what?", [VICTIM], time_range=(500.0, 600.0)), "OUT_OF_RANGE", "outside"),
    ("range-retention", lambda c, s: c.ask("what?", [RETAINED], time_range=(0.0, 1.0)), "OUT_OF_RANGE", "retention"),
    (
        "deadline",
        lambda c, s: c.ask("describe everything", [VICTIM], max_new_tokens=400, timeout_s=1.0),
        "DEADLINE_EXCEEDED",
        "",
    ),
]


@pytest.mark.parametrize(("call", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_the_other_camera_still_answers(client, service, streams, call, code, words):
    with pytest.raises(grpc.RpcError) as info:
        call(client, service)
    assert info.value.code().name == code, info.value.details()
    assert words.lower() in (info.value.details() or "").lower()
    healthy = client.ask("Is this camera still fine?", [HEALTHY], max_new_tokens=2, timeout_s=60)
    assert len(healthy.token_ids) == 2 and healthy.evidence


def test_bad_frames_in_a_mixed_call_are_reported_per_frame_and_harm_no_other_stream(client, streams):
    good = clip_frames("bikes.mp4", fps=2.0, num_frames=12)[8:]  # continues HEALTHY's clock
    frames = [frame_message(HEALTHY, t, rgb) for t, rgb in good]
    frames.insert(1, CORRUPT_JPEG)
    frames.insert(3, _raw(VICTIM, 200.0, RGB, cut=1))
    response = client.push_frames(frames)
    assert (response.frames_accepted, response.frames_rejected) == (4, 2)
    assert [(e.index, e.stream_id) for e in response.errors] == [(1, VICTIM), (3, VICTIM)]
    after = wait_ingested(client, HEALTHY, streams.frames_ingested + 4).stats
    assert after.frames_dropped == 0 and after.frames_received == streams.frames_received + 4


def test_a_call_whose_frames_are_refused_or_sampled_out_succeeds_and_counts_each(client):
    stream_id = "bad-sampled"
    client.create_stream(stream_id, fps=2.0)
    try:
        assert client.push_frames([_raw(stream_id, 10.0, RGB)]).frames_accepted == 1
        corrupt = pb.Frame(stream_id=stream_id, timestamp_s=10.1, encoded=CORRUPT_JPEG.encoded)
        response = client.push_frames([corrupt, _raw(stream_id, 10.2, RGB)])  # 0.2 s after a kept frame, at 2 fps
        counts = (response.frames_accepted, response.frames_rejected, response.frames_sampled_out)
        assert counts == (0, 1, 1) and [e.index for e in response.errors] == [0]
    finally:
        client.delete_stream(stream_id)


def test_errors_and_deadlines_are_counted_by_code(client, service, streams):
    rows = {c[0]: c for c in CASES}
    cases = [
        rows[name] for name in ("no-api-key", "bad-shape", "unknown-get", "duplicate", "range-outside", "deadline")
    ]
    url = service.metrics_url
    before = {code: metric(url, "mosaic_errors_total", code=code) for _, _, code, _ in cases}
    deadlines = metric(url, "mosaic_queries_total", outcome="deadline")
    for _, call, _, _ in cases:
        with pytest.raises(grpc.RpcError):
            call(client, service)
    for code, count in before.items():
        assert metric(url, "mosaic_errors_total", code=code) >= count + 1, code
    # The server itself ends an overdue question (just before the client's deadline) and counts it.
    wait_for(lambda: metric(url, "mosaic_queries_total", outcome="deadline") >= deadlines + 1, what="deadline count")
