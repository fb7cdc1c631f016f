"""A stream deleted and opened again under its id: no id the deleted stream gave out names anything of the new
one, in one process and across restarts."""

from __future__ import annotations

import errno
import json

import pytest

from mosaic_core.durable.manifest import MANIFEST_NAME, STATE_NAME, decode_line, encode_line
from mosaic_core.engine import history
from mosaic_core.engine.keyframe_store import UnknownKeyframeError
from mosaic_core.engine.results import FrameInput
from mosaic_core.errors import UnknownClusterError
from tests.engine.engine_helpers import feed, make_engine


def _ids(engine, stream_id: str) -> tuple[set[str], set[str]]:
    """The stream's held cluster ids, and the ids of every keyframe of them."""
    cluster_ids = {c.cluster_id for c in engine.clusters(stream_id)}
    keyframe_ids = {k.keyframe_id for cid in cluster_ids for k in engine.keyframes(stream_id, cluster_id=cid)}
    return cluster_ids, keyframe_ids


def _assert_gone(engine, stream_id: str, cluster_ids: set[str], keyframe_ids: set[str]) -> None:
    for keyframe_id in sorted(keyframe_ids):
        with pytest.raises(UnknownKeyframeError, match="earlier stream of that id, deleted since"):
            engine.keyframes(stream_id, keyframe_ids=[keyframe_id])
    for cluster_id in sorted(cluster_ids):
        with pytest.raises(UnknownClusterError, match="earlier stream of that id, deleted since"):
            engine.keyframes(stream_id, cluster_id=cluster_id)
        assert engine.cluster_info(stream_id, cluster_id) is None


def _assert_held(engine, stream_id: str, cluster_ids: set[str], keyframe_ids: set[str]) -> None:
    assert cluster_ids <= {c.cluster_id for c in engine.clusters(stream_id)}
    assert {k.keyframe_id for k in engine.keyframes(stream_id, keyframe_ids=sorted(keyframe_ids))} == keyframe_ids


def _kept_on_disk(tiny_model, tmp_path, frames) -> None:
    """Stream "cam" of an engine on ``tmp_path`` ingests ``frames``, and the engine shuts down cleanly."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", frames)
    engine.checkpoint()
    engine.close()


def test_a_reopened_stream_gives_none_of_the_deleted_stream_s_ids(tiny_model, bikes_frames):
    engine = make_engine(tiny_model)
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])
    old_clusters, old_keyframes = _ids(engine, "cam")
    assert len(old_clusters) >= 2 and old_keyframes
    engine.close_stream("cam")

    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])
    new_clusters, new_keyframes = _ids(engine, "cam")
    assert new_clusters and new_keyframes
    assert not new_clusters & old_clusters and not new_keyframes & old_keyframes
    _assert_gone(engine, "cam", old_clusters, old_keyframes)
    _assert_held(engine, "cam", new_clusters, new_keyframes)
    # Frames are still counted per stream; only their numbers go on.
    assert engine.stream("cam").frames_ingested == 16
    (latest,) = engine.keyframes("cam", latest=True)
    assert latest.frame_index == engine.stream("cam").next_frame_index - 1


def test_the_numbers_go_on_across_restarts(tiny_model, bikes_frames, tmp_path):
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:16])
    old_clusters, old_keyframes = _ids(first, "cam")
    assert old_clusters and old_keyframes
    first.close_stream("cam")
    first.close()

    # Deleted before the restart, opened again after it.
    second = make_engine(tiny_model, data_dir=str(tmp_path))
    assert second.restore_streams() == []
    second.open_stream("cam", fps=4.0)
    feed(second, "cam", bikes_frames[:16])
    second.checkpoint()
    _assert_gone(second, "cam", old_clusters, old_keyframes)
    kept_clusters, kept_keyframes = _ids(second, "cam")
    second.close()

    # The reopened stream comes back with its own numbers, and goes on past them.
    third = make_engine(tiny_model, data_dir=str(tmp_path))
    (restored,) = third.restore_streams()
    assert restored.num_clusters == len(kept_clusters)
    _assert_gone(third, "cam", old_clusters, old_keyframes)
    _assert_held(third, "cam", kept_clusters, kept_keyframes)
    assert third.stream("cam").frames_ingested == 16
    feed(third, "cam", bikes_frames[:8], offset_s=100.0)
    later_clusters, later_keyframes = _ids(third, "cam")
    grown_clusters, grown_keyframes = later_clusters - kept_clusters, later_keyframes - kept_keyframes
    assert grown_clusters and grown_keyframes
    assert not grown_clusters & old_clusters and not grown_keyframes & old_keyframes
    third.close()


def test_a_stream_deleted_on_one_engine_numbers_on_when_created_on_another(tiny_model, bikes_frames, tmp_path):
    """A service's workers: each its own data folder, one shared folder for the numbers of closed streams."""
    worker_0 = make_engine(tiny_model, data_dir=str(tmp_path / "worker-0"), retired_ids_dir=str(tmp_path))
    worker_1 = make_engine(tiny_model, data_dir=str(tmp_path / "worker-1"), retired_ids_dir=str(tmp_path))
    worker_0.open_stream("cam", fps=4.0)
    feed(worker_0, "cam", bikes_frames[:16])
    old_clusters, old_keyframes = _ids(worker_0, "cam")
    assert old_clusters and old_keyframes
    worker_0.close_stream("cam")

    worker_1.open_stream("cam", fps=4.0)
    feed(worker_1, "cam", bikes_frames[:16])
    new_clusters, new_keyframes = _ids(worker_1, "cam")
    assert not new_clusters & old_clusters and not new_keyframes & old_keyframes
    _assert_gone(worker_1, "cam", old_clusters, old_keyframes)
    worker_0.close()
    worker_1.close()


def test_a_journal_from_before_first_frame_index_numbers_its_frames_from_zero(tiny_model, bikes_frames, tmp_path):
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:16])
    first.checkpoint()
    clusters, keyframes = _ids(first, "cam")
    assert clusters and keyframes
    first.close()
    journal = tmp_path / "cam" / MANIFEST_NAME
    head, *rest = journal.read_bytes().splitlines(keepends=True)
    opened = decode_line(head)
    del opened["stream"]["first_frame_index"]  # as an older version wrote it
    journal.write_bytes(encode_line(opened) + b"".join(rest))

    second = make_engine(tiny_model, data_dir=str(tmp_path))
    second.restore_streams()
    assert second.stream("cam").first_frame_index == 0
    assert second.stream("cam").frames_ingested == 16
    _assert_held(second, "cam", clusters, keyframes)
    second.close()


def test_a_frame_index_given_out_before_a_crash_is_not_given_out_again(tiny_model, bikes_frames, tmp_path):
    """A crash loses the frames of the cluster still forming, and the stream's saved counters may be seconds old;
    the frames the restarted stream ingests must still not take the lost frames' indices, which named keyframes."""
    first = make_engine(tiny_model, data_dir=str(tmp_path))
    first.open_stream("cam", fps=4.0)
    feed(first, "cam", bikes_frames[:16])
    (lost,) = first.keyframes("cam", latest=True)  # of the cluster still forming: never written
    assert first.history.store.flush()
    state_path = tmp_path / "cam" / STATE_NAME
    state = json.loads(state_path.read_text())
    state["frames_ingested"] = 4  # as written a few seconds before the crash
    state_path.write_text(json.dumps(state))

    second = make_engine(tiny_model, data_dir=str(tmp_path))  # the crash: ``first`` is never closed
    second.restore_streams()
    assert lost.frame_index >= max(k.frame_index for c in second.clusters("cam") for k in second.keyframes(
        "cam", cluster_id=c.cluster_id))  # fmt: skip
    feed(second, "cam", bikes_frames[16:24], offset_s=100.0)
    first_new_index = second.stream("cam").next_frame_index - 8
    assert first_new_index > lost.frame_index
    with pytest.raises(UnknownKeyframeError):
        second.keyframes("cam", keyframe_ids=[lost.keyframe_id])
    second.close()
    first.close()


def test_a_reopened_stream_whose_first_reservation_was_never_written_still_numbers_on(
    tiny_model, bikes_frames, tmp_path
):
    """A crash (or a full disk) between the journal's first line and the reservation after it: the restored stream
    must still number its clusters past the deleted stream's."""
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])
    old_clusters, old_keyframes = _ids(engine, "cam")
    engine.close_stream("cam")
    engine.open_stream("cam", fps=4.0)
    engine.close()
    journal = tmp_path / "cam" / MANIFEST_NAME
    head, *_ = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(head)  # the first line alone, as if the process died right after it

    restarted = make_engine(tiny_model, data_dir=str(tmp_path))
    restarted.restore_streams()
    feed(restarted, "cam", bikes_frames[:16], offset_s=100.0)
    new_clusters, new_keyframes = _ids(restarted, "cam")
    assert new_clusters and not new_clusters & old_clusters and not new_keyframes & old_keyframes
    _assert_gone(restarted, "cam", old_clusters, old_keyframes)
    restarted.close()


def test_frames_ingested_stays_a_count_across_restarts(tiny_model, bikes_frames, tmp_path):
    """Frame indices skip past each restart's reserved block; the count GetStream shows must not follow them."""
    _kept_on_disk(tiny_model, tmp_path, bikes_frames[:8])
    second = make_engine(tiny_model, data_dir=str(tmp_path))
    second.restore_streams()
    feed(second, "cam", bikes_frames[:8], offset_s=100.0)
    assert second.stream("cam").frames_ingested == 16
    second.checkpoint()
    second.close()
    third = make_engine(tiny_model, data_dir=str(tmp_path))
    third.restore_streams()
    assert third.stream("cam").frames_ingested == 16
    third.close()


def _reservations(tmp_path, stream_id: str) -> list[dict]:
    lines = (tmp_path / stream_id / MANIFEST_NAME).read_bytes().splitlines(keepends=True)
    return [r for r in map(decode_line, lines) if r and r["op"] == "ids"]


def test_a_restored_stream_reserves_its_frame_indices_once(tiny_model, bikes_frames, tmp_path):
    """The reservation a restore writes covers the frames after it: the first ingest call after a restart writes
    (and fsyncs) no other line for the stream."""
    _kept_on_disk(tiny_model, tmp_path, bikes_frames[:8])
    second = make_engine(tiny_model, data_dir=str(tmp_path))
    second.restore_streams()
    after_restore = _reservations(tmp_path, "cam")
    feed(second, "cam", bikes_frames[:1], offset_s=100.0)
    assert _reservations(tmp_path, "cam") == after_restore
    second.close()


def test_a_reservation_that_cannot_be_written_fails_the_ingest_call_whole(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """Every id a call may give out is reserved before it changes anything: a full disk at a reservation leaves
    every stream of the call as it was, and the call goes through once the journal can be written again."""
    monkeypatch.setattr(history, "FRAME_ID_BLOCK", 1)  # a reservation at every call
    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    for stream_id in ("a", "b"):
        engine.open_stream(stream_id, fps=1.0)
    rgb = bikes_frames[0][1]
    engine.ingest([FrameInput("a", 0.0, rgb), FrameInput("b", 0.0, rgb)])
    store, disk_full = engine.history.store, {"b"}
    writable = store.reserve_ids

    def reserve_ids(stream_id, *numbers):
        if stream_id in disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return writable(stream_id, *numbers)

    monkeypatch.setattr(store, "reserve_ids", reserve_ids)
    with pytest.raises(OSError):
        engine.ingest([FrameInput("a", 1.0, rgb), FrameInput("b", 1.0, rgb)])
    assert [engine.stream(s).frames_ingested for s in ("a", "b")] == [1, 1]
    disk_full.clear()
    engine.ingest([FrameInput("a", 1.0, rgb), FrameInput("b", 1.0, rgb)])
    assert [engine.stream(s).frames_ingested for s in ("a", "b")] == [2, 2]
    engine.close()


def test_a_stream_is_deleted_on_a_full_disk_and_its_numbers_kept_in_the_room_it_left(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """Deleting streams is how an operator frees a full disk, yet keeping a deleted stream's numbers writes a file
    first: on a full disk every DeleteStream failed. The history goes first then, and the numbers are written in the
    room it left, so a stream opened again under the id still numbers past them."""
    from mosaic_core.durable import retired as retired_module

    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])
    old_clusters, old_keyframes = _ids(engine, "cam")
    history_dir = engine.history.store.stream_dir("cam")
    real_write_atomic = retired_module.write_atomic

    def full_while_the_history_is_there(path, data):
        if history_dir.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, data)

    monkeypatch.setattr(retired_module, "write_atomic", full_while_the_history_is_there)
    engine.close_stream("cam")
    assert not history_dir.exists() and "cam" not in engine.streams
    engine.close()

    again = make_engine(tiny_model, data_dir=str(tmp_path))
    try:
        assert again.restore_streams() == []
        again.open_stream("cam", fps=4.0)
        feed(again, "cam", bikes_frames[:16])
        _assert_gone(again, "cam", old_clusters, old_keyframes)
    finally:
        again.close()


def test_a_deleted_streams_numbers_are_kept_once_its_bytes_leave_a_full_disk(
    tiny_model, bikes_frames, tmp_path, monkeypatch
):
    """The test above, with a disk that stays full until the deleted history's bytes are gone: its move into the trash
    frees none, and the durable writer that empties the trash may be busy with another stream's commit (here, a
    record write held at a gate). The delete must empty it before it writes the numbers in the room it left."""
    from mosaic_core.durable import retired as retired_module
    from mosaic_core.durable.loading import TRASH
    from mosaic_core.durable.retired import StreamNumbers
    from tests.engine.test_durable_writers import WAIT_S, Gate, _seal

    engine = make_engine(tiny_model, data_dir=str(tmp_path))
    engine.open_stream("cam", fps=4.0)
    feed(engine, "cam", bikes_frames[:16])
    state = engine.stream("cam")
    ended_at = StreamNumbers(next_cluster_number=state.former.next_number, next_frame_index=state.next_frame_index)
    engine.open_stream("other", fps=4.0)
    store = engine.history.store
    history_dir, trash = store.stream_dir("cam"), store.root / TRASH
    held = Gate()
    store.submit("other", add=[_seal("other", 900, held)])
    assert held.reached.wait(WAIT_S)
    real_write_atomic = retired_module.write_atomic

    def full_while_the_history_is_on_disk(path, data):
        if history_dir.exists() or (trash.exists() and any(trash.iterdir())):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_atomic(path, data)

    monkeypatch.setattr(retired_module, "write_atomic", full_while_the_history_is_on_disk)
    try:
        engine.close_stream("cam")
    finally:
        held.open()
    try:
        assert not history_dir.exists() and "cam" not in engine.streams
        assert engine.retired.start_of("cam") == ended_at, "the deleted stream's numbers were not kept"
    finally:
        engine.close()
