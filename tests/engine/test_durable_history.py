"""Durable history in one process: sealed clusters survive a new engine on the same data directory."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import sys
import threading
import zlib

import pytest
import torch

from mosaic_core.bookkeeping.cluster_record import ClusterRecord
from mosaic_core.bookkeeping.tiers import Tier
from mosaic_core.config import MIB
from mosaic_core.durable.manifest import MANIFEST_NAME, RECORD_SUFFIX, encode_line, replay
from mosaic_core.durable.records import ClusterSummary, CorruptRecordError, decode_cluster, encode_pages, to_pages
from mosaic_core.engine.results import FrameInput
from mosaic_core.errors import InvalidArgumentError, StateError, TimestampOrderError
from mosaic_core.memory.tiers import KVTiers
from tests.engine.engine_helpers import feed, make_engine


def _durable_view(engine, stream_id):
    """Sealed, durable clusters: id -> (span, tokens, KV checksum)."""
    store = engine.history.store
    assert store.flush(30)
    return {
        e.cluster_id: (e.start_s, e.end_s, e.num_tokens, e.checksum)
        for e in replay(store.stream_dir(stream_id)).clusters.values()
    }


def _kv_crc(kv: torch.Tensor) -> int:
    return zlib.crc32(kv.cpu().contiguous().view(torch.uint8).numpy().data)


def test_sealed_clusters_come_back_in_a_new_engine(tiny_model, bikes_frames, tmp_path):
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=2.0, meta={"source": "bikes"})
    feed(first, "cam", bikes_frames[:24])
    before = _durable_view(first, "cam")
    assert len(before) >= 3, "24 frames must seal several clusters"
    kv_before = {cid: _kv_crc(first.tiering.tiers.read(cid)) for cid in before}
    last_ts = first.stream("cam").last_timestamp_s
    first.close()

    second = make_engine(tiny_model, data_dir=str(tmp_path))
    restored = second.restore_streams()
    assert [(r.stream_id, r.meta, r.num_clusters) for r in restored] == [("cam", {"source": "bikes"}, len(before))]
    infos = {c.cluster_id: c for c in second.clusters("cam")}
    assert set(infos) == set(before)
    for cid, (start_s, end_s, num_tokens, _) in before.items():
        assert (infos[cid].start_s, infos[cid].end_s, infos[cid].num_tokens, infos[cid].tier) == (
            start_s,
            end_s,
            num_tokens,
            "disk",
        )
        assert _kv_crc(second.tiering.tiers.read(cid)) == kv_before[cid]
    earliest = min(before, key=lambda c: before[c][0])
    answer = second.answer("cam", "what happened first?", max_new_tokens=2, time_range=(0.0, before[earliest][1]))
    assert answer.evidence and {span.cluster_id for span in answer.evidence} <= set(before)
    # Promotion after the answer brings retrieved clusters back from their records, page by page.
    fetched = [cid for cid in before if second.tiering.tiers.tier_of(cid).name != "DISK"]
    assert fetched, "the answer must have promoted a restored cluster out of the disk tier"
    for cid in fetched:
        assert _kv_crc(second.tiering.tiers.read(cid).cpu()) == kv_before[cid]

    # The clock and the ids continue: old timestamps are refused, new clusters get new numbers.
    with pytest.raises(Exception, match="not after"):
        feed(second, "cam", bikes_frames[:1], offset_s=-100.0)
    feed(second, "cam", bikes_frames[:12], offset_s=last_ts + 1.0)
    new_ids = {c.cluster_id for c in second.clusters("cam")} - set(before)
    assert new_ids and min(new_ids) > max(before)
    second.close()


def test_a_rewound_stream_takes_its_lost_frames_again_at_their_times(tiny_model, bikes_frames, tmp_path):
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=2.0)
    feed(first, "cam", bikes_frames[:24])
    assert first.history.store.flush(30)
    sealed = replay(first.history.store.stream_dir("cam")).clusters
    first.close()  # the window and the open cluster are lost, as in a crash
    last_sealed_s = max(e.end_s for e in sealed.values())
    lost = [(t, rgb) for t, rgb in bikes_frames[:24] if t > last_sealed_s]
    assert lost, "24 frames must leave some in the window and the open cluster"

    second = make_engine(tiny_model, data_dir=str(tmp_path))
    (restored,) = second.restore_streams()
    assert (restored.last_timestamp_s, restored.last_sealed_s) == (bikes_frames[23][0], last_sealed_s)
    with pytest.raises(TimestampOrderError, match="not after"):
        feed(second, "cam", lost[:1])
    assert second.rewind_to_sealed("cam") == last_sealed_s == second.stream_stats("cam").last_timestamp_s
    feed(second, "cam", lost)
    new = [r for r in second.stream("cam").former.records_to_read() if r.cluster_id not in sealed]
    assert new and min(r.cluster_id for r in new) > max(sealed)  # new ids, the lost frames' times
    assert [t for r in new for t in r.frame_timestamps_s] == [t for t, _ in lost]
    assert second.stream_stats("cam").last_timestamp_s == lost[-1][0]
    with pytest.raises(StateError, match="cannot rewind"):
        second.rewind_to_sealed("cam")
    second.close()


def test_a_torn_journal_line_and_orphan_files_are_ignored(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:16])
    before = _durable_view(engine, "cam")
    engine.close()
    stream_dir = tmp_path / "cam"
    line = encode_line({"op": "commit", "add": [], "remove": sorted(before)})
    with (stream_dir / MANIFEST_NAME).open("ab") as f:
        f.write(line[: len(line) // 2])  # a crash in the middle of a line: it removes nothing
    (stream_dir / "c999999.mkv").write_bytes(b"orphan")
    restored = make_engine(tiny_model, data_dir=str(tmp_path))
    assert restored.restore_streams()[0].num_clusters == len(before)
    assert not (stream_dir / "c999999.mkv").exists()
    restored.close()


def test_a_deleted_stream_stays_deleted(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("gone", fps=2.0)
    engine.open_stream("kept", fps=2.0)
    feed(engine, "gone", bikes_frames[:12])
    engine.close_stream("gone")
    engine.close()
    again = make_engine(tiny_model, data_dir=str(tmp_path))
    assert [r.stream_id for r in again.restore_streams()] == ["kept"]
    again.open_stream("gone", fps=2.0)  # the id is free again
    again.close()


def test_retention_and_merges_are_journalled(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, data_dir=str(tmp_path), merge_min_questions=1, merge_min_joint_fraction=0.5)
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:24])
    for _ in range(3):
        engine.answer("cam", "what moved?", max_new_tokens=1)
    dropped = engine.drop_clusters_before("cam", engine.stream("cam").last_timestamp_s - 4.0)
    assert dropped
    view = _durable_view(engine, "cam")
    live = {c.cluster_id for c in engine.clusters("cam")}
    assert not set(dropped) & set(view)
    assert set(view) <= live
    files = {p.name for p in (tmp_path / "cam").glob("*.mkv")}
    assert files == {cid.rsplit("/", 1)[1] + ".mkv" for cid in view}
    engine.close()


def test_a_graceful_checkpoint_loses_no_frame(tiny_model, bikes_frames, tmp_path):
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:13])
    engine.checkpoint()
    view = _durable_view(engine, "cam")
    assert sum(tokens for _, _, tokens, _ in view.values()) == 13 * engine.stream("cam").geometry.tokens_per_frame
    engine.close()


def test_a_corrupt_record_is_refused():
    kv = torch.randn(2, 2, 1, 6, 4)
    summary = ClusterSummary(torch.zeros(2, 1, 4), torch.ones(2, 1, 4), 6.0)
    chunks, checksum = encode_pages(to_pages(kv, 3), summary)
    data = b"".join(chunks)
    decoded, back = decode_cluster(data, expect_checksum=checksum, name="ok")
    assert torch.equal(decoded, kv) and back.key_count == 6.0
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    with pytest.raises(CorruptRecordError, match="checksum"):
        decode_cluster(bytes(flipped), expect_checksum=checksum, name="bad")


def test_retention_keeps_the_summary_rows_bounded(tiny_model, bikes_frames, tmp_path):
    """A camera that runs for months with retention must not grow its summary tensors with every cluster ever
    made: rows of dropped clusters are reused."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=2.0)
    summaries = engine.tiering.summaries
    capacities = []
    for lap in range(6):
        feed(engine, "cam", bikes_frames[:16], offset_s=lap * 100.0)
        engine.drop_clusters_before("cam", engine.stream("cam").last_timestamp_s - 3.0)
        capacities.append(summaries.capacity)
    assert len(summaries) <= 10, "retention keeps only the last few seconds"
    assert capacities[-1] == capacities[1], f"summary rows grew with every lap: {capacities}"
    engine.close()


def test_each_sealed_cluster_is_written_once_and_whole(tiny_model, bikes_frames, tmp_path):
    """Frames leave the window several at a time (a pass of many frames, a checkpoint): a cluster is written
    only when its last frame has joined it, never half-filled and rewritten."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path), max_frames_per_pass=4)
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:24], batch=12)
    engine.checkpoint()
    lines = (tmp_path / "cam" / "manifest.jsonl").read_text().splitlines()
    added = [entry["cluster_id"] for line in lines for entry in json.loads(line.split(" ", 1)[1]).get("add", [])]
    assert len(added) == len(set(added)), f"clusters written more than once: {added}"
    for entry in replay(tmp_path / "cam").clusters.values():
        kv = engine.history.store.read_kv(entry.cluster_id)
        assert kv.shape[3] == entry.num_tokens, f"{entry.cluster_id}: {kv.shape[3]} tokens, {entry.num_tokens} recorded"
    engine.close()


def test_flush_returns_only_once_a_changed_state_is_on_disk(tmp_path, monkeypatch):
    """The writer takes the changed states off its list before it writes them: flush must wait for that write
    too (a restarted worker read counters saved just before a flush that had returned early)."""
    import threading

    from mosaic_core.durable import write_behind as write_behind_module
    from mosaic_core.durable.manifest import STATE_NAME
    from mosaic_core.durable.store import DurableStore

    writing, real_write = threading.Event(), write_behind_module.write_atomic

    def slow_write(path, data):
        if path.name == STATE_NAME:
            writing.set()
            threading.Event().wait(0.5)
        real_write(path, data)

    monkeypatch.setattr(write_behind_module, "write_atomic", slow_write)
    store = DurableStore(tmp_path, state_interval_s=0.05)
    try:
        store.create_stream("cam", {"fps": 1.0})
        store.update_state("cam", counters={"ingested": 16})
        assert writing.wait(5.0)  # the writer has taken the state and is writing it
        assert store.flush(10.0)
        assert json.loads((tmp_path / "cam" / STATE_NAME).read_text())["counters"] == {"ingested": 16}
    finally:
        store.close()


def test_storing_a_frame_copies_no_cluster_record(tiny_model, bikes_frames, tmp_path, monkeypatch):
    """Every frame stored is checked for completing its cluster; a copy of the record there grew with the cluster."""
    copied_for = []
    real_copy = ClusterRecord.copy

    def counting_copy(record):
        copied_for.append(sys._getframe(2).f_code.co_name)  # copy <- former.get <- the caller
        return real_copy(record)

    monkeypatch.setattr(ClusterRecord, "copy", counting_copy)
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:24])
    assert len(_durable_view(engine, "cam")) >= 3, "24 frames must seal several clusters"
    assert "store_in_clusters" not in copied_for and "on_completed" not in copied_for
    engine.close()


def test_history_past_the_disk_budget_comes_back_and_the_disk_tier_says_so(tiny_model, bikes_frames, tmp_path):
    """The disk budget counts clusters in the disk tier, while every sealed cluster has its record on disk: a restart,
    which adopts them all into the disk tier, can find more than the budget. They all come back, counted, and the
    disk tier reports its use past the budget rather than the worker failing to start."""
    budget = 256 * 1024
    first = make_engine(tiny_model, data_dir=str(tmp_path), disk_budget_bytes=budget)
    first.open_stream("cam", fps=2.0)
    feed(first, "cam", bikes_frames[:24])
    assert first.history.store.flush(30)
    sealed = len(replay(tmp_path / "cam").clusters)
    first.close()

    second = make_engine(tiny_model, data_dir=str(tmp_path), disk_budget_bytes=budget)
    try:
        (restored,) = second.restore_streams()
        assert restored.num_clusters == sealed
        residency = second.tiering.residency
        assert residency.capacity_bytes(Tier.DISK) == budget < residency.used_bytes(Tier.DISK)
    finally:
        second.close()


def test_keyframes_come_back_after_a_restart_with_a_disk_budget(tiny_model, bikes_frames, tmp_path):
    """A restart adopts every cluster into the disk tier, past its budget if need be: their keyframes, in the same
    records, come back with them rather than being refused the disk tier's room."""
    first = make_engine(tiny_model, data_dir=str(tmp_path), disk_budget_bytes=512 * 1024)
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:24])
    first.checkpoint()
    r = first.tiering.residency
    assert r.used_bytes(Tier.DISK) <= r.capacity_bytes(Tier.DISK)  # the running engine kept to its budget
    entries = replay(first.history.store.stream_dir("cam")).clusters
    assert entries and all(e.keyframes for e in entries.values())
    before = {cid: [k.keyframe_id for k in first.keyframes("cam", cluster_id=cid)] for cid in entries}
    first.close()

    second = make_engine(tiny_model, data_dir=str(tmp_path), disk_budget_bytes=512 * 1024)
    second.restore_streams()
    after = {cid: [k.keyframe_id for k in second.keyframes("cam", cluster_id=cid)] for cid in entries}
    lost = sorted(cid for cid in before if after[cid] != before[cid])
    assert not lost, f"{len(lost)} of {len(before)} clusters lost their keyframes at restart"
    second.close()


def test_clusters_of_another_frame_size_after_a_restart_are_never_merged_together(tiny_model, bikes_frames, tmp_path):
    """A stream's frame size is chosen at its first frame in each process: after a restart with another target,
    new clusters' frames differ from the restored ones', and a cluster's record holds frames of one size. A merge the
    questions make due between the two kinds is passed over (it asserted while sealing the merged record)."""
    from mosaic_core.engine.maintenance import apply_merges, merge_clusters, mergeable_clusters

    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:12])
    first.checkpoint()
    first.close()
    merging = {"merge_min_questions": 1, "merge_min_joint_fraction": 0.01}
    second = make_engine(tiny_model, data_dir=str(tmp_path), target_tokens_per_frame=8, **merging)
    second.restore_streams()
    feed(second, "cam", bikes_frames[12:30], offset_s=10.0)
    state = second.stream("cam")
    size = {cid: state.former.get(cid).frame_num_tokens[0] for cid in mergeable_clusters(second.parts, state)}
    ordered = list(size)
    pair = next([a, b] for a, b in itertools.pairwise(ordered) if size[a] != size[b])
    for _ in range(3):  # three questions retrieve the pair together
        assert apply_merges(second.parts, state, pair) == []
    assert set(pair) <= {c.cluster_id for c in second.clusters("cam")}
    with pytest.raises(InvalidArgumentError, match="frames have different sizes"):
        merge_clusters(second.parts, state, *pair)
    second.close()


def test_a_stalled_disk_does_not_hold_ingest_and_loses_nothing_once_it_writes(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """While no record file can be written, clusters that leave memory for the disk tier are read from their
    snapshots, so ingest goes on rather than waiting for each record (it waited up to a minute a cluster); once the
    disk writes again, every complete cluster is on disk and comes back after a restart."""
    from mosaic_core.durable import write_behind as write_behind_module

    disk_writes = threading.Event()
    real_write_atomic = write_behind_module.write_atomic

    def stalled_write(path, data):
        if path.suffix == RECORD_SUFFIX:
            disk_writes.wait(120)
        return real_write_atomic(path, data)

    monkeypatch.setattr(write_behind_module, "write_atomic", stalled_write)
    engine = make_engine(
        tiny_model, data_dir=str(tmp_path), device_budget_bytes=int(1.3 * MIB), host_budget_bytes=int(0.3 * MIB)
    )
    try:
        engine.open_stream("cam", fps=2.0)
        fed = threading.Thread(target=feed, args=(engine, "cam", bikes_frames[:40]), daemon=True)
        fed.start()
        fed.join(30)
        assert not fed.is_alive(), "ingest waited for record files the disk could not write"
        on_disk = [c for c in engine.clusters("cam") if c.tier == "disk"]
        assert on_disk, "tight device and host budgets must push clusters to the disk tier"
        assert engine.history.store.snapshot_stats().clusters_written == 0
        before = {c.cluster_id: _kv_crc(engine.tiering.tiers.read(c.cluster_id)) for c in on_disk}
        disk_writes.set()
        store = engine.history.store
        sealed = {c.cluster_id for c in engine.clusters("cam") if store.owns(c.cluster_id)}
        assert store.flush(30)
    finally:
        disk_writes.set()
        engine.close()
    again = make_engine(tiny_model, data_dir=str(tmp_path))
    try:
        again.restore_streams()
        assert sealed <= {c.cluster_id for c in again.clusters("cam")}
        assert before == {cid: _kv_crc(again.tiering.tiers.read(cid)) for cid in before}
    finally:
        again.close()


def test_numpy_timestamps_are_journalled_as_numbers(tiny_model, bikes_frames, tmp_path):
    """A caller of the engine handing NumPy scalars as timestamps: the journal (JSON) could not write a line, and
    its one commit thread retried it for good, so no stream's history became durable any more."""
    import numpy as np

    from mosaic_core.engine.results import FrameInput

    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("a", fps=2.0)
    engine.open_stream("b", fps=2.0)
    frames = [FrameInput("a", np.float32(t), rgb) for t, rgb in bikes_frames[:16]]
    frames += [FrameInput("b", t, rgb) for t, rgb in bikes_frames[:16]]
    for i in range(0, len(frames), 8):
        engine.ingest(frames[i : i + 8])
    try:
        assert _durable_view(engine, "a") and _durable_view(engine, "b")
        with pytest.raises(InvalidArgumentError, match="must be a number"):
            engine.ingest([FrameInput("a", "soon", bikes_frames[20][1])])
    finally:
        engine.close()


def test_a_merge_whose_number_cannot_be_reserved_changes_nothing(tiny_model, bikes_frames, tmp_path):
    """The merge's new number falls at the end of the reserved block and the disk is full: the merge fails whole,
    the clusters stay as they were, in memory and in the journal, and a restart restores them all. Before, the
    merged cluster was made in memory but never journalled, and a later merge of it journalled frames the journal
    still held in the old clusters, so the restart set the whole stream aside."""
    import dataclasses
    import errno

    from mosaic_core.engine.maintenance import merge_clusters

    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:24])
    state, history = engine.streams["cam"], engine.history
    state.former.config = dataclasses.replace(state.former.config, max_tokens=1000)  # room for the merge
    before = _durable_view(engine, "cam")
    left, right = sorted(before)[:2]
    history._reserved["cam"] = (state.former.next_number + 1, history._reserved["cam"][1])
    reserve = history.store.reserve_ids

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    history.store.reserve_ids = full
    try:
        with pytest.raises(OSError, match="No space left"):
            merge_clusters(engine.parts, state, left, right)
    finally:
        history.store.reserve_ids = reserve
    held = {r.cluster_id for r in state.former.records_to_read() if r.sealed}
    assert {left, right} <= held and _durable_view(engine, "cam") == before
    merged = merge_clusters(engine.parts, state, left, right)  # room again: the merge goes through
    assert merged not in before and merged in _durable_view(engine, "cam")
    engine.close()
    again = make_engine(tiny_model, data_dir=str(tmp_path))
    try:
        (restored,) = again.restore_streams()
        assert restored.stream_id == "cam" and merged in {c.cluster_id for c in again.clusters("cam")}
    finally:
        again.close()


def test_a_cluster_whose_snapshot_fails_leaves_the_other_streams_clusters_durable(
    tiny_model, bikes_frames, tmp_path, monkeypatch, caplog
):
    """Clusters of several streams complete in one pass; the first one's snapshot fails (a read the disk refuses).
    It is logged, and every other cluster completed in the pass is still made durable: the error used to end the
    call before them, and nothing made them durable later."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    for stream_id in ("a", "b"):
        engine.open_stream(stream_id)
    snapshot_pages = KVTiers.snapshot_pages
    failed = []

    def first_snapshot_fails(self, cluster_id, *args, **kwargs):
        if not failed:
            failed.append(cluster_id)
            raise OSError(errno.EIO, "Input/output error")
        return snapshot_pages(self, cluster_id, *args, **kwargs)

    monkeypatch.setattr(KVTiers, "snapshot_pages", first_snapshot_fails)
    with caplog.at_level(logging.ERROR, logger="mosaic_core.engine.window_store"):
        for t, rgb in bikes_frames:
            engine.ingest([FrameInput("a", t, rgb), FrameInput("b", t, rgb)])
    assert failed == ["a/c000000"] and "a/c000000 completed, but making it durable failed" in caplog.text
    store = engine.history.store
    for stream_id in ("a", "b"):
        state = engine.stream(stream_id)
        window = state.local_cluster_ids()
        completed = [r.cluster_id for r in state.former.records_to_read() if r.sealed and r.cluster_id not in window]
        assert len(completed) > 1
        assert [cid for cid in completed if not store.owns(cid)] == (failed if stream_id == "a" else [])
    engine.close()


def test_an_open_whose_ids_cannot_be_reserved_leaves_no_history_behind(tiny_model, tmp_path):
    """The stream's folder is made, then its first ids cannot be journalled (a full disk): the open fails, and
    nothing of the stream stays. Before, its folder, its journal writer and its reservation stayed for as long as the
    engine ran, one set per failed open, the id was refused as existing until a restart, and the restart brought
    back a stream no one had created."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    history = engine.history
    reserve = history.store.reserve_ids

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    history.store.reserve_ids = full
    try:
        for n in range(3):
            with pytest.raises(OSError, match="No space left"):
                engine.open_stream(f"cam-{n}")
    finally:
        history.store.reserve_ids = reserve
    assert engine.streams == {} and history._reserved == {} and history.store._writers == {}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []
    engine.open_stream("cam-0")  # room again: the id is free
    engine.close()
    again = make_engine(tiny_model, data_dir=str(tmp_path))
    try:
        assert [s.stream_id for s in again.restore_streams()] == ["cam-0"]
    finally:
        again.close()


def test_an_open_whose_folder_cannot_be_removed_either_leaves_nothing_held(tiny_model, tmp_path):
    """Both the first ids' journal write and the folder's move to the trash fail: the open fails, and the engine
    holds no writer or reservation of the stream. Before, both stayed for as long as the engine ran. The folder
    stays too, and a restart restores the stream, empty."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    history = engine.history
    reserve, delete = history.store.reserve_ids, history.store.delete_stream

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    history.store.reserve_ids = history.store.delete_stream = full
    try:
        with pytest.raises(OSError, match="No space left"):
            engine.open_stream("cam-0")
    finally:
        history.store.reserve_ids, history.store.delete_stream = reserve, delete
    assert engine.streams == {} and history._reserved == {} and history.store._writers == {}
    engine.close()
    again = make_engine(tiny_model, data_dir=str(tmp_path))
    try:
        assert [(s.stream_id, s.num_clusters) for s in again.restore_streams()] == [("cam-0", 0)]
    finally:
        again.close()
