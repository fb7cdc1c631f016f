"""Scenario A's staging rate by part of the prefill: summed over questions, and shown beside the PCIe peak."""

from __future__ import annotations

import pytest

from mosaic_core.bench.scenario_a import _transfer_by_part
from mosaic_core.bench.scenario_a_report import _transfer_table

GB = 1e9


def test_parts_are_summed_over_the_questions_before_their_rates_are_taken():
    rows = [
        {"transfer_parts": {"choosing": (1 * GB, 0.04, 0.02, 10), "shared": (9 * GB, 0.2, 0.18, 4)}},
        {"transfer_parts": {"choosing": (1 * GB, 0.06, 0.02, 20), "shared": (9 * GB, 0.2, 0.18, 4)}},
    ]
    parts = _transfer_by_part(rows)
    expected = {"bytes_share": 0.1, "gbs": 20.0, "copy_gbs": 50.0, "copies_per_question": 15}
    assert parts["choosing"] == pytest.approx(expected)
    expected = {"bytes_share": 0.9, "gbs": 45.0, "copy_gbs": 50.0, "copies_per_question": 4}
    assert parts["shared"] == pytest.approx(expected)


def test_untimed_parts_have_no_rate_and_results_without_parts_make_no_table():
    parts = _transfer_by_part([{"transfer_parts": {"choosing": (4096, 0.0, 0.0, 2)}}, {}])
    assert parts == {"choosing": {"bytes_share": 1.0, "gbs": None, "copy_gbs": None, "copies_per_question": 1.0}}
    assert _transfer_table({"cluster": {"transfer_by_part": {}}, "old": {}}, 55.0) is None


def test_the_table_gives_each_rate_its_share_of_the_peak():
    shared = {"bytes_share": 0.9, "gbs": 44.0, "copy_gbs": 55.0, "copies_per_question": 12.4}
    _, header, rows = _transfer_table({"cluster": {"transfer_by_part": {"shared": shared}}}, 55.0)
    assert rows == [["cluster", "shared", "90.0%", "12", "44.0 (80%)", "55.0 (100%)"]]
    assert len(header) == len(rows[0])
