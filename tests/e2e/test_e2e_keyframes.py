"""Keyframes through the whole service: evidence spans name them, GetKeyframes returns their JPEGs, they survive
a server restart, and they go with a deleted stream.

Real local Ray, real redis-server, real gRPC on loopback. The evidence and error tests use the session's shared
server (two cameras on two workers); the restart test runs its own one-worker server on its own data directory
and Redis namespace, stopped and started again like ``test_e2e_watches``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from PIL import Image
from service_support import API_KEY, clip_frames, connect, wait_for, wait_ingested

from mosaic_core.model.video import sample_clip_path
from tests.integration.conftest import redis_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
PUSH_OFFSET_S = 2000.0


@pytest.fixture(scope="module")
def cameras(client):
    client.create_stream("kf-push", fps=2.0)
    client.create_stream("kf-file", fps=2.0, source_url=sample_clip_path("carphone_pristine.mp4"), loop_source=True)
    frames = clip_frames("bikes.mp4", fps=2.0, num_frames=16, offset_s=PUSH_OFFSET_S)
    response = client.push_frames(("kf-push", t, rgb) for t, rgb in frames)
    assert (response.frames_accepted, response.frames_rejected) == (16, 0)
    wait_ingested(client, "kf-push", 16)
    wait_ingested(client, "kf-file", 12)
    yield ["kf-push", "kf-file"]
    for stream_id in ("kf-push", "kf-file"):
        try:
            client.delete_stream(stream_id)
        except grpc.RpcError as err:  # the deletion test removed it already
            assert err.code() == grpc.StatusCode.NOT_FOUND


def _check_jpeg(keyframe) -> None:
    image = Image.open(io.BytesIO(keyframe.jpeg))
    assert image.format == "JPEG" and image.size == (keyframe.width, keyframe.height)
    assert max(image.size) <= 160


def _assert_keyframes_inside(client, spans) -> None:
    assert spans, "an answer must carry evidence"
    for span in spans:
        assert span.keyframe_ids, f"span {span.cluster_id} {span.start_s}-{span.end_s} names no keyframe"
        keyframes = client.get_keyframes(span.stream_id, keyframe_ids=span.keyframe_ids)
        assert [k.id for k in keyframes] == list(span.keyframe_ids)
        for keyframe in keyframes:
            assert span.start_s - 1e-6 <= keyframe.timestamp_s <= span.end_s + 1e-6, (span, keyframe.timestamp_s)
            assert (keyframe.stream_id, keyframe.cluster_id) == (span.stream_id, span.cluster_id)
            _check_jpeg(keyframe)


@pytest.mark.parametrize("stream_id", ["kf-push", "kf-file"])
def test_every_evidence_span_has_keyframes_inside_it(client, cameras, stream_id):
    result = client.ask("what happened?", [stream_id], max_new_tokens=4, timeout_s=120)
    _assert_keyframes_inside(client, result.evidence)


def test_a_question_over_both_cameras_keeps_each_spans_keyframes(client, cameras):
    result = client.ask("which camera saw a bike?", cameras, max_new_tokens=4, timeout_s=120)
    assert {span.stream_id for span in result.evidence} == set(cameras)
    _assert_keyframes_inside(client, result.evidence)


def test_a_cluster_and_the_latest_keyframe(client, cameras):
    result = client.ask("what happened?", ["kf-push"], max_new_tokens=2, timeout_s=120)
    span = result.evidence[0]
    whole = client.get_keyframes("kf-push", cluster_id=span.cluster_id)
    assert set(span.keyframe_ids) <= {k.id for k in whole}
    assert [k.timestamp_s for k in whole] == sorted(k.timestamp_s for k in whole)
    (latest,) = client.get_keyframes("kf-push", latest=True)
    assert latest.timestamp_s == client.get_stream("kf-push").stats.last_timestamp_s
    _check_jpeg(latest)


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        ({"latest": True, "cluster_id": "kf-push/c000000"}, grpc.StatusCode.INVALID_ARGUMENT, "exactly one"),
        ({"keyframe_ids": ["../../etc/passwd"]}, grpc.StatusCode.INVALID_ARGUMENT, "not a keyframe id"),
        ({"keyframe_ids": ["kf-file/f1"]}, grpc.StatusCode.INVALID_ARGUMENT, "not a keyframe id"),
        ({"keyframe_ids": [f"kf-push/f{i}" for i in range(65)]}, grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
        ({"keyframe_ids": ["kf-push/f999999"]}, grpc.StatusCode.NOT_FOUND, "kf-push/f999999"),
        ({"cluster_id": "kf-push/c999999"}, grpc.StatusCode.NOT_FOUND, "no cluster"),
    ],
)
def test_bad_requests_get_their_status_and_a_sentence(client, cameras, kwargs, code, words):
    with pytest.raises(grpc.RpcError) as caught:
        client.get_keyframes("kf-push", **kwargs)
    assert caught.value.code() == code and words in caught.value.details()


def test_unknown_stream_bad_stream_id_and_missing_api_key(service, client, cameras):
    with pytest.raises(grpc.RpcError) as caught:
        client.get_keyframes("no-such-cam", latest=True)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        client.get_keyframes("../etc", latest=True)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with connect(service) as anonymous, pytest.raises(grpc.RpcError) as caught:
        anonymous.get_keyframes("kf-push", latest=True)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_saving_evidence_skips_an_id_the_server_no_longer_holds(client, cameras, tmp_path):
    """A server call is all or nothing; an evidence id gone since the answer (a forming cluster's candidate replaced,
    or retention) costs only itself, and is named."""
    from services.cli_evidence import save_evidence

    result = client.ask("what happened?", ["kf-push"], max_new_tokens=2, timeout_s=120)
    held = [k for span in result.evidence for k in span.keyframe_ids]
    assert held
    spans = [SimpleNamespace(stream_id="kf-push", keyframe_ids=[held[0], "kf-push/f999999", *held[1:]])]
    written, gone = save_evidence(client, spans, tmp_path / "evidence")
    assert gone == ["kf-push/f999999"]
    assert len(written) == len(held) and all(Image.open(path).format == "JPEG" for path in written)


def test_a_deleted_streams_keyframes_are_gone(client, cameras):
    result = client.ask("what happened?", ["kf-push"], max_new_tokens=2, timeout_s=120)
    ids = list(result.evidence[0].keyframe_ids)
    assert client.get_keyframes("kf-push", keyframe_ids=ids)
    client.delete_stream("kf-push")
    with pytest.raises(grpc.RpcError) as caught:
        client.get_keyframes("kf-push", keyframe_ids=ids)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A new stream under the same id starts without the old one's keyframes.
    client.create_stream("kf-push", fps=2.0)
    with pytest.raises(grpc.RpcError) as caught:
        client.get_keyframes("kf-push", keyframe_ids=ids)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.get_keyframes("kf-push", latest=True) == []


def test_query_save_evidence_writes_the_frames_named_by_camera_and_time(service, cameras, tmp_path):
    out = tmp_path / "evidence"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    flags = ["--target", service.target, "--tls-ca", service.tls_ca_path, "--api-key", API_KEY]
    asked = subprocess.run(
        [sys.executable, "-m", "mosaic_core.cli", "query", *cameras, "--question", "What moved?",
         "--max-new-tokens", "2", "--save-evidence", str(out), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    files = sorted(out.iterdir())
    assert files and f"saved {len(files)} evidence frame" in asked.stdout
    for path in files:
        camera, seconds = path.name.removesuffix("s.jpg").rsplit("_", 1)
        assert camera in cameras and float(seconds) >= 0.0
        assert Image.open(path).format == "JPEG"


# -- a server restart on the same data directory ----------------------------------------------------------------


class RestartableServer:
    def __init__(self, config) -> None:
        self.config = config
        self.server = None

    def start(self) -> RestartableServer:
        from services.embedded import ServerThread

        self.server = ServerThread(self.config).start(timeout_s=400)
        return self

    def client(self):
        from services.client import MosaicClient

        return MosaicClient(self.server.target, api_key=API_KEY, timeout_s=60)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def own_server(ray_cluster, redis_server, tmp_path_factory):  # noqa: F811 - the imported fixture
    from mosaic_core.config import MIB
    from services.config import load_config

    config = load_config(
        None,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        workers=1,
        worker_cpus=0.5,
        redis_url=redis_server.url,
        redis_namespace="e2e-keyframes",
        api_key=API_KEY,
        device_budget_bytes=4 * MIB,
        host_budget_bytes=4 * MIB,
        data_dir=str(tmp_path_factory.mktemp("keyframe-history")),
        ingest_headroom=0.0,
        telemetry_interval_s=0.25,
        shutdown_grace_s=5.0,
        shutdown_drain_s=0.2,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    server = RestartableServer(config).start()
    yield server
    server.stop()


def test_keyframes_survive_a_server_restart(own_server):
    frames = clip_frames("bikes.mp4", fps=2.0, num_frames=16)
    with own_server.client() as client:
        client.create_stream("kf-restart", fps=2.0)
        client.push_frames(("kf-restart", t, rgb) for t, rgb in frames)
        wait_ingested(client, "kf-restart", 16)
        result = client.ask("what happened?", ["kf-restart"], max_new_tokens=2, timeout_s=120)
        _assert_keyframes_inside(client, result.evidence)
        before = {
            span.cluster_id: [(k.id, k.timestamp_s, k.jpeg) for k in client.get_keyframes(
                "kf-restart", cluster_id=span.cluster_id)]
            for span in result.evidence
        }  # fmt: skip
    own_server.stop()  # graceful: every open cluster is sealed and written with its keyframes
    own_server.start()
    with own_server.client() as client:
        wait_for(lambda: client.get_stream("kf-restart"), timeout_s=120, what="the stream to come back")
        for cluster_id, keyframes in before.items():
            after = client.get_keyframes("kf-restart", cluster_id=cluster_id)
            assert [(k.id, k.timestamp_s, k.jpeg) for k in after] == keyframes
        again = client.ask("what happened?", ["kf-restart"], max_new_tokens=2, timeout_s=120)
        _assert_keyframes_inside(client, again.evidence)
        client.delete_stream("kf-restart")
