"""Starting Ray: ``init_ray`` starts (or joins) it with ``ray_init_options``, which keep a local cluster as private
as the service. The router (``MosaicServer.start_ray``) and ``services.cli.start_ray`` both start Ray through here.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import ray

from services.config import ServiceConfig

log = logging.getLogger(__name__)
RAY_AUTH_ENV = "RAY_AUTH_MODE"
LOOPBACK = "127.0.0.1"


def init_ray(config: ServiceConfig, **overrides) -> None:
    """Starts (or joins) Ray for ``config`` with ``ray_init_options``, bound to loopback when the host is."""
    options = ray_init_options(config, **overrides)
    if options.get("_node_ip_address") != LOOPBACK:
        return ray.init(**options)
    # Ray replaces a 127.0.0.1 node address by the machine's routable one (so other nodes can reach it) unless
    # it runs as a single-machine cluster, which a private constant decides; the address becomes the one every
    # Ray process binds to. Set for this call only.
    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - a Ray without it binds where it likes; say so
        log.warning("this Ray cannot be bound to loopback; its ports may listen on every interface")
        return ray.init(**options)
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(**options)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def ray_init_options(config: ServiceConfig, **overrides) -> dict:
    """Keyword arguments for ``ray.init`` that keep a local Ray cluster as private as the service.

    - Ray's processes (gcs_server, raylet, dashboard agent, workers) bind to the service's host when it is a
      loopback address, so ``--host 127.0.0.1`` exposes no Ray port beyond this machine.
    - The dashboard is off unless ``ray_dashboard`` is set; then it listens on loopback only.
    - Ray's token authentication stays on: a new local cluster turns it on by itself unless ``RAY_AUTH_MODE``
      says otherwise (setting the variable here would not reach Ray's already-loaded config), so this only
      warns when an operator turned it off.

    ``overrides`` win (e.g. ``num_cpus``, ``log_to_driver``). Joining a cluster (``ray_address``) only passes
    the address: that cluster's own settings decide where it listens.
    """
    if config.ray_address != "local":
        return {"address": config.ray_address, **overrides}
    if os.environ.get(RAY_AUTH_ENV, "").lower() not in ("", "token"):
        log.warning("%s=%s turns off Ray's token authentication", RAY_AUTH_ENV, os.environ[RAY_AUTH_ENV])
    dashboard = config.ray_dashboard
    num_cpus = config.ray_num_cpus or os.cpu_count()
    # A whole float (the config's 8.0) reaches the raylet as --maximum_startup_concurrency=8.0 when the machine
    # has more cores, which the raylet cannot parse: it exits at once and ray.init times out.
    num_cpus = int(num_cpus) if float(num_cpus).is_integer() else num_cpus
    options: dict = {"num_cpus": num_cpus, "include_dashboard": dashboard}
    if dashboard:
        options["dashboard_host"] = LOOPBACK
    if is_loopback(config.host):
        options["_node_ip_address"] = LOOPBACK
    return {**options, **overrides}


def is_loopback(host: str) -> bool:
    """Whether gRPC binds ``host`` to loopback only: a loopback address (an IPv4-mapped one included) or the name
    ``localhost`` in any case, as the resolver reads it."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower() == "localhost"
    return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback
