"""The durable store writes record files side by side, journals commits in order, and counts what it holds back.

Each seal's ``ready`` is a gate the test opens, standing in for the device event a real snapshot waits for, so a
write can be held mid-way without timing guesses.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mosaic_core.durable import write_behind as write_behind_module
from mosaic_core.durable.manifest import (
    DAMAGED_PREFIX,
    MANIFEST_NAME,
    RECORD_SUFFIX,
    STATE_NAME,
    ClusterEntry,
    ManifestWriter,
    decode_line,
    replay,
)
from mosaic_core.durable.records import ClusterSummary, encode_pages
from mosaic_core.durable.store import DurableStore
from mosaic_core.durable.write_behind import Seal

WAIT_S = 10.0


class Gate:
    """A ``ready`` that holds the writer of its seal until the test opens it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._open = threading.Event()

    def synchronize(self) -> None:
        self.reached.set()
        assert self._open.wait(WAIT_S), "the test never opened this gate"

    def open(self) -> None:
        self._open.set()


def _seal(stream_id: str, number: int, ready=None, *, tokens: int = 4) -> Seal:
    cluster_id = f"{stream_id}/c{number:06d}"
    pages = torch.full((1, 2, 2, 1, tokens, 8), float(number), dtype=torch.bfloat16)
    entry = ClusterEntry(
        cluster_id=cluster_id,
        file=f"c{number:06d}{RECORD_SUFFIX}",
        start_s=float(number),
        end_s=float(number) + 1.0,
        frame_indices=[number],
        frame_timestamps_s=[float(number)],
        frame_num_tokens=[tokens],
        num_bytes=pages.numel() * pages.element_size(),
        checksum="",
        position_end=number,
    )
    summary = ClusterSummary(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), float(tokens))
    return Seal(entry, pages, summary, ready)


def _journal(root, stream_id: str) -> list[str]:
    """The clusters the stream's journal adds, in the order of its lines."""
    records = [decode_line(line) for line in (root / stream_id / MANIFEST_NAME).read_bytes().splitlines(True)]
    return [entry["cluster_id"] for record in records if record["op"] == "commit" for entry in record["add"]]


@contextmanager
def _held_first_write(tmp_path, **store_args):
    """A store with a stream "cam" whose first sealed cluster's write waits at a gate; yields the store and gate."""
    held = Gate()
    store = DurableStore(tmp_path, **store_args)
    try:
        store.create_stream("cam", {"fps": 1.0})
        store.submit("cam", add=[_seal("cam", 1, held)])
        yield store, held
    finally:
        held.open()  # a failed assertion must not leave the writer waiting
        store.close()


def test_a_record_file_is_written_while_an_earlier_one_waits_and_the_journal_keeps_their_order(tmp_path):
    with _held_first_write(tmp_path, writers=2) as (store, held):
        store.submit("cam", add=[_seal("cam", 2)])
        assert held.reached.wait(WAIT_S)
        second = tmp_path / "cam" / f"c000002{RECORD_SUFFIX}"
        deadline = time.monotonic() + WAIT_S
        while not second.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert second.exists(), "the second file waited for the first: files are not written side by side"
        assert _journal(tmp_path, "cam") == [], "a commit was journalled before the file of the one ahead of it"
        held.open()
        assert store.flush(WAIT_S)
        assert _journal(tmp_path, "cam") == ["cam/c000001", "cam/c000002"]
        assert store.read_pages("cam/c000001").flatten()[0].item() == 1.0  # read back from its file, checked


def test_one_writer_writes_in_turn(tmp_path):
    """The control for the test above: with one writer thread the second file cannot appear first."""
    with _held_first_write(tmp_path, writers=1) as (store, held):
        store.submit("cam", add=[_seal("cam", 2)])
        assert held.reached.wait(WAIT_S)
        time.sleep(0.2)
        assert not (tmp_path / "cam" / f"c000002{RECORD_SUFFIX}").exists()
        held.open()
        assert store.flush(WAIT_S)
        assert _journal(tmp_path, "cam") == ["cam/c000001", "cam/c000002"]


def test_time_blocked_by_the_pending_bound_is_counted(tmp_path):
    one_seal = _seal("cam", 0).num_bytes
    with _held_first_write(tmp_path, max_pending_bytes=one_seal, writers=1) as (store, held):
        store.submit("cam", add=[_seal("cam", 2)])  # at the bound, not past it: no wait
        assert store.snapshot_stats().submit_wait_s == 0.0
        threading.Timer(0.3, held.open).start()
        store.submit("cam", add=[_seal("cam", 3)])  # past the bound: waits for the writer
        assert store.snapshot_stats().submit_wait_s >= 0.2
        assert store.flush(WAIT_S)
        stats = store.snapshot_stats()
        assert stats.clusters_written == 3
        assert stats.file_write_s >= 0.2  # the held write's wait for its snapshot counts as writer time


def test_a_deleted_stream_leaves_no_late_file_in_a_new_stream_of_its_name(tmp_path):
    with _held_first_write(tmp_path, writers=1) as (store, held):
        store.submit("cam", add=[_seal("cam", 2, Gate())])  # queued behind the first, its gate never opens
        assert held.reached.wait(WAIT_S)
        threading.Timer(0.2, held.open).start()
        store.delete_stream("cam")  # returns once no write of the old stream runs
        store.create_stream("cam", {"fps": 2.0})
        assert store.flush(WAIT_S)
        time.sleep(0.1)
        assert sorted(p.name for p in (tmp_path / "cam").iterdir() if p.suffix == RECORD_SUFFIX) == []
        assert store.snapshot_stats().write_errors == 0


class FailsOnce:
    """A ``ready`` whose first wait fails the way a CUDA error would (not an OSError)."""

    def __init__(self) -> None:
        self.calls = 0

    def synchronize(self) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failed_write_that_is_no_oserror_is_retried_and_the_writer_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.01, 0.01, 0.01, 0.01))
    store = DurableStore(tmp_path, writers=2)
    try:
        store.create_stream("cam", {"fps": 1.0})
        store.submit("cam", add=[_seal("cam", 1, FailsOnce())])
        store.submit("cam", add=[_seal("cam", 2)])
        assert store.flush(WAIT_S)
        assert _journal(tmp_path, "cam") == ["cam/c000001", "cam/c000002"]
        stats = store.snapshot_stats()
        assert (stats.write_errors, stats.clusters_written) == (1, 2)
        assert stats.last_error.startswith("RuntimeError")
    finally:
        store.close()


def test_the_engine_gives_its_store_the_configured_writers_and_pending_bound(tiny_model, tmp_path):
    from tests.engine.engine_helpers import make_engine

    engine = make_engine(tiny_model, data_dir=str(tmp_path), durable_writers=2, durable_pending_bytes=3 << 20)
    store = engine.history.store
    assert store.max_pending_bytes == 3 << 20
    assert store._files._max_workers == 2
    engine.close()


def _stream_files(root, stream_id: str) -> list[str]:
    return sorted(p.name for p in (root / stream_id).glob(f"*{RECORD_SUFFIX}"))


def _restored(root) -> dict[str, list[str]]:
    """What a new store finds under ``root``: each stream's clusters."""
    store = DurableStore(root)
    try:
        return {s.stream_id: sorted(e.cluster_id for e in s.clusters) for s in store.load_streams()}
    finally:
        store.close()


def test_a_journal_append_that_fails_part_way_loses_no_cluster_at_restart(tmp_path, monkeypatch):
    """Half a journal line reaches the disk, then the disk is full: the retry must not follow the half line, or
    every later line reads as damaged at restart."""
    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.01, 0.01, 0.01, 0.01))
    real_fsync, failed = os.fsync, []

    def half_a_line_then_disk_full(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(MANIFEST_NAME) and not failed:
            failed.append(path)
            data = Path(path).read_bytes()
            line_start = data.rstrip(b"\n").rfind(b"\n") + 1
            os.truncate(fd, line_start + (len(data) - line_start) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("cam", {"fps": 1.0})
        store.submit("cam", add=[_seal("cam", 1)])
        assert store.flush(WAIT_S)
        monkeypatch.setattr(os, "fsync", half_a_line_then_disk_full)
        for number in range(2, 6):
            store.submit("cam", add=[_seal("cam", number)])
        assert store.flush(WAIT_S)
        assert failed and store.snapshot_stats().write_errors == 1
    finally:
        store.close()
    clusters = [f"cam/c{n:06d}" for n in range(1, 6)]
    assert _restored(tmp_path) == {"cam": clusters}
    assert _stream_files(tmp_path, "cam") == [f"c{n:06d}{RECORD_SUFFIX}" for n in range(1, 6)]


def test_a_damaged_line_inside_the_journal_loses_only_its_own_clusters_and_keeps_their_files(tmp_path):
    """Lines after a damaged one were acknowledged: they still count. The damaged line's files are kept, with the
    journal as it was, for a person to recover, at this restart and the next."""
    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("cam", {"fps": 1.0})
        for number in range(1, 4):
            store.submit("cam", add=[_seal("cam", number)])
            assert store.flush(WAIT_S)
    finally:
        store.close()
    journal = tmp_path / "cam" / MANIFEST_NAME
    lines = journal.read_bytes().splitlines(True)
    assert len(lines) == 4  # open, then one commit a cluster
    lines[2] = lines[2].replace(b"c000002", b"c0000x2")  # the second cluster's line fails its CRC
    journal.write_bytes(b"".join(lines))
    for _ in range(2):
        assert _restored(tmp_path) == {"cam": ["cam/c000001", "cam/c000003"]}
        assert _stream_files(tmp_path, "cam") == [f"c{n:06d}{RECORD_SUFFIX}" for n in range(1, 4)]
    (kept,) = (tmp_path / "cam").glob(f"{DAMAGED_PREFIX}*")
    assert b"c0000x2" in kept.read_bytes()


def test_writes_that_fail_past_every_retry_pause_land_once_the_disk_has_room(tmp_path, monkeypatch):
    """A disk full for longer than the retry pauses: nothing sealed is given up, and once there is room every cluster
    is written and the snapshots' memory is freed."""
    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.01, 0.01, 0.01, 0.01))
    real_write_atomic, disk_full = write_behind_module.write_atomic, threading.Event()
    disk_full.set()

    def write_unless_full(path, data):
        if disk_full.is_set() and path.suffix == RECORD_SUFFIX:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, data)

    monkeypatch.setattr(write_behind_module, "write_atomic", write_unless_full)
    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("cam", {"fps": 1.0})
        for number in range(1, 4):
            store.submit("cam", add=[_seal("cam", number)])
        deadline = time.monotonic() + WAIT_S
        while store.snapshot_stats().write_errors <= 2 * len(write_behind_module.RETRY_S):
            assert time.monotonic() < deadline, "the writes were not retried"
            time.sleep(0.01)
        disk_full.clear()
        assert store.flush(WAIT_S)
        stats = store.snapshot_stats()
        assert (stats.pending_clusters, stats.pending_bytes, stats.clusters_written) == (0, 0, 3)
    finally:
        store.close()
    assert _restored(tmp_path) == {"cam": ["cam/c000001", "cam/c000002", "cam/c000003"]}


def test_deleting_a_stream_frees_a_full_disk_that_another_streams_write_waits_on(tmp_path, monkeypatch):
    """The disk is full, and one camera's record write fails and is retried; the operator deletes another camera to
    free room. Its folder's bytes must leave the disk while the failing commit waits, not behind it in the queue
    (a rename into the trash frees nothing), or the room never comes and every later commit waits for good."""
    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.01,))
    real_write_atomic = write_behind_module.write_atomic
    trash = tmp_path / ".trash"

    def full_while_the_old_history_is_on_disk(path, data):
        old_history = (tmp_path / "old").exists() or (trash.exists() and any(trash.iterdir()))
        if old_history and path.suffix == RECORD_SUFFIX:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, data)

    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("old", {"fps": 1.0})
        store.submit("old", add=[_seal("old", 1)])
        assert store.flush(WAIT_S)
        monkeypatch.setattr(write_behind_module, "write_atomic", full_while_the_old_history_is_on_disk)
        store.create_stream("cam", {"fps": 1.0})
        store.submit("cam", add=[_seal("cam", 1)])
        deadline = time.monotonic() + WAIT_S
        while store.snapshot_stats().write_errors == 0:
            assert time.monotonic() < deadline, "the write did not fail"
            time.sleep(0.01)
        store.delete_stream("old")
        assert store.flush(WAIT_S), "the deleted stream's folder stayed on the full disk behind the failing commit"
    finally:
        store.close(WAIT_S)
    assert _restored(tmp_path) == {"cam": ["cam/c000001"]}


class SmallDisk:
    """A volume of ``capacity`` bytes holding every file under ``root``: a record's temporary file written past the
    room left gets the bytes that fit, then ENOSPC, as a full disk does."""

    def __init__(self, root: Path, *, room: int) -> None:
        self.root = root
        self.capacity = self.used() + room

    def used(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def room(self) -> int:
        return self.capacity - self.used()

    def open_records_on_it(self, monkeypatch) -> None:
        real_open, disk = Path.open, self

        def open_on_disk(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return _OnDisk(f, disk) if mode == "wb" and path.name.endswith(f"{RECORD_SUFFIX}.tmp") else f

        monkeypatch.setattr(Path, "open", open_on_disk)


class _OnDisk:
    def __init__(self, f, disk: SmallDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, chunk) -> int:
        data = memoryview(chunk).cast("B")
        room = max(self._disk.room(), 0)
        self._f.write(data[:room])
        self._f.flush()
        if len(data) > room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def test_a_failed_record_write_leaves_no_partial_file_holding_the_room_another_needs(tmp_path, monkeypatch):
    """Two record writes fail on a full disk; the first one's failed part-way and kept what it had written in its
    temporary file. Once room is freed for one record, the commit at the head of the queue must find it: a failed
    write that keeps its partial file holds that room for good, and neither cluster is ever written."""
    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.01,))
    first, second = Gate(), _seal("cam", 2, tokens=256)
    record_bytes = sum(memoryview(chunk).nbytes for chunk in encode_pages(second.pages, second.summary)[0])
    store = DurableStore(tmp_path, writers=2)
    try:
        store.create_stream("cam", {"fps": 1.0})
        ballast = tmp_path / "other-data"
        ballast.write_bytes(b"x" * (record_bytes * 3 // 4))
        disk = SmallDisk(tmp_path, room=record_bytes // 2)
        disk.open_records_on_it(monkeypatch)
        store.submit("cam", add=[_seal("cam", 1, first, tokens=256)])
        store.submit("cam", add=[second])  # written while the first waits: half of it fits
        deadline = time.monotonic() + WAIT_S
        while not second.written.done():
            assert time.monotonic() < deadline, "the second record's write did not end"
            time.sleep(0.01)
        assert second.written.exception() is not None, "the second record fit: the disk is not full"
        first.open()
        while store.snapshot_stats().write_errors == 0:  # the first fails too, and is retried
            assert time.monotonic() < deadline, "the first record's write did not fail"
            time.sleep(0.01)
        ballast.unlink()  # room for one record, not two
        while "cam/c000001" not in replay(tmp_path / "cam").clusters:
            assert time.monotonic() < deadline, f"the first record never found the room freed ({disk.room()} left)"
            time.sleep(0.01)
        disk.capacity += 10 * record_bytes
        assert store.flush(WAIT_S)
    finally:
        first.open()
        store.close(WAIT_S)
    assert _restored(tmp_path) == {"cam": ["cam/c000001", "cam/c000002"]}
    assert sorted(p.name for p in (tmp_path / "cam").glob("*.tmp")) == []


def test_a_deleted_streams_commit_never_lands_in_a_new_stream_of_its_name(tmp_path, monkeypatch):
    """A record write fails and waits out its retry pause; meanwhile the camera is deleted and added again under its
    id. The old commit belongs to neither: the new stream's journal and folder get nothing of it."""
    monkeypatch.setattr(write_behind_module, "RETRY_S", (1.0,))
    real_write_atomic, failures = write_behind_module.write_atomic, []

    def fail_once(path, data):
        if path.suffix == RECORD_SUFFIX and not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, data)

    monkeypatch.setattr(write_behind_module, "write_atomic", fail_once)
    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("cam", {"fps": 1.0, "generation": "old"})
        store.submit("cam", add=[_seal("cam", 7)])
        deadline = time.monotonic() + WAIT_S
        while store.snapshot_stats().write_errors == 0:
            assert time.monotonic() < deadline, "the write did not fail"
            time.sleep(0.01)
        store.delete_stream("cam")  # within the commit's 1-s retry pause
        store.create_stream("cam", {"fps": 1.0, "generation": "new"})
        assert store.flush(WAIT_S)
    finally:
        store.close()
    new = replay(tmp_path / "cam")
    assert new.stream["generation"] == "new" and not new.clusters
    assert _stream_files(tmp_path, "cam") == []


def test_a_create_that_fails_midway_leaves_the_stream_id_free(tmp_path, monkeypatch):
    """The disk fails as the new stream's first journal line is written: nothing is left under the id, so the camera
    can be added again, now or after a restart."""
    real_append = ManifestWriter.append

    def disk_full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = DurableStore(tmp_path)
    try:
        monkeypatch.setattr(ManifestWriter, "append", disk_full)
        with pytest.raises(OSError):
            store.create_stream("cam", {"fps": 1.0})
        monkeypatch.setattr(ManifestWriter, "append", real_append)
        assert not (tmp_path / "cam").exists()
        store.create_stream("cam", {"fps": 1.0})
    finally:
        store.close()
    assert _restored(tmp_path) == {"cam": []}
    assert not list(tmp_path.glob(".new-*"))  # the unfinished folder went at the restart


def test_a_folder_with_no_readable_journal_is_kept_aside_and_frees_its_id(tmp_path):
    """Left by a crash of an older version, or with its first line damaged: it cannot be read as a stream, so it is
    moved out of its id's way, its files kept for a person."""
    (tmp_path / "cam").mkdir()
    (tmp_path / "cam" / f"c000001{RECORD_SUFFIX}").write_bytes(b"record bytes")
    store = DurableStore(tmp_path)
    try:
        assert store.load_streams() == []
        store.create_stream("cam", {"fps": 1.0})
    finally:
        store.close()
    (kept,) = (tmp_path / ".unreadable").iterdir()
    assert kept.name.startswith("cam-") and (kept / f"c000001{RECORD_SUFFIX}").read_bytes() == b"record bytes"


def test_a_commit_for_a_stream_with_no_journal_is_dropped_not_retried(tmp_path):
    """A stream deleted before its commit was queued: the commit has no journal to go to, and is let go at once."""
    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("cam", {"fps": 1.0})
        store.delete_stream("cam")
        store.submit("cam", add=[_seal("cam", 1)])
        assert store.flush(WAIT_S)
        assert store.snapshot_stats().pending_clusters == 0
    finally:
        store.close()
    assert not (tmp_path / "cam").exists()


def test_a_state_write_that_fails_is_counted_and_lands_once_the_disk_has_room(tmp_path, monkeypatch):
    """A stream's state (clock, counters, watch watermark) that cannot be written is counted as a write error, and
    a flush does not claim it is on disk; it is written at a later interval, the newest state then."""
    store = DurableStore(tmp_path / "data", state_interval_s=0.05, writers=1)
    store.create_stream("cam", {"fps": 1.0})
    write = write_behind_module.write_atomic
    full = [True]

    def disk(path, data):
        if full[0] and path.name == STATE_NAME:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, data)

    monkeypatch.setattr(write_behind_module, "write_atomic", disk)
    store.update_state("cam", watch_watermark_s=12.5)
    assert not store.flush(0.5)
    stats = store.snapshot_stats()
    assert stats.write_errors >= 1 and "No space left" in stats.last_error
    store.update_state("cam", watch_watermark_s=13.0)
    full[0] = False
    assert store.flush(5.0)
    store.close()
    assert json.loads((tmp_path / "data" / "cam" / STATE_NAME).read_text())["watch_watermark_s"] == 13.0


def test_a_checkpoint_whose_history_is_not_on_disk_says_so_and_logs_its_wait(
    tiny_model, bikes_frames, tmp_path, monkeypatch, caplog
):
    """A graceful stop on a full disk: the checkpoint's wait ends with clusters unwritten, and it raises naming the
    store's last error, where it returned as if everything were durable; meanwhile its log says what it waits for and
    the store's last error, every progress interval, where it was silent for up to a minute."""
    import mosaic_core.engine.stream_lifecycle as stream_lifecycle_module
    from mosaic_core.durable import progress
    from mosaic_core.errors import StateError
    from tests.engine.engine_helpers import feed, make_engine

    monkeypatch.setattr(write_behind_module, "RETRY_S", (0.01,))
    monkeypatch.setattr(stream_lifecycle_module, "CHECKPOINT_WAIT_S", 0.5)
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.1)
    real_write_atomic = write_behind_module.write_atomic

    def disk_full(path, data):
        if path.suffix == RECORD_SUFFIX:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, data)

    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=2.0)
    feed(engine, "cam", bikes_frames[:12])
    monkeypatch.setattr(write_behind_module, "write_atomic", disk_full)
    try:
        logged = caplog.at_level(logging.INFO, logger="mosaic_core.engine.stream_lifecycle")
        with logged, pytest.raises(StateError, match=r"not all on disk after 0\.5 s .*No space left on device"):
            engine.checkpoint()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint: ")]
        assert re.match(r"checkpoint: waiting up to 0\.5 s for the durable store to write \d+ clusters? ", lines[0])
        still = [line for line in lines if line.startswith("checkpoint: still waiting after ")]
        assert 1 <= len(still) <= 5 and all("No space left on device" in line for line in still)
        assert not any("is on disk" in line for line in lines)
        caplog.clear()
        monkeypatch.setattr(write_behind_module, "write_atomic", real_write_atomic)  # room again
        monkeypatch.setattr(stream_lifecycle_module, "CHECKPOINT_WAIT_S", WAIT_S)
        with caplog.at_level(logging.INFO, logger="mosaic_core.engine.stream_lifecycle"):
            engine.checkpoint()
        assert re.search(r"checkpoint: every stream's history is on disk after [\d.]+ s", caplog.text)
    finally:
        monkeypatch.setattr(write_behind_module, "write_atomic", real_write_atomic)
        assert engine.history.store.flush(WAIT_S)  # room again: everything lands
        engine.close()
