"""The hosts a source URL may not reach: the machine's own addresses (loopback, and while loopback is blocked, every
address of its interfaces) and the link-local ones, where cloud metadata services answer (``169.254.169.254``),
unless the operator says otherwise (``source_blocked_networks``).

A camera's URL is the caller's choice, so without this a caller could make a worker fetch from services that
listen only on the worker's own loopback or read the cloud's metadata (server-side request forgery). Camera
networks are private ranges (10/8, 192.168/16), so those stay open by default.

Two checks, since a name can resolve anywhere:
- at CreateStream, ``literal_refusal``: a host written as an address in a blocked network, or ``localhost``;
- before every connect, ``resolved_refusal``: every address the host's name resolves to at that moment, and, while
  loopback is blocked, whether it is one of this machine's own (``own_addresses``): a server listening on every
  interface answers there as it does on loopback.

FFmpeg resolves the name again as it connects, so a name whose DNS answer changes between the two (DNS rebinding)
is not covered; HTTP redirects and playlists (HLS, DASH), whose entries name hosts of their own, are refused
outright (``mosaic_core.model.video_sources.open_options``), but an RTSP server's redirect is followed. Restricting the
workers' egress closes both (``docs/security.md``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from mosaic_core.errors import ConfigError

DEFAULT_BLOCKED_NETWORKS = (
    "127.0.0.0/8",  # loopback
    "::1/128",
    "0.0.0.0/8",  # "this host"
    "::/128",
    "169.254.0.0/16",  # link-local: cloud metadata services
    "fe80::/10",
    "fd00:ec2::254/128",  # AWS's metadata service over IPv6
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``cidrs`` (``"10.0.0.0/8"``, ``"::1/128"``, or a bare address); ConfigError names a bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as err:
            raise ConfigError(f"source_blocked_networks: {cidr!r} is not an address or network ({err})") from None
    return tuple(networks)


def url_host(url: str) -> tuple[str, int | None] | None:
    """The host and port ``url`` names (an IPv6 address without its brackets), or None when it names none.

    Raises:
        ValueError: a port that is not all ASCII digits, or out of range (FFmpeg would read ``80x`` as 80, where
            Python reads no port at all: the two must not disagree on where a URL goes).
    """
    parts = urlsplit(url)
    address = parts.netloc.rpartition("@")[2]
    after_host = address.partition("]")[2] if address.startswith("[") else address
    port_text = after_host.partition(":")[2] if ":" in after_host else None
    if port_text is not None and not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
        quoted = "" if "@" in url else f" {port_text!r}"  # else what urlsplit read as a port may be a password
        raise ValueError(f"port{quoted} is not a number from 0 to 65535")
    port = None if not port_text else int(port_text)
    return (parts.hostname, port) if parts.hostname else None


def ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP address (an IPv6 zone ignored, an IPv4-mapped one read as IPv4), or None if it is none."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def numeric_address(host: str) -> str | None:
    """The address the system's resolver reads ``host`` as with no lookup (``getaddrinfo``'s ``AI_NUMERICHOST``),
    or None for a name. Besides the dotted quad it takes inet_aton's forms (``127.1``, ``2130706433``,
    ``0x7f.0.0.1``), which FFmpeg connects to as the address they stand for, so they are addresses as written."""
    try:
        answers = socket.getaddrinfo(host, None, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    return str(answers[0][4][0]) if answers else None


def blocked(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``address`` (an IP address, as ``ip_of`` reads it) is in one of ``networks``."""
    ip = ip_of(address)
    return ip is not None and any(ip.version == network.version and ip in network for network in networks)


def own_addresses() -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This machine's addresses, read anew at each call (a host's addresses change): those its name resolves to and,
    on Linux, every local IPv4 address of its routing table (``/proc/net/fib_trie``) and every IPv6 address of its
    interfaces (``/proc/net/if_inet6``). A machine's name often resolves to loopback only, hence the second look."""
    texts = []
    with contextlib.suppress(OSError, UnicodeError):  # a name that does not resolve: the other looks still count
        texts = [str(answer[4][0]) for answer in socket.getaddrinfo(socket.gethostname(), None)]
    last_address = ""
    for line in _read_text("/proc/net/fib_trie").splitlines():  # "|-- 10.0.0.5" then "/32 host LOCAL"
        entry = line.strip()
        if entry.startswith("|-- "):
            last_address = entry[len("|-- ") :]
        elif entry.endswith(" host LOCAL"):
            texts.append(last_address)
    for line in _read_text("/proc/net/if_inet6").splitlines():  # "fd000000000000000000000000000002 04 40 00 82 eth0"
        hex_digits = line.partition(" ")[0]
        if len(hex_digits) == 32:
            texts.append(":".join(hex_digits[i : i + 4] for i in range(0, 32, 4)))
    return frozenset(ip for ip in map(ip_of, texts) if ip is not None)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError:
        return ""


def literal_refusal(url: str, networks: tuple[Network, ...]) -> str | None:
    """Why ``url`` is refused as written (a port that is no number, or a host that is an address in ``networks``,
    or a ``localhost`` name or no host at all while loopback is blocked: FFmpeg connects to an empty host's
    loopback), or None; no name is resolved."""
    try:
        named = url_host(url)
    except ValueError as err:
        return f"source_url's {err}"
    if not networks:
        return None
    host = "" if named is None else named[0].rstrip(".").lower()
    if host in ("", "localhost") or host.endswith(".localhost"):
        host = "127.0.0.1"
    if blocked(host, networks) or blocked(numeric_address(host) or "", networks):
        shown = "(none)" if named is None else repr(named[0])
        return f"source host {shown} is in a network this server does not open (source_blocked_networks)"
    return None


def resolved_refusal(url: str, networks: tuple[Network, ...]) -> str | None:
    """Why ``url`` is refused once its host's name is resolved (an address in ``networks``, or one of this machine's
    own while ``networks`` block loopback), or None, also when the name does not resolve (the connect then fails with
    its own error). What ``literal_refusal`` refuses comes first."""
    refusal = literal_refusal(url, networks)
    if refusal is not None or not networks:
        return refusal
    named = url_host(url)  # the port parses: ``literal_refusal`` said so
    if named is None:
        return None
    host, port = named
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    own = own_addresses() if blocked("127.0.0.1", networks) or blocked("::1", networks) else frozenset()
    for *_, address in answers:
        if blocked(str(address[0]), networks):
            return (
                f"source host {host!r} resolves to {address[0]}, in a network this server does not open "
                "(source_blocked_networks)"
            )
        if ip_of(str(address[0])) in own:
            return (
                f"source host {host!r} resolves to {address[0]}, an address of this machine, which this server does "
                "not open while source_blocked_networks holds loopback"
            )
    return None
