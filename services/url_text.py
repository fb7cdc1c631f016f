"""URLs as logs and messages show them: without the user and password a URL may carry (``rtsp://user:pass@cam``),
and with an IPv6 host in brackets, as addresses with a port write it."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def without_credentials(url: str) -> str:
    """``url`` with any user and password replaced by ``***``; a text with no ``@`` after its ``://`` as it is.

    Where ``urlsplit`` finds no user in the host part although an ``@`` follows the ``://`` (a password with an
    unescaped ``/``, ``?`` or ``#``), or refuses the URL (an unclosed IPv6 bracket), everything between ``://`` and
    the last ``@`` goes: such a URL ends up quoted in a refusal, and where its password ends is anyone's guess.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or "@" not in parts.netloc:
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def host_in_address(host: str) -> str:
    """``host`` as it goes before ``:PORT`` in an address or a URL: an IPv6 address in brackets (``[::1]``)."""
    return f"[{host}]" if ":" in host else host
