"""Checks ``mosaic serve`` makes before it starts Ray: each problem is one sentence naming the thing and the fix.

Every check is cheap (a socket bind, one Redis PING with a one-second timeout, a few ``stat`` calls), so a
misconfigured server says what is wrong in well under two seconds instead of failing after Ray and the
workers have started.

    problems = preflight_problems(config)
    if problems: print each one, exit 2
"""

from __future__ import annotations

import errno
import glob
import os
import socket
import tempfile
from pathlib import Path

from mosaic_core.checks import model_problem
from services.config import ServiceConfig
from services.url_text import without_credentials

REDIS_TIMEOUT_S = 1.0


def preflight_problems(config: ServiceConfig) -> list[str]:
    """Every problem found, as sentences ending in a full stop; empty when the server may start."""
    checks = [
        _port_problem(config.host, config.grpc_port, "gRPC", "--grpc-port"),
        _port_problem(config.host, config.metrics_port, "metrics", "--metrics-port"),
        _port_problem(config.host, config.console_port, "console", "--console-port") if config.console else None,
        _same_port_problem(config),
        _redis_problem(config.redis_url) if config.redis_url else None,
        _model_problem(config.model),
        _device_problem(config),
        # Folders the workers use are checked only when the workers run here; a router that joins a Ray cluster
        # (Helm) does not mount them.
        *(_worker_folder_problems(config) if config.ray_address == "local" else ()),
        *(_file_problem(path, flag) for path, flag in ((config.tls_cert, "--tls-cert"), (config.tls_key, "--tls-key"))),
    ]
    return [problem for problem in checks if problem]


def port_in_use(host: str, port: int) -> OSError | None:
    """The error binding ``host:port`` gives, or ``None`` if it is free (the socket is closed again)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as servers do: a port whose old connections linger in TIME_WAIT is free to listen on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            return err
    return None


def _port_problem(host: str, port: int, what: str, flag: str) -> str | None:
    if port == 0:
        return None  # the server picks a free one
    err = port_in_use(host, port)
    if err is None:
        return None
    if err.errno == errno.EADDRINUSE:
        return (
            f"The {what} port {port} on {host} is already in use; stop what listens there or pass {flag} "
            "with a free port."
        )
    if err.errno == errno.EACCES:
        return f"The {what} port {port} on {host} needs root (it is below 1024); pass {flag} above 1023."
    return f"Cannot bind the {what} port {host}:{port} ({err.strerror}); check --host and {flag}."


def _same_port_problem(config: ServiceConfig) -> str | None:
    ports = [("--grpc-port", config.grpc_port), ("--metrics-port", config.metrics_port)]
    if config.console:
        ports.append(("--console-port", config.console_port))
    for i, (first, port) in enumerate(ports):
        for second, other in ports[i + 1 :]:
            if port and port == other:
                return f"{first} and {second} are both {port}; give them different ports."
    return None


def _redis_problem(url: str) -> str | None:
    """A sentence saying what is wrong with the Redis at ``url``, or None; it never holds the URL's credentials
    (the sentences go to stderr, and so to a pod's logs)."""
    import redis

    shown = without_credentials(url)
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
    except ValueError as err:
        reason = str(err).replace(url, shown)
        return f"--redis-url {shown!r} is not a Redis URL ({reason}); use redis://HOST:PORT/DB."
    try:
        client.ping()
    except redis.AuthenticationError:
        return (
            f"Redis at {shown} refused the credentials; put the right password in --redis-url "
            "(redis://:PASSWORD@HOST:PORT/DB)."
        )
    except redis.RedisError as err:
        # redis-py says "Error 111 connecting to HOST:PORT. Connection refused."; the last part is the reason
        reason = str(err).rstrip(".").split(". ")[-1] or type(err).__name__
        return f"Redis at {shown} does not answer ({reason}); start redis-server there or fix --redis-url."
    finally:
        client.close()
    return None


def _model_problem(model: str) -> str | None:
    problem = model_problem(model)
    if problem is None:
        return None
    return f"{problem[0].upper()}{problem[1:]}; pass --model with a preset name or a Qwen2.5-VL checkpoint directory."


def _device_problem(config: ServiceConfig) -> str | None:
    if config.worker_gpus <= 0 or config.ray_address != "local":
        return None  # a joined cluster's GPUs are on its own nodes; Ray places the workers there
    # No torch import (seconds): the NVIDIA driver exposes its GPUs under /proc and /dev.
    if glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"):
        return None
    return (
        f"--worker-gpus {config.worker_gpus:g} asks for GPUs, but this machine has no NVIDIA GPU driver; "
        "use --worker-gpus 0 to run the workers on the CPU."
    )


def _worker_folder_problems(config: ServiceConfig) -> list[str | None]:
    return [
        _dir_problem(config.data_dir, "data directory", "--data-dir"),
        _dir_problem(config.disk_dir, "disk-tier directory", "--disk-dir"),
        unserved_history_problem(config.data_dir, config.workers),
        *(_source_root_problem(root) for root in config.source_roots),
    ]


def unserved_history_problem(data_dir: str | None, workers: int) -> str | None:
    """Camera history kept for a worker past the configured count (``workers`` lowered since): no worker would
    restore it, so its cameras would be gone from the service without a word."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    unserved = {}  # worker index -> its folder's name
    for folder in sorted(Path(data_dir).glob("worker-*")):
        index = folder.name.removeprefix("worker-")
        if (
            index.isdigit()
            and int(index) >= workers
            and any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())
        ):
            unserved[int(index)] = folder.name
    if not unserved:
        return None
    return (
        f"The data directory {data_dir!r} holds camera history of {', '.join(unserved.values())}, which no worker "
        f"would serve with {workers} worker(s): pass --workers {max(unserved) + 1} or more (Helm: more "
        "ray.worker.replicas), or move those folders out of the data directory first."
    )


def _dir_problem(path: str | None, what: str, flag: str) -> str | None:
    if not path:
        return None
    directory = Path(path).expanduser()
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"The {what} {path!r} is not a directory ({str(existing)!r} is a file); pass {flag} with a directory."
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mosaic-preflight-"):
            pass
    except OSError as err:
        return f"The {what} {path!r} is not writable ({err.strerror}); fix its permissions or pass {flag} elsewhere."
    return None


def _source_root_problem(root: str) -> str | None:
    if os.path.isdir(root):
        return None
    return f"The source root {root!r} is not a directory; pass --source-root with a folder that holds the videos."


def _file_problem(path: str | None, flag: str) -> str | None:
    if not path or os.access(path, os.R_OK):
        return None
    return f"{flag} {path!r} cannot be read; check the path and its permissions."
