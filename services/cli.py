"""Service subcommands of ``mosaic``: ``serve``, ``demo``, ``streams`` (``add``/``rm``/``show``), ``push``, ``query``,
``watch`` (``create``/``list``/``delete``/``tail``, in ``cli_watches``).

``mosaic_core.cli`` imports this module lazily and calls ``add_service_commands(subparsers)``; each command
sets ``func(args) -> int`` (the exit code). Flags left unset fall back to ``--config`` YAML, then the
environment (``MOSAIC_API_KEY``, ``MOSAIC_REDIS_URL``), then the defaults in ``services.config``.

Only argparse is imported at module level: gRPC, Ray, pydantic and the engine are imported by the command
that runs, so ``mosaic --help`` and every ``mosaic CMD --help`` answer at once.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from mosaic_core.cli import count, positive_float
from mosaic_core.terminal import escape_for_terminal, format_span
from services.cli_evidence import add_save_evidence_flag, save_evidence_files
from services.cli_streams import add_client_flags, add_push_command, add_streams_command, client_command, open_client
from services.cli_watches import add_watch_command
from services.demo import add_demo_command

# services.config.API_KEY_ENV, spelled out so that --help does not import pydantic
API_KEY_ENV = "MOSAIC_API_KEY"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SERVE_FLAGS = (
    # (flag, type, help)
    ("--host", str, "address to bind (default 127.0.0.1; 0.0.0.0: every interface)"),
    ("--grpc-port", int, "gRPC port (default 50051; 0 picks a free one)"),
    ("--metrics-port", int, "Prometheus /metrics port (default 9464)"),
    ("--ray-address", str, "'local' starts Ray here (default), 'auto' joins a running one, or ray://host:port"),
    ("--redis-url", str, "metadata in Redis (redis://host:port/db); default: in memory"),
    ("--model", str, "preset (tiny, qwen2.5-vl-7b) or checkpoint directory (default tiny)"),
    ("--workers", int, "worker actors (default 1)"),
    ("--worker-gpus", float, "GPUs per worker (default 0: CPU)"),
    ("--device-budget-bytes", int, "device KV budget per worker"),
    (
        "--device-budget-share",
        float,
        "on a GPU, the device budget as a share of the memory free after the model loads",
    ),
    ("--host-budget-bytes", int, "host KV budget per worker"),
    ("--data-dir", str, "directory that keeps camera history durably, so it survives restarts"),
    ("--disk-dir", str, "directory of the disk tier"),
    ("--disk-budget-bytes", int, "disk KV budget per worker (0: no disk tier)"),
    ("--mode", str, "retrieval mode: full, token, frame or cluster (default cluster)"),
    ("--api-key", str, f"require this key in x-api-key (or set {API_KEY_ENV})"),
    ("--api-key-file", str, "require one of this file's keys (one a line; read again when it changes)"),
    ("--tls-cert", str, "PEM certificate chain; enables TLS with --tls-key"),
    ("--tls-key", str, "PEM private key"),
    ("--max-message-bytes", int, "largest gRPC message (default 16 MiB)"),
    ("--query-queue-size", int, "questions that may wait before RESOURCE_EXHAUSTED (default 64)"),
    ("--ingest-queue-frames", int, "frames queued per stream before the oldest is dropped (default 32)"),
    ("--console-port", int, "port of the operator console web page (default 8080; 0 picks a free one)"),
)
log = logging.getLogger("mosaic.serve")
# Between two "still starting" lines of ``mosaic serve``: a start that restores much history takes minutes, and the
# workers' own lines (the restore's progress) stay in Ray's session logs unless they are shown here.
STARTING_NOTE_S = 30.0


def add_service_commands(subparsers) -> None:
    """Registers ``serve``, ``demo``, ``streams``, ``push`` and ``query`` on ``mosaic``'s subparsers."""
    serve = subparsers.add_parser("serve", help="run the gRPC service (router + Ray workers)")
    for flag, kind, text in _SERVE_FLAGS:
        serve.add_argument(flag, type=kind, default=None, help=text)
    serve.add_argument(
        "--source-root",
        dest="source_roots",
        action="append",
        default=None,
        metavar="DIR",
        help="directory whose video files streams may use as --source (repeatable); files elsewhere are refused",
    )
    serve.add_argument(
        "--console",
        action="store_true",
        default=None,
        help="also serve the operator console, a web page on --console-port (docs/console.md)",
    )
    serve.add_argument("--config", default=None, help="YAML file with serve options (flags win)")
    serve.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="INFO: a line per start-up phase; DEBUG: also Ray's own log lines (default %(default)s)",
    )
    serve.set_defaults(func=run_serve)

    add_demo_command(subparsers)
    add_streams_command(subparsers)
    add_push_command(subparsers)
    add_watch_command(subparsers)

    query = subparsers.add_parser("query", help="ask a running server about one, several or all streams")
    query.add_argument("streams", nargs="*", metavar="STREAM", help="stream ids (none: every stream)")
    query.add_argument("--question", required=True)
    query.add_argument("--max-new-tokens", type=count, default=0, help="0: the server default")
    query.add_argument("--start-s", type=float, default=None, help="time range start (stream clock)")
    query.add_argument("--end-s", type=float, default=None, help="time range end (stream clock)")
    query.add_argument("--timeout-s", type=positive_float, default=120.0, help="deadline of the question")
    add_save_evidence_flag(query)
    add_client_flags(query)
    query.set_defaults(func=run_query)


# -- serve ----------------------------------------------------------------------------------------------------


def run_serve(args) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    config = _preflighted_config(args)
    if config is None:
        return 2
    log.info("preflight passed after %.1fs; loading Ray, gRPC and the engine's modules ...", time.monotonic() - started)
    return _serve_on_ray(config, debug=args.log_level == "DEBUG", started=started)


def _preflighted_config(args):
    """The service config from ``--config`` and the serve flags once it passed preflight, or None once the reasons
    it cannot serve are printed."""
    from services.config import ServiceConfig, load_config
    from services.preflight import preflight_problems

    overrides = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in _SERVE_FLAGS}
    if args.source_roots is not None:
        if "source_roots" not in ServiceConfig.model_fields:
            print(
                "error: this build's service config has no source_roots yet, so --source-root cannot be used.",
                file=sys.stderr,
            )
            return None
        overrides["source_roots"] = [str(Path(root).expanduser().resolve()) for root in args.source_roots]
    overrides["console"] = args.console
    config = load_config(args.config, **overrides)  # a ConfigError is one sentence, exit 2 (mosaic_core.cli)

    log.info("preflight: ports, Redis, model, device and directories")
    problems = preflight_problems(config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return None if problems else config


def _say_ready(server, config, *, host: str, started: float) -> None:
    log.info("ready after %.1fs", time.monotonic() - started)
    print(
        f"mosaic serving: gRPC {host}:{server.grpc_port} ({'TLS' if config.tls_cert else 'plaintext'}"
        f"{', API key required' if config.api_key or config.api_key_file else ''}), metrics http://{host}:"
        f"{server.metrics_port}/metrics, {config.workers} worker(s), model {config.model}, mode {config.mode}",
        flush=True,
    )
    if server.console_port:
        scheme = "https" if config.tls_cert else "http"
        print(f"mosaic console: {scheme}://{host}:{server.console_port}/", flush=True)


def _serve_on_ray(config, *, debug: bool, started: float) -> int:
    """Starts Ray and serves until the router stops, saying while the workers start and once it is ready."""
    from services.url_text import host_in_address

    host = host_in_address(config.host)
    # Ray's crash handler would catch SIGTERM in this (driver) process, print a stack and abort; the service
    # handles SIGTERM itself to drain calls, so the handler stays off here unless the operator sets it.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    import asyncio

    import ray

    from services.router import serve  # imports ray; kept out of the client commands' start-up

    to_driver = config.ray_log_to_driver if "ray_log_to_driver" in config.model_fields_set else debug
    log.info("starting Ray (%s) ...", config.ray_address)
    ray_started = time.monotonic()
    ray_log = start_ray(config, debug=debug, log_to_driver=to_driver)
    log.info("Ray is up after %.1fs; %s", time.monotonic() - ray_started, ray_log)
    log.info(
        "starting the router, the metadata store and %d worker(s) (each builds an engine with model %s; "
        "this is the slow part) ...",
        config.workers,
        config.model,
    )

    async def serve_saying_while_starting() -> int:
        starting = asyncio.create_task(say_while_starting(config, workers_log_here=to_driver))

        def on_ready(server) -> None:
            starting.cancel()
            _say_ready(server, config, host=host, started=started)

        try:
            return await serve(config, on_ready=on_ready)
        finally:
            starting.cancel()

    try:
        return asyncio.run(serve_saying_while_starting())
    finally:
        ray.shutdown()


async def say_while_starting(config, *, workers_log_here: bool) -> None:
    """Logs every ``STARTING_NOTE_S`` that the workers are still starting, and how long they may take, until
    cancelled (once the server serves, or stops)."""
    import asyncio

    started = time.monotonic()
    where = "their lines here" if workers_log_here else "their lines in Ray's session logs (named above)"
    while True:
        await asyncio.sleep(STARTING_NOTE_S)
        log.info(
            "still starting after %.0fs: %d worker(s) build their engines and restore their streams from the data "
            "directory, each waited for while it makes progress (none for worker_start_timeout_s=%gs fails the "
            "start); %s show the restore's progress",
            time.monotonic() - started, config.workers, config.worker_start_timeout_s, where,
        )  # fmt: skip


def start_ray(config, *, debug: bool, log_to_driver: bool, show_flag: str = "--log-level DEBUG") -> str:
    """Starts or joins Ray for ``config`` in this process; returns a sentence saying where Ray's log lines go.

    Unless ``debug``, the driver's own Ray lines (start-up, the token-auth notice) go to a file and the
    workers' lines stay in Ray's session logs, so the terminal shows Mosaic's lines only.
    """
    import ray

    ray_logger = logging.getLogger("ray")
    driver_log = handler = None
    if not debug:
        driver_log = Path(tempfile.gettempdir()) / "ray" / f"mosaic-driver-{os.getpid()}.log"
        driver_log.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(driver_log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # ray.init clears the "ray" logger's handlers when it does not configure logging, so its own start-up
        # lines (from ray._private.*) are caught one level down, and "ray" gets the file again afterwards.
        for name in ("ray", "ray._private"):
            logging.getLogger(name).handlers = [handler]
            logging.getLogger(name).propagate = False
            logging.getLogger(name).setLevel(logging.INFO)
    from services.ray_setup import init_ray  # binds Ray to loopback with a loopback --host, dashboard off

    init_ray(config, log_to_driver=log_to_driver, configure_logging=debug)
    if driver_log is not None:
        ray_logger.handlers = [handler]
    try:
        session_logs = ray._private.worker._global_node.get_logs_dir_path()
    except AttributeError:  # a private path; only the message depends on it
        session_logs = "Ray's session directory"
    if driver_log is None:
        return f"Ray's lines are shown here; its session logs are in {session_logs}"
    return f"Ray's own log lines go to {driver_log} and {session_logs} ({show_flag} shows them here)"


# -- query ----------------------------------------------------------------------------------------------------


@client_command
def run_query(args) -> int:
    if (args.start_s is None) != (args.end_s is None):
        print("error: give both --start-s and --end-s, or neither.", file=sys.stderr)
        return 2
    time_range = None if args.start_s is None else (args.start_s, args.end_s)
    with open_client(args) as client:
        events = client.query(
            args.question,
            args.streams,
            max_new_tokens=args.max_new_tokens,
            time_range=time_range,
            timeout_s=args.timeout_s,
        )
        spans = []
        for event in events:
            print_event(event, client)
            if event.WhichOneof("event") == "evidence":
                spans = list(event.evidence.spans)
        if args.save_evidence is not None:
            return save_evidence_files(client, spans, args.save_evidence)
    return 0


def print_event(event, client, *, indent: str = "") -> None:
    """Prints one ``QueryEvent``: token text escaped for the terminal, evidence with readable times."""
    kind = event.WhichOneof("event")
    if kind == "token":
        text = event.token.text
        if event.token.token_ids:  # model text is escaped; the server's per-camera headers keep their newlines
            text = escape_for_terminal(text)
        print(text, end="", flush=True)
    elif kind == "evidence":
        print(f"\n{indent}evidence:")
        starts = stream_starts(client, {s.stream_id for s in event.evidence.spans})
        for s in event.evidence.spans:
            span = format_span(s.start_s, s.end_s, stream_start_s=starts.get(s.stream_id))
            print(f"{indent}  #{s.rank} {s.stream_id} {span} score {s.score:.3f} ({s.cluster_id})")
    elif kind == "timings":
        t = event.timings
        print(
            f"{indent}timings: queue {t.queue_s * 1000:.1f} ms, first token {t.time_to_first_token_s * 1000:.0f} ms "
            f"(of it waiting for the engine {t.start_wait_s * 1000:.0f} ms, prefill "
            f"{t.engine_first_token_s * 1000:.0f} ms, between router and worker {t.transport_s * 1000:.0f} ms), "
            f"decode {t.decode_s * 1000:.0f} ms, {t.num_tokens} tokens, "
            f"{t.bytes_fetched} bytes fetched"
        )


def stream_starts(client, stream_ids: set[str]) -> dict[str, float]:
    """First frame timestamp of each stream (to show live streams' evidence in seconds since they started)."""
    import grpc

    try:
        streams = client.list_streams()
    except grpc.RpcError:
        return {}  # only the display depends on it
    return {
        s.stream_id: s.stats.first_timestamp_s
        for s in streams
        if s.stream_id in stream_ids and s.stats.HasField("first_timestamp_s")
    }
