"""Service subcommands of ``mosaic``: ``serve``, ``demo``, ``streams`` and ``query``.

``mosaic_core.cli`` imports this module lazily and calls ``add_service_commands(subparsers)``; each command
sets ``func(args) -> int`` (the exit code). Flags left unset fall back to ``--config`` YAML, then the
environment (``MOSAIC_API_KEY``, ``MOSAIC_REDIS_URL``), then the defaults in ``services.config``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import grpc

from services.client import MosaicClient
from services.config import API_KEY_ENV, load_config
from services.demo import add_demo_command

DEFAULT_TARGET = "127.0.0.1:50051"
_SERVE_FLAGS = (
    # (flag, type, help)
    ("--host", str, "address to bind (default 0.0.0.0)"),
    ("--grpc-port", int, "gRPC port (default 50051; 0 picks a free one)"),
    ("--metrics-port", int, "Prometheus /metrics port (default 9464)"),
    ("--ray-address", str, "'local' starts Ray here (default), 'auto' joins a running one, or ray://host:port"),
    ("--redis-url", str, "metadata in Redis (redis://host:port/db); default: in memory"),
    ("--model", str, "preset (tiny, qwen2.5-vl-7b) or checkpoint directory (default tiny)"),
    ("--workers", int, "worker actors (default 1)"),
    ("--worker-gpus", float, "GPUs per worker (default 0: CPU)"),
    ("--device-budget-bytes", int, "device KV budget per worker"),
    ("--host-budget-bytes", int, "host KV budget per worker"),
    ("--disk-dir", str, "directory of the disk tier"),
    ("--disk-budget-bytes", int, "disk KV budget per worker (0: no disk tier)"),
    ("--mode", str, "retrieval mode: full, token or cluster (default cluster)"),
    ("--api-key", str, f"require this key in x-api-key (or set {API_KEY_ENV})"),
    ("--tls-cert", str, "PEM certificate chain; enables TLS with --tls-key"),
    ("--tls-key", str, "PEM private key"),
    ("--max-message-bytes", int, "largest gRPC message (default 16 MiB)"),
    ("--query-queue-size", int, "questions that may wait before RESOURCE_EXHAUSTED (default 64)"),
    ("--ingest-queue-frames", int, "frames queued per stream before the oldest is dropped (default 32)"),
)


def add_service_commands(subparsers) -> None:
    """Registers ``serve``, ``demo``, ``streams`` and ``query`` on ``mosaic``'s subparsers."""
    serve = subparsers.add_parser("serve", help="run the gRPC service (router + Ray workers)")
    for flag, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, type=kind, default=None, help=text)
    serve.add_argument("--config", default=None, help="YAML file with serve options (flags win)")
    serve.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    serve.set_defaults(func=run_serve)

    add_demo_command(subparsers)

    streams = subparsers.add_parser("streams", help="list the streams of a running server")
    _add_client_flags(streams)
    streams.set_defaults(func=run_streams)

    query = subparsers.add_parser("query", help="ask a running server about one, several or all streams")
    query.add_argument("streams", nargs="*", metavar="STREAM", help="stream ids (none: every stream)")
    query.add_argument("--question", required=True)
    query.add_argument("--max-new-tokens", type=int, default=0, help="0: the server default")
    query.add_argument("--start-s", type=float, default=None, help="time range start (stream clock)")
    query.add_argument("--end-s", type=float, default=None, help="time range end (stream clock)")
    query.add_argument("--timeout-s", type=float, default=120.0, help="deadline of the question")
    _add_client_flags(query)
    query.set_defaults(func=run_query)


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="server host:port (default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"API key (default: ${API_KEY_ENV})")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle; connects with TLS")


def _client(args) -> MosaicClient:
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return MosaicClient(args.target, api_key=args.api_key, root_certificates=ca)


def run_serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in _SERVE_FLAGS}
    config = load_config(args.config, **overrides)

    def ready(server) -> None:
        print(
            f"mosaic serving: gRPC {config.host}:{server.grpc_port} ({'TLS' if config.tls_cert else 'plaintext'}"
            f"{', API key required' if config.api_key else ''}), metrics http://{config.host}:"
            f"{server.metrics_port}/metrics, {config.workers} worker(s), model {config.model}, mode {config.mode}",
            flush=True,
        )

    # Ray's crash handler would catch SIGTERM in this (driver) process, print a stack and abort; the service
    # handles SIGTERM itself to drain calls, so the handler stays off here unless the operator sets it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    from services.router import serve  # imports ray; kept out of the client commands' start-up

    return asyncio.run(serve(config, on_ready=ready))


def run_streams(args) -> int:
    try:
        with _client(args) as client:
            streams = client.list_streams()
    except grpc.RpcError as err:
        return _rpc_failed(err)
    header = ("stream", "worker", "fps", "received", "ingested", "dropped", "clusters")
    print("{:<20} {:>6} {:>5} {:>9} {:>9} {:>8} {:>9}  source".format(*header))
    for s in streams:
        st = s.stats
        source = s.source_url if s.HasField("source_url") else "push"
        print(
            f"{s.stream_id:<20} {s.worker_id:>6} {s.fps:>5g} {st.frames_received:>9} {st.frames_ingested:>9} "
            f"{st.frames_dropped:>8} {st.num_clusters:>9}  {source}"
        )
    if not streams:
        print("(no streams)")
    return 0


def run_query(args) -> int:
    if (args.start_s is None) != (args.end_s is None):
        print("error: give both --start-s and --end-s, or neither", file=sys.stderr)
        return 2
    time_range = None if args.start_s is None else (args.start_s, args.end_s)
    try:
        with _client(args) as client:
            events = client.query(
                args.question,
                args.streams,
                max_new_tokens=args.max_new_tokens,
                time_range=time_range,
                timeout_s=args.timeout_s,
            )
            for event in events:
                _print_event(event)
    except grpc.RpcError as err:
        return _rpc_failed(err)
    return 0


def _print_event(event) -> None:
    kind = event.WhichOneof("event")
    if kind == "token":
        print(event.token.text, end="", flush=True)
    elif kind == "evidence":
        print("\nevidence:")
        for s in event.evidence.spans:
            print(f"  #{s.rank} {s.stream_id} {s.start_s:.2f}s-{s.end_s:.2f}s score {s.score:.3f} ({s.cluster_id})")
    elif kind == "timings":
        t = event.timings
        print(
            f"timings: first token {t.time_to_first_token_s * 1000:.0f} ms, decode {t.decode_s * 1000:.0f} ms, "
            f"{t.num_tokens} tokens, queue {t.queue_s * 1000:.0f} ms, {t.bytes_fetched} bytes fetched"
        )


def _rpc_failed(err: grpc.RpcError) -> int:
    print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
    return 1
