"""An API key gRPC cannot carry as metadata is refused when the server starts, with a sentence: accepted, it left
every client failing 'Invalid metadata' while health said SERVING."""

from __future__ import annotations

import pytest

from mosaic_core.errors import ConfigError
from services.api_keys import read_key_file
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


def test_a_key_file_stands_in_for_the_key_and_the_environment(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("first-key\r\n\nsecond-key\n")  # a Secret made on Windows, a blank line
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    config = load_config(None, api_key_file=str(key_file))
    assert (config.api_key, config.api_key_file) == (None, str(key_file))
    assert read_key_file(key_file) == ["first-key", "second-key"]
    with pytest.raises(ConfigError, match="api_key and api_key_file both set"):
        load_config(None, api_key="flag-key", api_key_file=str(key_file))


@pytest.mark.parametrize(
    ("text", "words"),
    [("", "holds no key"), ("good-key\n s3cret-key\n", "line 2 .* spaces"), ("k\x07ey\n", "line 1 .* control")],
)
def test_a_key_file_no_client_could_use_is_refused_at_start_without_showing_the_key(tmp_path, text, words):
    key_file = tmp_path / "keys"
    key_file.write_text(text)
    with pytest.raises(ConfigError, match=words) as info:
        load_config(None, api_key_file=str(key_file))
    assert "s3cret" not in str(info.value) and "k\x07ey" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        load_config(None, api_key_file=str(tmp_path / "missing"))


def test_the_key_never_shows_in_the_config_as_text():
    """A config in a log line or a traceback's locals must not carry the key with it."""
    config = load_config(None, api_key="s3cret-key")
    assert config.api_key == "s3cret-key"
    assert "s3cret" not in repr(config) and "s3cret" not in str(config)
