"""A ``MosaicServer`` on its own event loop in a background thread, for ``mosaic demo`` and the tests.

The caller keeps its own thread (and blocking gRPC client); ``start``/``stop`` block until done.
"""

from __future__ import annotations

import asyncio
import threading

from services.config import ServiceConfig
from services.router import MosaicServer


class ServerThread:
    """Runs one server in a daemon thread.

    Args:
        config: service settings; use port 0 for free ports and read ``target``/``metrics_url`` after start.
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.server = MosaicServer(config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mosaic-server", daemon=True)

    def start(self, timeout_s: float = 300.0) -> ServerThread:
        self._thread.start()
        try:
            self.run(self.server.start(), timeout_s)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def run(self, coro, timeout_s: float = 60.0):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def stop(self, timeout_s: float = 60.0, *, grace_s: float | None = None) -> None:
        try:
            self.run(self.server.stop(grace_s), timeout_s)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def target(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"{host}:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.server.metrics_port}/metrics"

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
