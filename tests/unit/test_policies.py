"""Eviction policies: order, decay, lookup by name."""

from __future__ import annotations

import pytest

from mosaic_core.bookkeeping import POLICY_NAMES, EvictionPolicy, HeatPolicy, LruPolicy, make_policy
from mosaic_core.errors import ConfigError, UnknownClusterError, UnknownPolicyError


def fill(policy: EvictionPolicy, cluster_ids: str, now_s: float = 0.0) -> None:
    for cluster_id in cluster_ids:
        policy.on_add(cluster_id, now_s)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policies_follow_the_protocol(name: str) -> None:
    policy = make_policy(name)
    assert isinstance(policy, EvictionPolicy) and policy.name == name
    fill(policy, "abc")
    assert list(policy.victims(["c", "a", "b"], 0.0)) == ["a", "b", "c"]
    policy.on_remove("b")
    policy.on_remove("b")  # removing twice is harmless for a policy; the manager guards misuse
    assert list(policy.victims({"a", "c"}, 0.0)) == ["a", "c"]
    with pytest.raises(UnknownClusterError):
        policy.on_touch("b", 0.0, False)


# (touch sequence, expected coldest-first order of all of "abcde")
LRU_TABLE = [
    ("", "abcde"),
    ("a", "bcdea"),
    ("ea", "bcdea"),
    ("cab", "decab"),
    ("aaaa", "bcdea"),
]


@pytest.mark.parametrize(("touches", "expected"), LRU_TABLE)
def test_lru_order(touches: str, expected: str) -> None:
    policy = LruPolicy()
    fill(policy, "abcde")
    for cluster_id in touches:
        policy.on_touch(cluster_id, 0.0, retrieved=cluster_id == "a")
    assert "".join(policy.victims("abcde", 0.0)) == expected
    # A small candidate set takes the heap path; it must agree with the ordered walk.
    subset = expected[1::2]
    assert "".join(policy.victims(subset, 0.0)) == subset
    assert [policy.priority(c, 0.0) for c in expected] == sorted(policy.priority(c, 0.0) for c in expected)


def test_lru_victims_are_lazy() -> None:
    policy = LruPolicy()
    fill(policy, "abcdef")
    victims = policy.victims("abcdef", 0.0)
    assert next(victims) == "a" and next(victims) == "b"


def test_heat_orders_by_retrievals_then_recency() -> None:
    policy = HeatPolicy(half_life_s=60.0)
    fill(policy, "abcd")
    for cluster_id in "aab":
        policy.on_touch(cluster_id, 1.0, retrieved=True)
    policy.on_touch("d", 2.0, retrieved=False)  # recency only: d is now warmer than c, colder than b
    assert list(policy.victims("abcd", 2.0)) == ["c", "d", "b", "a"]
    assert policy.heat("a", 1.0) == pytest.approx(2.0)
    assert policy.heat("c", 1.0) == 0.0


def test_heat_decays_with_half_life() -> None:
    policy = HeatPolicy(half_life_s=10.0)
    fill(policy, "ab")
    for _ in range(4):
        policy.on_touch("a", 0.0, retrieved=True)
    policy.on_touch("b", 30.0, retrieved=True)
    assert policy.heat("a", 10.0) == pytest.approx(2.0)
    assert policy.heat("a", 30.0) == pytest.approx(0.5)
    # Four retrievals 30 s (three half-lives) ago weigh less than one just now.
    assert list(policy.victims("ab", 30.0)) == ["a", "b"]
    assert list(policy.victims("ab", 0.0)) == [
        "b",
        "a",
    ]  # at t=0 "a" was hotter (b's heat counted as of 30 s)
    # A clock that steps back never heats a cluster up.
    assert policy.heat("a", -100.0) == pytest.approx(4.0)


def test_heat_accumulates_decayed_count() -> None:
    policy = HeatPolicy(half_life_s=10.0)
    fill(policy, "a")
    policy.on_touch("a", 0.0, retrieved=True)
    policy.on_touch("a", 10.0, retrieved=True)
    assert policy.heat("a", 10.0) == pytest.approx(1.5)
    assert policy.heat("a", 20.0) == pytest.approx(0.75)


def test_make_policy_by_name_and_options() -> None:
    assert isinstance(make_policy("lru"), LruPolicy)
    heat = make_policy("heat", half_life_s=5.0)
    assert isinstance(heat, HeatPolicy) and heat.half_life_s == 5.0
    assert make_policy("heat").half_life_s == 60.0


def test_unknown_policy_lists_valid_names() -> None:
    with pytest.raises(UnknownPolicyError, match=r"'fifo'.*lru, heat"):
        make_policy("fifo")
    with pytest.raises(ValueError):  # a ConfigError is a ValueError for callers that only know builtins
        make_policy("")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("lru", {"half_life_s": 5.0}, "does not take options"),
        ("heat", {"half_life_s": 0.0}, "half_life_s must be"),
        ("heat", {"half_life_s": float("inf")}, "half_life_s must be"),
        ("heat", {"window_s": 1.0}, "does not take options"),
    ],
)
def test_bad_policy_options(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_policy(name, **options)
