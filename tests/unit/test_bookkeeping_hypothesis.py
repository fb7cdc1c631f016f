"""Random operation sequences against the residency manager, checked against a plain model.

Properties after every step: no tier over budget, used + free == capacity, every cluster in exactly one tier
(and where the model says), pinned clusters never moved, per-stream listings isolated.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mosaic_core.bookkeeping import (
    ClusterFormer,
    FormationConfig,
    MovePlan,
    ResidencyManager,
    Tier,
    TierBudgets,
)
from mosaic_core.errors import StateError

STREAMS = ("s0", "s1", "s2")
SETTINGS = settings(
    max_examples=100, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


class ResidencyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rm: ResidencyManager
        self.tiers: dict[str, Tier] = {}  # model: where each cluster is
        self.streams: dict[str, str] = {}
        self.pins: dict[str, int] = {}
        self.reservations: dict[str, int] = {}
        self.num_added = 0
        self.now_s = 0.0
        self.heard: dict[str, str] = {}  # cluster -> stream, from the change listener since the last check
        self.last_seen: dict[str, tuple[Tier, int]] = {}  # cluster -> (tier, bytes) at the last check

    @initialize(
        device=st.integers(16, 120),
        host=st.integers(0, 120),
        disk=st.integers(0, 120),
        policy=st.sampled_from(["lru", "heat"]),
        clusters=st.lists(st.tuples(st.sampled_from(STREAMS), st.integers(0, 40), st.integers(0, 2)), max_size=10),
    )
    def start(self, device: int, host: int, disk: int, policy: str, clusters: list[tuple[str, int, int]]) -> None:
        budgets = TierBudgets(device_bytes=device, host_bytes=host, disk_bytes=disk)
        self.rm = ResidencyManager(budgets, policy=policy)
        self.rm.change_listeners.append(lambda stream_id, cluster_id: self.heard.__setitem__(cluster_id, stream_id))
        # Start with tiers under pressure: in ~25 random steps an empty start rarely fills a tier.
        for stream, num_bytes, tier_index in clusters:
            self.add(stream, num_bytes, tier_index)

    # -- helpers -----------------------------------------------------------------------------------------

    def enabled(self) -> list[Tier]:
        return list(self.rm.budgets.enabled_tiers)

    def run_plan(self, plan: MovePlan, exclude: frozenset[str] = frozenset()) -> None:
        """Check a plan against the model, then apply it to both."""
        moved = [move.cluster_id for move in plan.moves]
        assert not any(self.pins[cid] for cid in moved), "a plan moves a pinned cluster"
        spilled = {move.cluster_id for move in plan.spills}
        assert not spilled & exclude, "a plan spills an excluded cluster"
        for move in plan.moves:
            assert self.tiers[move.cluster_id] == move.src
            assert move.num_bytes == self.rm.record(move.cluster_id).num_bytes
            self.tiers[move.cluster_id] = move.dst
        self.rm.apply(plan)

    @property
    def ids(self) -> list[str]:
        return sorted(self.tiers)

    # -- rules -------------------------------------------------------------------------------------------

    @rule(stream=st.sampled_from(STREAMS), num_bytes=st.integers(0, 60), tier_index=st.integers(0, 2))
    def add(self, stream: str, num_bytes: int, tier_index: int) -> None:
        tier = self.enabled()[tier_index % len(self.enabled())]
        cluster_id = f"{stream}/c{self.num_added:06d}"
        self.num_added += 1
        if num_bytes > self.rm.free_bytes(tier):
            plan = self.rm.plan_make_room(tier, num_bytes)
            if plan is None:
                return
            self.run_plan(plan)
            assert self.rm.free_bytes(tier) >= num_bytes
        self.rm.add(cluster_id, stream, num_bytes, tier, now_s=self.now_s)
        self.tiers[cluster_id], self.streams[cluster_id], self.pins[cluster_id] = tier, stream, 0

    @precondition(lambda self: self.tiers)
    @rule(data=st.data(), extra=st.integers(0, 40))
    def grow(self, data: st.DataObject, extra: int) -> None:
        cluster_id = data.draw(st.sampled_from(self.ids))
        fits = extra <= self.rm.free_bytes(self.tiers[cluster_id])
        before = self.rm.record(cluster_id).num_bytes
        assert self.rm.grow(cluster_id, extra) == fits
        assert self.rm.record(cluster_id).num_bytes == before + (extra if fits else 0)

    @precondition(lambda self: self.tiers)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        cluster_id = data.draw(st.sampled_from(self.ids))
        self.rm.pin(cluster_id)
        self.pins[cluster_id] += 1

    @precondition(lambda self: self.tiers)
    @rule(tier_index=st.integers(0, 2))
    def pin_coldest(self, tier_index: int) -> None:
        """Pin the cluster the policy would evict first: the adversarial case for every plan after it."""
        tier = self.enabled()[tier_index % len(self.enabled())]
        coldest = next(self.rm.policy.victims(self.rm.clusters(tier=tier), self.now_s), None)
        if coldest is not None:
            self.rm.pin(coldest)
            self.pins[coldest] += 1

    @precondition(lambda self: self.tiers)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        cluster_id = data.draw(st.sampled_from(self.ids))
        if self.pins[cluster_id] == 0:
            with pytest.raises(StateError):
                self.rm.unpin(cluster_id)
            return
        self.rm.unpin(cluster_id)
        self.pins[cluster_id] -= 1

    @precondition(lambda self: self.tiers)
    @rule(data=st.data(), retrieved=st.booleans(), dt_s=st.floats(0.0, 100.0))
    def touch(self, data: st.DataObject, retrieved: bool, dt_s: float) -> None:
        self.now_s += dt_s
        self.rm.touch(data.draw(st.sampled_from(self.ids)), retrieved=retrieved, now_s=self.now_s)

    @precondition(lambda self: self.tiers)
    @rule(data=st.data(), to_index=st.integers(0, 1))
    def fetch(self, data: st.DataObject, to_index: int) -> None:
        targets = data.draw(st.lists(st.sampled_from(self.ids), min_size=1, max_size=3))
        to = self.enabled()[min(to_index, len(self.enabled()) - 1)]
        if any(self.pins[cid] and self.tiers[cid] > to for cid in targets):
            with pytest.raises(StateError):
                self.rm.plan_fetch_many(targets, to, now_s=self.now_s)
            return
        plan = self.rm.plan_fetch_many(targets, to, now_s=self.now_s)
        if plan is None:
            return
        self.run_plan(plan, exclude=frozenset(targets))
        assert all(self.rm.tier_of(cid) <= to for cid in targets)

    @precondition(lambda self: self.tiers)
    @rule(data=st.data())
    def spill(self, data: st.DataObject) -> None:
        cluster_id = data.draw(st.sampled_from(self.ids))
        colder = [t for t in self.enabled() if t > self.tiers[cluster_id]]
        if not colder:
            return
        to = data.draw(st.sampled_from(colder))
        if self.pins[cluster_id]:
            with pytest.raises(StateError):
                self.rm.plan_spill(cluster_id, to)
            return
        plan = self.rm.plan_spill(cluster_id, to, now_s=self.now_s)
        if plan is not None:
            self.run_plan(plan)
            assert self.rm.tier_of(cluster_id) == to

    @rule(data=st.data(), tier_index=st.integers(0, 2))
    def make_room(self, data: st.DataObject, tier_index: int) -> None:
        tier = self.enabled()[tier_index % len(self.enabled())]
        num_bytes = data.draw(st.integers(0, self.rm.capacity_bytes(tier) + 1))
        exclude = frozenset(data.draw(st.lists(st.sampled_from(self.ids)))) if self.tiers else frozenset()
        plan = self.rm.plan_make_room(tier, num_bytes, exclude=exclude, now_s=self.now_s)
        if plan is None:
            return
        self.run_plan(plan, exclude=exclude)
        assert self.rm.free_bytes(tier) >= num_bytes

    @precondition(lambda self: self.tiers)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        cluster_id = data.draw(st.sampled_from(self.ids))
        if self.pins[cluster_id]:
            with pytest.raises(StateError):
                self.rm.remove(cluster_id)
            return
        self.rm.remove(cluster_id)
        del self.tiers[cluster_id], self.streams[cluster_id], self.pins[cluster_id]

    @rule(stream=st.sampled_from(STREAMS))
    def drop_stream(self, stream: str) -> None:
        members = sorted(cid for cid, s in self.streams.items() if s == stream)
        if any(self.pins[cid] for cid in members):
            with pytest.raises(StateError):
                self.rm.drop_stream(stream)
            return
        assert sorted(self.rm.drop_stream(stream)) == members
        for cid in members:
            del self.tiers[cid], self.streams[cid], self.pins[cid]

    @rule(owner=st.sampled_from(["sink", "window", "q"]), num_bytes=st.integers(0, 50))
    def reserve_or_release(self, owner: str, num_bytes: int) -> None:
        if owner in self.reservations:
            self.rm.release(owner)
            del self.reservations[owner]
        elif self.rm.can_reserve(num_bytes):
            self.rm.reserve(owner, num_bytes)
            self.reservations[owner] = num_bytes

    # -- invariants --------------------------------------------------------------------------------------

    @invariant()
    def budgets_hold(self) -> None:
        for tier in Tier:
            used, free, capacity = (
                self.rm.used_bytes(tier),
                self.rm.free_bytes(tier),
                self.rm.capacity_bytes(tier),
            )
            assert used + free == capacity
            assert 0 <= used <= capacity, f"{tier.name} over budget: {used} > {capacity}"
        assert self.rm.reserved_bytes() == sum(self.reservations.values())
        self.rm.check_invariants()

    @invariant()
    def model_agrees(self) -> None:
        listed = [self.rm.clusters(tier=tier) for tier in Tier]
        flat = [cid for ids in listed for cid in ids]
        assert sorted(flat) == self.ids, "every cluster must be in exactly one tier"
        for tier, ids in zip(Tier, listed, strict=True):
            assert all(self.tiers[cid] == tier for cid in ids)
        for cid in self.ids:
            assert self.rm.record(cid).pin_count == self.pins[cid]
        assert self.rm.stats().num_pinned == sum(1 for n in self.pins.values() if n)

    @invariant()
    def every_change_is_heard(self) -> None:
        """A cluster added, grown, moved or removed since the last check was reported, with its stream."""
        now = {cid: (self.rm.tier_of(cid), self.rm.record(cid).num_bytes) for cid in self.rm.clusters()}
        changed = {cid for cid in now.keys() | self.last_seen.keys() if now.get(cid) != self.last_seen.get(cid)}
        assert changed <= self.heard.keys(), f"changes not reported: {sorted(changed - self.heard.keys())}"
        assert all(cid.split("/")[0] == stream for cid, stream in self.heard.items()), self.heard  # ids: stream/c..
        self.heard.clear()
        self.last_seen = now

    @invariant()
    def streams_isolated(self) -> None:
        for stream in STREAMS:
            expected = sorted(cid for cid, s in self.streams.items() if s == stream)
            assert sorted(self.rm.clusters(stream_id=stream)) == expected


ResidencyMachine.TestCase.settings = SETTINGS
TestResidencyMachine = ResidencyMachine.TestCase


FORMATION = FormationConfig(max_tokens=300, max_gap_s=2.0)


@SETTINGS
@given(
    frames=st.lists(
        st.tuples(
            st.floats(0.01, 3.0),  # time since the previous frame
            st.integers(1, 120),
            st.floats(-1.0, 1.0),
            st.one_of(st.none(), st.floats(-1.0, 1.0)),
        ),
        max_size=40,
    )
)
def test_formation_random_frames(frames: list[tuple[float, int, float, float | None]]) -> None:
    """Random frame sequences: clusters partition the frames in order and never break the caps."""
    former = ClusterFormer("cam", FORMATION)
    timestamp_s = 0.0
    for index, (dt_s, num_tokens, similarity, cohesion) in enumerate(frames):
        timestamp_s += dt_s
        decision = former.decide(
            timestamp_s=timestamp_s, num_tokens=num_tokens, similarity=similarity, cohesion_after=cohesion
        )
        if decision.join:
            assert similarity >= FORMATION.min_similarity and (cohesion is None or cohesion >= FORMATION.min_cohesion)
        former.commit(decision, frame_index=index, timestamp_s=timestamp_s, num_tokens=num_tokens)
    records = former.records()
    assert [i for r in records for i in r.frame_indices] == list(range(len(frames)))
    assert len({r.cluster_id for r in records}) == len(records)
    for record in records:
        assert 0 < record.num_tokens <= FORMATION.max_tokens
        assert record.num_tokens == sum(record.frame_num_tokens)
        assert all(b - a <= FORMATION.max_gap_s for a, b in itertools.pairwise(record.frame_timestamps_s))
        assert (record.start_s, record.end_s) == (record.frame_timestamps_s[0], record.frame_timestamps_s[-1])
