"""A deleted stream's totals stay gone: a frame a source thread counts just after the delete is not counted."""

from __future__ import annotations

from services.telemetry import StreamTotals, WorkerTelemetry


def _drained(telemetry: WorkerTelemetry):
    return telemetry.drain(queue_depths={}, lags_s={}, engine_stats=None)


def test_frames_of_a_deleted_stream_still_on_their_way_are_not_counted():
    telemetry = WorkerTelemetry("0")
    telemetry.opened("cam")
    telemetry.received("cam")
    telemetry.forget("cam")
    _drained(telemetry)

    telemetry.received("cam")  # the source thread's last frame, counted after the delete
    telemetry.dropped("cam", "stream_deleted")
    telemetry.ingested_batch({"cam": 1, "other": 2}, [0.1], forward_passes=1)

    assert telemetry.totals("cam") == StreamTotals()
    assert "cam" not in telemetry._totals
    delta = _drained(telemetry)
    assert (delta.received, delta.dropped, delta.ingested) == ({}, {}, {"other": 2})


def test_a_stream_opened_again_under_a_deleted_ones_id_counts_from_its_opening():
    telemetry = WorkerTelemetry("0")
    telemetry.received("cam", 3)
    telemetry.forget("cam")
    _drained(telemetry)  # the deleted stream's last counts
    telemetry.opened("cam")

    telemetry.received("cam")

    assert telemetry.totals("cam").received == 1
    assert _drained(telemetry).received == {"cam": 1}
