#!/usr/bin/env python3
"""gRPC health check for the Mosaic image: exit 0 when the server reports SERVING, 1 otherwise.

Used by the Dockerfile's HEALTHCHECK and, when TLS is on, by the Helm chart's exec probes (kubelet's native
gRPC probe cannot speak TLS). Installed in the image as ``mosaic-healthcheck``. It needs only grpcio and
grpcio-health-checking, both in the ``service`` extra, and reads no API key: health is unauthenticated.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the health check."""
    parser = argparse.ArgumentParser(prog="mosaic-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port (default: %(default)s)")
    parser.add_argument("--service", default="", help='service name to ask about; "" is the whole server')
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call in seconds")
    parser.add_argument("--tls-ca", help="PEM CA bundle; switches to TLS")
    parser.add_argument("--tls-server-name", help="name expected in the server certificate (TLS only)")
    return parser


def check(
    *,
    host: str,
    port: int,
    service: str = "",
    timeout_s: float = 3.0,
    tls_ca_pem: bytes | None = None,
    tls_server_name: str | None = None,
) -> str:
    """Asks grpc.health.v1 about ``service`` and returns the status name (``SERVING``, ``NOT_SERVING``, ...).

    Raises:
        grpc.RpcError: the server could not be reached or does not know the service.
    """
    target = f"{host}:{port}"
    if tls_ca_pem is None:
        channel = grpc.insecure_channel(target)
    else:
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca_pem)
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tls_ca_pem = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            tls_ca_pem = f.read()
    try:
        status = check(
            host=args.host,
            port=args.port,
            service=args.service,
            timeout_s=args.timeout_s,
            tls_ca_pem=tls_ca_pem,
            tls_server_name=args.tls_server_name,
        )
    except grpc.RpcError as e:
        print(f"unhealthy: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
