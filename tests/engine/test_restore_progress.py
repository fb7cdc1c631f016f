"""A restart's restore says how far it has come while it runs, and sums up what came back and what did not: with
hundreds of streams it takes minutes, and a silent log reads as a hung worker."""

from __future__ import annotations

import logging
import re
import shutil

import pytest

from mosaic_core.durable import progress
from tests.engine.engine_helpers import durable_streams, make_engine


@pytest.fixture(scope="module")
def three_streams(tiny_model, bikes_frames, tmp_path_factory):
    """A data directory with streams "a", "b" and "c", 16 frames each, sealed and durable (copied per test)."""
    return durable_streams(tiny_model, bikes_frames, tmp_path_factory.mktemp("three_streams"), ("a", "b", "c"))


@pytest.fixture
def data_dir(three_streams, tmp_path):
    shutil.copytree(three_streams, tmp_path / "data")
    (tmp_path / "data" / "broken").mkdir()  # a folder with no journal: set aside
    return tmp_path / "data"


def _restore(tiny_model, data_dir, caplog):
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        with caplog.at_level(logging.INFO, logger="mosaic_core"):
            restored = engine.restore_streams()
        return restored, engine.history.ledger.total_bytes
    finally:
        engine.close()


def test_each_pass_of_a_restore_logs_how_far_it_has_come(tiny_model, data_dir, caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)  # a line at every stream but the last of a pass
    restored, _ = _restore(tiny_model, data_dir, caplog)
    lines = [r.getMessage() for r in caplog.records if r.name == "mosaic_core.durable.progress"]
    reading = [line for line in lines if "reading streams" in line]
    reopening = [line for line in lines if "reopening streams" in line]
    # four folders read ("broken" among them, set aside), three streams reopened
    assert [re.search(r"(\d+ of \d+) done", line)[1] for line in reading] == ["1 of 4", "2 of 4", "3 of 4"]
    assert [re.search(r"(\d+ of \d+) done", line)[1] for line in reopening] == ["1 of 3", "2 of 3"]
    per_stream = restored[0].num_clusters
    assert per_stream > 0 and f"with {2 * per_stream} cluster records" in reopening[-1]


def test_a_restore_ends_with_a_summary_of_what_came_back_and_what_did_not(tiny_model, data_dir, caplog):
    restored, num_bytes = _restore(tiny_model, data_dir, caplog)
    assert [r.stream_id for r in restored] == ["a", "b", "c"]
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restored ")]
    num_clusters = sum(r.num_clusters for r in restored)
    size = progress.size_text(num_bytes)
    assert summary.startswith(f"restored 3 streams with {num_clusters} sealed clusters ({size} of records) in ")
    assert "0 streams left on disk unserved, 1 stream and 0 cluster records set aside" in summary
    # the default interval: a restore this quick logs no progress line, only its summary
    assert not [r for r in caplog.records if r.name == "mosaic_core.durable.progress"]


def test_a_restores_observer_sees_every_step_of_both_passes(tiny_model, data_dir):
    seen = []
    engine = make_engine(tiny_model, data_dir=str(data_dir))
    try:
        engine.restore_streams(on_progress=lambda p: seen.append((p.doing, p.num_done, p.num_streams)))
    finally:
        engine.close()
    # four folders read ("broken" among them), three streams reopened; each pass told as it begins, then per stream
    assert seen == [("reading streams", i, 4) for i in range(5)] + [("reopening streams", i, 3) for i in range(4)]
