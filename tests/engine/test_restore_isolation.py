"""A restart restores each stream on its own: one stream this version cannot restore is set aside, and the others
come back all the same; a record whose summary cannot be read leaves the history instead of haunting it."""

from __future__ import annotations

import errno
import shutil

import pytest
from safetensors.torch import load

from mosaic_core.durable.checks import READ_ERROR_NOTE
from mosaic_core.durable.manifest import MANIFEST_NAME, ManifestState, decode_line, encode_line, replay
from mosaic_core.durable.records import ClusterSummary, encode_pages
from mosaic_core.durable.store import DurableStore
from tests.engine.engine_helpers import durable_streams, feed, make_engine


@pytest.fixture(scope="module")
def two_streams(tiny_model, bikes_frames, tmp_path_factory):
    """A data directory with streams "a" and "b", 16 frames each, both sealed and durable (copied per test)."""
    return durable_streams(tiny_model, bikes_frames, tmp_path_factory.mktemp("two_streams"), ("a", "b"))


@pytest.fixture
def data_dir(two_streams, tmp_path):
    shutil.copytree(two_streams, tmp_path / "data")
    return tmp_path / "data"


def _rewrite_journal(stream_dir, change) -> None:
    """Every line of the journal through ``change(record)``, each with its CRC again."""
    path = stream_dir / MANIFEST_NAME
    records = [decode_line(line) for line in path.read_bytes().splitlines(True)]
    path.write_bytes(b"".join(encode_line(change(record)) for record in records))


def _rewrite_entries(stream_dir, change) -> None:
    """Every cluster entry the journal adds through ``change(entry)``."""
    _rewrite_journal(stream_dir, lambda r: {**r, "add": [change(e) for e in r["add"]]} if r["op"] == "commit" else r)


def _rewrite_opened(stream_dir, **fields) -> None:
    """The journal's first line, with ``fields`` in what it opened."""
    _rewrite_journal(stream_dir, lambda r: {**r, "stream": {**r["stream"], **fields}} if r["op"] == "open" else r)


def _add_unknown_field(stream_dir) -> None:
    _rewrite_entries(stream_dir, lambda entry: {**entry, "new_field": 1})


def _drop_a_field(stream_dir) -> None:
    _rewrite_entries(stream_dir, lambda entry: {**entry, "position_end": None})


def _fps_of_another_kind(stream_dir) -> None:
    _rewrite_opened(stream_dir, fps="fast")


def _another_kv_shape_in_the_journal(stream_dir) -> None:
    _rewrite_opened(stream_dir, kv={"num_layers": 99, "num_kv_heads": 1, "head_dim": 8, "dtype": "float32"})


def _summary_of_another_shape(stream_dir) -> None:
    """One record rewritten as another model's would be: key statistics of one more layer."""
    entry = next(iter(replay(stream_dir).clusters.values()))
    tensors = load((stream_dir / entry.file).read_bytes())
    num_layers, heads, head_dim = tensors["key_sum"].shape
    other = tensors["key_sum"].new_zeros(num_layers + 1, heads, head_dim)
    keyframes = tensors["keyframes"].numpy().tobytes() if "keyframes" in tensors else b""
    chunks, checksum = encode_pages(tensors["pages"], ClusterSummary(other, other, 1.0), keyframes=keyframes)
    (stream_dir / entry.file).write_bytes(b"".join(bytes(chunk) for chunk in chunks))
    _rewrite_entries(stream_dir, lambda e: {**e, "checksum": checksum} if e["cluster_id"] == entry.cluster_id else e)


def test_a_journal_field_this_version_does_not_know_is_ignored(tiny_model, data_dir):
    """A rollback: a newer version wrote one more field. Both streams come back whole."""
    _add_unknown_field(data_dir / "b")
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = {r.stream_id: r.num_clusters for r in engine.restore_streams()}
        assert set(restored) == {"a", "b"} and restored["a"] == restored["b"] > 0
        assert engine.history.store.snapshot_stats().streams_set_aside == 0
    finally:
        engine.close()


def _assert_numbered_past(engine, frames, old: ManifestState) -> None:
    """Stream "b", created again after the one of journal ``old`` was set aside, names none of its clusters or
    frames: an id an answer gave out from the old stream must not name one of the new."""
    engine.open_stream("b", fps=2.0)  # its id is free
    state = engine.stream("b")
    assert state.former.next_number >= old.next_cluster_number and state.next_frame_index >= old.next_frame_index
    feed(engine, "b", frames)
    assert not {c.cluster_id for c in engine.clusters("b")} & old.clusters.keys()


@pytest.mark.parametrize(
    "damage",
    [_drop_a_field, _fps_of_another_kind, _another_kv_shape_in_the_journal, _summary_of_another_shape],
)
def test_a_stream_this_version_cannot_restore_is_set_aside_and_the_others_restore(
    tiny_model, bikes_frames, data_dir, damage
):
    old = replay(data_dir / "b")
    damage(data_dir / "b")
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = engine.restore_streams()
        assert [r.stream_id for r in restored] == ["a"] and restored[0].num_clusters > 0
        assert set(engine.streams) == {"a"}
        stats = engine.history.store.snapshot_stats()
        assert stats.streams_set_aside == 1 and stats.last_set_aside.startswith("stream b ")
        (kept,) = (data_dir / ".unreadable").iterdir()
        assert kept.name.startswith("b-") and (kept / MANIFEST_NAME).exists()
        _assert_numbered_past(engine, bikes_frames[:16], old)
    finally:
        engine.close()


def test_a_stream_that_cannot_be_moved_aside_stays_under_its_id_and_is_counted_unserved(tiny_model, data_dir):
    """Setting a stream aside fails too (``.unreadable`` cannot be made): its folder stays where it was, holding
    its id and not served, which the store counts apart from the streams it did move aside."""
    _fps_of_another_kind(data_dir / "b")
    (data_dir / ".unreadable").write_bytes(b"")  # a file where the folder would go
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        assert [r.stream_id for r in engine.restore_streams()] == ["a"]
        stats = engine.history.store.snapshot_stats()
        assert stats.streams_set_aside == 1 and stats.streams_left == {"not_moved": 1}
        assert (data_dir / "b" / MANIFEST_NAME).exists()
    finally:
        engine.close()


def test_a_stream_whose_adoption_fails_unforeseen_is_set_aside_and_the_others_restore(
    tiny_model, bikes_frames, data_dir, monkeypatch
):
    from mosaic_core.engine.history import HistoryKeeper

    old = replay(data_dir / "b")

    adopt = HistoryKeeper.adopt

    def fails_for_b(self, state, stored):
        if stored.stream_id == "b":
            raise RuntimeError("something no check foresaw")
        return adopt(self, state, stored)

    monkeypatch.setattr(HistoryKeeper, "adopt", fails_for_b)
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = engine.restore_streams()
        assert [r.stream_id for r in restored] == ["a"] and set(engine.streams) == {"a"}
        stats = engine.history.store.snapshot_stats()
        assert stats.streams_set_aside == 1 and "something no check foresaw" in stats.last_set_aside
        (kept,) = (data_dir / ".unreadable").iterdir()
        assert kept.name.startswith("b-") and (kept / MANIFEST_NAME).exists()
        _assert_numbered_past(engine, bikes_frames[:16], old)
    finally:
        engine.close()


def test_a_stream_records_its_kv_shape(tiny_model, data_dir):
    opened = replay(data_dir / "a").stream
    spec = tiny_model.kv_spec
    assert opened["kv"] == {
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": str(spec.dtype).removeprefix("torch."),
    }


def test_a_full_disk_at_restore_restores_every_stream(tiny_model, bikes_frames, data_dir, monkeypatch):
    """The journal write a restore makes (the next ids' reservation) fails: the stream is restored all the same,
    and reserves before it gives out an id."""
    reserve = DurableStore.reserve_ids
    full = [True]

    def disk(self, stream_id, next_number, next_frame_index):
        if full[0] and stream_id == "b":
            raise OSError(errno.ENOSPC, "No space left on device")
        reserve(self, stream_id, next_number, next_frame_index)

    monkeypatch.setattr(DurableStore, "reserve_ids", disk)
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = {r.stream_id: r.num_clusters for r in engine.restore_streams()}
        assert set(restored) == {"a", "b"} and restored["b"] > 0
        before = {c.cluster_id for c in engine.clusters("b")}
        full[0] = False
        feed(engine, "b", bikes_frames[:12], offset_s=100.0)
        new_ids = {c.cluster_id for c in engine.clusters("b")} - before
        assert new_ids and min(new_ids) > max(before)
        assert engine.history.store.flush(30)
        assert replay(data_dir / "b").next_cluster_number > int(max(new_ids).rsplit("/c", 1)[1])
    finally:
        engine.close()


def test_a_record_whose_summary_cannot_be_read_leaves_the_history(tiny_model, data_dir):
    """Skipped by the engine but kept in the journal, no budget or retention would ever free it: it is journalled
    out, and its file kept aside for a person."""
    entry = next(iter(replay(data_dir / "a").clusters.values()))
    (data_dir / "a" / entry.file).write_bytes(b"not a record")
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = {r.stream_id: r.num_clusters for r in engine.restore_streams()}
        assert restored["a"] == restored["b"] - 1
        store = engine.history.store
        assert store.flush(30)
        assert not store.owns(entry.cluster_id)
        assert entry.cluster_id not in replay(data_dir / "a").clusters
        assert store.snapshot_stats().clusters_set_aside == 1
        (kept,) = (data_dir / ".unreadable").iterdir()
        assert kept.name.startswith(f"a-{entry.file}-") and kept.read_bytes() == b"not a record"
    finally:
        engine.close()


def _failing_reads(monkeypatch, fails) -> None:
    """The restart's summary reads of the record files ``fails(path)`` names raise an I/O error, as a disk's do."""
    from mosaic_core.durable import loading as loading_module

    read = loading_module.read_summary

    def read_or_eio(path):
        if fails(path):
            raise OSError(errno.EIO, "Input/output error")
        return read(path)

    monkeypatch.setattr(loading_module, "read_summary", read_or_eio)


def test_a_record_the_disk_fails_to_read_leaves_its_stream_for_the_next_start(tiny_model, data_dir, monkeypatch):
    """An I/O error is the disk's, not the record's: the stream is not restored this time, nothing of it is set aside
    or journalled out, and the next start, with the disk well, restores it whole."""
    clusters_before = set(replay(data_dir / "b").clusters)
    failing = [True]
    _failing_reads(monkeypatch, lambda path: failing[0] and path.parent.name == "b")
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        assert [r.stream_id for r in engine.restore_streams()] == ["a"]
        stats = engine.history.store.snapshot_stats()
        assert stats.streams_set_aside == 0 and stats.clusters_set_aside == 0
        assert stats.streams_left == {"read_failed": 1}
        assert not (data_dir / ".unreadable").exists()
    finally:
        engine.close()
    assert set(replay(data_dir / "b").clusters) == clusters_before
    failing[0] = False
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = {r.stream_id: r.num_clusters for r in engine.restore_streams()}
        assert restored["b"] == len(clusters_before)
        assert engine.history.store.snapshot_stats().streams_left == {}
        assert not (data_dir / "b" / READ_ERROR_NOTE).exists()  # a later passing error is waited out again
    finally:
        engine.close()


def test_a_record_the_disk_fails_to_read_at_two_starts_in_a_row_is_set_aside_and_its_stream_restores(
    tiny_model, data_dir, monkeypatch
):
    """A record that fails at every read must not keep its camera's whole history from ever coming back: the first
    start leaves the stream whole, the next sets that record aside, as a garbled one is, and restores the rest."""
    clusters = replay(data_dir / "b").clusters
    bad = next(iter(clusters.values()))
    _failing_reads(monkeypatch, lambda path: path == data_dir / "b" / bad.file)
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        assert [r.stream_id for r in engine.restore_streams()] == ["a"]
        assert engine.history.store.snapshot_stats().clusters_set_aside == 0
    finally:
        engine.close()
    assert replay(data_dir / "b").clusters.keys() == clusters.keys()
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        restored = {r.stream_id: r.num_clusters for r in engine.restore_streams()}
        assert restored["b"] == len(clusters) - 1
        store = engine.history.store
        stats = store.snapshot_stats()
        assert stats.clusters_set_aside == 1 and stats.last_set_aside.startswith(f"cluster {bad.cluster_id} ")
        assert store.flush(30) and bad.cluster_id not in replay(data_dir / "b").clusters
        (kept,) = (data_dir / ".unreadable").iterdir()
        assert kept.name.startswith(f"b-{bad.file}-")
        assert not (data_dir / "b" / READ_ERROR_NOTE).exists()
    finally:
        engine.close()


def test_a_stream_the_device_has_no_room_for_stays_on_disk_and_the_others_restore(tiny_model, data_dir):
    """A restart with a smaller device budget: the first stream's window fits, the second's does not. That one
    stream waits on disk, whole, and a start with room restores both."""
    working_set, window = 196_608, 98_304  # the tiny preset's, at the test engine's settings (its BudgetError says)
    small = make_engine(tiny_model, data_dir=str(data_dir), device_budget_bytes=working_set + window * 3 // 2)
    try:
        restored = small.restore_streams()
        assert [r.stream_id for r in restored] == ["a"] and set(small.streams) == {"a"}
        assert not (data_dir / ".unreadable").exists() and (data_dir / "b" / MANIFEST_NAME).exists()
        assert small.history.store.snapshot_stats().streams_left == {"no_room": 1}
    finally:
        small.close()
    again = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        assert sorted(r.stream_id for r in again.restore_streams()) == ["a", "b"]
        assert again.history.store.snapshot_stats().streams_left == {}
    finally:
        again.close()
