"""The options ``mosaic serve`` starts Ray with: a whole CPU count reaches Ray as an int.

The config holds ``ray_num_cpus`` as a float; Ray turns ``min(cores, num_cpus)`` into the raylet's
``--maximum_startup_concurrency`` flag, so ``8.0`` on a machine of more than 8 cores became ``=8.0``, which the
raylet refuses: it exited at once and ``ray.init`` timed out (seen on a 16-core GPU machine).
"""

from __future__ import annotations

import pytest

pytest.importorskip("ray")


@pytest.mark.parametrize(("ray_num_cpus", "expected"), [(8.0, 8), (2, 2), (1.5, 1.5)])
def test_a_whole_cpu_count_is_an_int(ray_num_cpus, expected):
    from services.config import ServiceConfig
    from services.ray_setup import ray_init_options

    num_cpus = ray_init_options(ServiceConfig(ray_num_cpus=ray_num_cpus))["num_cpus"]
    assert num_cpus == expected and type(num_cpus) is type(expected)


def test_the_default_is_the_machines_core_count():
    import os

    from services.config import ServiceConfig
    from services.ray_setup import ray_init_options

    assert ray_init_options(ServiceConfig())["num_cpus"] == os.cpu_count()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "LOCALHOST", "::ffff:127.0.0.1"])
def test_a_loopback_host_in_any_spelling_keeps_ray_on_loopback(host):
    """gRPC binds ``--host LOCALHOST`` to loopback (a name is read in any case) and ``::ffff:127.0.0.1`` to the
    IPv4-mapped loopback: Ray must then stay on loopback too, or its ports listen on every interface while the
    service's own listen on loopback only (docs/security.md)."""
    from services.config import ServiceConfig
    from services.ray_setup import LOOPBACK, ray_init_options

    assert ray_init_options(ServiceConfig(host=host)).get("_node_ip_address") == LOOPBACK


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "localhost.example.com"])
def test_a_host_that_is_not_loopback_leaves_ray_its_address(host):
    from services.config import ServiceConfig
    from services.ray_setup import ray_init_options

    assert "_node_ip_address" not in ray_init_options(ServiceConfig(host=host))
