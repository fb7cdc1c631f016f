"""URLs in logs and messages lose their credentials, and keep the rest."""

from __future__ import annotations

import pytest

from mosaic_core.errors import InvalidArgumentError
from services.source_policy import check_source_url
from services.url_text import host_in_address, without_credentials


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/live", "rtsp://***@10.0.0.5:554/live"),
        ("redis://:hunter2@redis:6379/0", "redis://***@redis:6379/0"),
        ("https://user@cam.example/x?y=1", "https://***@cam.example/x?y=1"),
        ("rtsp://10.0.0.5/live", "rtsp://10.0.0.5/live"),
        ("/videos/cam-1.mp4", "/videos/cam-1.mp4"),
        ("http://[::1", "http://[::1"),  # not a URL urlsplit accepts, and no credentials: as it is
    ],
)
def test_credentials_are_replaced_and_nothing_else(url, shown):
    assert without_credentials(url) == shown


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:hunter2@[cam/live", "rtsp://***@[cam/live"),  # an unclosed IPv6 bracket
        ("rtsp://admin:hunter2@cam]/live", "rtsp://***@cam]/live"),
        ("rtsp://admin:hunter2/x@cam/live", "rtsp://***@cam/live"),  # a password's "/" ends urlsplit's host part
        ("rtsp://admin:hunter2?x@cam/live", "rtsp://***@cam/live"),
        ("rtsp://admin:hunter2#x@cam/live", "rtsp://***@cam/live"),
    ],
)
def test_a_url_whose_password_does_not_parse_is_refused_without_it(url, shown):
    assert without_credentials(url) == shown
    with pytest.raises(InvalidArgumentError) as refused:
        check_source_url(url)
    assert "hunter2" not in str(refused.value)
    assert shown in str(refused.value)


@pytest.mark.parametrize(("host", "written"), [("::1", "[::1]"), ("::", "[::]"), ("127.0.0.1", "127.0.0.1")])
def test_an_ipv6_host_goes_in_brackets_before_its_port(host, written):
    assert host_in_address(host) == written
