"""Which tier every cluster lives in, and how many bytes each tier has left.

One ``ResidencyManager`` per engine covers all the streams that share the worker's budgets. It owns each
cluster's record (``ClusterResidency``): its tier, size and pins, its pages in each pool (``ClusterPages``, which
``mosaic_core.memory.tiers.KVTiers`` fills in as it moves the bytes), its summary row (``SummaryRow``, which
``mosaic_core.engine.summaries.SummaryIndex`` fills in) and its co-retrieval counts (``CoRetrieval``, which
``mosaic_core.bookkeeping.maintenance.CoRetrievalTracker`` keeps). A record is made by ``add`` and ends with
``remove``, and everything about the cluster ends with it; nothing else keeps a cluster's tier, pages, row or
counts. It never moves bytes itself: it plans moves, the torch layer performs them, and ``apply`` then commits the
bookkeeping.

    plan = residency.plan_fetch_many(top_ids)      # None: not possible now (everything else pinned)
    transfers.run(plan.moves)                      # torch layer, in plan order
    residency.apply(plan)

Plans are sequential (every move fits in its destination at the moment it runs, given the moves before it), and
``planning`` makes them (``MovePlanningMixin``, mixed in).

``change_listeners`` hear ``(stream_id, cluster_id)`` whenever a cluster is added, grown, moved or removed, so a
mirror of the clusters (the service's metadata index) can follow the changes instead of re-reading every cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, KeysView

from mosaic_core.bookkeeping.cluster_residency import ClusterResidency, CoRetrieval, SummaryRow
from mosaic_core.bookkeeping.pages import ClusterPages
from mosaic_core.bookkeeping.planning import MovePlanningMixin, check_nbytes, now_or_monotonic
from mosaic_core.bookkeeping.policies import EvictionPolicy, make_policy
from mosaic_core.bookkeeping.tiers import MovePlan, Tier, TierBudgets
from mosaic_core.bookkeeping.usage import ResidencyStats, StreamUsage
from mosaic_core.errors import (
    AlreadyExistsError,
    CapacityError,
    InvalidArgumentError,
    NotFoundError,
    StateError,
    UnknownClusterError,
)


class ResidencyManager(MovePlanningMixin):
    """Tracks every cluster's tier and size, plus fixed device reservations and side-data charges (keyframes),
    against shared byte budgets.

    Args:
        budgets: byte capacity per tier.
        policy: eviction policy name (see ``make_policy``) or a policy object.
    """

    def __init__(self, budgets: TierBudgets, *, policy: str | EvictionPolicy = "lru") -> None:
        self.budgets = budgets
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._records: dict[str, ClusterResidency] = {}
        self.generation = 0  # clusters stopped being tracked so far: a reader of an older list checks it again
        # Insertion-ordered sets (dict keys), so that listings and plans are deterministic.
        self._by_tier: dict[Tier, dict[str, None]] = {tier: {} for tier in Tier}
        self._by_stream: dict[str, dict[str, None]] = {}
        self._stream_usage: dict[str, StreamUsage] = {}
        self._used_bytes = dict.fromkeys(Tier, 0)
        self._reservations: dict[str, int] = {}
        self._charges: dict[tuple[str, Tier], int] = {}  # side data kept beside clusters (keyframes)
        self._num_pinned = 0
        self.change_listeners: list[Callable[[str, str], None]] = []

    # -- accounting ---------------------------------------------------------------------------------------

    def capacity_bytes(self, tier: Tier) -> int:
        return self.budgets.capacity_bytes(tier)

    def used_bytes(self, tier: Tier) -> int:
        return self._used_bytes[Tier(tier)]

    def free_bytes(self, tier: Tier) -> int:
        return self.capacity_bytes(tier) - self.used_bytes(tier)

    def stats(self) -> ResidencyStats:
        used, cap, members = self._used_bytes, self.budgets.capacity_bytes, self._by_tier
        return ResidencyStats(
            device_used_bytes=used[Tier.DEVICE],
            device_capacity_bytes=cap(Tier.DEVICE),
            host_used_bytes=used[Tier.HOST],
            host_capacity_bytes=cap(Tier.HOST),
            disk_used_bytes=used[Tier.DISK],
            disk_capacity_bytes=cap(Tier.DISK),
            reserved_bytes=self.reserved_bytes(),
            num_device_clusters=len(members[Tier.DEVICE]),
            num_host_clusters=len(members[Tier.HOST]),
            num_disk_clusters=len(members[Tier.DISK]),
            num_pinned=self._num_pinned,
        )

    # -- reservations (device only, never evicted) -------------------------------------------------------

    def can_reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit in the device's free bytes right now (no spills considered)."""
        return check_nbytes(nbytes) <= self.free_bytes(Tier.DEVICE)

    def reserve(self, owner: str, nbytes: int) -> None:
        """Hold ``nbytes`` of device memory for ``owner``: sink tokens, a local window, a working set.

        Only free bytes count: make room first with ``plan_make_room(Tier.DEVICE, nbytes)`` and ``apply``.

        Raises:
            AlreadyExistsError: ``owner`` already holds a reservation.
            CapacityError: not enough free device bytes.
        """
        if owner in self._reservations:
            raise AlreadyExistsError(f"reservation owner {owner!r} already holds {self._reservations[owner]} bytes")
        if not self.can_reserve(nbytes):
            free_bytes = self.free_bytes(Tier.DEVICE)
            raise CapacityError(f"cannot reserve {nbytes} bytes for {owner!r}: {free_bytes} device bytes free")
        self._reservations[owner] = nbytes
        self._used_bytes[Tier.DEVICE] += nbytes

    def release(self, owner: str) -> None:
        """Give back ``owner``'s reservation. Raises NotFoundError if it holds none."""
        nbytes = self._reservations.pop(owner, None)
        if nbytes is None:
            raise NotFoundError(f"no reservation held by {owner!r}")
        self._used_bytes[Tier.DEVICE] -= nbytes

    def reserved_bytes(self, owner: str | None = None) -> int:
        """Reserved device bytes of ``owner`` (0 if it holds none), or of all owners."""
        if owner is None:
            return sum(self._reservations.values())
        return self._reservations.get(owner, 0)

    # -- side data (host or disk bytes held beside clusters, never moved between tiers) ---------------------

    def charge(self, owner: str, tier: Tier, nbytes: int, *, past_budget: bool = False) -> bool:
        """Counts ``nbytes`` of ``owner``'s side data (a cluster's keyframes) in ``tier``'s used bytes, if they fit
        in its free bytes now (make room first with ``plan_make_room``); False, with nothing counted, otherwise.
        ``past_budget``: the bytes are there already (a restart adopting records on disk), counted even past it.

        Raises:
            AlreadyExistsError: ``owner`` already holds a charge in ``tier``.
        """
        key = (owner, Tier(tier))
        if key in self._charges:
            raise AlreadyExistsError(f"{owner!r} already holds a {key[1].name} charge of {self._charges[key]} bytes")
        if check_nbytes(nbytes) > self.free_bytes(key[1]) and not past_budget:
            return False
        self._charges[key] = nbytes
        self._used_bytes[key[1]] += nbytes
        return True

    def discharge(self, owner: str, tier: Tier) -> int:
        """Gives back ``owner``'s charge in ``tier``; returns its bytes (0 if it held none)."""
        nbytes = self._charges.pop((owner, Tier(tier)), 0)
        self._used_bytes[Tier(tier)] -= nbytes
        return nbytes

    def charged_bytes(self, tier: Tier) -> int:
        """Side-data bytes counted in ``tier``."""
        return sum(n for (_, t), n in self._charges.items() if t == tier)

    # -- clusters -----------------------------------------------------------------------------------------

    def __contains__(self, cluster_id: object) -> bool:
        return cluster_id in self._records

    def tracked_ids(self) -> KeysView[str]:
        """The ids of every tracked cluster, as a live view: a membership test per id without a method call each,
        for a question's set-up that tests a thousand or more."""
        return self._records.keys()

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        cluster_id: str,
        stream_id: str,
        num_bytes: int,
        tier: Tier,
        *,
        pages: ClusterPages | None = None,
        now_s: float | None = None,
        past_budget: bool = False,
    ) -> None:
        """Track a new cluster in ``tier``, with ``pages`` when its bytes are already in pages of that tier (a
        regroup), else an empty page record. The caller must have made room (see ``plan_make_room``), unless the
        bytes are there already (``past_budget``: a restart adopting records on disk), which are then counted even
        past the tier's budget.

        Raises:
            AlreadyExistsError: ``cluster_id`` is already tracked.
        """
        tier = self._enabled(tier)
        if cluster_id in self._records:
            raise AlreadyExistsError(f"cluster {cluster_id!r} is already tracked")
        check_nbytes(num_bytes)
        assert past_budget or num_bytes <= self.free_bytes(tier), (
            f"add {cluster_id!r}: {num_bytes} bytes do not fit in {tier.name} ({self.free_bytes(tier)} free)"
        )
        pages = ClusterPages(cluster_id) if pages is None else pages
        self._records[cluster_id] = ClusterResidency(cluster_id, stream_id, num_bytes, tier, pages)
        self._by_tier[tier][cluster_id] = None
        self._by_stream.setdefault(stream_id, {})[cluster_id] = None
        self._stream_usage.setdefault(stream_id, StreamUsage()).count(tier, 1, num_bytes)
        self._used_bytes[tier] += num_bytes
        self.policy.on_add(cluster_id, now_or_monotonic(now_s))
        self._changed(stream_id, cluster_id)

    def can_grow(self, cluster_id: str, extra_bytes: int) -> bool:
        """Whether a cluster's tier has room for ``extra_bytes`` more of it (``grow`` would succeed)."""
        return check_nbytes(extra_bytes) <= self.free_bytes(self._get(cluster_id).tier)

    def grow(self, cluster_id: str, extra_bytes: int) -> bool:
        """Grow a cluster in place (the open cluster gains a frame). Returns False if its tier has no room."""
        if not self.can_grow(cluster_id, extra_bytes):
            return False
        record = self._get(cluster_id)
        record.num_bytes += extra_bytes
        self._stream_usage[record.stream_id].count(record.tier, 0, extra_bytes)
        self._used_bytes[record.tier] += extra_bytes
        self._changed(record.stream_id, cluster_id)
        return True

    def remove(self, cluster_id: str) -> None:
        """Stop tracking a cluster and free its bytes.

        Raises:
            UnknownClusterError: not tracked (including a second remove).
            StateError: the cluster is pinned.
        """
        record = self._get(cluster_id)
        if record.pinned:
            raise StateError(f"cannot remove cluster {cluster_id!r}: pinned {record.pin_count} time(s)")
        self._forget(record)

    def drop_stream(self, stream_id: str) -> list[str]:
        """Remove every cluster of ``stream_id``; returns their ids ([] for a stream with none).

        Raises:
            StateError: one of its clusters is pinned (then nothing is removed).
        """
        cluster_ids = list(self._by_stream.get(stream_id, ()))
        pinned = [cid for cid in cluster_ids if self._records[cid].pinned]
        if pinned:
            raise StateError(f"cannot drop stream {stream_id!r}: clusters {pinned} are pinned")
        for cluster_id in cluster_ids:
            self._forget(self._records[cluster_id])
        return cluster_ids

    def tier_of(self, cluster_id: str) -> Tier:
        return self._get(cluster_id).tier

    def record_to_read(self, cluster_id: str) -> ClusterResidency:
        """The cluster's record itself, not a copy, for a caller that only reads it."""
        return self._get(cluster_id)

    def record(self, cluster_id: str) -> ClusterResidency:
        """A copy of the cluster's record (its ``pages``, ``summary`` and ``co_retrieval`` are the live ones)."""
        return dataclasses.replace(self._get(cluster_id))

    def stream_of(self, cluster_id: str) -> str:
        return self._get(cluster_id).stream_id

    def summary(self, cluster_id: str) -> SummaryRow:
        """The cluster's live summary row (raises UnknownClusterError if not tracked)."""
        return self._get(cluster_id).summary

    def summaries(self, cluster_ids: list[str]) -> list[SummaryRow]:
        """``summary`` of each of ``cluster_ids``, in order, in one pass (a question reads a thousand of them)."""
        records = self._records
        try:
            return [records[cluster_id].summary for cluster_id in cluster_ids]
        except KeyError as err:
            raise UnknownClusterError(f"cluster {err.args[0]!r} is not tracked") from None

    def co_retrieval(self, cluster_id: str) -> CoRetrieval:
        """The cluster's live co-retrieval counts (raises UnknownClusterError if not tracked)."""
        return self._get(cluster_id).co_retrieval

    def pages(self, cluster_id: str) -> ClusterPages:
        """The cluster's page record, which the torch layer changes as it places and moves the bytes.

        Raises:
            UnknownClusterError: not tracked.
        """
        return self._get(cluster_id).pages

    def num_clusters(self, tier: Tier) -> int:
        return len(self._by_tier[Tier(tier)])

    def stream_usage(self, stream_id: str) -> StreamUsage:
        """A copy of the stream's clusters and bytes per tier (zeros for a stream with none)."""
        usage = self._stream_usage.get(stream_id)
        return StreamUsage() if usage is None else StreamUsage(dict(usage.clusters), dict(usage.num_bytes))

    def clusters(self, stream_id: str | None = None, tier: Tier | None = None) -> list[str]:
        """Tracked cluster ids, optionally of one stream and/or one tier, in the order they were added."""
        pool: Iterable[str] = self._records if stream_id is None else self._by_stream.get(stream_id, ())
        if tier is None:
            return list(pool)
        return [cid for cid in pool if self._records[cid].tier == tier]

    # -- pins and policy hooks ----------------------------------------------------------------------------

    def pin(self, cluster_id: str) -> None:
        """Keep the cluster where it is (a question is reading it): no plan moves a pinned cluster."""
        record = self._get(cluster_id)
        record.pin_count += 1
        self._num_pinned += record.pin_count == 1

    def unpin(self, cluster_id: str) -> None:
        """Undo one ``pin``. Raises StateError if the cluster is not pinned."""
        record = self._get(cluster_id)
        if record.pin_count == 0:
            raise StateError(f"cannot unpin cluster {cluster_id!r}: it is not pinned")
        record.pin_count -= 1
        self._num_pinned -= record.pin_count == 0

    def touch(self, cluster_id: str, *, retrieved: bool = False, now_s: float | None = None) -> None:
        """Tell the eviction policy about an access (``retrieved``: a question's retrieval chose it)."""
        self._get(cluster_id)
        self.policy.on_touch(cluster_id, now_or_monotonic(now_s), retrieved)

    # -- applying plans (``MovePlanningMixin`` makes them) -----------------------------------------------------

    def apply(self, plan: MovePlan) -> None:
        """Commit a plan after the torch layer has moved the bytes, in plan order."""
        error = self._plan_error(plan)
        assert error is None, f"stale or inconsistent move plan: {error}"
        for move in plan.moves:
            record = self._records[move.cluster_id]
            del self._by_tier[move.src][move.cluster_id]
            self._by_tier[move.dst][move.cluster_id] = None
            self._used_bytes[move.src] -= move.num_bytes
            self._used_bytes[move.dst] += move.num_bytes
            usage = self._stream_usage[record.stream_id]
            usage.count(move.src, -1, -record.num_bytes)
            usage.count(move.dst, 1, record.num_bytes)
            record.tier = move.dst
            self._changed(record.stream_id, move.cluster_id)

    def check_invariants(self) -> None:
        """Assert the internal indexes agree with each other (for tests and debugging)."""
        for tier in Tier:
            cluster_bytes = sum(self._records[cid].num_bytes for cid in self._by_tier[tier])
            reserved = self.reserved_bytes() if tier == Tier.DEVICE else 0
            side = self.charged_bytes(tier)
            assert self._used_bytes[tier] == cluster_bytes + reserved + side, f"{tier.name} byte count drifted"
            assert 0 <= self._used_bytes[tier] <= self.capacity_bytes(tier), f"{tier.name} over budget"
        assert sum(len(members) for members in self._by_tier.values()) == len(self._records)
        assert sum(len(members) for members in self._by_stream.values()) == len(self._records)
        assert self._num_pinned == sum(record.pinned for record in self._records.values())
        for cid, record in self._records.items():
            assert cid in self._by_tier[record.tier] and cid in self._by_stream[record.stream_id]
            assert record.pin_count >= 0
        assert self._stream_usage.keys() == self._by_stream.keys()
        for stream_id, members in self._by_stream.items():
            counted = StreamUsage()
            for cid in members:
                counted.count(self._records[cid].tier, 1, self._records[cid].num_bytes)
            assert self._stream_usage[stream_id] == counted, f"stream {stream_id}'s usage drifted"
        rows = [record.summary.row for record in self._records.values() if record.summary.row is not None]
        assert len(rows) == len(set(rows)), "two clusters share a summary row"

    # -- internals ----------------------------------------------------------------------------------------

    def _changed(self, stream_id: str, cluster_id: str) -> None:
        for listener in self.change_listeners:
            listener(stream_id, cluster_id)

    def _get(self, cluster_id: str) -> ClusterResidency:
        record = self._records.get(cluster_id)
        if record is None:
            raise UnknownClusterError(f"cluster {cluster_id!r} is not tracked")
        return record

    def _enabled(self, tier: Tier) -> Tier:
        tier = Tier(tier)
        if self.capacity_bytes(tier) == 0:
            raise InvalidArgumentError(f"tier {tier.name} has a budget of 0 bytes and is switched off")
        return tier

    def _forget(self, record: ClusterResidency) -> None:
        cid = record.cluster_id
        self.generation += 1
        del self._records[cid]
        del self._by_tier[record.tier][cid]
        stream_members = self._by_stream[record.stream_id]
        del stream_members[cid]
        self._stream_usage[record.stream_id].count(record.tier, -1, -record.num_bytes)
        if not stream_members:
            del self._by_stream[record.stream_id]
            del self._stream_usage[record.stream_id]
        self._used_bytes[record.tier] -= record.num_bytes
        self._changed(record.stream_id, cid)
        self.policy.on_remove(cid)
