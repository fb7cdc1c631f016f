"""The router keeps API keys to itself: workers are made without them, and serving them over plain gRPC beyond
loopback is warned of."""

from __future__ import annotations

import pytest

from services.auth import clear_text_key_warning
from services.config import ServiceConfig
from services.router import worker_config


def test_a_worker_is_made_without_the_api_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-one\n")

    with_key = worker_config(ServiceConfig(api_key="s3cret-key", workers=2))
    with_file = worker_config(ServiceConfig(api_key_file=str(keys)))

    assert (with_key.api_key, with_key.api_key_file, with_key.workers) == (None, None, 2)
    assert (with_file.api_key, with_file.api_key_file) == (None, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "mosaic.example"])
def test_a_key_over_plain_grpc_beyond_loopback_is_warned_of(host):
    warning = clear_text_key_warning(ServiceConfig(api_key="s3cret-key", host=host))

    assert warning is not None and f"gRPC on {host} has no TLS" in warning and "s3cret" not in warning


@pytest.mark.parametrize(
    "settings",
    [
        {"api_key": "s3cret-key", "host": "127.0.0.1"},
        {"api_key": "s3cret-key", "host": "::1"},
        {"api_key": "s3cret-key", "host": "localhost"},
        {"host": "0.0.0.0"},  # no key to leak
    ],
)
def test_nothing_is_warned_of_where_no_key_leaves_the_machine_in_clear(settings):
    assert clear_text_key_warning(ServiceConfig(**settings)) is None
