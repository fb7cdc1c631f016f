"""Watch records, active hours and the webhook allow-list: table-driven checks of every user-facing rule."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from mosaic_core.errors import ConfigError, InvalidArgumentError
from services.ingest_queue import MAX_TIMESTAMP_S
from services.watches_spec import ActiveHours, WatchRecord
from services.watches_webhook import check_allowed_prefixes, check_webhook_url, sign


def _unix(hour: int, minute: int = 0) -> float:
    return datetime(2026, 12, 1, hour, minute, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("start", "end", "timezone", "at", "inside"),
    [
        ("08:00", "18:00", "UTC", _unix(8), True),
        ("08:00", "18:00", "UTC", _unix(18), False),  # [start, end)
        ("08:00", "18:00", "UTC", _unix(7, 59), False),
        ("22:00", "06:00", "UTC", _unix(23, 30), True),  # wraps past midnight
        ("22:00", "06:00", "UTC", _unix(5, 59), True),
        ("22:00", "06:00", "UTC", _unix(12), False),
        ("08:00", "18:00", "Asia/Tokyo", _unix(0), True),  # 09:00 in Tokyo
        ("08:00", "18:00", "Asia/Tokyo", _unix(12), False),  # 21:00 in Tokyo
    ],
)
def test_active_hours(start, end, timezone, at, inside):
    assert ActiveHours(start, end, timezone).contains(at) is inside


@pytest.mark.parametrize("at", [-MAX_TIMESTAMP_S, -0.7 * MAX_TIMESTAMP_S, -62135596801.0])  # the last: 0000-12-31
@pytest.mark.parametrize("timezone", ["UTC", "Asia/Tokyo"])
def test_active_hours_judge_a_pushed_frame_before_the_year_1_as_outside(at, timezone):
    # A pushed camera's clock may be anywhere within MAX_TIMESTAMP_S of 0, past what the calendar holds; such a
    # time raised here, out of the watches' evaluation pass, and the pass's other watches lost their events.
    assert ActiveHours("22:00", "06:00", timezone).contains(at) is False


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"question": " "}, "question is empty"),
        ({"question": "x" * 1001}, "1001 characters"),
        ({"threshold": float("inf")}, "threshold"),
        ({"cooldown_s": -0.5}, "cooldown_s"),
        ({"max_answer_tokens": 0}, "max_answer_tokens"),
        ({"labels": {"": "x"}}, "labels"),
        ({"watch_id": "a:b"}, "watch id"),
    ],
)
def test_watch_record_refuses_bad_fields_with_a_sentence(fields, words):
    with pytest.raises(InvalidArgumentError, match=words):
        WatchRecord(**{"watch_id": "w1", "question": "Is anyone there?", **fields})


@pytest.mark.parametrize(
    ("start", "end", "timezone", "words"),
    [("8", "18:00", "UTC", "HH:MM"), ("08:00", "24:00", "UTC", "HH:MM"), ("08:00", "08:00", "UTC", "both"),
     ("8:00", "08:00", "UTC", "both"),  # the same time written two ways: it read as all day
     ("08:00", "09:00", "Nowhere/City", "time zone"),
     ("08:00", "09:00", "a/" * 300 + "b", "time zone")],  # nested deep enough to exhaust zoneinfo's recursion
)  # fmt: skip
def test_active_hours_refuses_bad_values(start, end, timezone, words):
    with pytest.raises(InvalidArgumentError, match=words):
        ActiveHours(start, end, timezone)


ALLOWED = ["https://hooks.example.com/mosaic", "http://10.0.0.5:8080/"]


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://hooks.example.com/mosaic", True),
        ("https://hooks.example.com/mosaic/cam7?x=1", True),
        ("https://HOOKS.example.com/mosaic/a", True),
        ("https://hooks.example.com:443/mosaic/a", True),
        ("https://hooks.example.com/mosaic-evil", False),  # not at a / boundary
        ("https://hooks.example.com/other", False),
        ("http://hooks.example.com/mosaic", False),  # scheme differs
        ("https://hooks.example.com:8443/mosaic", False),  # port differs
        ("https://hooks.example.com.evil.net/mosaic", False),
        ("https://user:pw@hooks.example.com/mosaic", False),
        ("http://10.0.0.5:8080/anything", True),
        ("http://10.0.0.5/anything", False),
        ("file:///etc/passwd", False),
        ("http://169.254.169.254/latest/meta-data", False),
        ("not a url", False),
    ],
)
def test_webhook_allow_list(url, ok):
    if ok:
        assert check_webhook_url(url, ALLOWED) == url
    else:
        with pytest.raises(InvalidArgumentError, match="webhook URL"):
            check_webhook_url(url, ALLOWED)


def test_webhooks_are_off_by_default():
    with pytest.raises(InvalidArgumentError, match="allows no webhooks"):
        check_webhook_url("https://hooks.example.com/mosaic", [])


@pytest.mark.parametrize("prefix", ["ftp://x/", "https://", "https://u:p@h/", "https://h/p?q=1", "https://h/#f"])
def test_config_refuses_bad_prefixes(prefix):
    with pytest.raises(ConfigError, match="webhook_allowed_urls"):
        check_allowed_prefixes([prefix])


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    body = b'{"event_id":7}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", "1700000000", body) == f"sha256={expected}"
    assert sign("k", "1700000001", body) != sign("k", "1700000000", body)


def test_service_config_checks_webhook_prefixes():
    from services.config import load_config

    assert load_config(None, webhook_allowed_urls=ALLOWED).webhook_allowed_urls == ALLOWED
    with pytest.raises(ConfigError, match="webhook_allowed_urls"):
        load_config(None, webhook_allowed_urls=["gopher://x/"])
