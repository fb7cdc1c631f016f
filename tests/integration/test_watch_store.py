"""The watch store contract, run against the in-memory store and a real redis-server alike."""

from __future__ import annotations

import pytest

from services.metadata.schema import template_regex
from services.metadata.watches import WATCH_KEY_TEMPLATES, InMemoryWatchStore, RedisWatchStore, encode_watch
from services.watches_spec import ActiveHours, WatchRecord


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield InMemoryWatchStore()
        return
    client = request.getfixturevalue("redis_client")
    namespace = request.getfixturevalue("redis_namespace")
    yield RedisWatchStore(client, namespace=namespace)


def _watch(watch_id: str, **fields) -> WatchRecord:
    return WatchRecord(watch_id=watch_id, question="Is a truck at the gate?", **fields)


def _event(stream_id: str = "cam", end_s: float = 2.0, **fields) -> dict:
    return {"stream_id": stream_id, "start_s": end_s - 1, "end_s": end_s, "fired_unix_s": 1000.0 + end_s, **fields}


def test_watches_round_trip_and_ids_are_unique(store):
    record = _watch("w1", stream_ids=["a", "b"], threshold=0.5, cooldown_s=3.0, labels={"site": "n"},
                    active_hours=ActiveHours("22:00", "06:00", "Europe/Berlin"), webhook_url="https://h/x",
                    webhook_secret="s", created_s=12.5)  # fmt: skip
    assert store.put_watch(record)
    assert not store.put_watch(_watch("w1"))  # the id is taken: nothing changes
    assert store.get_watch("w1") == record
    store.put_watch(_watch("a0"))
    assert [w.watch_id for w in store.list_watches()] == ["a0", "w1"]
    assert store.get_watch("nope") is None


def test_events_get_increasing_ids_across_watches_and_are_read_after_a_cursor(store):
    store.put_watch(_watch("w1"))
    store.put_watch(_watch("w2"))
    ids = [store.append_event(w, _event(end_s=float(i)), max_events=10)[0] for i, w in enumerate(["w1", "w2", "w1"])]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert store.last_event_id() == ids[-1]
    assert [i for i, _ in store.events_after("w1", 0, 10)] == [ids[0], ids[2]]
    assert [i for i, _ in store.events_after("w1", ids[0], 10)] == [ids[2]]
    assert store.events_after("w1", ids[0], 10)[0][1]["end_s"] == 2.0
    assert store.events_after("w1", 0, 1) == store.events_after("w1", 0, 10)[:1]


def test_buffer_is_bounded_and_remembers_what_it_trimmed(store):
    store.put_watch(_watch("w1"))
    ids = []
    for i in range(5):
        event_id, trimmed = store.append_event("w1", _event(end_s=float(i)), max_events=3)
        ids.append(event_id)
        assert trimmed == (1 if i >= 3 else 0)
    assert [i for i, _ in store.events_after("w1", 0, 10)] == ids[2:]
    state = store.state("w1")
    assert (state.num_events, state.trimmed_through) == (5, ids[1])
    assert state.fired_until_s == {"cam": 4.0} and state.last_event_unix_s == 1004.0


def test_delete_removes_events_and_state_and_appends_to_a_deleted_watch_are_refused(store):
    store.put_watch(_watch("w1"))
    store.append_event("w1", _event(), max_events=3)
    assert store.delete_watch("w1") and not store.delete_watch("w1")
    assert store.append_event("w1", _event(), max_events=3) is None
    assert store.events_after("w1", 0, 10) == [] and store.state("w1").num_events == 0
    assert store.list_watches() == []


def test_a_deleted_streams_cooldowns_go_from_every_watch_and_the_others_stay(store):
    for watch_id in ("w1", "w2"):
        store.put_watch(_watch(watch_id))
        store.append_event(watch_id, _event("gate", end_s=5000.0), max_events=3)
        store.append_event(watch_id, _event("yard", end_s=7.0), max_events=3)
    store.forget_stream("gate")
    assert [store.state(w).fired_until_s for w in ("w1", "w2")] == [{"yard": 7.0}] * 2
    assert store.state("w1").num_events == 2


def test_an_event_stored_without_its_cooldown_counts_and_leaves_the_cooldown_alone(store):
    """The router stores an event whose stream may have been deleted since without its cooldown."""
    store.put_watch(_watch("w1"))
    store.append_event("w1", _event("gate", end_s=7.0), max_events=3)
    store.forget_stream("gate")
    stored = store.append_event("w1", _event("gate", end_s=5000.0), max_events=3, sets_cooldown=False)
    assert stored is not None
    state = store.state("w1")
    assert state.fired_until_s == {} and state.num_events == 2 and state.last_event_unix_s == 6000.0
    assert [e["end_s"] for _, e in store.events_after("w1", 0, 10)] == [7.0, 5000.0]


def test_redis_keys_match_the_documented_templates(redis_client, redis_namespace):
    store = RedisWatchStore(redis_client, namespace=redis_namespace)
    store.put_watch(_watch("site.cam-7_w"))
    store.append_event("site.cam-7_w", _event(), max_events=3)
    store.claim_epoch("first")
    patterns = {t: template_regex(t, redis_namespace) for t in WATCH_KEY_TEMPLATES}
    seen = set()
    for key in redis_client.scan_iter(match=f"{redis_namespace}:*"):
        matching = [t for t, rx in patterns.items() if rx.fullmatch(key)]
        assert len(matching) == 1, (key, matching)
        seen.add(matching[0])
    assert seen == set(WATCH_KEY_TEMPLATES)


def test_one_unreadable_watch_in_redis_is_skipped_and_a_half_made_one_is_repaired(redis_client, redis_namespace):
    """A record an older or newer version wrote, or one damaged by hand, costs itself, not the router's start; a
    create cut short between the record and the list (before it was one transaction) is listed by the next create."""
    store = RedisWatchStore(redis_client, namespace=redis_namespace)
    store.put_watch(_watch("good"))
    redis_client.hset(f"{redis_namespace}:watch:bad", "record", '{"watch_id": "bad", "no_such_field": 1}')
    redis_client.sadd(f"{redis_namespace}:watches", "bad")
    for unreadable in ("null", "42", '"x"', '{"watch_id": "bad", "question": ""}'):  # the last: no question
        redis_client.hset(f"{redis_namespace}:watch:bad", "record", unreadable)
        assert [w.watch_id for w in store.list_watches()] == ["good"]
    redis_client.hset(f"{redis_namespace}:watch:half", "record", encode_watch(_watch("half")))  # never listed
    assert not store.put_watch(_watch("half"))  # the id is taken: nothing changes but the listing
    assert [w.watch_id for w in store.list_watches()] == ["good", "half"]


def test_the_epoch_is_kept_and_a_restore_writes_back_only_what_is_missing(store):
    assert store.claim_epoch("first") == "first"
    assert store.claim_epoch("second") == "first"
    store.put_watch(_watch("kept", threshold=0.7))
    assert store.restore([_watch("kept"), _watch("lost", labels={"site": "n"})], last_event_id=41) == ["lost"]
    assert store.get_watch("kept").threshold == 0.7  # what the store has wins
    assert store.get_watch("lost") == _watch("lost", labels={"site": "n"})
    assert store.state("lost").trimmed_through == 41 and store.state("kept").trimmed_through == 0
    assert store.append_event("lost", _event(), max_events=3)[0] == 42
    store.restore([], last_event_id=7)  # never lowers the counter
    assert store.last_event_id() == 42
