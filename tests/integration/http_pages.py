"""A loopback HTTP server for source tests: one body for every GET, the paths asked for recorded."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def serving(
    body: bytes, content_type: str = "application/octet-stream", requests: list[str] | None = None
) -> Iterator[str]:
    """Answers every GET with ``body`` (status 200), appending its path to ``requests`` when given; yields the
    server's ``http://127.0.0.1:PORT`` and stops it after."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if requests is not None:
                requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
