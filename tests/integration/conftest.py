"""Integration fixtures: real services on loopback, started once per session and stopped at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REDIS_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(slots=True, frozen=True)
class RedisServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"


def _wait_for_redis(proc: subprocess.Popen, server: RedisServer, log_path: Path) -> None:
    import redis

    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    client = redis.Redis(host=server.host, port=server.port, socket_timeout=1.0)
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer PING within {REDIS_START_TIMEOUT_S}s")
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, without persistence; killed at session end."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not found on PATH (Debian: apt-get install redis-server)")
    workdir = tmp_path_factory.mktemp("redis")
    log_path = workdir / "redis.log"
    server = RedisServer(host="127.0.0.1", port=free_port())
    args = [binary, "--bind", server.host, "--port", str(server.port), "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), "--daemonize", "no", "--logfile", str(log_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for_redis(proc, server, log_path)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[object]:
    """A ``redis.Redis`` (decode_responses=True) on the session server."""
    import redis

    client = redis.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def frozen_redis(redis_client) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``with frozen_redis():`` stops the session's redis-server (SIGSTOP, by its PID) for the block's length; it is
    always woken again."""
    pid = int(redis_client.info("server")["process_id"])

    @contextlib.contextmanager
    def frozen() -> Iterator[None]:
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    return frozen


@pytest.fixture
def redis_namespace(redis_client) -> Iterator[str]:
    """A fresh key namespace per test; its keys are deleted afterwards so tests never see each other."""
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    yield namespace
    stale = list(redis_client.scan_iter(match=f"{namespace}:*", count=1000))
    if stale:
        redis_client.delete(*stale)
