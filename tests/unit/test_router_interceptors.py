"""The router's interceptors: the API key check before the call limits, so a call without a valid key takes no
place, and the limits as configured, per client by API key only where keys are checked."""

from __future__ import annotations

import pytest

from services.auth import ApiKeyInterceptor
from services.call_limit import CallLimitInterceptor
from services.config import ServiceConfig
from services.metrics import MosaicMetrics
from services.request_log import RequestLogInterceptor
from services.router import interceptors


def test_the_key_is_checked_before_a_call_takes_a_place():
    cfg = ServiceConfig(
        api_key="s3cret-key", max_open_calls=100, max_open_calls_per_client=7, max_push_calls_per_client=3
    )

    chain = interceptors(cfg, MosaicMetrics())

    assert [type(i) for i in chain] == [RequestLogInterceptor, ApiKeyInterceptor, CallLimitInterceptor]
    limits = chain[-1]
    assert limits.max_open_calls == 100 and limits.by_api_key
    assert (limits.client_calls.max_per_client, limits.client_pushes.max_per_client) == (7, 3)


def test_without_keys_a_client_is_its_host():
    chain = interceptors(ServiceConfig(), MosaicMetrics())

    assert [type(i) for i in chain] == [RequestLogInterceptor, CallLimitInterceptor]
    assert not chain[-1].by_api_key


def test_unless_set_a_client_has_no_cap_of_its_own():
    limits = interceptors(ServiceConfig(max_open_calls=100, max_push_calls=9), MosaicMetrics())[-1]

    assert limits.client_calls is None and limits.client_pushes is None


@pytest.mark.parametrize("setting, server", [("max_open_calls_per_client", "max_open_calls"),
                                             ("max_push_calls_per_client", "max_push_calls")])  # fmt: skip
def test_a_client_cap_above_the_servers_is_refused(setting, server):
    with pytest.raises(ValueError, match=f"{setting}=11 is more than {server}=10"):
        ServiceConfig(**{server: 10, setting: 11})
    assert getattr(ServiceConfig(**{server: 10, setting: 10}), setting) == 10
