"""The MetadataStore contract, run against every implementation.

``MetadataStoreContract`` holds the tests; a subclass supplies the ``store`` fixture (built with the
``clock`` fixture) and may extend ``assert_no_trace``. The in-memory store runs it here; the Redis store
runs it in tests/integration/test_metadata_redis.py against a real redis-server.
"""

from __future__ import annotations

import itertools
import math
import threading
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaic_core.errors import InvalidArgumentError, UnknownStreamError
from services.metadata import TIERS, ClusterMeta, InMemoryMetadataStore, MetadataStore, StreamRecord


class StepClock:
    """Deterministic wall clock: every reading is one second after the previous (thread-safe)."""

    def __init__(self, start_s: float = 1000.0) -> None:
        self._ticks = itertools.count()
        self.start_s = start_s

    def __call__(self) -> float:
        return self.start_s + next(self._ticks)


def stream(stream_id: str = "cam-1", **kw: object) -> StreamRecord:
    return StreamRecord(stream_id=stream_id, fps=kw.pop("fps", 1.0), **kw)


def cluster(cluster_id: str, start_s: float, end_s: float, stream_id: str = "cam-1", **kw: object) -> ClusterMeta:
    fields = dict(
        num_tokens=128,
        num_bytes=1 << 20,
        tier="device",
        location="device:0",
        centroid_summary=[0.1, -2.5, 1e-300],
    )
    fields.update(kw)
    if "first_frame" not in fields:
        fields["first_frame"] = int(start_s * 10)
    if "last_frame" not in fields:
        fields["last_frame"] = int(end_s * 10)
    return ClusterMeta(cluster_id=cluster_id, stream_id=stream_id, start_s=start_s, end_s=end_s, **fields)


def ids(metas: list[ClusterMeta]) -> list[str]:
    return [m.cluster_id for m in metas]


class MetadataStoreContract:
    """Behaviour every MetadataStore must show. Subclasses provide the ``store`` fixture."""

    @pytest.fixture
    def clock(self) -> StepClock:
        return StepClock()

    def assert_no_trace(self, store: MetadataStore, stream_id: str) -> None:
        assert store.get_stream(stream_id) is None
        assert store.list_clusters(stream_id) == []
        assert store.clusters_in_range(stream_id, -math.inf, math.inf) == []
        assert stream_id not in store.assignments()
        assert stream_id not in [s.stream_id for s in store.list_streams()]

    # --- streams -----------------------------------------------------------------------------------

    def test_stream_round_trip(self, store: MetadataStore) -> None:
        record = StreamRecord(
            stream_id="site1/cam_3.east",
            fps=0.1 + 0.2,
            source_url="rtsp://10.0.0.3/live",
            loop_source=True,
            retention_s=1 / 3,
            worker_id="2",
            created_s=1_700_000_000.123456,
            labels={"site": "north", "model": "äxis"},
        )
        assert store.put_stream(record)
        assert store.get_stream(record.stream_id) == record
        assert store.list_streams() == [record]
        plain = stream("b-cam")
        store.put_stream(plain)
        assert store.get_stream("b-cam") == plain  # None source_url, {} labels round-trip
        assert [s.stream_id for s in store.list_streams()] == ["b-cam", "site1/cam_3.east"]
        assert store.get_stream("nope") is None

    def test_put_stream_if_absent_and_replace(self, store: MetadataStore) -> None:
        assert store.put_stream(stream(fps=1.0, worker_id="0"))
        assert not store.put_stream(stream(fps=5.0), if_absent=True)
        assert store.get_stream("cam-1").fps == 1.0
        store.put_cluster(cluster("c0", 0, 3))
        assert store.put_stream(stream(fps=2.0, worker_id="1"))  # replace: clusters stay, worker moves
        assert store.get_stream("cam-1").fps == 2.0
        assert ids(store.clusters_in_range("cam-1", 2.5, 2.5)) == ["c0"]  # time index survives
        assert store.streams_on_worker("0") == []
        assert store.streams_on_worker("1") == ["cam-1"]

    def test_returned_records_are_copies(self, store: MetadataStore) -> None:
        store.put_stream(stream(labels={"a": "1"}))
        store.put_cluster(cluster("c0", 0, 1))
        store.get_stream("cam-1").labels["a"] = "changed"
        store.get_cluster("cam-1", "c0").centroid_summary.append(9.0)
        assert store.get_stream("cam-1").labels == {"a": "1"}
        assert len(store.get_cluster("cam-1", "c0").centroid_summary) == 3

    @pytest.mark.parametrize("bad", ["", "a:b", " cam", "-cam", "cam*", "x" * 129, "cam\n"])
    def test_invalid_ids_rejected(self, bad: str) -> None:
        with pytest.raises(InvalidArgumentError):
            stream(bad)
        with pytest.raises(InvalidArgumentError):
            cluster(bad if len(bad) <= 128 else "x" * 161, 0, 1)

    def test_the_clusters_of_a_stream_with_the_longest_id_are_kept(self, store: MetadataStore) -> None:
        # The engine names a cluster "<stream id>/c<number>": past 128 characters for a stream id of 121 or more. The
        # store refused those, and the worker's flush raised for every ingest call that held a frame of such a stream.
        long_id = "x" * 128
        store.put_stream(stream(long_id))
        for number in (0, 10**12):
            store.put_cluster(cluster(f"{long_id}/c{number:06d}", number, number + 1, stream_id=long_id))
        assert ids(store.clusters_in_range(long_id, 0, 1)) == [f"{long_id}/c000000"]

    @pytest.mark.parametrize(
        "changes",
        [
            {"tier": "gpu"},
            {"end_s": -1.0},
            {"centroid_summary": [0.0] * 65},
            {"location": ""},
            {"num_bytes": -1},
            {"last_frame": -1},
            {"start_s": math.nan, "first_frame": 0},
        ],
    )
    def test_invalid_cluster_fields_rejected(self, changes: dict) -> None:
        fields = dict(start_s=0.0, end_s=1.0) | changes
        with pytest.raises(InvalidArgumentError):
            cluster("c0", stream_id="cam-1", **fields)

    def test_delete_stream_removes_everything(self, store: MetadataStore) -> None:
        store.put_stream(stream("victim", worker_id="0"))
        store.put_stream(stream("keeper", worker_id="0"))
        for i in range(5):
            store.put_cluster(cluster(f"c{i}", i, i + 0.5, stream_id="victim"))
        store.put_cluster(cluster("c0", 0, 1, stream_id="keeper"))
        assert store.delete_stream("victim")
        assert not store.delete_stream("victim")
        self.assert_no_trace(store, "victim")
        assert store.get_cluster("victim", "c0") is None
        assert store.streams_on_worker("0") == ["keeper"]
        assert ids(store.list_clusters("keeper")) == ["c0"]

    def test_worker_assignment(self, store: MetadataStore) -> None:
        store.put_stream(stream("a"))
        store.put_stream(stream("b", worker_id="1"))
        assert store.assignments() == {"b": "1"}
        store.set_worker("a", "1")
        store.set_worker("b", "2")
        assert store.streams_on_worker("1") == ["a"]
        assert store.streams_on_worker("2") == ["b"]
        assert store.get_stream("b").worker_id == "2"
        store.set_worker("a", None)
        assert store.assignments() == {"b": "2"}
        assert store.get_stream("a").worker_id is None
        with pytest.raises(UnknownStreamError):
            store.set_worker("ghost", "0")
        with pytest.raises(InvalidArgumentError):
            store.set_worker("a", "bad:worker")

    # --- clusters ----------------------------------------------------------------------------------

    def test_cluster_round_trip_and_updated_stamp(self, store: MetadataStore) -> None:
        store.put_stream(stream())
        meta = cluster("c0", 0.1 + 0.2, 1e9 + 0.5, centroid_summary=[1 / 3, -0.0, 5e-324, 1e308], updated_s=-1.0)
        store.put_cluster(meta)
        got = store.get_cluster("cam-1", "c0")
        assert got.updated_s >= 1000.0  # stamped by the store's clock, not the caller's value
        got.updated_s = meta.updated_s
        assert got == meta
        assert got.centroid_summary == [1 / 3, -0.0, 5e-324, 1e308]
        assert store.get_cluster("cam-1", "missing") is None
        assert store.get_cluster("no-stream", "c0") is None

    def test_put_cluster_unknown_stream_raises(self, store: MetadataStore) -> None:
        with pytest.raises(UnknownStreamError):
            store.put_cluster(cluster("c0", 0, 1, stream_id="ghost"))
        self.assert_no_trace(store, "ghost")

    def test_list_clusters_in_time_order(self, store: MetadataStore) -> None:
        store.put_stream(stream())
        for cid, start in [("z", 5.0), ("a", 9.0), ("m", 1.0), ("b", 5.0)]:
            store.put_cluster(cluster(cid, start, start + 1))
        assert ids(store.list_clusters("cam-1")) == ["m", "b", "z", "a"]
        assert store.list_clusters("ghost") == []

    def test_update_cluster_reindexes(self, store: MetadataStore) -> None:
        store.put_stream(stream())
        store.put_cluster(cluster("c0", 0, 1))
        store.put_cluster(cluster("c0", 50, 60, num_tokens=7))  # e.g. after a re-cluster
        assert store.clusters_in_range("cam-1", 0, 1) == []
        assert ids(store.clusters_in_range("cam-1", 55, 55)) == ["c0"]
        assert len(store.list_clusters("cam-1")) == 1
        assert store.get_cluster("cam-1", "c0").num_tokens == 7

    @pytest.mark.parametrize(
        ("start_s", "end_s", "expected"),
        [
            (2.0, 2.0, ["c0", "c1"]),  # touching boundaries overlap (closed intervals)
            (4.5, 4.9, []),  # a gap between clusters
            (9.0, 10.0, ["c2", "c3"]),
            (3.0, 6.0, ["c1", "c2"]),
            (-math.inf, math.inf, ["c0", "c1", "c2", "c3", "long"]),
            (30.0, 30.0, ["long"]),  # only the long cluster spans it: needs the end-time handling
            (-5.0, -1.0, []),
        ],
    )
    def test_clusters_in_range_overlap(
        self, store: MetadataStore, start_s: float, end_s: float, expected: list[str]
    ) -> None:
        store.put_stream(stream())
        for cid, a, b in [("c0", 0, 2), ("c1", 2, 4), ("c2", 5, 9), ("c3", 10, 10), ("long", 20, 40)]:
            store.put_cluster(cluster(cid, a, b))
        assert ids(store.clusters_in_range("cam-1", start_s, end_s)) == expected

    def test_clusters_in_range_arguments(self, store: MetadataStore) -> None:
        assert store.clusters_in_range("ghost", 0, 1) == []
        with pytest.raises(InvalidArgumentError):
            store.clusters_in_range("ghost", 2, 1)
        with pytest.raises(InvalidArgumentError):
            store.clusters_in_range("ghost", math.nan, 1)

    # The contract runs once per store class (memory here, Redis in tests/integration), so hypothesis sees this
    # one method on two executors; each run still draws its own examples against a fresh store.
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.differing_executors],
    )
    @given(
        spans=st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.floats(0, 20, allow_nan=False)), max_size=25),
        query=st.tuples(st.floats(-10, 130, allow_nan=False), st.floats(0, 50, allow_nan=False)),
    )
    def test_clusters_in_range_matches_brute_force(
        self, store: MetadataStore, spans: list[tuple[float, float]], query: tuple[float, float]
    ) -> None:
        stream_id = f"s-{uuid.uuid4().hex[:8]}"
        store.put_stream(stream(stream_id))
        metas = [cluster(f"c{i:02d}", a, a + d, stream_id=stream_id) for i, (a, d) in enumerate(spans)]
        for meta in metas:
            store.put_cluster(meta)
        a, b = query[0], query[0] + query[1]
        expected = sorted((m.start_s, m.cluster_id) for m in metas if m.start_s <= b and m.end_s >= a)
        assert ids(store.clusters_in_range(stream_id, a, b)) == [c for _, c in expected]
        store.delete_stream(stream_id)

    def test_move_cluster_compare_and_set(self, store: MetadataStore) -> None:
        store.put_stream(stream())
        store.put_cluster(cluster("c0", 0, 1))
        before = store.get_cluster("cam-1", "c0")
        assert not store.move_cluster("cam-1", "c0", from_tier="host", to_tier="disk", location="disk:/x")
        assert store.get_cluster("cam-1", "c0") == before  # nothing changed, not even updated_s
        assert store.move_cluster("cam-1", "c0", from_tier="device", to_tier="host", location="host:0")
        after = store.get_cluster("cam-1", "c0")
        assert (after.tier, after.location) == ("host", "host:0")
        assert after.updated_s > before.updated_s
        assert after.start_s == before.start_s and after.centroid_summary == before.centroid_summary
        assert not store.move_cluster("cam-1", "c0", from_tier="device", to_tier="host", location="host:1")
        assert not store.move_cluster("cam-1", "gone", from_tier="device", to_tier="host", location="host:0")
        assert store.get_cluster("cam-1", "gone") is None  # a failed move never creates a record
        with pytest.raises(InvalidArgumentError):
            store.move_cluster("cam-1", "c0", from_tier="host", to_tier="gpu", location="gpu:0")

    def test_delete_cluster(self, store: MetadataStore) -> None:
        store.put_stream(stream())
        store.put_cluster(cluster("c0", 0, 1))
        store.put_cluster(cluster("c1", 1, 2))
        assert store.delete_cluster("cam-1", "c0")
        assert not store.delete_cluster("cam-1", "c0")
        assert ids(store.list_clusters("cam-1")) == ["c1"]
        assert ids(store.clusters_in_range("cam-1", 0, 0.5)) == []

    def test_retention_drops_old_clusters_and_index(self, store: MetadataStore) -> None:
        store.put_stream(stream(retention_s=10.0))
        for cid, a, b in [("c0", 0, 1), ("c1", 1, 5), ("c2", 5, 12), ("c3", 12, 20)]:
            store.put_cluster(cluster(cid, a, b))
        assert store.apply_retention("cam-1", now_s=20.0) == ["c0", "c1"]  # cutoff 10: c2 straddles, kept
        assert ids(store.list_clusters("cam-1")) == ["c2", "c3"]
        assert ids(store.clusters_in_range("cam-1", -math.inf, 9.0)) == ["c2"]
        assert store.get_cluster("cam-1", "c0") is None
        assert store.apply_retention("cam-1", now_s=20.0) == []
        assert store.apply_retention("cam-1", now_s=100.0) == ["c2", "c3"]
        assert store.list_clusters("cam-1") == []

    def test_retention_zero_keeps_everything(self, store: MetadataStore) -> None:
        store.put_stream(stream(retention_s=0.0))
        store.put_cluster(cluster("c0", 0, 1))
        assert store.apply_retention("cam-1", now_s=1e12) == []
        assert ids(store.list_clusters("cam-1")) == ["c0"]
        with pytest.raises(UnknownStreamError):
            store.apply_retention("ghost", now_s=0.0)

    # --- concurrency -------------------------------------------------------------------------------

    def test_concurrent_moves_stay_consistent(self, store: MetadataStore) -> None:
        """Movers race compare-and-set moves round device->host->disk; readers check every snapshot."""
        store.put_stream(stream())
        store.put_cluster(cluster("c0", 0, 1, tier="device", location="device:init"))
        nxt = {"device": "host", "host": "disk", "disk": "device"}
        num_moves = [0] * 3
        bad: list[tuple[str, str]] = []
        stop = threading.Event()

        def mover(slot: int) -> None:
            for i in range(150):
                tier = store.get_cluster("cam-1", "c0").tier
                to = nxt[tier]
                if store.move_cluster("cam-1", "c0", from_tier=tier, to_tier=to, location=f"{to}:m{slot}:{i}"):
                    num_moves[slot] += 1

        def reader() -> None:
            while not stop.is_set():
                meta = store.get_cluster("cam-1", "c0")
                if not meta.location.startswith(meta.tier + ":"):
                    bad.append((meta.tier, meta.location))

        readers = [threading.Thread(target=reader) for _ in range(2)]
        movers = [threading.Thread(target=mover, args=(i,)) for i in range(3)]
        for t in readers + movers:
            t.start()
        for t in movers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert bad == []
        assert sum(num_moves) > 0
        # Every successful CAS advanced the cycle exactly once: no lost or doubled moves.
        assert store.get_cluster("cam-1", "c0").tier == TIERS[sum(num_moves) % 3]

    def test_delete_stream_racing_writer_leaves_no_orphans(self, store: MetadataStore) -> None:
        """A stream with history is deleted while a writer adds clusters to it without pause: the delete finishes,
        and leaves nothing. (Redis under WATCH restarted its read of the index at every write, ever longer: a
        fresh-clone CI run hung here for 600 s.)"""
        store.put_stream(stream("racy", worker_id="0"))
        history = 2_000
        for i in range(history):
            store.put_cluster(cluster(f"c{i}", i, i + 0.5, stream_id="racy"))
        started, stop = threading.Event(), threading.Event()
        num_written = [0]

        def writer() -> None:
            for i in itertools.count(history):
                if stop.is_set():
                    return
                try:
                    store.put_cluster(cluster(f"c{i}", i, i + 0.5, stream_id="racy"))
                except UnknownStreamError:
                    return
                num_written[0] += 1
                started.set()

        thread = threading.Thread(target=writer)
        thread.start()
        assert started.wait(10)
        deleted: list[bool] = []
        deleter = threading.Thread(target=lambda: deleted.append(store.delete_stream("racy")), daemon=True)
        deleter.start()
        deleter.join(60)  # a bound on liveness, not a speed target
        stop.set()
        thread.join(10)
        assert deleted == [True], "delete_stream did not finish within 60 s while a writer kept writing"
        assert not thread.is_alive()
        assert num_written[0] > 0
        self.assert_no_trace(store, "racy")

    def test_retention_racing_writer_finishes(self, store: MetadataStore) -> None:
        """Retention over a long history while a writer adds clusters without pause finishes, expires every old
        cluster and keeps every new one. (Redis under WATCH restarted its read of the index at every write.)"""
        store.put_stream(stream("racy", retention_s=10.0))
        history = 2_000
        for i in range(history):
            store.put_cluster(cluster(f"c{i}", i, i + 0.5, stream_id="racy"))
        started, stop = threading.Event(), threading.Event()

        def writer() -> None:
            for i in itertools.count(10 * history):  # new clusters, past the cutoff
                if stop.is_set():
                    return
                store.put_cluster(cluster(f"n{i}", i, i + 0.5, stream_id="racy"))
                started.set()

        thread = threading.Thread(target=writer)
        thread.start()
        assert started.wait(10)
        expired: list[list[str]] = []
        retention = threading.Thread(target=lambda: expired.append(store.apply_retention("racy", history + 100.0)))
        retention.daemon = True
        retention.start()
        retention.join(60)  # a bound on liveness, not a speed target
        stop.set()
        thread.join(10)
        assert expired, "apply_retention did not finish within 60 s while a writer kept writing"
        assert sorted(expired[0]) == sorted(f"c{i}" for i in range(history))
        left = [c.cluster_id for c in store.list_clusters("racy")]
        assert left and all(cluster_id.startswith("n") for cluster_id in left)


class TestInMemoryContract(MetadataStoreContract):
    @pytest.fixture
    def store(self, clock: StepClock) -> InMemoryMetadataStore:
        return InMemoryMetadataStore(clock=clock)
