"""The router's delete of a stream whose worker is gone for good, on the real filesystem: the history a real
``DurableStore`` left in the worker's folder goes, its numbers retired in the shared folder first, and where the router
cannot see the folder nothing is deleted and the sentence says why (the Ray side: tests/e2e/test_e2e_gone_worker.py).
"""

from __future__ import annotations

import grpc
import pytest

from mosaic_core.durable.loading import TRASH
from mosaic_core.durable.retired import RetiredNumbers, StreamNumbers
from mosaic_core.durable.store import DurableStore
from mosaic_core.errors import StateError
from services.errors import HistoryNotDeletedError, status_for
from services.gone_workers import delete_history_of_gone_worker, unreachable_error


def _left_behind(data_dir, worker: int, stream_id: str, *, next_number: int, next_frame_index: int) -> None:
    """A stream's history as a worker leaves it when it dies: made, its numbers reserved, never deleted."""
    store = DurableStore(data_dir / f"worker-{worker}", retired=RetiredNumbers(data_dir))
    try:
        store.create_stream(stream_id, {"fps": 2.0})
        store.reserve_ids(stream_id, next_number, next_frame_index)
    finally:
        store.close()


def test_a_gone_workers_history_is_deleted_and_its_numbers_kept_for_the_id(tmp_path):
    _left_behind(tmp_path, 1, "cam", next_number=7, next_frame_index=30)
    _left_behind(tmp_path, 1, "other", next_number=2, next_frame_index=5)

    assert delete_history_of_gone_worker(str(tmp_path), 1, "cam") == 0
    assert not (tmp_path / "worker-1" / "cam").exists()
    assert RetiredNumbers(tmp_path).start_of("cam") == StreamNumbers(next_cluster_number=7, next_frame_index=30)
    assert delete_history_of_gone_worker(str(tmp_path), 1, "cam") == 0  # a retry finds it deleted already

    restarted = DurableStore(tmp_path / "worker-1", retired=RetiredNumbers(tmp_path))
    try:
        assert [s.stream_id for s in restarted.load_streams()] == ["other"]  # the deleted stream stays gone
    finally:
        restarted.close()


def test_a_history_this_process_cannot_see_is_not_deleted_and_the_sentence_says_why(tmp_path):
    _left_behind(tmp_path, 0, "cam", next_number=3, next_frame_index=9)

    with pytest.raises(StateError) as refused:
        delete_history_of_gone_worker(str(tmp_path), 1, "cam")  # worker 1's folder is not on this machine
    assert "worker-1/ of the data directory" in str(refused.value) and "not on this machine" in str(refused.value)
    status = status_for(unreachable_error("cam", 1, [f"router: {refused.value}"]))
    assert status.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "'cam' was not deleted" in status.message and "neither by this router nor by a live worker" in status.message
    assert "not on this machine" in status.message and "Restart the server" in status.message
    assert str(tmp_path) not in status.message  # the host's paths stay in the server's log
    assert (tmp_path / "worker-0" / "cam").is_dir()
    assert RetiredNumbers(tmp_path).start_of("cam") == StreamNumbers()
    with pytest.raises(StateError):
        delete_history_of_gone_worker(None, 0, "cam")  # no data directory at all


def test_a_history_the_disk_fails_to_delete_is_kept_whole_the_sentence_names_no_path_and_a_retry_deletes_it(tmp_path):
    _left_behind(tmp_path, 1, "cam", next_number=4, next_frame_index=12)
    trash = tmp_path / "worker-1" / TRASH
    trash.write_bytes(b"")  # a file where the trash folder goes: the move into it fails, as on a failing volume

    with pytest.raises(HistoryNotDeletedError) as refused:
        delete_history_of_gone_worker(str(tmp_path), 1, "cam")
    status = status_for(refused.value)
    assert status.code is grpc.StatusCode.INTERNAL
    assert "'cam' was not deleted" in status.message and "could not be deleted from the disk" in status.message
    assert "retry DeleteStream once the volume is fixed" in status.message
    assert str(tmp_path) not in status.message
    assert (tmp_path / "worker-1" / "cam").is_dir()

    trash.unlink()  # the volume is fixed
    assert delete_history_of_gone_worker(str(tmp_path), 1, "cam") == 0
    assert not (tmp_path / "worker-1" / "cam").exists()
    assert RetiredNumbers(tmp_path).start_of("cam") == StreamNumbers(next_cluster_number=4, next_frame_index=12)
