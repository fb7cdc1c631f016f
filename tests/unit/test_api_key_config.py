"""An API key gRPC cannot carry as metadata is refused when the server starts, with a sentence: accepted, it left
every client failing 'Invalid metadata' while health said SERVING."""

from __future__ import annotations

import pytest

from mosaic_core.errors import ConfigError
from services.config import API_KEY_ENV, load_config


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("s3cret\n", "line break"),  # a Kubernetes Secret made --from-file keeps the file's newline
        ("clé-secrète", "non-ASCII"),
        (" s3cret", "spaces"),
    ],
)
def test_a_key_no_client_can_send_is_refused_at_start(key, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, api_key=key)


def test_a_key_from_the_environment_is_checked_too(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "s3cret\n")
    with pytest.raises(ConfigError, match=API_KEY_ENV):
        load_config(None)


def test_a_printable_ascii_key_is_kept():
    assert load_config(None, api_key="k3y-With_symbols!~").api_key == "k3y-With_symbols!~"
