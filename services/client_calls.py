"""Calls each client holds open, so that one client cannot take every place of the router.

A client is an API key where the server checks keys, else a host: the peer's address less its port. A key is kept
only as the start of its SHA-256 digest (``KEY_DIGEST_CHARS`` hex characters), never as itself. A client leaves the
map as its last call ends, so the map holds only clients with calls open.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import unquote

KEY_DIGEST_CHARS = 12


@dataclass(frozen=True, slots=True)
class Client:
    """Who a call is from: an API key, by the start of its digest, or a host (empty where the other is set)."""

    key_digest: str = ""
    host: str = ""

    @classmethod
    def of(cls, peer: str, api_key: str | None = None) -> Client:
        """The client of a call from ``peer`` (``context.peer()``), by ``api_key`` when one is given."""
        if api_key:
            return cls(key_digest=hashlib.sha256(api_key.encode()).hexdigest()[:KEY_DIGEST_CHARS])
        return cls(host=peer_host(peer))

    @property
    def described(self) -> str:
        """How a refusal names the client to itself: never by its key."""
        return "with this API key" if self.key_digest else f"from {self.host}"


def peer_host(peer: str) -> str:
    """The host of a gRPC peer: ``ipv4:10.0.0.5:5555`` -> ``10.0.0.5``, ``ipv6:%5B::1%5D:5555`` (gRPC escapes the
    brackets) -> ``::1``; any other peer (``unix:``, which has no client address) whole."""
    scheme, _, address = peer.partition(":")
    if scheme not in ("ipv4", "ipv6") or ":" not in address:
        return peer
    host, _, _port = unquote(address).rpartition(":")
    return host.removeprefix("[").removesuffix("]")


class ClientCalls:
    """Calls open per client, at most ``max_per_client`` of each; ``can_open`` answers, ``open`` takes a place.

    Not thread-safe: the router's calls all run on its event loop.
    """

    def __init__(self, max_per_client: int) -> None:
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be at least 1, got {max_per_client}")
        self.max_per_client = max_per_client
        self._num_open: dict[Client, int] = {}

    @property
    def num_clients(self) -> int:
        """Clients with a call open."""
        return len(self._num_open)

    def num_open(self, client: Client) -> int:
        return self._num_open.get(client, 0)

    def can_open(self, client: Client) -> bool:
        return self.num_open(client) < self.max_per_client

    def open(self, client: Client) -> None:
        assert self.can_open(client), f"{client} has {self.num_open(client)} calls open already, its limit"
        self._num_open[client] = self.num_open(client) + 1

    def close(self, client: Client) -> None:
        """Gives back a place; the client leaves the map with its last one."""
        num_open = self.num_open(client)
        assert num_open > 0, f"{client} closed a call it did not have open"
        if num_open == 1:
            del self._num_open[client]
        else:
            self._num_open[client] = num_open - 1
