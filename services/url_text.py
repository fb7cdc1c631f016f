"""URLs as logs and messages show them: without the user and password a URL may carry (``rtsp://user:pass@cam``),
and with an IPv6 host in brackets, as addresses with a port write it."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def without_credentials(url: str) -> str:
    """``url`` with any user and password replaced by ``***``; anything that is not such a URL as it is."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def host_in_address(host: str) -> str:
    """``host`` as it goes before ``:PORT`` in an address or a URL: an IPv6 address in brackets (``[::1]``)."""
    return f"[{host}]" if ":" in host else host
