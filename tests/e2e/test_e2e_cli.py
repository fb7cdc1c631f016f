"""The service commands as a user runs them: ``mosaic streams``/``query`` against the session server,
``mosaic demo`` from scratch, and ``mosaic serve`` shutting down on SIGTERM with health NOT_SERVING first."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_support import API_KEY, clip_frames, wait_for, wait_ingested

ROOT = Path(__file__).resolve().parents[2]
STREAM = "cli-cam"


def _mosaic(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mosaic_core.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )


@pytest.fixture(scope="module")
def cli_stream(client):
    client.create_stream(STREAM, fps=2.0)
    client.push_frames((STREAM, t, rgb) for t, rgb in clip_frames("bikes.mp4", fps=2.0, num_frames=8))
    wait_ingested(client, STREAM, 8)
    yield STREAM
    client.delete_stream(STREAM)


def test_streams_and_query_commands_talk_to_a_running_server(service, cli_stream):
    listed = _mosaic(
        "streams", "--target", service.target, "--tls-ca", service.tls_ca_path, "--api-key", API_KEY, timeout_s=60
    )
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith(STREAM))
    assert row.split()[4] == "8"  # ingested column

    asked = _mosaic(
        "query", STREAM, "--question", "What moved?", "--max-new-tokens", "3",
        "--target", service.target, "--tls-ca", service.tls_ca_path, "--api-key", API_KEY, timeout_s=60,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    assert "evidence:" in asked.stdout and f"#1 {STREAM}" in asked.stdout and "3 tokens" in asked.stdout

    refused = _mosaic(
        "streams", "--target", service.target, "--tls-ca", service.tls_ca_path, "--api-key", "wrong", timeout_s=60
    )
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_a_camera_added_pushed_asked_and_removed_from_the_command_line(service, client, tmp_path):
    from services.frames import encode_image

    flags = ("--target", service.target, "--tls-ca", service.tls_ca_path, "--api-key", API_KEY)
    for i, (_, rgb) in enumerate(clip_frames("bikes.mp4", fps=2.0, num_frames=6)):
        (tmp_path / f"{i:03d}.jpg").write_bytes(encode_image(rgb))

    added = _mosaic("streams", "add", "cli-pushed", "--push", "--fps", "2", *flags, timeout_s=60)
    assert added.returncode == 0, added.stderr
    assert "created stream cli-pushed" in added.stdout

    pushed = _mosaic("push", "cli-pushed", str(tmp_path), *flags, timeout_s=60)
    assert pushed.returncode == 0, pushed.stderr
    assert "6 accepted, 0 dropped, 0 rejected" in pushed.stdout
    wait_ingested(client, "cli-pushed", 6)

    shown = _mosaic("streams", "show", "cli-pushed", *flags, timeout_s=60)
    assert shown.returncode == 0, shown.stderr
    assert "6 received, 6 ingested" in shown.stdout and "source               push" in shown.stdout

    asked = _mosaic("query", "cli-pushed", "--question", "What moved?", "--max-new-tokens", "2", *flags, timeout_s=60)
    assert asked.returncode == 0, asked.stderr
    # pushed frames carry wall-clock timestamps: evidence shows stream seconds and the UTC time
    evidence = next(line for line in asked.stdout.splitlines() if line.strip().startswith("#1 cli-pushed"))
    assert "s (20" in evidence and "Z" in evidence, evidence

    (tmp_path / "unreadable.jpg").mkdir()  # read as a frame, it fails mid-call: the reason reaches the user
    broken = _mosaic("push", "cli-pushed", str(tmp_path), *flags, timeout_s=60)
    assert broken.returncode == 2, broken.stderr
    assert "cannot read" in broken.stderr and "unreadable.jpg" in broken.stderr and "UNKNOWN" not in broken.stderr

    removed = _mosaic("streams", "rm", "cli-pushed", *flags, timeout_s=60)
    assert removed.returncode == 0 and "deleted stream cli-pushed" in removed.stdout
    again = _mosaic("streams", "show", "cli-pushed", *flags, timeout_s=60)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr and "Traceback" not in again.stderr


def test_demo_runs_from_scratch_and_exits_cleanly():
    started = time.monotonic()
    result = _mosaic("demo", timeout_s=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "random weights" in out
    assert "ingest: cam-bikes" in out  # progress
    assert "Q (cam-bikes)" in out and "Q (all cameras)" in out
    assert "camera history is kept in" in out and "Token authentication" not in out + result.stderr
    assert out.count("evidence:") == 2 and "#1 cam-" in out
    for row in ("frames ingested", "questions ok", "mean time to first token", "workers up"):
        assert row in out
    assert out.rstrip().endswith("done.")
    history = Path(re.search(r"camera history is kept in (\S+) until the demo ends", out).group(1))
    assert history.name.startswith("mosaic-demo-") and not history.exists()  # its own folder, gone with it
    print(f"demo took {time.monotonic() - started:.0f}s")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_flips_health_to_not_serving_then_exits_on_sigterm(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "workers: 1\nray_num_cpus: 1\nshutdown_drain_s: 0.5\nshutdown_grace_s: 1\n"
        "engine:\n  target_tokens_per_frame: 16\n  local_window_tokens: 64\n  retrieval_budget_tokens: 128\n"
    )
    port, metrics_port = _free_port(), _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["serve", "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mosaic_core.cli", *args, "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                try:
                    request = health_pb2.HealthCheckRequest(service="mosaic.v1.Mosaic")
                    return stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    assert proc.poll() is None, proc.stdout.read()
                    return False

            wait_for(serving, timeout_s=300, interval_s=1.0, what="mosaic serve to become ready")
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="mosaic.v1.Mosaic"), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            statuses = []
            try:
                for update in watch:
                    statuses.append(update.status)
            except grpc.RpcError:
                pass  # the server closes the watch when it stops
            assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert f"gRPC 127.0.0.1:{port}" in out and "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
