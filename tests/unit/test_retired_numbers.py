"""A stream id used again numbers on past the ended stream's clusters and frames, in memory and on disk."""

from __future__ import annotations

import json
import logging

import pytest

from mosaic_core.bookkeeping import ClusterFormer, FormationConfig
from mosaic_core.durable.manifest import MANIFEST_NAME, STATE_NAME, encode_line
from mosaic_core.durable.retired import RETIRED_DIR, RetiredNumbers, StreamNumbers, numbers_given_out
from mosaic_core.errors import InvalidArgumentError

ENDED = StreamNumbers(next_cluster_number=71, next_frame_index=5230)


@pytest.mark.parametrize("on_disk", [False, True], ids=["in_memory", "on_disk"])
def test_an_ended_stream_s_numbers_are_where_the_next_stream_of_its_id_starts(tmp_path, on_disk):
    retired = RetiredNumbers(tmp_path if on_disk else None)
    assert retired.start_of("cam") == StreamNumbers()
    retired.retire("cam", ENDED)
    assert retired.start_of("cam") == ENDED
    assert retired.start_of("other") == StreamNumbers()  # per stream id


def test_retiring_never_lowers_a_number(tmp_path):
    retired = RetiredNumbers(tmp_path)
    retired.retire("cam", ENDED)
    retired.retire("cam", StreamNumbers(next_cluster_number=3, next_frame_index=9000))
    expected = StreamNumbers(next_cluster_number=71, next_frame_index=9000)
    assert retired.start_of("cam") == expected
    assert RetiredNumbers(tmp_path).start_of("cam") == expected


def test_the_numbers_outlive_a_restart_in_a_hidden_folder(tmp_path):
    RetiredNumbers(tmp_path).retire("cam-1.a_b", ENDED)
    assert [p.name for p in (tmp_path / RETIRED_DIR).iterdir()] == ["cam-1.a_b.json"]
    assert RetiredNumbers(tmp_path).start_of("cam-1.a_b") == ENDED
    assert RetiredNumbers(None).start_of("cam-1.a_b") == StreamNumbers()  # nothing kept without a folder


def test_engines_sharing_the_folder_see_each_other_s_retirements(tmp_path):
    worker_0, worker_1 = RetiredNumbers(tmp_path), RetiredNumbers(tmp_path)
    assert worker_1.start_of("cam") == StreamNumbers()
    worker_0.retire("cam", ENDED)  # deleted on one worker, created again on the other
    assert worker_1.start_of("cam") == ENDED


def test_a_service_s_workers_share_the_data_folder_for_it(tmp_path):
    from services.config import load_config

    config = load_config(None, data_dir=str(tmp_path))
    engines = [config.engine_config(worker_subdir=f"worker-{i}") for i in range(2)]
    assert [e.data_dir for e in engines] == [str(tmp_path / "worker-0"), str(tmp_path / "worker-1")]
    assert {e.retired_ids_dir for e in engines} == {str(tmp_path)}


def test_a_damaged_file_starts_the_id_from_zero_and_says_so(tmp_path, caplog):
    (tmp_path / RETIRED_DIR).mkdir()
    (tmp_path / RETIRED_DIR / "cam.json").write_text('{"next_cluster_number": 7')
    with caplog.at_level(logging.ERROR):
        assert RetiredNumbers(tmp_path).start_of("cam") == StreamNumbers()
    assert "counts its clusters and frames from 0" in caplog.text


def test_a_former_numbers_its_clusters_from_its_first_number():
    former = ClusterFormer("cam", FormationConfig(max_tokens=100), first_number=71)
    decision = former.decide(timestamp_s=0.0, num_tokens=10, similarity=None, cohesion_after=None)
    assert decision.cluster_id == "cam/c000071"
    former.commit(decision, frame_index=5230, timestamp_s=0.0, num_tokens=10)
    assert former.next_number == 72
    with pytest.raises(InvalidArgumentError, match="first_number"):
        ClusterFormer("cam", first_number=-1)


def test_a_folder_set_aside_gives_its_numbers_even_where_its_journal_does_not_replay(tmp_path):
    """What a restart sets aside may be a journal this version cannot apply: each number is read where it can be,
    and what cannot be read (a field of the wrong type, a line failing its CRC) is passed over."""
    entry = {"cluster_id": "cam/c000070", "frame_indices": [5000, 5001], "position_end": None}
    lines = [
        encode_line({"op": "open", "stream": {"stream_id": "cam", "first_frame_index": 10, "first_cluster_number": 2}}),
        encode_line({"op": "commit", "add": [entry, "not an entry"], "remove": []}),
        encode_line({"op": "ids", "next": "many", "frames": 4096}),
        encode_line({"op": "ids", "next": 9999, "frames": 9999}).replace(b"9999,", b"99999,", 1),  # fails its CRC
    ]
    (tmp_path / MANIFEST_NAME).write_bytes(b"".join(lines))
    (tmp_path / STATE_NAME).write_text(json.dumps({"frames_ingested": 5000}))
    (tmp_path / "c000080.mkv").write_bytes(b"")  # a record whose line the journal lost
    assert numbers_given_out(tmp_path) == StreamNumbers(next_cluster_number=81, next_frame_index=5010)


def test_the_hidden_folder_is_synced_into_its_parent_before_the_first_numbers_go_in(tmp_path, synced_dirs):
    """A power cut after the first retirement must not lose the folder its file is in: the data folder's entry for
    it is synced once, as it is made."""
    synced = synced_dirs
    retired = RetiredNumbers(tmp_path)
    retired.retire("cam", ENDED)
    hidden = str(tmp_path / RETIRED_DIR)
    assert synced == [str(tmp_path), hidden]  # the folder's entry, then the file's
    retired.retire("other", ENDED)
    assert synced[2:] == [hidden]  # the folder exists: only the file's entry
