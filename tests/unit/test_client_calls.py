"""Per-client call accounting: who a call is from (an API key by its digest, never the key, else the peer's host),
each client's count bounded by its own cap, and a client gone from the map as its last call ends."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.client_calls import KEY_DIGEST_CHARS, Client, ClientCalls, peer_host


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:5555", "127.0.0.1"),
        ("ipv4:10.1.2.3:1", "10.1.2.3"),
        ("ipv6:%5B::1%5D:5555", "::1"),  # as gRPC 1.85 writes it
        ("ipv6:[::1]:5555", "::1"),
        ("ipv6:%5B2001:db8::7%5D:40000", "2001:db8::7"),
        ("unix:", "unix:"),
        ("unix:/run/mosaic.sock", "unix:/run/mosaic.sock"),
        ("unix-abstract:mosaic", "unix-abstract:mosaic"),
    ],
)
def test_peer_host_drops_only_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_two_ports_of_one_host_are_one_client() -> None:
    assert Client.of("ipv4:10.0.0.5:40001") == Client.of("ipv4:10.0.0.5:40002")
    assert Client.of("ipv4:10.0.0.5:40001") != Client.of("ipv4:10.0.0.6:40001")


def test_a_key_names_the_client_whatever_its_host_and_is_never_kept() -> None:
    key = "s3cret-key-of-client-a"
    client = Client.of("ipv4:10.0.0.5:40001", key)
    assert client == Client.of("ipv6:%5B::1%5D:1", key)
    assert client != Client.of("ipv4:10.0.0.5:40001", "s3cret-key-of-client-b")
    assert client.key_digest == hashlib.sha256(key.encode()).hexdigest()[:KEY_DIGEST_CHARS]
    for text in (repr(client), client.described, client.key_digest, client.host):
        assert key not in text
    assert client.described == "with this API key"
    assert Client.of("ipv4:10.0.0.5:40001", "").described == "from 10.0.0.5"


def test_each_client_has_its_own_cap() -> None:
    calls = ClientCalls(max_per_client=2)
    a, b = Client(host="10.0.0.1"), Client(host="10.0.0.2")
    calls.open(a)
    calls.open(a)
    assert not calls.can_open(a)
    assert calls.can_open(b)  # a at its cap takes nothing from b
    calls.open(b)
    assert (calls.num_open(a), calls.num_open(b), calls.num_clients) == (2, 1, 2)
    calls.close(a)
    assert calls.can_open(a)


def test_a_client_leaves_the_map_with_its_last_call() -> None:
    calls = ClientCalls(max_per_client=3)
    a = Client(key_digest="0123456789ab")
    calls.open(a)
    calls.open(a)
    calls.close(a)
    calls.close(a)
    assert calls.num_clients == 0 and calls.num_open(a) == 0


def test_misuse_raises() -> None:
    calls = ClientCalls(max_per_client=1)
    a = Client(host="10.0.0.1")
    with pytest.raises(AssertionError, match="did not have open"):
        calls.close(a)
    calls.open(a)
    with pytest.raises(AssertionError, match="its limit"):
        calls.open(a)
    with pytest.raises(ValueError, match="got 0"):
        ClientCalls(max_per_client=0)


HOSTS = st.sampled_from([Client(host=f"10.0.0.{i}") for i in range(4)])


@settings(max_examples=200, deadline=None)
@given(cap=st.integers(1, 4), steps=st.lists(st.tuples(st.booleans(), HOSTS), max_size=60))
def test_random_opens_and_closes_match_a_plain_count(cap: int, steps: list[tuple[bool, Client]]) -> None:
    """Opens where ``can_open`` allows and closes of open calls, in any order: counts as a plain tally says, never
    over the cap, and only clients with calls open in the map."""
    calls = ClientCalls(max_per_client=cap)
    model: dict[Client, int] = {}
    for opening, client in steps:
        if opening and calls.can_open(client):
            calls.open(client)
            model[client] = model.get(client, 0) + 1
        elif not opening and model.get(client, 0) > 0:
            calls.close(client)
            model[client] -= 1
        assert calls.can_open(client) == (model.get(client, 0) < cap)
        assert all(calls.num_open(c) == n <= cap for c, n in model.items())
        assert calls.num_clients == sum(1 for n in model.values() if n > 0)
