"""Redis and ``mosaic serve`` as child processes on loopback, for benchmarks that kill, freeze or soak them.

Every wait is bounded; processes are stopped by PID. Used by ``mosaic bench faults``, ``mosaic bench soak`` and
``mosaic bench service``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mosaic_core.durable.manifest import replay

# Below Linux's ephemeral range (32768 and up), which the kernel hands to every later bind to port 0, and above the
# ports Ray's workers take (10002-19999): a port picked from the ephemeral range could be given to Ray, which starts
# inside ``mosaic serve`` before its gRPC server binds (it was, once, in CI).
PICKED_PORTS = range(20000, 32768)


def free_port() -> int:
    """A loopback port free now, from ``PICKED_PORTS``."""
    for port in random.sample(PICKED_PORTS, 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port among 64 tried in {PICKED_PORTS.start}-{PICKED_PORTS.stop - 1}")


def wait_until(predicate, timeout_s: float, interval_s: float = 0.25):
    """Polls ``predicate`` until it returns a truthy value (returned) or ``timeout_s`` passes (None)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    return None


def stop_services_on_sigterm() -> None:
    """Makes SIGTERM (``timeout``'s, a job runner's) end this process as Ctrl-C does, through its ``finally``
    blocks, so the redis-server and ``mosaic serve`` it started stop with it. Python's default for SIGTERM exits at
    once, and they lived on, holding their ports and the GPU. Call from the main thread."""

    def _exit(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


class LocalService:
    """A redis-server and a ``mosaic serve`` as child processes, on loopback, sharing ``workdir``."""

    def __init__(self, workdir: Path, *, log_level: str = "INFO", **overrides) -> None:
        self.workdir = workdir
        self.log_level = log_level  # DEBUG also leaves Ray's logging to Ray (see services.cli.start_ray)
        self.overrides = overrides  # ServiceConfig fields over the defaults below
        self.data_dir = Path(overrides.get("data_dir", workdir / "data"))
        self.redis_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.redis: subprocess.Popen | None = None
        self.server: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start_redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (Debian package redis-server); it is needed here")
        args = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.redis = subprocess.Popen(args, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._redis_answers, 20):
            raise RuntimeError(f"redis-server did not start on port {self.redis_port}")

    def _redis_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start_server(self, timeout_s: float = 240.0) -> None:
        config = {
            "host": "127.0.0.1",
            "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port,
            "redis_url": f"redis://127.0.0.1:{self.redis_port}/0",
            "redis_namespace": "faults",
            "data_dir": str(self.data_dir),
            "model": "tiny",
            "workers": 1,
            "ray_num_cpus": 2,
            "ray_log_to_driver": False,
            "metadata_resync_interval_s": 2.0,
            "telemetry_interval_s": 0.5,
            # Maintenance merges would rename clusters on purpose; this benchmark counts renames as losses.
            "engine": {"target_tokens_per_frame": 16, "local_window_tokens": 64, "merge_min_questions": 1_000_000},
            **self.overrides,
        }
        path = self.workdir / "serve.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        log = (self.workdir / "serve.log").open("ab")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "mosaic_core.cli", "serve", "--config", str(path), "--log-level", self.log_level],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        if not wait_until(lambda: self.health() == "SERVING" or self.server.poll() is not None, timeout_s, 0.5):
            raise RuntimeError(f"mosaic serve was not ready in {timeout_s:.0f}s; its log ends:\n{self.log_tail()}")
        if self.server.poll() is not None:
            raise RuntimeError(f"mosaic serve exited with {self.server.returncode}; its log ends:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 40) -> str:
        """The end of serve.log: the benches delete their working folder, so a failure must carry it."""
        try:
            return "\n".join((self.workdir / "serve.log").read_text(errors="replace").splitlines()[-num_lines:])
        except OSError as err:
            return f"(serve.log unreadable: {err})"

    def stop_server(self, sig: int = signal.SIGTERM, timeout_s: float = 90.0) -> None:
        if self.server is None or self.server.poll() is not None:
            return
        self.server.send_signal(sig)
        try:
            self.server.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait(10)

    def stop(self) -> None:
        self.stop_server()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(10)

    def client(self):
        from services.client import MosaicClient

        return MosaicClient(self.target, timeout_s=15.0)

    def health(self) -> str:
        try:
            with self.client() as client:
                return client.health_status(timeout_s=2.0)
        except Exception:
            return "UNREACHABLE"

    def metric(self, name: str, labels: str) -> float | None:
        text = self.metrics_text()
        match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    def metrics_text(self) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=3) as response:
                return response.read().decode()
        except OSError:
            return ""

    def worker_pid(self) -> int | None:
        value = self.metric("mosaic_worker_pid", 'worker="0"')
        return int(value) if value else None

    def sealed(self, stream_id: str) -> dict[str, tuple]:
        """The stream's sealed clusters as its manifest records them: id -> (start, end, tokens, checksum)."""
        stream_dir = self.data_dir / "worker-0" / stream_id
        return {
            e.cluster_id: (e.start_s, e.end_s, e.num_tokens, e.checksum) for e in replay(stream_dir).clusters.values()
        }

    def redis_cluster_ids(self, stream_id: str) -> set[str] | None:
        from services.metadata.redis_store import RedisMetadataStore

        try:
            store = RedisMetadataStore.from_url(f"redis://127.0.0.1:{self.redis_port}/0", namespace="faults")
            try:
                return {m.cluster_id for m in store.list_clusters(stream_id)}
            finally:
                store.close()
        except Exception:
            return None
