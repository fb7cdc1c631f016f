"""InMemoryMetadataStore against a naive model (hypothesis state machine), plus a thread stress test."""

from __future__ import annotations

import math
import threading

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mosaic_core.errors import UnknownStreamError
from services.metadata import TIERS, ClusterMeta, InMemoryMetadataStore, StreamRecord

STREAM_IDS = st.sampled_from(["a", "b"])
CLUSTER_IDS = st.sampled_from([f"c{i}" for i in range(6)])
TIMES = st.floats(0, 50, allow_nan=False)


class StoreVersusModel(RuleBasedStateMachine):
    """Every operation is applied to the store and to plain dicts; observable answers must agree."""

    def __init__(self) -> None:
        super().__init__()
        self.store = InMemoryMetadataStore(clock=lambda: 7.0)
        self.streams: dict[str, float] = {}  # stream_id -> retention_s
        self.clusters: dict[str, dict[str, ClusterMeta]] = {}

    @rule(stream_id=STREAM_IDS, retention_s=st.sampled_from([0.0, 10.0]))
    def put_stream(self, stream_id: str, retention_s: float) -> None:
        self.store.put_stream(StreamRecord(stream_id=stream_id, fps=1.0, retention_s=retention_s))
        self.streams[stream_id] = retention_s
        self.clusters.setdefault(stream_id, {})

    @rule(
        stream_id=STREAM_IDS,
        cluster_id=CLUSTER_IDS,
        start_s=TIMES,
        span_s=st.floats(0, 15),
        tier=st.sampled_from(TIERS),
    )
    def put_cluster(self, stream_id: str, cluster_id: str, start_s: float, span_s: float, tier: str) -> None:
        meta = ClusterMeta(
            cluster_id=cluster_id,
            stream_id=stream_id,
            start_s=start_s,
            end_s=start_s + span_s,
            first_frame=0,
            last_frame=1,
            num_tokens=1,
            num_bytes=1,
            tier=tier,
            location=f"{tier}:0",
            updated_s=7.0,
        )
        if stream_id not in self.streams:
            try:
                self.store.put_cluster(meta)
            except UnknownStreamError:
                return
            raise AssertionError("put_cluster on an unknown stream must raise")
        self.store.put_cluster(meta)
        self.clusters[stream_id][cluster_id] = meta

    @rule(
        stream_id=STREAM_IDS,
        cluster_id=CLUSTER_IDS,
        from_tier=st.sampled_from(TIERS),
        to_tier=st.sampled_from(TIERS),
    )
    def move(self, stream_id: str, cluster_id: str, from_tier: str, to_tier: str) -> None:
        meta = self.clusters.get(stream_id, {}).get(cluster_id)
        expected = meta is not None and meta.tier == from_tier
        moved = self.store.move_cluster(
            stream_id, cluster_id, from_tier=from_tier, to_tier=to_tier, location=f"{to_tier}:1"
        )
        assert moved == expected
        if moved:
            meta.tier, meta.location = to_tier, f"{to_tier}:1"

    @rule(stream_id=STREAM_IDS, cluster_id=CLUSTER_IDS)
    def delete_cluster(self, stream_id: str, cluster_id: str) -> None:
        existed = self.clusters.get(stream_id, {}).pop(cluster_id, None) is not None
        assert self.store.delete_cluster(stream_id, cluster_id) == existed

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), now_s=st.floats(0, 80))
    def retention(self, data: st.DataObject, now_s: float) -> None:
        stream_id = data.draw(st.sampled_from(sorted(self.streams)))
        retention_s = self.streams[stream_id]
        metas = self.clusters[stream_id]
        expired = [] if retention_s == 0 else [m for m in metas.values() if m.end_s < now_s - retention_s]
        expected = [m.cluster_id for m in sorted(expired, key=lambda m: (m.start_s, m.cluster_id))]
        assert self.store.apply_retention(stream_id, now_s) == expected
        for cluster_id in expected:
            del metas[cluster_id]

    @rule(stream_id=STREAM_IDS)
    def delete_stream(self, stream_id: str) -> None:
        existed = self.streams.pop(stream_id, None) is not None
        self.clusters.pop(stream_id, None)
        assert self.store.delete_stream(stream_id) == existed

    @rule(stream_id=STREAM_IDS, a=TIMES, length=st.floats(0, 30))
    def range_query(self, stream_id: str, a: float, length: float) -> None:
        b = a + length
        metas = self.clusters.get(stream_id, {}).values()
        expected = sorted((m.start_s, m.cluster_id) for m in metas if m.start_s <= b and m.end_s >= a)
        got = self.store.clusters_in_range(stream_id, a, b)
        assert [(m.start_s, m.cluster_id) for m in got] == expected

    @invariant()
    def listings_agree(self) -> None:
        assert [s.stream_id for s in self.store.list_streams()] == sorted(self.streams)
        for stream_id, metas in self.clusters.items():
            expected = sorted(metas.values(), key=lambda m: (m.start_s, m.cluster_id))
            assert self.store.list_clusters(stream_id) == expected


TestStoreVersusModel = StoreVersusModel.TestCase
TestStoreVersusModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)


def test_many_threads_mixed_operations_keep_the_index_consistent() -> None:
    store = InMemoryMetadataStore()
    store.put_stream(StreamRecord(stream_id="s", fps=1.0, retention_s=5.0))
    errors: list[BaseException] = []

    def worker(slot: int) -> None:
        try:
            for i in range(300):
                cid = f"c{(slot * 7 + i) % 20}"
                start = float(i % 40)
                store.put_cluster(
                    ClusterMeta(
                        cluster_id=cid,
                        stream_id="s",
                        start_s=start,
                        end_s=start + 1,
                        first_frame=i,
                        last_frame=i,
                        num_tokens=1,
                        num_bytes=1,
                        tier="device",
                        location="device:0",
                    )
                )
                store.move_cluster("s", cid, from_tier="device", to_tier="host", location="host:0")
                store.clusters_in_range("s", start - 2, start + 2)
                if i % 25 == 0:
                    store.apply_retention("s", now_s=float(i % 40))
                if i % 40 == 0:
                    store.delete_cluster("s", cid)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    listed = store.list_clusters("s")
    assert [m.cluster_id for m in listed] == [m.cluster_id for m in store.clusters_in_range("s", -math.inf, math.inf)]
    assert len({m.cluster_id for m in listed}) == len(listed)
    for meta in listed:
        assert store.get_cluster("s", meta.cluster_id) == meta


def test_default_clock_stamps_wall_time() -> None:
    import time

    store = InMemoryMetadataStore()
    store.put_stream(StreamRecord(stream_id="s", fps=1.0))
    before = time.time()
    store.put_cluster(
        ClusterMeta(
            cluster_id="c",
            stream_id="s",
            start_s=0,
            end_s=1,
            first_frame=0,
            last_frame=0,
            num_tokens=0,
            num_bytes=0,
            tier="disk",
            location="disk:/kv/c",
        )
    )
    assert before <= store.get_cluster("s", "c").updated_s <= time.time()
    store.close()  # a no-op for the in-memory store
