"""The record ledger behind the history budget: totals, and the records sealed first, first."""

from __future__ import annotations

from mosaic_core.engine.record_ledger import RecordLedger


def _ledger(*items) -> RecordLedger:
    ledger = RecordLedger()
    for stream_id, cluster_id, sealed_unix_s, num_bytes in items:
        ledger.add(stream_id, cluster_id, sealed_unix_s=sealed_unix_s, num_bytes=num_bytes)
    return ledger


def test_the_oldest_records_across_streams_bring_the_total_under_the_limit():
    ledger = _ledger(("a", "a/1", 3.0, 10), ("b", "b/1", 1.0, 10), ("a", "a/2", 5.0, 10), ("b", "b/2", 4.0, 10))
    assert ledger.total_bytes == 40
    assert ledger.oldest_over(25, lambda s, c: True) == [("b", "b/1"), ("a", "a/1")]
    assert ledger.total_bytes == 40, "choosing takes nothing out"
    assert ledger.oldest_over(40, lambda s, c: True) == []


def test_a_refused_record_stays_and_the_next_oldest_goes_instead():
    ledger = _ledger(("a", "a/1", 1.0, 10), ("a", "a/2", 2.0, 10), ("a", "a/3", 3.0, 10))
    assert ledger.oldest_over(25, lambda s, c: c != "a/1") == [("a", "a/2")]
    ledger.remove(["a/2"])
    assert ledger.oldest_over(0, lambda s, c: True) == [("a", "a/1"), ("a", "a/3")]


def test_a_record_written_again_counts_once_at_its_new_age():
    ledger = _ledger(("a", "a/1", 1.0, 10), ("a", "a/2", 2.0, 10))
    ledger.add("a", "a/1", sealed_unix_s=9.0, num_bytes=30)  # merged under its id, later and larger
    assert ledger.total_bytes == 40 and len(ledger) == 2
    assert ledger.oldest_over(30, lambda s, c: True) == [("a", "a/2")]


def test_a_forgotten_stream_leaves_the_others():
    ledger = _ledger(("a", "a/1", 1.0, 10), ("b", "b/1", 2.0, 7))
    ledger.forget_stream("a")
    assert ledger.total_bytes == 7 and "a/1" not in ledger and "b/1" in ledger
    assert ledger.oldest_over(0, lambda s, c: True) == [("b", "b/1")]


def test_the_heap_stays_bounded_as_records_come_and_go():
    """Removed records' items leave the heap too, even when no budget ever asks for the oldest."""
    ledger = RecordLedger()
    for n in range(10_000):
        ledger.add("a", f"a/{n}", sealed_unix_s=float(n), num_bytes=1)
        if n >= 6:
            ledger.remove([f"a/{n - 6}"])
    assert len(ledger) == 6 and ledger.total_bytes == 6
    assert len(ledger._by_age) <= 2 * 6 + 64
    assert ledger.oldest_over(3, lambda s, c: True) == [("a", f"a/{n}") for n in range(9994, 9997)]
