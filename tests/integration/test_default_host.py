"""A server started without ``--host`` listens on loopback only: its gRPC and metrics ports are not reachable from
another machine until an operator names an address (the image and the chart pass ``--host 0.0.0.0``). Before, the
default was ``0.0.0.0``, every interface, with no API key. The real router's gRPC and metrics servers; sockets read
with ``ss``."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from services.config import load_config
from services.router import MosaicServer
from services.scheduler import QueryQueue

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _listening_addresses(port: int) -> list[str]:
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()]


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) is not installed")
def test_a_server_without_a_host_listens_on_loopback_only():
    config = load_config(None, host=None, grpc_port=0, metrics_port=0)

    async def main() -> dict[str, list[str]]:
        server = MosaicServer(config)
        queue = QueryQueue(max_waiting=1, max_running=1, on_depth=lambda *_: None)
        metrics = server.metrics.start_http_server(config.metrics_port, addr=config.host)
        try:
            await server._start_grpc(queue)
            return {"grpc": _listening_addresses(server.grpc_port), "metrics": _listening_addresses(metrics.port)}
        finally:
            metrics.close()
            if server._server is not None:
                await server._server.stop(0)

    bound = asyncio.run(main())
    assert bound["grpc"] and bound["metrics"], bound
    assert set(bound["grpc"] + bound["metrics"]) <= LOOPBACK, f"listening beyond loopback: {bound}"
