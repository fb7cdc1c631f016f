"""A journal line is written once: a compaction that fails after it, or an unlink that fails after the line, is not
a reason to write the line again, and the files a commit removed are still unlinked."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
import torch

from mosaic_core.durable import manifest as manifest_module
from mosaic_core.durable.manifest import (
    MANIFEST_NAME,
    RECORD_SUFFIX,
    ClusterEntry,
    ManifestState,
    ManifestWriter,
    decode_line,
    replay,
)
from mosaic_core.durable.records import ClusterSummary
from mosaic_core.durable.store import DurableStore
from mosaic_core.durable.write_behind import Seal

WAIT_S = 10.0


def _seal(number: int) -> Seal:
    pages = torch.full((1, 2, 2, 1, 4, 8), float(number), dtype=torch.bfloat16)
    entry = ClusterEntry(
        cluster_id=f"cam/c{number:06d}",
        file=f"c{number:06d}{RECORD_SUFFIX}",
        start_s=float(number),
        end_s=float(number) + 1.0,
        frame_indices=[number],
        frame_timestamps_s=[float(number)],
        frame_num_tokens=[4],
        num_bytes=pages.numel() * pages.element_size(),
        checksum="",
        position_end=number,
    )
    return Seal(entry, pages, ClusterSummary(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), 4.0))


def _removals(stream_dir: Path) -> list[list[str]]:
    records = [decode_line(line) for line in (stream_dir / MANIFEST_NAME).read_bytes().splitlines(True)]
    return [record["remove"] for record in records if record["op"] == "commit" and record["remove"]]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_append_whose_compaction_fails_keeps_its_line_and_compacts_at_the_next(tmp_path, monkeypatch):
    writer = ManifestWriter(tmp_path, ManifestState())
    writer.append({"op": "open", "stream": {"stream_id": "cam", "fps": 1.0}})
    monkeypatch.setattr(manifest_module, "write_atomic", _disk_full)
    for number in range(70):  # past the dead lines a compaction waits for
        writer.append({"op": "ids", "next": number, "frames": 0})  # does not raise: the line is on disk
    assert replay(tmp_path).next_cluster_number == 69
    monkeypatch.undo()
    writer.append({"op": "ids", "next": 70, "frames": 0})
    assert replay(tmp_path).num_lines == 2  # compacted: the open line and one of ids (no clusters)


def _store_with_one_cluster(tmp_path) -> DurableStore:
    store = DurableStore(tmp_path, writers=1)
    store.create_stream("cam", {"fps": 1.0})
    store.submit("cam", add=[_seal(1)])
    assert store.flush(WAIT_S)
    return store


def test_a_compaction_that_fails_after_a_removal_neither_repeats_the_line_nor_keeps_the_file(tmp_path, monkeypatch):
    store = _store_with_one_cluster(tmp_path)
    compact = ManifestWriter.compact
    failures = [1]

    def fails_once(self):
        if failures[0]:
            failures[0] -= 1
            _disk_full()
        compact(self)

    try:
        store._writers["cam"].state.num_lines = 1000  # the next append compacts
        monkeypatch.setattr(ManifestWriter, "compact", fails_once)
        store.submit("cam", remove=["cam/c000001"])
        assert store.flush(WAIT_S)
    finally:
        store.close()
    assert not failures[0], "the compaction was never tried"
    assert not (tmp_path / "cam" / f"c000001{RECORD_SUFFIX}").exists()
    assert replay(tmp_path / "cam").clusters == {}


def test_a_commit_retried_after_its_line_is_written_only_unlinks(tmp_path, monkeypatch):
    store = _store_with_one_cluster(tmp_path)
    record = tmp_path / "cam" / f"c000001{RECORD_SUFFIX}"
    unlink = Path.unlink
    failures = [1]

    def fails_once(self, missing_ok=False):
        if self == record and failures[0]:
            failures[0] -= 1
            raise OSError(errno.EIO, "Input/output error")
        unlink(self, missing_ok=missing_ok)

    try:
        monkeypatch.setattr(Path, "unlink", fails_once)
        store.submit("cam", remove=["cam/c000001"])
        assert store.flush(WAIT_S)
        assert store.snapshot_stats().write_errors == 1
    finally:
        store.close()
    assert not record.exists(), "the retry forgot the file its commit removed"
    assert _removals(tmp_path / "cam") == [["cam/c000001"]], "the retry journalled the commit again"


def test_a_delete_whose_move_to_the_trash_fails_forgets_nothing_and_a_retry_deletes(tmp_path, monkeypatch):
    store = DurableStore(tmp_path, writers=1)
    try:
        store.create_stream("cam", {"fps": 1.0})
        rename = Path.rename

        def no_room_in_the_trash(self, target):
            if ".trash" in str(target):
                raise OSError(errno.ENOSPC, "No space left on device")
            return rename(self, target)

        monkeypatch.setattr(Path, "rename", no_room_in_the_trash)
        try:
            store.delete_stream("cam")
        except OSError:
            pass
        else:
            raise AssertionError("the move to the trash was refused: the delete must say so")
        monkeypatch.undo()
        store.reserve_ids("cam", 5, 7)  # its journal is still written
        store.submit("cam", add=[_seal(1)])
        assert store.flush(WAIT_S)
        assert "cam/c000001" in replay(tmp_path / "cam").clusters
        store.delete_stream("cam")
        assert not (tmp_path / "cam").exists()
    finally:
        store.close()


def test_a_half_line_that_could_not_be_cut_back_is_not_glued_to_the_retry(tmp_path, monkeypatch):
    """A write fails part-way and cutting it back fails too: the retry first rewrites the journal from memory, so
    the retried line is not appended to half a line (which replay would drop as a torn tail, its files with it)."""
    import os

    writer = ManifestWriter(tmp_path, ManifestState())
    writer.append({"op": "open", "stream": {"stream_id": "cam", "fps": 1.0}})
    write = os.write

    def half_then_full(fd, data):
        write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_module.os, "write", half_then_full)
    monkeypatch.setattr(manifest_module.os, "ftruncate", _disk_full)
    entry = _seal(7).entry
    commit = {"op": "commit", "add": [dataclasses.asdict(entry)], "remove": []}
    with pytest.raises(OSError, match="No space left"):
        writer.append(commit)
    monkeypatch.undo()
    writer.append(commit)  # the retry, with room again
    state = replay(tmp_path)
    assert list(state.clusters) == ["cam/c000007"] and not state.torn_tail and state.damaged_lines == 0


def test_a_complete_last_line_that_fails_its_crc_is_damaged_not_torn(tmp_path):
    """A line with its newline was acknowledged: failing its CRC, it is damage to keep a copy of (and orphan record
    files are then kept), not a torn tail to ignore."""
    writer = ManifestWriter(tmp_path, ManifestState())
    writer.append({"op": "open", "stream": {"stream_id": "cam", "fps": 1.0}})
    writer.append({"op": "ids", "next": 5, "frames": 0})
    path = tmp_path / MANIFEST_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last line, before its newline
    path.write_bytes(bytes(data))
    state = replay(tmp_path)
    assert state.damaged_lines == 1 and not state.torn_tail
    path.write_bytes(bytes(data[:-3]))  # cut short, without its newline: torn
    state = replay(tmp_path)
    assert state.torn_tail and state.damaged_lines == 0
