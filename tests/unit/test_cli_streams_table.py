"""``mosaic streams``'s table: each stream's lag is shown as GetStream reports it."""

from __future__ import annotations

from services.cli_streams import streams_table_row
from services.gen.mosaic.v1 import mosaic_pb2 as pb


def test_a_stream_whose_first_frames_still_wait_shows_how_long_they_waited():
    """Frames arrived but none is ingested yet (an engine stuck from the stream's start): the lag is how long the
    oldest has waited, which GetStream reports whether or not a frame was ingested. A dash read as nothing waiting."""
    stats = pb.StreamStats(frames_received=32, frames_ingested=0, lag_s=42.0, ingest_queue_frames=32)
    stream = pb.Stream(stream_id="gate", fps=1.0, worker_id="0", source_state=pb.SOURCE_STATE_PUSH, stats=stats)
    assert streams_table_row(stream).split()[7] == "42.0s"


def test_a_stream_with_nothing_waiting_shows_a_lag_of_zero():
    stats = pb.StreamStats(frames_ingested=5, first_timestamp_s=0.0, last_timestamp_s=4.0)
    stream = pb.Stream(stream_id="gate", fps=1.0, worker_id="0", source_state=pb.SOURCE_STATE_PUSH, stats=stats)
    assert streams_table_row(stream).split()[7] == "0.0s"
