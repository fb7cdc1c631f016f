"""A worker killed past Ray's restart limit (``MAX_RESTARTS``), by its PID: its streams' calls say it is
gone for good, ListStreams names them, and a DeleteStream deletes one all the same (its history in the gone worker's
folder, its Redis record and the router's placement; the live worker deletes the history where the router does not see
the data directory), after which its id can be created again on the live worker.

Real local Ray (the e2e suite's one cluster), a real redis-server, the real gRPC server with two workers of this
module's own (one of them is killed for good), tiny preset on the CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import grpc
import pytest
from service_support import clip_frames, metric, wait_for, wait_ingested

from mosaic_core.durable.loading import TRASH
from mosaic_core.durable.manifest import replay
from services.worker_actor import MAX_RESTARTS

NAMESPACE = "gone-worker"
FPS = 2.0


@pytest.fixture(scope="module")
def gone(ray_cluster, redis_server, tmp_path_factory):
    """A two-worker server whose worker of streams ``gw-cam`` and ``gw-far`` was killed ``MAX_RESTARTS + 1`` times,
    the last time for good, and ``gw-keep`` on the other worker."""
    from services.client import MosaicClient
    from services.config import load_config
    from services.embedded import ServerThread

    data_dir = tmp_path_factory.mktemp("history")
    config = load_config(
        None, host="127.0.0.1", grpc_port=0, metrics_port=0, workers=2, worker_cpus=0.5,
        redis_url=redis_server.url, redis_namespace=NAMESPACE, data_dir=str(data_dir), ingest_headroom=0.0,
        telemetry_interval_s=0.25, shutdown_grace_s=0.5, shutdown_drain_s=0.1,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )  # fmt: skip
    server = ServerThread(config).start(timeout_s=400)
    try:
        with MosaicClient(server.target) as client:
            victim = int(client.create_stream("gw-cam", fps=FPS).worker_id)
            keep = client.create_stream("gw-keep", fps=FPS)
            assert int(keep.worker_id) != victim, "the second stream went to the same worker"
            # Each worker has one stream, neither has frames yet: the tie goes to the lower index, the victim's.
            assert int(client.create_stream("gw-far", fps=FPS).worker_id) == victim == 0
            frames = clip_frames("bikes.mp4", fps=FPS, num_frames=16, step=4)
            client.push_frames([("gw-cam", t, rgb) for t, rgb in frames], timeout_s=60)
            wait_ingested(client, "gw-cam", len(frames))
            stream_dir = data_dir / f"worker-{victim}" / "gw-cam"
            wait_for(lambda: replay(stream_dir).clusters, timeout_s=60, what="a sealed cluster of gw-cam on disk")
            for kill in range(MAX_RESTARTS + 1):
                pid = wait_for(lambda: _pid(server, victim), timeout_s=180, what=f"worker {victim} after {kill} kills")
                os.kill(pid, signal.SIGKILL)
                if kill < MAX_RESTARTS:  # Ray restarts it: a new process answers the router's polls
                    wait_for(lambda p=pid: _pid(server, victim) not in (0, p), timeout_s=180,
                             what=f"worker {victim} back after kill {kill + 1}")  # fmt: skip
            yield server, client, victim, data_dir
    finally:
        server.stop()


def _pid(server, worker: int) -> int:
    """The worker's process as the router last heard it (0 while it does not answer)."""
    return int(metric(server.metrics_url, "mosaic_worker_pid", worker=str(worker)))


def _outcome(call) -> tuple[str, str, object]:
    """``(code name, details, value)`` of a call: ``("OK", "", its value)`` when it succeeds."""
    try:
        return "OK", "", call()
    except grpc.RpcError as err:
        return err.code().name, err.details(), None


def test_calls_about_a_gone_workers_stream_say_so_and_the_rest_is_served(gone):
    server, client, victim, _ = gone
    code, details, _ = _outcome(lambda: client.get_stream("gw-cam"))  # the first since its final death
    assert code == "FAILED_PRECONDITION" and f"worker {victim} is gone for good" in details, (code, details)
    assert "DeleteStream still deletes" in details
    code, details, _ = _outcome(client.list_streams)
    assert code == "FAILED_PRECONDITION" and "'gw-cam'" in details and "delete them" in details, (code, details)
    assert client.get_stream("gw-keep").stream_id == "gw-keep"
    assert client.health_status("mosaic.v1.Mosaic") == "SERVING"
    wait_for(lambda: metric(server.metrics_url, "mosaic_workers_up") == 1, timeout_s=30, what="one worker up")
    assert metric(server.metrics_url, "mosaic_workers_gone") == 1


def test_a_gone_workers_streams_are_deleted_with_their_history_and_record_and_can_be_created_again(gone, redis_server):
    from services.metadata.redis_store import RedisMetadataStore

    server, client, victim, data_dir = gone
    stream_dir = data_dir / f"worker-{victim}" / "gw-cam"
    on_disk = replay(stream_dir).clusters  # the worker is dead: nothing changes them any more
    store = RedisMetadataStore.from_url(redis_server.url, namespace=NAMESPACE)
    assert store.get_stream("gw-cam") is not None

    trash = data_dir / f"worker-{victim}" / TRASH
    shutil.rmtree(trash, ignore_errors=True)
    trash.write_bytes(b"")  # a file where the trash folder goes: the history cannot be moved into it
    code, details, _ = _outcome(lambda: client.delete_stream("gw-cam"))
    assert code == "INTERNAL" and "could not be deleted from the disk" in details, (code, details)
    assert "retry DeleteStream once the volume is fixed" in details and str(data_dir) not in details
    assert replay(stream_dir).clusters == on_disk and store.get_stream("gw-cam") is not None
    assert _outcome(lambda: client.get_stream("gw-cam"))[0] == "FAILED_PRECONDITION"  # still placed, still gone
    trash.unlink()  # the volume is fixed: the retry deletes it all

    code, details, num_deleted = _outcome(lambda: client.delete_stream("gw-cam"))
    assert (code, details) == ("OK", "")
    assert num_deleted == len(on_disk) > 0
    assert not stream_dir.exists()
    assert (data_dir / f"worker-{victim}" / "gw-far").is_dir()  # the other stream of the gone worker is kept
    retired = json.loads((data_dir / ".retired" / "gw-cam.json").read_text())
    assert retired["next_cluster_number"] >= len(on_disk) and retired["next_frame_index"] >= 16
    assert store.get_stream("gw-cam") is None
    assert store.list_clusters("gw-cam") == []
    assert _outcome(lambda: client.get_stream("gw-cam"))[0] == "NOT_FOUND"

    coordinator = server.server.coordinator
    coordinator.data_dir = str(data_dir / "not-mounted")  # as a Helm release's router, which does not mount it
    try:
        assert client.delete_stream("gw-far") == 0  # by the live worker, which shares the data directory
    finally:
        coordinator.data_dir = str(data_dir)
    assert not (data_dir / f"worker-{victim}" / "gw-far").exists()
    assert store.get_stream("gw-far") is None
    assert [s.stream_id for s in client.list_streams()] == ["gw-keep"]  # the gone worker holds nothing now

    again = client.create_stream("gw-cam", fps=FPS)
    assert int(again.worker_id) != victim
    wait_for(lambda: store.get_stream("gw-cam") is not None, timeout_s=30, what="the new stream's record in Redis")
    assert sorted(s.stream_id for s in client.list_streams()) == ["gw-cam", "gw-keep"]
    client.delete_stream("gw-cam")
