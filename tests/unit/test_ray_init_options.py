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
