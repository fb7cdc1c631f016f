"""End-to-end fixtures: real local Ray (started once per session), real redis-server, the real gRPC server on
loopback with two worker actors, TLS (a self-signed certificate made with openssl) and an API key, and a
client. Everything is torn down at the end of the session.

The server is shared by every e2e test (building two engines is the slow part); tests use their own stream
ids so they do not see each other.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from service_support import API_KEY, NAMESPACE, connect

# The integration suite's session fixture: a real redis-server on a free loopback port.
from tests.integration.conftest import redis_server  # noqa: F401


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert path, key path)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; the e2e server runs with TLS")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="session")
def service(ray_cluster, redis_server, tls_files, tmp_path_factory):  # noqa: F811 - the imported fixture
    from mosaic_core.config import MIB
    from mosaic_core.model.video import sample_clip_path
    from services.config import load_config
    from services.embedded import ServerThread

    config = load_config(
        None,
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        workers=2,
        worker_cpus=0.5,
        redis_url=redis_server.url,
        redis_namespace=NAMESPACE,
        api_key=API_KEY,
        console=True,  # the console's browser test shares this server
        console_port=0,
        tls_cert=tls_files[0],
        tls_key=tls_files[1],
        device_budget_bytes=2 * MIB,
        host_budget_bytes=1 * MIB,
        disk_budget_bytes=32 * MIB,
        disk_dir=str(tmp_path_factory.mktemp("kv-disk")),
        data_dir=str(tmp_path_factory.mktemp("history")),
        source_roots=[os.path.dirname(sample_clip_path("bikes.mp4"))],  # the sample clips, as `mosaic demo` does
        ingest_queue_frames=32,
        ingest_headroom=0.0,  # tests here create streams at whatever fps they need; admission has its own test
        max_batch_frames=8,
        query_queue_size=3,
        query_concurrency=2,
        max_push_calls=3,
        telemetry_interval_s=0.25,
        shutdown_grace_s=1.0,
        shutdown_drain_s=0.2,
        engine={"target_tokens_per_frame": 16, "local_window_tokens": 64, "retrieval_budget_tokens": 128},
    )
    server = ServerThread(config).start(timeout_s=400)
    server.tls_ca_path = tls_files[0]  # clients trust the self-signed certificate
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(service):
    with connect(service, api_key=API_KEY) as client:
        yield client


@pytest.fixture(scope="session")
def redis(redis_server):  # noqa: F811
    import redis as redis_lib

    client = redis_lib.Redis(host=redis_server.host, port=redis_server.port, decode_responses=True)
    yield client
    client.close()
