"""An IPv6 `--host` (`::1`, `::`) is bound as such: preflight accepts it, and the gRPC address puts it in brackets
(`[::1]:PORT`); before, gRPC read `::1:PORT` as another address and the router died at start, failing to bind."""

from __future__ import annotations

import asyncio
import socket

import pytest

from services.config import load_config
from services.preflight import preflight_problems
from services.router import MosaicServer
from services.scheduler import QueryQueue


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_grpc_binds_an_ipv6_host_that_preflight_accepts():
    config = load_config(None, host="::1", grpc_port=0, metrics_port=0)
    assert not [p for p in preflight_problems(config) if "port" in p]  # preflight: fine

    async def main():
        server = MosaicServer(config)
        queue = QueryQueue(max_waiting=1, max_running=1, on_depth=lambda *_: None)
        try:
            await server._start_grpc(queue)
            assert server.grpc_port > 0
        finally:
            if server._server is not None:
                await server._server.stop(0)

    asyncio.run(main())
