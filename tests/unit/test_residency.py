"""Invariant tests of the residency manager: accounting, pins, reservations, two-phase plans."""

from __future__ import annotations

import pytest

from mosaic_core.bookkeeping import Move, MovePlan, ResidencyManager, Tier, TierBudgets
from mosaic_core.errors import (
    AlreadyExistsError,
    CapacityError,
    ConfigError,
    InvalidArgumentError,
    NotFoundError,
    StateError,
    UnknownClusterError,
)

D, H, K = Tier.DEVICE, Tier.HOST, Tier.DISK


def manager(device: int = 100, host: int = 100, disk: int = 0, policy: str = "lru") -> ResidencyManager:
    return ResidencyManager(TierBudgets(device_bytes=device, host_bytes=host, disk_bytes=disk), policy=policy)


def assert_accounting(rm: ResidencyManager) -> None:
    for tier in Tier:
        assert rm.used_bytes(tier) + rm.free_bytes(tier) == rm.capacity_bytes(tier)
        assert 0 <= rm.used_bytes(tier) <= rm.capacity_bytes(tier)
    rm.check_invariants()


def run(rm: ResidencyManager, plan: MovePlan | None) -> MovePlan:
    assert plan is not None
    rm.apply(plan)
    assert_accounting(rm)
    return plan


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device_bytes": 0, "host_bytes": 1}, "device_bytes must be > 0"),
        ({"device_bytes": 1, "host_bytes": -1}, "host_bytes must be >= 0, got -1"),
        ({"device_bytes": 1, "host_bytes": 1, "disk_bytes": -5}, "disk_bytes must be >= 0, got -5"),
        ({"device_bytes": 1.5, "host_bytes": 1}, "must be an int"),
        ({"device_bytes": True, "host_bytes": 1}, "must be an int"),
    ],
)
def test_budgets_validate(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TierBudgets(**kwargs)


def test_budgets_derived() -> None:
    budgets = TierBudgets(device_bytes=10, host_bytes=0, disk_bytes=5)
    assert budgets.enabled_tiers == (D, K)
    assert budgets.total_bytes == 15
    assert [budgets.capacity_bytes(t) for t in Tier] == [10, 0, 5]


# (operation, args, expected used bytes per tier after it)
ACCOUNTING_TABLE = [
    ("add", ("a", "s1", 30, D), (30, 0, 0)),
    ("add", ("b", "s1", 20, H), (30, 20, 0)),
    ("add", ("c", "s2", 0, D), (30, 20, 0)),
    ("grow", ("c", 15), (45, 20, 0)),
    ("grow", ("b", 80), (45, 100, 0)),
    ("reserve", ("sink/s1", 40), (85, 100, 0)),
    ("remove", ("a",), (55, 100, 0)),
    ("release", ("sink/s1",), (15, 100, 0)),
    ("remove", ("b",), (15, 0, 0)),
]


def test_accounting_after_each_operation() -> None:
    rm = manager()
    for op, args, expected in ACCOUNTING_TABLE:
        result = getattr(rm, op)(*args)
        if op == "grow":
            assert result is True
        assert tuple(rm.used_bytes(t) for t in Tier) == expected, (op, args)
        assert_accounting(rm)


def test_grow_refuses_when_tier_full_and_changes_nothing() -> None:
    rm = manager(device=50)
    rm.add("a", "s", 40, D)
    assert rm.grow("a", 11) is False
    assert rm.record("a").num_bytes == 40 and rm.used_bytes(D) == 40
    assert rm.grow("a", 10) is True
    assert rm.free_bytes(D) == 0


def test_add_validation() -> None:
    rm = manager(disk=0)
    rm.add("a", "s", 1, D)
    with pytest.raises(AlreadyExistsError):
        rm.add("a", "s", 1, H)
    with pytest.raises(InvalidArgumentError, match="switched off"):
        rm.add("b", "s", 1, K)
    with pytest.raises(InvalidArgumentError, match=">= 0"):
        rm.add("b", "s", -1, D)
    with pytest.raises(AssertionError, match="do not fit"):
        rm.add("b", "s", 100, D)
    assert rm.clusters() == ["a"]


def test_double_remove_and_unknown_ids_raise() -> None:
    rm = manager()
    rm.add("a", "s", 10, D)
    rm.remove("a")
    for call in (rm.remove, rm.pin, rm.unpin, rm.touch, rm.tier_of, rm.record):
        with pytest.raises(UnknownClusterError, match="'a'"):
            call("a")
    assert_accounting(rm)


def test_summaries_of_many_clusters_are_their_live_rows_in_order_and_name_an_unknown_one() -> None:
    rm = manager()
    for cluster_id in ("a", "b", "c"):
        rm.add(cluster_id, "s", 10, D)
    rm.summary("b").num_tokens = 7
    assert rm.summaries(["c", "b"]) == [rm.summary("c"), rm.summary("b")]
    assert rm.summaries(["b"])[0] is rm.summary("b")
    rm.remove("a")
    with pytest.raises(UnknownClusterError, match="'a'"):
        rm.summaries(["b", "a"])


def test_pin_counts_and_unpin_below_zero() -> None:
    rm = manager()
    rm.add("a", "s", 10, D)
    rm.add("b", "s", 10, D)
    with pytest.raises(StateError, match="not pinned"):
        rm.unpin("a")
    rm.pin("a")
    rm.pin("a")
    rm.pin("b")
    assert rm.record("a").pin_count == 2 and rm.stats().num_pinned == 2
    rm.unpin("a")
    assert rm.record("a").pinned and rm.stats().num_pinned == 2
    rm.unpin("a")
    assert not rm.record("a").pinned and rm.stats().num_pinned == 1
    with pytest.raises(StateError):
        rm.unpin("a")
    with pytest.raises(StateError, match="pinned"):
        rm.remove("b")
    rm.unpin("b")
    rm.remove("b")
    assert rm.stats().num_pinned == 0


def test_record_is_a_copy_with_derived_flags() -> None:
    rm = manager(disk=10)
    rm.add("a", "s", 10, H)
    record = rm.record("a")
    assert (record.on_device, record.on_host, record.on_disk) == (False, True, False)
    record.tier = D
    record.num_bytes = 0
    assert rm.tier_of("a") == H and rm.record("a").num_bytes == 10


def test_reservations() -> None:
    rm = manager(device=100)
    rm.add("a", "s", 60, D)
    assert rm.can_reserve(40) and not rm.can_reserve(41)
    with pytest.raises(CapacityError, match="40 device bytes free"):
        rm.reserve("q1", 41)
    rm.reserve("q1", 30)
    with pytest.raises(AlreadyExistsError):
        rm.reserve("q1", 1)
    rm.reserve("sink", 10)
    assert rm.reserved_bytes() == 40 and rm.reserved_bytes("q1") == 30 and rm.reserved_bytes("nobody") == 0
    assert rm.free_bytes(D) == 0 and rm.stats().reserved_bytes == 40
    rm.release("q1")
    with pytest.raises(NotFoundError):
        rm.release("q1")
    assert rm.free_bytes(D) == 30
    assert_accounting(rm)


def test_reservation_after_make_room() -> None:
    rm = manager(device=100, host=100)
    rm.add("a", "s", 50, D)
    rm.add("b", "s", 50, D)
    assert not rm.can_reserve(30)
    plan = run(rm, rm.plan_make_room(D, 30))
    assert [m.cluster_id for m in plan.moves] == ["a"]
    rm.reserve("window", 30)
    # Reservations are never victims: nothing left to evict on the device but "b".
    assert rm.plan_make_room(D, 71) is None
    assert [m.cluster_id for m in rm.plan_make_room(D, 70).moves] == ["b"]


def test_lru_eviction_order_and_touch() -> None:
    rm = manager(device=40, host=100)
    for cid in "abcd":
        rm.add(cid, "s", 10, D)
    rm.touch("a")
    rm.touch("c", retrieved=True)
    plan = rm.plan_make_room(D, 30)
    assert [m.cluster_id for m in plan.moves] == ["b", "d", "a"]
    assert all((m.src, m.dst) == (D, H) for m in plan.moves)
    assert plan.num_bytes_by_direction == {(D, H): 30}


def test_heat_eviction_keeps_retrieved_clusters() -> None:
    rm = manager(device=40, host=100, policy="heat")
    for cid in "abcd":
        rm.add(cid, "s", 10, D, now_s=0.0)
    rm.touch("a", retrieved=True, now_s=1.0)
    rm.touch("a", retrieved=True, now_s=2.0)
    rm.touch("b", retrieved=True, now_s=3.0)
    rm.touch("c", now_s=4.0)  # recency only
    plan = rm.plan_make_room(D, 30, now_s=5.0)
    assert [m.cluster_id for m in plan.moves] == ["d", "c", "b"]


@pytest.mark.parametrize("blocked", ["pinned", "excluded"])
def test_make_room_never_picks_pinned_or_excluded(blocked: str) -> None:
    rm = manager(device=30, host=100)
    for cid in "abc":
        rm.add(cid, "s", 10, D)
    exclude = frozenset()
    if blocked == "pinned":
        rm.pin("a")
    else:
        exclude = frozenset({"a"})
    plan = rm.plan_make_room(D, 20, exclude=exclude)
    assert [m.cluster_id for m in plan.moves] == ["b", "c"]
    assert rm.plan_make_room(D, 21, exclude=exclude) is None


def test_make_room_is_empty_when_free_and_none_when_impossible() -> None:
    rm = manager(device=30, host=20)
    rm.add("a", "s", 10, D)
    assert rm.plan_make_room(D, 20).moves == []
    assert rm.plan_make_room(D, 31) is None  # more than the tier holds
    rm.add("b", "s", 20, H)
    assert rm.plan_make_room(D, 30) is None  # host full, no disk tier
    assert rm.plan_make_room(H, 1) is None  # host is the coldest tier


def test_cascade_device_host_disk() -> None:
    rm = manager(device=30, host=30, disk=100)
    for cid in ("d1", "d2", "d3"):
        rm.add(cid, "s", 10, D)
    for cid in ("h1", "h2", "h3"):
        rm.add(cid, "s", 10, H)
    rm.touch("d1")
    plan = rm.plan_make_room(D, 20)
    # host->disk spills first, so the device spills then fit
    assert [(m.cluster_id, m.src, m.dst) for m in plan.moves] == [
        ("h1", H, K),
        ("h2", H, K),
        ("d2", D, H),
        ("d3", D, H),
    ]
    assert plan.num_bytes_by_direction == {(H, K): 20, (D, H): 20}
    run(rm, plan)
    assert rm.clusters(tier=K) == ["h1", "h2"]
    assert rm.clusters(tier=D) == ["d1"]
    assert sorted(rm.clusters(tier=H)) == ["d2", "d3", "h3"]


def test_cascade_fails_when_disk_full() -> None:
    rm = manager(device=10, host=10, disk=10)
    rm.add("d", "s", 10, D)
    rm.add("h", "s", 10, H)
    rm.add("k", "s", 10, K)
    assert rm.plan_make_room(D, 1) is None
    rm.remove("k")
    assert [m.cluster_id for m in rm.plan_make_room(D, 1).moves] == ["h", "d"]


def test_spills_larger_than_the_host_tier_go_straight_to_disk() -> None:
    rm = manager(device=40, host=15, disk=100)
    for cid in ("d1", "d2", "d3", "d4"):
        rm.add(cid, "s", 10, D)
    rm.add("h1", "s", 10, H)
    plan = run(rm, rm.plan_make_room(D, 30))  # 30 bytes of victims cannot pass through a 15-byte host tier
    assert [(m.cluster_id, m.src, m.dst) for m in plan.moves] == [("d1", D, K), ("d2", D, K), ("d3", D, K)]
    assert rm.clusters(tier=H) == ["h1"]
    assert rm.plan_make_room(D, 41) is None  # more than the device tier holds


def test_switched_off_host_spills_straight_to_disk() -> None:
    rm = manager(device=10, host=0, disk=50)
    rm.add("a", "s", 10, D)
    plan = run(rm, rm.plan_make_room(D, 5))
    assert plan.moves == [Move("a", D, K, 10)]


def test_plan_fetch_spills_then_fetches() -> None:
    rm = manager(device=20, host=40)
    rm.add("a", "s", 10, D)
    rm.add("b", "s", 10, D)
    rm.add("x", "s", 15, H)
    plan = rm.plan_fetch("x")
    assert [(m.cluster_id, m.src, m.dst) for m in plan.moves] == [("a", D, H), ("b", D, H), ("x", H, D)]
    assert [m.cluster_id for m in plan.fetches] == ["x"] and len(plan.spills) == 2
    run(rm, plan)
    assert rm.tier_of("x") == D
    assert rm.plan_fetch("x").moves == []  # already there


def test_plan_fetch_from_disk_and_to_host() -> None:
    rm = manager(device=20, host=20, disk=40)
    rm.add("x", "s", 10, K)
    plan = run(rm, rm.plan_fetch("x", H))
    assert plan.moves == [Move("x", K, H, 10)]
    run(rm, rm.plan_fetch("x"))
    assert rm.tier_of("x") == D
    assert rm.plan_fetch("x", H).moves == []  # already hotter than asked


def test_plan_fetch_many_never_evicts_its_own_members() -> None:
    rm = manager(device=30, host=100)
    rm.add("a", "s", 10, D)  # coldest, but retrieved together with x and y
    rm.add("b", "s", 10, D)
    rm.add("c", "s", 10, D)
    rm.add("x", "s", 10, H)
    rm.add("y", "s", 10, H)
    plan = run(rm, rm.plan_fetch_many(["x", "a", "y", "x"]))
    assert [m.cluster_id for m in plan.spills] == ["b", "c"]
    assert [m.cluster_id for m in plan.fetches] == ["x", "y"]
    assert sorted(rm.clusters(tier=D)) == ["a", "x", "y"]
    assert rm.plan_fetch_many(["a", "b", "c", "x"]) is None  # four 10-byte clusters on a 30-byte device


def test_plan_fetch_and_spill_refuse_pinned() -> None:
    rm = manager(device=20, host=40, disk=40)
    rm.add("x", "s", 10, H)
    rm.pin("x")
    with pytest.raises(StateError, match="pinned"):
        rm.plan_fetch("x")
    with pytest.raises(StateError, match="pinned"):
        rm.plan_spill("x", K)
    assert rm.plan_spill("x", H).moves == []


def test_plan_spill() -> None:
    rm = manager(device=20, host=10, disk=40)
    rm.add("a", "s", 10, D)
    rm.add("h", "s", 10, H)
    with pytest.raises(InvalidArgumentError, match="cannot spill"):
        rm.plan_spill("h", D)
    plan = run(rm, rm.plan_spill("a", H))
    assert plan.moves == [Move("h", H, K, 10), Move("a", D, H, 10)]
    plan = run(rm, rm.plan_spill("a", K))
    assert plan.moves == [Move("a", H, K, 10)]
    assert rm.clusters(tier=K) == ["a", "h"]  # listings keep the order clusters were added


def test_stale_plan_is_detected() -> None:
    rm = manager(device=20, host=40)
    rm.add("a", "s", 10, D)
    rm.add("x", "s", 15, H)
    plan = rm.plan_fetch("x")
    assert rm.is_valid(plan)
    rm.pin("a")
    assert not rm.is_valid(plan)
    with pytest.raises(AssertionError, match="pinned"):
        rm.apply(plan)
    rm.unpin("a")
    rm.grow("a", 5)
    with pytest.raises(AssertionError, match="has 15 bytes"):
        rm.apply(plan)
    rm.remove("a")
    assert not rm.is_valid(plan)
    assert not rm.is_valid(MovePlan([Move("x", D, H, 15)]))  # wrong source tier
    assert not rm.is_valid(MovePlan([Move("x", H, D, 15), Move("x", H, D, 15)]))
    assert_accounting(rm)


def test_apply_rejects_overflowing_move() -> None:
    rm = manager(device=10, host=40)
    rm.add("a", "s", 10, D)
    rm.add("x", "s", 5, H)
    with pytest.raises(AssertionError, match="overflow"):
        rm.apply(MovePlan([Move("x", H, D, 5)]))
    assert rm.tier_of("x") == H


def test_stream_isolation_and_drop_stream() -> None:
    rm = manager(device=100, host=100)
    rm.add("s1/c0", "s1", 10, D)
    rm.add("s2/c0", "s2", 10, D)
    rm.add("s1/c1", "s1", 10, H)
    rm.add("s2/c1", "s2", 10, H)
    assert rm.clusters(stream_id="s1") == ["s1/c0", "s1/c1"]
    assert rm.clusters(stream_id="s2", tier=H) == ["s2/c1"]
    assert rm.clusters(stream_id="nope") == []
    rm.pin("s1/c1")
    with pytest.raises(StateError, match="pinned"):
        rm.drop_stream("s1")
    assert len(rm) == 4
    rm.unpin("s1/c1")
    assert rm.drop_stream("s1") == ["s1/c0", "s1/c1"]
    assert rm.drop_stream("s1") == []
    assert rm.clusters() == ["s2/c0", "s2/c1"]
    assert "s1/c0" not in rm and "s2/c0" in rm
    assert (rm.used_bytes(D), rm.used_bytes(H)) == (10, 10)
    assert_accounting(rm)


def test_stats_snapshot() -> None:
    rm = manager(device=100, host=50, disk=25)
    rm.add("a", "s", 10, D)
    rm.add("b", "s", 20, H)
    rm.add("c", "s", 5, K)
    rm.reserve("sink", 7)
    rm.pin("b")
    stats = rm.stats()
    assert (stats.device_used_bytes, stats.host_used_bytes, stats.disk_used_bytes) == (17, 20, 5)
    assert (stats.device_capacity_bytes, stats.host_capacity_bytes, stats.disk_capacity_bytes) == (
        100,
        50,
        25,
    )
    assert (stats.num_device_clusters, stats.num_host_clusters, stats.num_disk_clusters) == (1, 1, 1)
    assert (stats.num_clusters, stats.num_pinned, stats.reserved_bytes) == (3, 1, 7)


def test_zero_byte_clusters_are_not_victims() -> None:
    rm = manager(device=10, host=10)
    rm.add("empty", "s", 0, D)
    rm.add("a", "s", 10, D)
    assert [m.cluster_id for m in rm.plan_make_room(D, 5).moves] == ["a"]
    assert rm.pick_victims(D, 1) == ["a"]
    assert rm.pick_victims(D, 11) is None
