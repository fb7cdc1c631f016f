"""RedisMetadataStore against a real redis-server: the shared contract plus the documented key schema."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from services.metadata import ClusterMeta, InMemoryMetadataStore, MetadataStore
from services.metadata import schema as schema_mod
from services.metadata.redis_store import RedisMetadataStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_metadata_contract import MetadataStoreContract, StepClock, cluster, stream


def keys_of(client, namespace: str) -> list[str]:
    return sorted(client.scan_iter(match=f"{namespace}:*", count=1000))


class TestRedisContract(MetadataStoreContract):
    @pytest.fixture
    def store(self, redis_client, redis_namespace: str, clock: StepClock) -> RedisMetadataStore:
        return RedisMetadataStore(redis_client, namespace=redis_namespace, clock=clock)

    @pytest.fixture(autouse=True)
    def _remember_client(self, redis_client, redis_namespace: str) -> None:
        self.client, self.namespace = redis_client, redis_namespace

    def assert_no_trace(self, store: MetadataStore, stream_id: str) -> None:
        super().assert_no_trace(store, stream_id)
        leftovers = [k for k in keys_of(self.client, self.namespace) if stream_id in k.split(":")]
        assert leftovers == []
        for worker_key in self.client.scan_iter(match=f"{self.namespace}:worker:*", count=1000):
            assert not self.client.sismember(worker_key, stream_id)
        assert not self.client.sismember(f"{self.namespace}:streams", stream_id)


@pytest.fixture
def store(redis_client, redis_namespace: str) -> RedisMetadataStore:
    return RedisMetadataStore(redis_client, namespace=redis_namespace, clock=StepClock())


def test_every_key_matches_the_documented_schema(store: RedisMetadataStore, redis_client, redis_namespace) -> None:
    store.put_stream(stream("cam-1", worker_id="0", retention_s=5.0))
    store.put_stream(stream("site/cam.2"))
    for i in range(3):
        store.put_cluster(cluster(f"c{i}", i, i + 1))
        store.put_cluster(cluster(f"k-{i}", i, i + 2, stream_id="site/cam.2"))
    store.move_cluster("cam-1", "c0", from_tier="device", to_tier="host", location="host:0")
    store.apply_retention("cam-1", now_s=7.5)
    patterns = {t: schema_mod.template_regex(t, redis_namespace) for t in schema_mod.KEY_TEMPLATES}
    seen = set()
    for key in keys_of(redis_client, redis_namespace):
        matching = [t for t, rx in patterns.items() if rx.fullmatch(key)]
        assert len(matching) == 1, f"key {key!r} matches {matching} of the documented templates"
        seen.add(matching[0])
    assert seen == set(schema_mod.KEY_TEMPLATES)  # the test exercised every documented key kind
    for template in schema_mod.KEY_TEMPLATES:
        assert f"``{template}``" in schema_mod.__doc__


def test_key_types_and_fields(store: RedisMetadataStore, redis_client, redis_namespace) -> None:
    store.put_stream(stream("cam-1", worker_id="3", labels={"site": "n"}))
    store.put_cluster(cluster("c0", 2.5, 4.0))
    k = store.keys
    assert redis_client.type(k.streams()) == "set"
    assert redis_client.type(k.stream("cam-1")) == "hash"
    assert redis_client.type(k.tindex("cam-1")) == "zset"
    assert redis_client.type(k.cluster("cam-1", "c0")) == "hash"
    assert redis_client.type(k.worker_streams("3")) == "set"
    assert set(redis_client.hkeys(k.stream("cam-1"))) == {
        *schema_mod.STREAM_FIELDS,
        schema_mod.MAX_SPAN_FIELD,
    }
    assert set(redis_client.hkeys(k.cluster("cam-1", "c0"))) == set(schema_mod.CLUSTER_FIELDS)
    assert redis_client.zscore(k.tindex("cam-1"), "c0") == 2.5
    assert redis_client.hget(k.cluster("cam-1", "c0"), "tier") == "device"  # readable in redis-cli
    assert redis_client.hget(k.stream("cam-1"), schema_mod.MAX_SPAN_FIELD) == "1.5"
    assert all(redis_client.ttl(key) == -1 for key in keys_of(redis_client, redis_namespace))  # no EXPIRE
    doc = " ".join(schema_mod.__doc__.split())
    assert ", ".join(schema_mod.STREAM_FIELDS) in doc and ", ".join(schema_mod.CLUSTER_FIELDS) in doc


def test_retention_removes_index_entries(store: RedisMetadataStore, redis_client) -> None:
    store.put_stream(stream("cam-1", retention_s=10.0))
    for cid, a, b in [("old", 0, 1), ("mid", 5, 12), ("new", 15, 20)]:
        store.put_cluster(cluster(cid, a, b))
    assert store.apply_retention("cam-1", now_s=20.0) == ["old"]
    assert redis_client.zrange(store.keys.tindex("cam-1"), 0, -1) == ["mid", "new"]
    assert not redis_client.exists(store.keys.cluster("cam-1", "old"))


def test_move_uses_a_registered_script(store: RedisMetadataStore, redis_client) -> None:
    store.put_stream(stream())
    store.put_cluster(cluster("c0", 0, 1))
    redis_client.script_flush()  # EVALSHA must recover from NOSCRIPT (e.g. after a Redis restart)
    assert store.move_cluster("cam-1", "c0", from_tier="device", to_tier="disk", location="disk:/kv/c0")
    assert redis_client.script_exists(store._move_script.sha) == [True]
    assert redis_client.hmget(store.keys.cluster("cam-1", "c0"), "tier", "location") == [
        "disk",
        "disk:/kv/c0",
    ]


def test_stores_share_state_across_clients(redis_server, redis_namespace: str) -> None:
    router = RedisMetadataStore.from_url(redis_server.url, namespace=redis_namespace)
    worker = RedisMetadataStore.from_url(redis_server.url, namespace=redis_namespace)
    other = RedisMetadataStore.from_url(redis_server.url, namespace=redis_namespace + "-other")
    try:
        router.put_stream(stream("cam-1", worker_id="0"))
        worker.put_cluster(cluster("c0", 0, 1))
        assert [m.cluster_id for m in router.list_clusters("cam-1")] == ["c0"]
        assert other.list_streams() == []  # namespaces isolate deployments
    finally:
        for s in (router, worker, other):
            s.close()


def test_client_without_decoding_is_refused(redis_server) -> None:
    import redis

    from mosaic_core.errors import ConfigError

    with pytest.raises(ConfigError):
        RedisMetadataStore(redis.Redis(host=redis_server.host, port=redis_server.port))


def _random_ops(rng: random.Random, num_ops: int):
    """A random workload of stream/cluster writes, moves, deletes and retention passes."""
    tiers = ("device", "host", "disk")
    for step in range(num_ops):
        sid = f"s{rng.randrange(3)}"
        cid = f"c{rng.randrange(12)}"
        op = rng.choices(
            ["stream", "cluster", "move", "del_cluster", "retention", "del_stream", "worker"],
            weights=[1, 6, 4, 1, 1, 0.3, 1],
        )[0]
        if op == "stream":
            yield (
                "put_stream",
                (stream(sid, retention_s=rng.choice([0.0, 20.0]), worker_id=str(rng.randrange(2))),),
            )
        elif op == "cluster":
            a = rng.uniform(0, 100)
            meta = ClusterMeta(
                cluster_id=cid,
                stream_id=sid,
                start_s=a,
                end_s=a + rng.uniform(0, 8),
                first_frame=step,
                last_frame=step + 3,
                num_tokens=rng.randrange(1000),
                num_bytes=rng.randrange(1 << 30),
                tier=rng.choice(tiers),
                location="x:0",
                centroid_summary=[rng.gauss(0, 1) for _ in range(rng.randrange(8))],
            )
            yield "put_cluster", (meta,)
        elif op == "move":
            f, t = rng.choice(tiers), rng.choice(tiers)
            yield "move_cluster", (sid, cid), {"from_tier": f, "to_tier": t, "location": f"{t}:{step}"}
        elif op == "del_cluster":
            yield "delete_cluster", (sid, cid)
        elif op == "retention":
            yield "apply_retention", (sid, rng.uniform(0, 120))
        elif op == "del_stream":
            yield "delete_stream", (sid,)
        else:
            yield "set_worker", (sid, rng.choice([None, "0", "1"]))


def _observe(store: MetadataStore) -> tuple:
    return (
        store.list_streams(),
        store.assignments(),
        {s.stream_id: store.list_clusters(s.stream_id) for s in store.list_streams()},
        {s.stream_id: store.clusters_in_range(s.stream_id, 30.0, 45.0) for s in store.list_streams()},
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_redis_matches_memory_on_random_workloads(redis_client, redis_namespace: str, seed: int) -> None:
    """Differential test: the same operations give the same answers and the same final state."""
    memory = InMemoryMetadataStore(clock=StepClock())
    redis_store = RedisMetadataStore(redis_client, namespace=redis_namespace, clock=StepClock())
    for i, (name, args, *kw) in enumerate(_random_ops(random.Random(seed), 400)):
        results = []
        for s in (memory, redis_store):
            try:
                results.append(getattr(s, name)(*args, **(kw[0] if kw else {})))
            except Exception as exc:  # both stores must fail the same way
                results.append(type(exc))
        assert results[0] == results[1], f"op {i} {name}{args} diverged: {results}"
        if i % 50 == 0:
            assert _observe(memory) == _observe(redis_store)
    assert _observe(memory) == _observe(redis_store)
    for s in memory.list_streams():
        redis_store.delete_stream(s.stream_id)
    assert keys_of(redis_client, redis_namespace) == []
