"""Admission by compute: a worker admits streams while their fps add up to less than its measured rate."""

from __future__ import annotations

import pytest

from mosaic_core.errors import CapacityError
from services.admission import IngestCapacity, check_admission


def test_capacity_is_the_best_batch_size_measured_enough_and_unknown_before_any():
    capacity = IngestCapacity(window=5, min_calls=3)
    capacity.observe(1, 0.5)  # 2 frames/s alone
    capacity.observe(8, 0.8)  # 10 frames/s in batches of 8
    capacity.observe(8, 1.6)  # a slower pass of 8
    assert capacity.frames_per_s() is None  # no batch size measured three times yet
    for _ in range(2):
        capacity.observe(1, 0.5)
    assert capacity.frames_per_s() == pytest.approx(2.0)
    capacity.observe(8, 1.0)  # 8 frames/s: the median of 10, 5 and 8
    assert capacity.frames_per_s() == pytest.approx(8.0)
    capacity.observe(0, 1.0)  # an empty pass says nothing
    assert capacity.frames_per_s() == pytest.approx(8.0)


def test_one_call_timed_short_does_not_overstate_the_capacity():
    """A call whose time went nearly all to questions (not counted as ingest) looks a hundred times faster."""
    capacity = IngestCapacity()
    for seconds in (0.1, 0.001, 0.1, 0.1):
        capacity.observe(8, seconds)
    assert capacity.frames_per_s() == pytest.approx(80.0)


@pytest.mark.parametrize(
    ("capacity_fps", "offered", "new", "headroom", "admitted"),
    [
        (None, 100.0, 5.0, 0.8, True),  # not measured yet
        (10.0, 6.0, 2.0, 0.8, True),  # 8 of 8 allowed
        (10.0, 6.0, 2.5, 0.8, False),
        (10.0, 60.0, 5.0, 0.0, True),  # admission off
    ],
)
def test_admission(capacity_fps, offered, new, headroom, admitted):
    def admit():
        check_admission(capacity_fps, offered_fps=offered, new_fps=new, headroom=headroom, worker_id="0",
                        stream_id="cam")  # fmt: skip

    if admitted:
        admit()
    else:
        with pytest.raises(CapacityError, match=r"ingests about 10\.0 frames/s") as refused:
            admit()
        assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"
