"""The operator console (``mosaic serve --console``): a small web page served from the router's event loop.

``server.ConsoleServer`` is an aiohttp app that serves three static files from this package and a small JSON and
Server-Sent-Events API. Every API call is forwarded to the router's own gRPC server (over a private Unix socket),
so authentication, validation, status codes and metrics are exactly those of the gRPC API; ``convert`` turns the
protos into JSON and gRPC status codes into HTTP ones. docs/console.md describes the page and its security.
"""
