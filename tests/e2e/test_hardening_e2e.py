"""Issue 10 at the service edge, against the session server (real Ray, Redis, gRPC over TLS): limits and
messages, retrieval time in QueryTimings, drop counts that agree, reflection v1 and v1alpha, and readiness
that follows the workers (a server of its own, whose only worker is killed)."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import av
import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from service_support import API_KEY, NAMESPACE, clip_frames, connect, metric, samples, scrape, wait_for, wait_ingested

from services.client import frame_message
from services.gen.mosaic.v1 import mosaic_pb2 as pb

STREAM = "hard-main"


def _png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of any size, all black, streamed row by row (20000^2 is 50 KB)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _jpeg(width: int, height: int) -> bytes:
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = width, height, "yuvj420p", Fraction(1, 25)
    picture = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
    packets = ctx.encode(picture.reformat(format="yuvj420p")) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


@pytest.fixture(scope="module")
def stream(client):
    client.create_stream(STREAM, fps=2.0)
    client.push_frames((STREAM, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=16))
    wait_ingested(client, STREAM, 16)
    yield STREAM
    client.delete_stream(STREAM)


def _create(client, **fields):
    return client.stub.CreateStream(pb.CreateStreamRequest(**fields), timeout=30, metadata=client.metadata)


def _query(client, **fields):
    request = pb.QueryRequest(question="what happened?", stream_ids=[STREAM], max_new_tokens=2, **fields)
    return list(client.stub.Query(request, timeout=60, metadata=client.metadata))


def _nan_range(client):
    request = pb.QueryRequest(question="what?", stream_ids=[STREAM], time_range=pb.TimeRange(start_s=float("nan")))
    return list(client.stub.Query(request, timeout=60, metadata=client.metadata))


def _push(client, data: bytes):
    return client.push_frames([pb.Frame(stream_id=STREAM, timestamp_s=1000.0, encoded=data)])


# (case id, call, code, words the sentence must contain, words it must not contain)
CASES = [
    ("fps-huge", lambda c: _create(c, stream_id="h-fps", fps=1e9), "INVALID_ARGUMENT", "limit of 60 frames", ""),
    ("fps-nan", lambda c: _create(c, stream_id="h-fps", fps=float("nan")), "INVALID_ARGUMENT", "finite", ""),
    ("fps-inf", lambda c: _create(c, stream_id="h-fps", fps=float("inf")), "INVALID_ARGUMENT", "finite", ""),
    ("fps-tiny", lambda c: _create(c, stream_id="h-fps", fps=1e-300), "INVALID_ARGUMENT", "one frame a day", ""),
    ("retention-nan", lambda c: _create(c, stream_id="h-r", retention_s=float("nan")), "INVALID_ARGUMENT",
     "retention_s", ""),
    ("priority-99", lambda c: _query(c, priority=99), "INVALID_ARGUMENT", "priority 99 is not one of", ""),
    ("priority-negative", lambda c: _query(c, priority=-1), "INVALID_ARGUMENT", "priority -1", ""),
    ("range-nan", _nan_range, "INVALID_ARGUMENT", "must be finite", "after its end"),
    ("png-20000", lambda c: _push(c, _png(20000, 20000)), "INVALID_ARGUMENT", "20000x20000 px", "invalid data"),
    ("jpeg-9000", lambda c: _push(c, _jpeg(9000, 16)), "INVALID_ARGUMENT", "each side must be 1..8192", ""),
    ("get-bad-id", lambda c: c.get_stream("bad id!"), "INVALID_ARGUMENT", "letters, digits", "'/'"),
    ("get-slash-id", lambda c: c.get_stream("a/b"), "INVALID_ARGUMENT", "letters, digits", "'/'"),
    ("create-slash-id", lambda c: c.create_stream("a/b"), "INVALID_ARGUMENT", "letters, digits", "'/'"),
    ("delete-bad-id", lambda c: c.delete_stream("a b"), "INVALID_ARGUMENT", "letters, digits", "'/'"),
    ("query-bad-id", lambda c: c.ask("what?", ["a/b"]), "INVALID_ARGUMENT", "letters, digits", "'/'"),
    ("list-page-size-negative", lambda c: c.list_streams(page_size=-1), "INVALID_ARGUMENT", "page_size -1", ""),
]  # fmt: skip


@pytest.mark.parametrize(("call", "code", "words", "never"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_limits_and_messages(client, stream, call, code, words, never):
    with pytest.raises(grpc.RpcError) as info:
        call(client)
    details = info.value.details() or ""
    assert info.value.code().name == code, details
    assert words.lower() in details.lower(), details
    assert not never or never.lower() not in details.lower(), details


@pytest.mark.parametrize(
    "bad_id", ["a/b", "-a", "x" * 129, "caf\u00e9"], ids=["slash", "dash-first", "129-chars", "accent"]
)
def test_the_id_sentence_is_the_same_wherever_an_id_is_refused(client, stream, bad_id):
    sentences = set()
    for call in (client.get_stream, client.create_stream, client.delete_stream):
        with pytest.raises(grpc.RpcError) as info:
            call(bad_id)
        sentences.add(info.value.details())
    assert len(sentences) == 1, sentences


def test_a_stream_of_the_longest_id_is_recorded_and_so_are_its_neighbours(client, redis):
    """The engine names a cluster "<stream id>/c<number>", past 128 characters for a 128-character stream id: the
    metadata store refused such ids, so every ingest call holding a frame of that stream failed as it published,
    and the other streams of the call lost their records (and their retention and watch passes) with it."""
    long_id, neighbour = "h-long-" + "x" * 121, "h-long-neighbour"
    frames = clip_frames("bikes.mp4", fps=2.0, num_frames=12)
    for stream_id in (long_id, neighbour):
        client.create_stream(stream_id, fps=2.0)
    try:
        client.push_frames((s, t, rgb) for t, rgb in frames for s in (long_id, neighbour))
        for stream_id in (long_id, neighbour):
            wait_ingested(client, stream_id, len(frames))

        def recorded(stream_id: str) -> bool:
            held = client.get_stream(stream_id).stats.num_clusters
            return held > 0 and redis.zcard(f"{NAMESPACE}:stream:{stream_id}:tindex") == held

        wait_for(lambda: recorded(long_id) and recorded(neighbour), timeout_s=30,
                 what="both streams' clusters in the metadata store")  # fmt: skip
    finally:
        for stream_id in (long_id, neighbour):
            client.delete_stream(stream_id)


def test_creates_sent_at_once_make_every_id_and_each_only_once(client, stream):
    """Creates sent at once (the router no longer takes them one at a time): every distinct id is created and
    listed once, and one id asked for three times at once is created once, the other two refused."""
    ids = [f"h-par-{i}" for i in range(5)]

    def outcome(stream_id: str) -> str:
        try:
            _create(client, stream_id=stream_id, fps=1.0)
        except grpc.RpcError as err:
            return err.code().name
        return "OK"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(outcome, [*ids, ids[0], ids[0]]))
    try:
        assert outcomes[1:5] == ["OK"] * 4
        assert sorted([outcomes[0], *outcomes[5:]]) == ["ALREADY_EXISTS", "ALREADY_EXISTS", "OK"]
        listed = [s.stream_id for s in client.list_streams(page_size=0) if s.stream_id.startswith("h-par-")]
        assert sorted(listed) == ids
        every = [s.stream_id for s in client.list_streams(page_size=0)]
        assert [s.stream_id for s in client.list_streams(page_size=2)] == sorted(every)  # page by page, in id order
    finally:
        for stream_id in ids:
            client.delete_stream(stream_id)


def test_answers_report_their_retrieval_time_and_where_their_first_token_waited(client, stream):
    result = client.ask("what happened?", [STREAM], max_new_tokens=2, timeout_s=60)
    assert result.evidence, "the stream has clusters to retrieve"
    t = result.timings
    assert t.retrieval_s > 0, t
    assert t.retrieval_s <= t.engine_first_token_s, t  # retrieval is part of the engine's prefill
    assert t.start_wait_s > 0 and t.engine_first_token_s > 0, t
    # The parts nest: the engine's within the worker's, the worker's and the way between within the router's.
    assert t.start_wait_s + t.engine_first_token_s + t.token_handoff_s <= t.worker_first_token_s, t
    assert t.transport_s > 0, t
    assert t.queue_s + t.worker_first_token_s + t.transport_s <= t.time_to_first_token_s, t


def test_getstream_and_the_metric_count_the_same_drops(client, service):
    stream_id = "hard-drops"
    client.create_stream(stream_id, fps=2.0)
    try:
        corrupt = [pb.Frame(stream_id=stream_id, timestamp_s=50.0 + i, encoded=b"\xff\xd8\xff\xe0" + b"\x13" * 64)
                   for i in range(3)]  # fmt: skip
        good = clip_frames("bikes.mp4", fps=2.0, num_frames=4)
        frames = corrupt + [frame_message(stream_id, t, rgb) for t, rgb in good]
        frames.append(frame_message(stream_id, 0.1, good[0][1]))  # timestamps must increase: refused
        response = client.push_frames(frames)
        assert (response.frames_accepted, response.frames_rejected) == (4, 4)
        wait_ingested(client, stream_id, 4)

        def agree():
            got = client.get_stream(stream_id).stats.frames_dropped
            counted = metric(service.metrics_url, "mosaic_frames_dropped_total", stream=stream_id)
            return got == counted == 4 and got

        wait_for(agree, timeout_s=30, what="GetStream and mosaic_frames_dropped_total to agree on 4 drops")
    finally:
        client.delete_stream(stream_id)


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(service, package):
    with connect(service) as anonymous:  # reflection needs no API key
        call = anonymous.channel.stream_stream(
            f"/{package}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        (response,) = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in response.list_services_response.service}
        assert {"mosaic.v1.Mosaic", "grpc.reflection.v1.ServerReflection"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="mosaic.v1.Mosaic")
        (described,) = list(call(iter([request]), timeout=10))
        assert described.file_descriptor_response.file_descriptor_proto


@pytest.fixture(scope="module")
def own_server(ray_cluster, redis_server, tmp_path_factory):
    """A one-worker server of this module's own (its worker gets killed), with a source root holding a clip."""
    from pathlib import Path

    from mosaic_core.model.video import sample_clip_path
    from services.client import MosaicClient
    from services.config import load_config
    from services.embedded import ServerThread

    root = tmp_path_factory.mktemp("sources")
    (root / "cam.mp4").write_bytes(Path(sample_clip_path("carphone_pristine.mp4")).read_bytes())
    config = load_config(
        None, host="127.0.0.1", grpc_port=0, metrics_port=0, workers=1, worker_cpus=0.25,
        redis_url=redis_server.url, redis_namespace="hard-own", api_key=API_KEY,
        telemetry_interval_s=0.25, shutdown_grace_s=0.5, shutdown_drain_s=0.1, source_roots=[str(root)],
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
        source_blocked_networks=["169.254.0.0/16"],  # loopback open: unreachable sources are loopback ports here
    )  # fmt: skip
    server = ServerThread(config).start(timeout_s=400)
    server.source_root = root
    try:
        with MosaicClient(server.target, api_key=API_KEY) as client:
            yield server, client
    finally:
        server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_source_urls_outside_the_policy_get_one_sentence(own_server):
    server, client = own_server
    shapes = set()
    refused = [
        "file:///etc/hostname", "concat:/etc/hostname|/etc/hostname", "data:,x", "tcp://127.0.0.1:9",
        "ftp://127.0.0.1/a.mp4", "/etc/hostname", "/no/such/clip.mp4", f"{server.source_root}/../x.mp4",
    ]  # fmt: skip
    for url in refused:
        with pytest.raises(grpc.RpcError) as info:
            client.create_stream("h-src", source_url=url)
        assert info.value.code().name == "INVALID_ARGUMENT", info.value.details()
        shapes.add(info.value.details().replace(repr(url), "<url>"))
    assert len(shapes) == 1, shapes
    created = client.create_stream("h-src-ok", fps=2.0, source_url=str(server.source_root / "cam.mp4"))
    wait_for(lambda: client.get_stream("h-src-ok").stats.frames_ingested > 0, what="the file under the root")
    client.delete_stream(created.stream_id)


def test_a_source_host_in_a_blocked_network_is_refused_with_a_sentence(own_server):
    _, client = own_server
    with pytest.raises(grpc.RpcError) as info:
        client.create_stream("h-metadata", source_url="http://169.254.169.254/latest/meta-data/")
    assert info.value.code().name == "INVALID_ARGUMENT"
    assert "'169.254.169.254' is in a network this server does not open" in info.value.details()
    assert "h-metadata" not in [s.stream_id for s in client.list_streams()]


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_an_unreachable_source_is_accepted_and_reports_its_error_alike_over_every_scheme(own_server, scheme):
    server, client = own_server
    stream_id = f"h-down-{scheme}"
    client.create_stream(stream_id, source_url=f"{scheme}://127.0.0.1:{_free_port()}/cam")
    try:
        stream = wait_for(lambda: "Cannot open" in (s := client.get_stream(stream_id)).source_error and s,
                          timeout_s=30, what=f"the {scheme} source's error")  # fmt: skip
        assert stream.source_state in (pb.SOURCE_STATE_ERROR, pb.SOURCE_STATE_CONNECTING)
        wait_for(lambda: metric(server.metrics_url, "mosaic_sources_failing") == 1, timeout_s=30,
                 what="the failed source in mosaic_sources_failing")  # fmt: skip
    finally:
        client.delete_stream(stream_id)


def test_readiness_is_not_serving_while_no_worker_can_answer(own_server):
    import ray

    server, client = own_server
    assert client.health_status("mosaic.v1.Mosaic") == "SERVING"
    ray.kill(server.server.coordinator.workers[0], no_restart=True)
    wait_for(lambda: client.health_status("mosaic.v1.Mosaic") == "NOT_SERVING", timeout_s=30,
             what="readiness to drop with the only worker gone")  # fmt: skip
    assert client.health_status("") == "SERVING"  # the process itself is alive
    assert samples(scrape(server.metrics_url))[("mosaic_workers_up", ())] == 0
