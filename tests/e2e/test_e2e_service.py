"""Two cameras through the whole service: one pushed over PushFrames, one pulled by the server from a file.

Real local Ray (two worker actors), real redis-server, real gRPC on loopback. Questions on each camera and
across both; evidence must fall inside each camera's time range; Redis keys must match the documented
schema and agree with what the workers hold.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_support import NAMESPACE, clip_frames, connect, wait_for, wait_ingested

from mosaic_core.model.video import sample_clip_path
from services.gen.mosaic.v1 import mosaic_pb2 as pb
from services.metadata.base import TIERS
from services.metadata.schema import KEY_TEMPLATES, template_regex
from services.metadata.watches import WATCH_KEY_TEMPLATES

PUSH_OFFSET_S = 1000.0  # the pushed camera's clock starts here, so the two time ranges cannot be confused


@pytest.fixture(scope="module")
def cameras(client):
    client.create_stream("e2e-push", fps=2.0, labels={"site": "dock"})
    client.create_stream("e2e-file", fps=2.0, source_url=sample_clip_path("carphone_pristine.mp4"), loop_source=True)
    frames = clip_frames("bikes.mp4", fps=2.0, num_frames=14, offset_s=PUSH_OFFSET_S)
    response = client.push_frames(("e2e-push", t, rgb) for t, rgb in frames)
    assert (response.frames_accepted, response.frames_rejected) == (14, 0)
    push = wait_ingested(client, "e2e-push", 14)
    file = wait_ingested(client, "e2e-file", 10)
    yield {"e2e-push": push, "e2e-file": file}
    for stream_id in ("e2e-push", "e2e-file"):
        assert client.delete_stream(stream_id) >= 0


def _range(client, stream_id: str) -> tuple[float, float]:
    stats = client.get_stream(stream_id).stats
    return stats.first_timestamp_s, stats.last_timestamp_s


def _assert_evidence_inside(client, spans) -> None:
    assert spans, "an answer must carry evidence"
    for span in spans:
        first, last = _range(client, span.stream_id)
        assert first - 1e-6 <= span.start_s <= span.end_s <= last + 1e-6, (span, first, last)


def test_streams_are_placed_listed_and_described(client, cameras):
    listed = {s.stream_id: s for s in client.list_streams()}
    assert {"e2e-push", "e2e-file"} <= set(listed)
    # Placement by free budget spreads the two new cameras over the two workers.
    assert {listed["e2e-push"].worker_id, listed["e2e-file"].worker_id} == {"0", "1"}
    push = client.get_stream("e2e-push")
    assert push.labels["site"] == "dock" and push.source_state == pb.SOURCE_STATE_PUSH
    assert push.stats.frames_received == 14 and push.stats.num_clusters >= 1
    assert [t.tier for t in push.stats.tiers] == [pb.TIER_DEVICE, pb.TIER_HOST, pb.TIER_DISK]
    file = client.get_stream("e2e-file")
    assert file.source_state == pb.SOURCE_STATE_RUNNING and file.source_url.endswith("carphone_pristine.mp4")


@pytest.mark.parametrize("stream_id", ["e2e-push", "e2e-file"])
def test_each_camera_answers_with_evidence_inside_its_time_range(client, cameras, stream_id):
    events = list(client.query("What is moving, and when?", [stream_id], max_new_tokens=6, timeout_s=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-2:] == ["evidence", "timings"] and kinds.count("token") == 6
    spans = events[-2].evidence.spans
    assert {s.stream_id for s in spans} == {stream_id}
    assert [s.rank for s in spans] == list(range(1, len(spans) + 1))
    _assert_evidence_inside(client, spans)
    timings = events[-1].timings
    assert timings.num_tokens == 6 and 0 < timings.time_to_first_token_s < 60


def test_question_across_both_cameras_merges_answers_and_ranks_evidence(client, cameras):
    result = client.ask("Which camera saw a bicycle?", ["e2e-push", "e2e-file"], max_new_tokens=4, timeout_s=60)
    assert result.text.count("[e2e-push] ") == 1 and result.text.count("[e2e-file] ") == 1
    assert len(result.token_ids) == 8  # both answers, each whole
    assert {s.stream_id for s in result.evidence} == {"e2e-push", "e2e-file"}
    scores = [s.score for s in result.evidence]
    assert scores == sorted(scores, reverse=True)
    _assert_evidence_inside(client, result.evidence)
    everyone = client.ask("Anything unusual?", [], max_new_tokens=2, timeout_s=60)  # empty list: all streams
    assert {"e2e-push", "e2e-file"} <= {s.stream_id for s in everyone.evidence}


def test_time_range_limits_the_evidence(client, cameras):
    first, _ = _range(client, "e2e-push")
    lo, hi = first + 2.0, first + 4.0
    result = client.ask("What happened here?", ["e2e-push"], max_new_tokens=2, time_range=(lo, hi), timeout_s=60)
    assert result.evidence
    assert all(s.start_s <= hi and s.end_s >= lo for s in result.evidence)


def test_redis_keys_match_the_documented_schema_and_the_workers(client, cameras, redis):
    patterns = [template_regex(t, NAMESPACE) for t in (*KEY_TEMPLATES, *WATCH_KEY_TEMPLATES)]
    keys = list(redis.scan_iter(match=f"{NAMESPACE}:*", count=1000))
    assert keys
    unmatched = [k for k in keys if not any(p.fullmatch(k) for p in patterns)]
    assert not unmatched, unmatched[:5]
    assert {"e2e-push", "e2e-file"} <= redis.smembers(f"{NAMESPACE}:streams")
    for stream_id in ("e2e-push", "e2e-file"):
        record = redis.hgetall(f"{NAMESPACE}:stream:{stream_id}")
        worker = client.get_stream(stream_id).worker_id
        assert record["worker_id"] == worker
        assert stream_id in redis.smembers(f"{NAMESPACE}:worker:{worker}:streams")
    # The pushed camera is idle now: Redis must hold exactly what its worker reports, tier by tier.
    stats = client.get_stream("e2e-push").stats
    cluster_ids = redis.zrange(f"{NAMESPACE}:stream:e2e-push:tindex", 0, -1)
    assert len(cluster_ids) == stats.num_clusters
    by_tier = {tier: 0 for tier in TIERS}
    for cluster_id in cluster_ids:
        fields = redis.hgetall(f"{NAMESPACE}:cluster:e2e-push:{cluster_id}")
        assert fields["location"].startswith(fields["tier"] + ":")
        assert float(redis.zscore(f"{NAMESPACE}:stream:e2e-push:tindex", cluster_id)) == float(fields["start_s"])
        by_tier[fields["tier"]] += int(fields["num_bytes"])
    assert [by_tier[t] for t in TIERS] == [t.num_bytes for t in stats.tiers]


def test_deleted_stream_leaves_no_keys(client, redis):
    client.create_stream("e2e-gone", fps=2.0)
    client.push_frames(("e2e-gone", t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=10))
    wait_for(lambda: redis.zcard(f"{NAMESPACE}:stream:e2e-gone:tindex"), what="clusters of e2e-gone in Redis")
    client.delete_stream("e2e-gone")
    # The worker forgot the stream before DeleteStream answered; its publisher then empties the index behind it.
    wait_for(lambda: not list(redis.scan_iter(match=f"{NAMESPACE}:*e2e-gone*")), what="e2e-gone gone from Redis")
    with pytest.raises(grpc.RpcError) as info:
        client.get_stream("e2e-gone")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection_are_served_without_the_api_key(service):
    with connect(service) as anonymous:  # no API key: health and reflection stay open
        assert anonymous.health_status("") == "SERVING"
        assert anonymous.health_status("mosaic.v1.Mosaic") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(anonymous.channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"mosaic.v1.Mosaic", "grpc.health.v1.Health"} <= names


def test_plaintext_is_refused_by_the_tls_server(service):
    with grpc.insecure_channel(service.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
