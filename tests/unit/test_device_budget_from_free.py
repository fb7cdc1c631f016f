"""A device budget sized from free GPU memory: the share, less the workspace, never under the configured floor."""

from __future__ import annotations

import pytest

from mosaic_core.config import BUDGET_WORKSPACE_BYTES, GIB, TOWER_STREAM_WORKSPACE_BYTES, device_budget_from_free
from mosaic_core.errors import ConfigError


def test_the_budget_is_the_share_of_free_memory_less_the_workspace():
    # the H200 with the 7B model loaded: about 125 GiB free
    assert device_budget_from_free(125 * GIB, share=0.8, floor_bytes=GIB) == 100 * GIB - BUDGET_WORKSPACE_BYTES


def test_the_tower_on_a_stream_of_its_own_leaves_out_its_pool_too():
    budget = device_budget_from_free(125 * GIB, share=0.8, floor_bytes=GIB, tower_stream=True)
    assert budget == 100 * GIB - BUDGET_WORKSPACE_BYTES - TOWER_STREAM_WORKSPACE_BYTES


def test_a_configured_budget_larger_than_the_share_is_kept():
    assert device_budget_from_free(10 * GIB, share=0.5, floor_bytes=8 * GIB) == 8 * GIB


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        device_budget_from_free(10 * GIB, share=share, floor_bytes=GIB)
